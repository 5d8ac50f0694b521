-- Feeds that never harm the app's tables; who may change them; an explicit source switch.
--
-- Why it looks like this:
-- * A feed's per-row version lives in a column of its own, `streamer_version` (bigint, so a
--   transaction id x 1024 never overflows it), marked as the feed's by a comment. An app's
--   own `version` column is the app's: never written, never sent (events carry the feed's
--   version under "version"). Any other column named streamer_version is an error, never
--   taken over. A side table was the other choice: it would cost every writer a second row
--   write per change; a column costs nothing beyond the stamp. `disable_feed` drops it.
-- * The previous releases added `version bigint not null default 0` themselves: such a
--   column is renamed, its values (and so every cursor) kept. A `version` of any other
--   shape was the app's, wrongly stamped by them: it is left to the app, and the feed's
--   horizon moves past now, so a cursor from before gets a reset instead of a gap.
-- * enable_feed and disable_feed are for the service role (the owner of schema streamer,
--   which ran `streamer migrate`), and it must have the table owner's rights (own it, or be
--   a member of its owner): checked first, in one line. Enabling a feed twice needs
--   `replace => true`. No NOTICE reaches the caller.
-- * use_source checks the server before it writes anything, and tells every running
--   service on both ways (NOTIFY and the WAL): a process reading the other source learns at
--   once that it is deaf now (it ends its streams and is unready).

create or replace function streamer.version_comment() returns text
language sql immutable as $$select 'streamer: the feed''s row version; dropped by streamer.disable_feed'$$;

-- Whether the caller may enable or disable a feed of `tbl`: an error in one line if not.
create or replace function streamer.may_change_feed(tbl regclass, what text) returns void
language plpgsql as $may$
declare
    schema_owner name := (select n.nspowner::regrole::text from pg_namespace n where n.nspname = 'streamer');
    table_owner name := (select c.relowner::regrole::text from pg_class c where c.oid = tbl);
begin
    if not pg_has_role(current_user, schema_owner, 'USAGE') then
        raise exception using errcode = 'insufficient_privilege', message = format(
            'streamer: %s is for the service role %s (the owner of schema streamer), not %s: connect as %s',
            what, schema_owner, current_user, schema_owner);
    end if;
    if not pg_has_role(current_user, table_owner, 'USAGE') then
        raise exception using errcode = 'insufficient_privilege', message = format(
            'streamer: %s(%s) needs the rights of its owner %s: `grant %s to %s` (as a superuser, or a role with admin option on %s)',
            what, tbl, table_owner, table_owner, current_user, table_owner);
    end if;
end
$may$;

drop function if exists streamer.enable_feed(regclass, text, text, text, text[]);

-- Turn a table with a primary key `id` (uuid, an integer or text) and an owner column (uuid
-- or text) into a feed. Changing an existing feed's settings needs `replace => true`.
create or replace function streamer.enable_feed(
    tbl regclass,
    owner_column text,
    event text default null,
    terminal text default null,
    columns text[] default null,
    replace boolean default false
) returns void
language plpgsql set client_min_messages = warning as $enable$
declare
    feed_name text := (select c.relname from pg_class c where c.oid = tbl);
    id_type text;
    owner_type text;
    pk_ok boolean;
    missing text;
    row_json text;  -- the row as sent, an expression over __row__, the row's to_jsonb
    is_terminal text;
    declared text;  -- the terminal's variables, for checking it
    caller_path text := current_setting('search_path');
    signed text := 'encode(sha256(streamer.signing_opad() || sha256(streamer.signing_ipad() || convert_to(body, ''UTF8''))), ''hex'')';
    via_wal boolean := (select c.source = 'wal' from streamer.config c);
    -- How a signed payload leaves: a logical message has no size limit, a NOTIFY has 8000 bytes.
    send text := format(case when via_wal then 'pg_logical_emit_message(true, ''streamer'', %s)'
                             else 'pg_notify(''streamer'', %s)' end, signed || ' || body');
    too_big text := case when via_wal then 'false' else 'octet_length(body) > 7900' end;
    existing streamer.feeds;
begin
    perform streamer.may_change_feed(tbl, 'enable_feed');
    if exists (select from streamer.feeds f where f.name = feed_name and f.tbl <> enable_feed.tbl) then
        raise exception 'streamer: a feed named % exists already, of table %: a feed is named after its table',
            feed_name, (select f.tbl from streamer.feeds f where f.name = feed_name);
    end if;
    select * into existing from streamer.feeds f where f.tbl = enable_feed.tbl;
    if feed_name !~ '^[a-z_][a-z0-9_]*$' then
        raise exception 'streamer: a feed''s table name must be lower-case letters, digits and _ (it names the route /api/%/events)', feed_name;
    end if;
    select format_type(a.atttypid, null) into id_type
    from pg_attribute a where a.attrelid = tbl and a.attname = 'id' and not a.attisdropped;
    select exists (
        select from pg_index i join pg_attribute a on a.attrelid = i.indrelid
        where i.indrelid = tbl and i.indisprimary and i.indnatts = 1
          and a.attnum = i.indkey[0] and a.attname = 'id'
    ) into pk_ok;
    if not pk_ok then
        raise exception 'streamer: % needs a primary key column "id"', tbl;
    end if;
    id_type := case id_type
        when 'uuid' then 'uuid'
        when 'bigint' then 'bigint' when 'integer' then 'bigint' when 'smallint' then 'bigint'
        when 'text' then 'text' when 'character varying' then 'text'
    end;
    if id_type is null then
        raise exception 'streamer: the id of % must be uuid, an integer (bigint, integer, smallint) or text (text, varchar)', tbl;
    end if;
    select format_type(a.atttypid, null) into owner_type
    from pg_attribute a
    where a.attrelid = tbl and a.attname = enable_feed.owner_column and not a.attisdropped;
    owner_type := case owner_type
        when 'uuid' then 'uuid' when 'text' then 'text' when 'character varying' then 'text'
    end;
    if owner_type is null then
        raise exception 'streamer: % needs an owner column "%" of type uuid or text', tbl, owner_column;
    end if;
    event := coalesce(event, feed_name);
    if event !~ '^[a-z][a-z0-9_]*$' then
        raise exception 'streamer: event must be lower-case letters, digits and _, not %', event;
    end if;
    if owner_column in ('id', 'streamer_version') then
        raise exception 'streamer: the owner column of % cannot be %', tbl, owner_column;
    end if;
    -- The feed's own bookkeeping: a column no app would name so, never an app's `version`.
    if exists (select from pg_attribute a where a.attrelid = tbl and a.attname = 'streamer_version'
               and not a.attisdropped)
       and coalesce(col_description(tbl, (select a.attnum from pg_attribute a
               where a.attrelid = tbl and a.attname = 'streamer_version')), '') <> streamer.version_comment()
    then
        raise exception 'streamer: % already has a column streamer_version that is not the feed''s: rename it first', tbl;
    end if;
    if columns is not null then
        if 'version' = any(columns) or 'streamer_version' = any(columns) then
            raise exception 'streamer: columns cannot list % of %: every event carries the feed''s own "version"',
                case when 'version' = any(columns) then 'version' else 'streamer_version' end, tbl;
        end if;
        select string_agg(quote_literal(c), ', ') into missing
        from unnest(columns) c
        where not exists (
            select from pg_attribute a
            where a.attrelid = tbl and a.attname = c and a.attnum > 0 and not a.attisdropped);
        if missing is not null then
            raise exception 'streamer: % has no column %', tbl, missing;
        end if;
        -- Every event carries the row's id and the feed's version, whatever else is listed.
        select 'jsonb_build_object(' || string_agg(format('%L, __row__->%L', c, c), ', ' order by n)
                || ', ''version'', __row__->''streamer_version'')',
            array_agg(c order by n)
        into row_json, columns
        from (
            select c, min(n) n
            from unnest('{id}' || columns) with ordinality u(c, n) group by c
        ) s;
    else
        -- Every column but the owner; an app's own `version` is the app's and is not sent.
        row_json := format(
            '((__row__ - %L - ''version'' - ''streamer_version'') || jsonb_build_object(''version'', __row__->''streamer_version''))',
            owner_column);
    end if;
    if terminal is not null then
        -- The expression names columns bare: in the trigger they become variables of an
        -- inner block, so it is evaluated as a plain expression (a subquery over `new`
        -- would cost every writer a trip through the executor).
        select string_agg(format('%I %s := new.%I;', a.attname,
                                 format_type(a.atttypid, a.atttypmod), a.attname), ' '),
            string_agg(format('%I %s;', a.attname, format_type(a.atttypid, a.atttypmod)), ' ')
        into is_terminal, declared
        from pg_attribute a
        where a.attrelid = tbl and a.attnum > 0 and not a.attisdropped
          and position(a.attname in enable_feed.terminal) > 0;
        -- Checked here as the trigger evaluates it (those variables, its search_path), so a
        -- mistake is an error now and not in every writer's statement: a qualified column
        -- (jobs.status) or a text column cast to boolean compile in a query over the table
        -- and fail in the trigger.
        begin
            perform set_config('search_path', 'pg_catalog, pg_temp', true);
            execute format('do %L', format(
                'declare %s begin if pg_typeof((%s)) <> ''boolean''::regtype then '
                'raise exception ''it is of type %%, not boolean'', pg_typeof((%s)); end if; end',
                coalesce(declared, ''), terminal, terminal));
            perform set_config('search_path', caller_path, true);
        exception when others then
            raise exception 'streamer: terminal (%) must be a condition over the columns of %: %',
                terminal, tbl, sqlerrm;
        end;
        is_terminal := format(
            'declare %s begin streamer_notify.ended := coalesce((%s)::boolean, false); end;',
            coalesce(is_terminal, ''), terminal);
    else
        is_terminal := '';
    end if;

    if existing.name is not null and not replace then
        if (existing.owner_column, existing.event, existing.terminal, existing.columns)
                is not distinct from (owner_column, event, terminal, columns) then
            return;  -- as it is already: nothing to do
        end if;
        raise exception 'streamer: % is a feed already (event %, owner column %): enable_feed(..., replace => true) changes its settings',
            tbl, existing.event, existing.owner_column;
    end if;
    if not exists (select from pg_attribute a where a.attrelid = tbl
                   and a.attname = 'streamer_version' and not a.attisdropped) then
        -- A constant default: no table rewrite, existing rows start at 0.
        execute format('alter table %s add column streamer_version bigint not null default 0', tbl);
        execute format('comment on column %s.streamer_version is %L', tbl, streamer.version_comment());
    end if;
    insert into streamer.horizon (feed) values (feed_name) on conflict do nothing;
    insert into streamer.feeds as f (name, tbl, owner_column, owner_type, id_type, event, terminal, columns)
    values (feed_name, tbl, owner_column, owner_type, id_type, event, terminal, columns)
    on conflict (name) do update set
        tbl = excluded.tbl, owner_column = excluded.owner_column, owner_type = excluded.owner_type,
        id_type = excluded.id_type, event = excluded.event, terminal = excluded.terminal,
        columns = excluded.columns;

    -- The row as a stream sends it, for snapshots and rows too big to travel in NOTIFY.
    -- Plain enough for Postgres to inline it into the service's queries (no SET clause: the
    -- service's sessions render time stamps in UTC themselves), which halves what a
    -- 200,000-row snapshot costs the server.
    execute format($f$
        create or replace function streamer.%1$I(r %2$s) returns text
        language sql stable as %3$L
    $f$, feed_name || '_row', tbl,
        format('select (%s)::text', replace(row_json, '__row__', 'to_jsonb(r)')));

    -- Needs nothing of schema streamer: a writer runs it with its own rights.
    execute format($f$
        create or replace function streamer.%1$I() returns trigger
        language plpgsql as $body$
        begin
            if tg_op = 'INSERT' then
                new.streamer_version := txid_current() * 1024;
            else
                new.streamer_version := greatest(old.streamer_version + 1, txid_current() * 1024);
            end if;
            return new;
        end
        $body$
    $f$, feed_name || '_stamp');

    -- Writers pay for every line below on every row they change: each step is one plpgsql
    -- expression, and the row is rendered once.
    execute format($f$
        create or replace function streamer.%1$I() returns trigger
        language plpgsql security definer set search_path = pg_catalog, pg_temp
        set timezone = 'UTC' as $body$
        <<streamer_notify>>
        declare
            ended boolean := false;
            xid bigint := txid_current();
            tail text := ',"x":' || xid || ',"m":' || txid_snapshot_xmin(txid_current_snapshot())
                || ',"t":' || extract(epoch from clock_timestamp());
            gone_version bigint;
            body text;
            j jsonb;
        begin
            if tg_op = 'DELETE' or new.%3$I is null then
                -- A row deleted, or left with no owner: gone for its owner, if it had one.
                if tg_op = 'INSERT' or old.%3$I is null then
                    return null;
                end if;
                gone_version := case tg_op when 'DELETE' then greatest(old.streamer_version + 1, xid * 1024)
                                else new.streamer_version end;
                insert into streamer.tombstones as t (feed, owner_id, row_id, version)
                values (%2$L, old.%3$I::text, old.id::text, gone_version)
                on conflict (feed, owner_id, row_id)
                do update set version = excluded.version, deleted_at = now();
                body := '{"f":' || %4$L || ',"o":"d","id":' || to_json(old.id) || ',"u":'
                    || to_json(old.%3$I::text) || ',"v":' || gone_version || tail || '}';
            else
                %5$s
                body := '{"f":' || %4$L || ',"o":"u","id":' || to_json(new.id) || ',"u":'
                    || to_json(new.%3$I::text) || ',"v":' || new.streamer_version || tail
                    || ',"e":' || ended;
                if tg_op = 'UPDATE' and new.%3$I is distinct from old.%3$I
                        and old.%3$I is not null then
                    insert into streamer.tombstones as t (feed, owner_id, row_id, version)
                    values (%2$L, old.%3$I::text, old.id::text, new.streamer_version)
                    on conflict (feed, owner_id, row_id)
                    do update set version = excluded.version, deleted_at = now();
                    body := body || ',"ou":' || to_json(old.%3$I::text);
                end if;
                j := to_jsonb(new);
                body := body || '}' || chr(10) || (%6$s)::text;
                if %8$s then
                    -- Too big for NOTIFY (8000 bytes): the envelope alone; the row is read back.
                    body := split_part(body, chr(10), 1);
                end if;
            end if;
            perform %7$s;
            return null;
        end
        $body$
    $f$, feed_name || '_notify', feed_name, owner_column, to_json(feed_name)::text,
        is_terminal, replace(row_json, '__row__', 'j'), send, too_big);

    execute format($f$
        create or replace function streamer.%1$I() returns trigger
        language plpgsql security definer set search_path = pg_catalog, pg_temp as $body$
        declare
            xid bigint := txid_current();
            body text := '{"f":' || %2$L || ',"o":"t","x":' || xid || ',"m":'
                || txid_snapshot_xmin(txid_current_snapshot())
                || ',"t":' || extract(epoch from clock_timestamp()) || '}';
        begin
            -- Every cursor from before this transaction must now get a reset.
            update streamer.horizon h set pruned_below = greatest(h.pruned_below, (xid + 1) * 1024)
            where h.feed = %3$L;
            delete from streamer.tombstones t where t.feed = %3$L and t.version < (xid + 1) * 1024;
            perform %4$s;
            return null;
        end
        $body$
    $f$, feed_name || '_truncate', to_json(feed_name)::text, feed_name, send);

    execute format('revoke all on function streamer.%I() from public', feed_name || '_notify');
    execute format('revoke all on function streamer.%I() from public', feed_name || '_truncate');
    execute format('revoke all on function streamer.%I(%s) from public', feed_name || '_row', tbl);

    execute format('drop trigger if exists streamer_stamp on %s', tbl);
    execute format(
        'create trigger streamer_stamp before insert or update on %s '
        'for each row execute function streamer.%I()', tbl, feed_name || '_stamp');
    execute format('drop trigger if exists streamer_notify on %s', tbl);
    execute format(
        'create trigger streamer_notify after insert or update or delete on %s '
        'for each row execute function streamer.%I()', tbl, feed_name || '_notify');
    execute format('drop trigger if exists streamer_truncate on %s', tbl);
    execute format(
        'create trigger streamer_truncate after truncate on %s '
        'for each statement execute function streamer.%I()', tbl, feed_name || '_truncate');
    -- A running service picks the feed_name up on this signal, or within seconds when it polls.
    perform streamer.feeds_changed();
end
$enable$;


-- enable_feed('jobs', ...) with the table's name as text, resolved in the caller's search
-- path. Postgres prefers this form for a quoted name, so that a second run of the released
-- 003_feeds.sql (which defines the first form again beside this one) is not ambiguous.
create or replace function streamer.enable_feed(
    tbl text,
    owner_column text,
    event text default null,
    terminal text default null,
    columns text[] default null,
    replace boolean default false
) returns void
language sql as $$
    select streamer.enable_feed(tbl::regclass, owner_column => owner_column, event => event,
                                terminal => terminal, columns => columns, replace => replace)
$$;

-- Remove a feed: its triggers, functions and version column go, its routes 404, its open
-- streams end.
create or replace function streamer.disable_feed(tbl regclass) returns void
language plpgsql set client_min_messages = warning as $disable$
declare
    feed_name text := (select f.name from streamer.feeds f where f.tbl = disable_feed.tbl);
begin
    if feed_name is null then
        raise exception 'streamer: % is not a feed', tbl;
    end if;
    perform streamer.may_change_feed(tbl, 'disable_feed');
    execute format('drop trigger if exists streamer_stamp on %s', tbl);
    execute format('drop trigger if exists streamer_notify on %s', tbl);
    execute format('drop trigger if exists streamer_truncate on %s', tbl);
    execute format('drop function if exists streamer.%I()', feed_name || '_stamp');
    execute format('drop function if exists streamer.%I()', feed_name || '_notify');
    execute format('drop function if exists streamer.%I()', feed_name || '_truncate');
    execute format('drop function if exists streamer.%I(%s)', feed_name || '_row', tbl);
    if coalesce(col_description(tbl, (select a.attnum from pg_attribute a where a.attrelid = tbl
            and a.attname = 'streamer_version' and not a.attisdropped)), '') = streamer.version_comment() then
        execute format('alter table %s drop column streamer_version', tbl);
    end if;
    delete from streamer.feeds f where f.name = feed_name;
    delete from streamer.tombstones t where t.feed = feed_name;
    -- Changes made while the feed is off leave no trace (no version, no tombstone): should
    -- it come back, a cursor from before now gets a reset, never a silent gap.
    update streamer.horizon h set pruned_below = greatest(h.pruned_below, (txid_current() + 1) * 1024)
    where h.feed = feed_name;
    -- The service drops the feed on this signal, or within seconds when it polls.
    perform streamer.feeds_changed();
end
$disable$;

-- The change source: every check first, then the switch, then both ways told.
create or replace function streamer.use_source(source text) returns void
language plpgsql set client_min_messages = warning as $use$
declare
    feed record;
    logical boolean := current_setting('wal_level') = 'logical';
begin
    if source is null or source not in ('notify', 'wal') then
        raise exception 'streamer: the source is notify or wal, not %', source;
    end if;
    if source = 'wal' and not logical then
        raise exception 'streamer: the wal source needs wal_level = logical (the server has %): set it and restart Postgres',
            current_setting('wal_level');
    end if;
    if source = 'wal' and not exists (select from pg_roles r where r.rolname = current_user
                                      and (r.rolreplication or r.rolsuper)) then
        raise exception 'streamer: the wal source needs a role that may replicate: alter role % replication', current_user;
    end if;
    if source = 'wal' and not exists (select from pg_publication p where p.pubname = 'streamer') then
        create publication streamer;
    end if;
    if (select c.source from streamer.config c) = use_source.source then
        return;
    end if;
    update streamer.config set source = use_source.source;
    for feed in select f.tbl, f.owner_column, f.event, f.terminal, f.columns from streamer.feeds f loop
        perform streamer.enable_feed(feed.tbl, feed.owner_column, feed.event, feed.terminal,
                                     feed.columns, replace => true);
    end loop;
    -- Services reading either way hear of it at once: those reading the other one are deaf now.
    perform pg_notify('streamer', '');
    if logical then
        perform pg_logical_emit_message(true, 'streamer', '');
    end if;
end
$use$;

-- The feeds of the previous releases move to the new column and the new triggers.
do $upgrade$
declare
    f record;
    old record;
begin
    for f in select * from streamer.feeds loop
        select a.atttypid = 'bigint'::regtype and a.attnotnull
               and pg_get_expr(d.adbin, d.adrelid) = '0' as added_by_us
        into old
        from pg_attribute a
        left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
        where a.attrelid = f.tbl and a.attname = 'version' and not a.attisdropped;
        if found and old.added_by_us and not exists (
            select from pg_attribute a
            where a.attrelid = f.tbl and a.attname = 'streamer_version' and not a.attisdropped
        ) then
            execute format('alter table %s rename column version to streamer_version', f.tbl);
            execute format('comment on column %s.streamer_version is %L', f.tbl, streamer.version_comment());
        elsif found then
            update streamer.horizon h
            set pruned_below = greatest(h.pruned_below, (txid_current() + 1) * 1024)
            where h.feed = f.name;
        end if;
        perform streamer.enable_feed(f.tbl, f.owner_column, f.event, f.terminal,
                                     array_remove(f.columns, 'version'), replace => true);
    end loop;
end
$upgrade$;
