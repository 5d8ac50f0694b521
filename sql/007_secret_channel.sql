-- The feeds' notifications travel on a secret channel instead of being signed row by row.
--
-- Why it looks like this:
-- * Only the feed's own triggers may make a user see a change, and any role that can
--   connect may NOTIFY, and LISTEN, on any channel it can name. Until now every payload was
--   signed with an HMAC-SHA256 in plpgsql (two SHA-256 over the payload, per row changed),
--   which cost a writer about half of a bare NOTIFY's throughput, and anyone could LISTEN
--   on `streamer` and read every user's rows as they changed. Now the channel's name is the
--   secret: `streamer_` and 40 hex digits derived from `streamer.signing_key`, which only
--   this schema's owner (the service's role) can read. A role without it can neither send a
--   change the service reads nor LISTEN to one, and the triggers hash nothing.
-- * The name never appears where other roles look: `streamer.channel()` is IMMUTABLE, so it
--   is folded into a trigger's cached plan once per session, and like the key only the
--   owner may call it; the service LISTENs through `streamer.listen()`, so its session's
--   query text (pg_stat_activity, pg_stat_statements, log_statement) is that call and not
--   the channel. Function sources stay public and name only the function.
-- * The service's own markers and the feeds-changed hint use the same channel: nothing on
--   it is from anyone but the triggers and the service.
-- * Processes of the earlier release LISTEN on `streamer`, where nothing is sent any more:
--   rather than let them stay open and deaf, this migration (and every process of this
--   release, at each connect and ping) sends there a signed change of a format they cannot
--   read, so they end their streams and report /readyz 503; their clients resume on this
--   release from their cursors (which this migration does not change).

-- The channel, for the triggers and the service: only the owner may call it.
create or replace function streamer.channel() returns text
language sql immutable as $$
    select 'streamer_' || left(encode(sha256('streamer channel:'::bytea || k.key), 'hex'), 40)
    from streamer.signing_key k
$$;
revoke all on function streamer.channel() from public;

-- LISTEN on the channel without its name in the session's query text.
create or replace function streamer.listen() returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    execute format('listen %I', streamer.channel());
end
$$;
revoke all on function streamer.listen() from public;

-- Tells running services to read streamer.feeds again, the way the triggers send.
create or replace function streamer.feeds_changed() returns void
language plpgsql as $$
begin
    if (select c.source from streamer.config c) = 'wal' then
        perform pg_logical_emit_message(true, 'streamer', '');
    else
        perform pg_notify(streamer.channel(), '');
    end if;
end
$$;

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
    via_wal boolean := (select c.source = 'wal' from streamer.config c);
    -- Under notify the payload leaves in a NOTIFY (8000 bytes at most) on the feeds' secret
    -- channel, folded into the trigger's plan once per session; under wal the row change
    -- itself is the message.
    send text := 'pg_notify(streamer.channel(), body)';
    too_big text := 'octet_length(body) > 7900';
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

    -- Needs nothing of schema streamer: a writer runs it with its own rights. Under wal, for
    -- a feed with a terminal condition, the version's lowest bit says whether the row is
    -- terminal at that version (the decoded row carries it; the service evaluates no SQL).
    execute format($f$
        create or replace function streamer.%1$I() returns trigger
        language plpgsql as $body$
        <<streamer_stamp>>
        declare
            ended boolean := false;
            v bigint;
        begin
            if tg_op = 'INSERT' then
                v := txid_current() * 1024;
            else
                v := greatest(old.streamer_version + 1, txid_current() * 1024);
            end if;
            %2$s
            new.streamer_version := v;
            return new;
        end
        $body$
    $f$, feed_name || '_stamp',
        case when via_wal and enable_feed.terminal is not null then
            replace(is_terminal, 'streamer_notify.ended', 'streamer_stamp.ended')
            || ' if (v & 1 = 1) <> ended then v := v + 1; end if;'
        else '' end);

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

    -- A TRUNCATE: every cursor from before it must now get a reset.
    execute format($f$
        create or replace function streamer.%1$I() returns trigger
        language plpgsql security definer set search_path = pg_catalog, pg_temp as $body$
        declare
            xid bigint := txid_current();
            body text := '{"f":' || %2$L || ',"o":"t","x":' || xid || ',"m":'
                || txid_snapshot_xmin(txid_current_snapshot())
                || ',"t":' || extract(epoch from clock_timestamp()) || '}';
        begin
            update streamer.horizon h set pruned_below = greatest(h.pruned_below, (xid + 1) * 1024)
            where h.feed = %3$L;
            delete from streamer.tombstones t where t.feed = %3$L and t.version < (xid + 1) * 1024;
            %4$s
            return null;
        end
        $body$
    $f$, feed_name || '_truncate', to_json(feed_name)::text, feed_name,
        case when via_wal then '' else format('perform %s;', send) end);

    -- Under wal: the tombstone of a row deleted, or moved away from its owner. Only these
    -- rows pay for it; the WAL carries it to the service like any row change.
    execute format($f$
        create or replace function streamer.%1$I() returns trigger
        language plpgsql security definer set search_path = pg_catalog, pg_temp as $body$
        begin
            if old.%3$I is not null then
                insert into streamer.tombstones as t (feed, owner_id, row_id, version)
                values (%2$L, old.%3$I::text, old.id::text,
                        case tg_op when 'DELETE' then greatest(old.streamer_version + 1, txid_current() * 1024)
                                   else new.streamer_version end)
                on conflict (feed, owner_id, row_id)
                do update set version = excluded.version, deleted_at = now();
            end if;
            return null;
        end
        $body$
    $f$, feed_name || '_gone', feed_name, owner_column);

    execute format('revoke all on function streamer.%I() from public', feed_name || '_notify');
    execute format('revoke all on function streamer.%I() from public', feed_name || '_truncate');
    execute format('revoke all on function streamer.%I() from public', feed_name || '_gone');
    execute format('revoke all on function streamer.%I(%s) from public', feed_name || '_row', tbl);

    execute format('drop trigger if exists streamer_stamp on %s', tbl);
    execute format(
        'create trigger streamer_stamp before insert or update on %s '
        'for each row execute function streamer.%I()', tbl, feed_name || '_stamp');
    execute format('drop trigger if exists streamer_notify on %s', tbl);
    execute format('drop trigger if exists streamer_deleted on %s', tbl);
    execute format('drop trigger if exists streamer_moved on %s', tbl);
    if via_wal then
        execute format(
            'create trigger streamer_deleted after delete on %s '
            'for each row execute function streamer.%I()', tbl, feed_name || '_gone');
        execute format(
            'create trigger streamer_moved after update of %I on %s '
            'for each row when (old.%I is distinct from new.%I) execute function streamer.%I()',
            owner_column, tbl, owner_column, owner_column, feed_name || '_gone');
        perform streamer.publish('streamer.tombstones'::regclass, true);
        perform streamer.publish(tbl, true);
    else
        execute format(
            'create trigger streamer_notify after insert or update or delete on %s '
            'for each row execute function streamer.%I()', tbl, feed_name || '_notify');
        perform streamer.publish(tbl, false);
    end if;
    execute format('drop trigger if exists streamer_truncate on %s', tbl);
    execute format(
        'create trigger streamer_truncate after truncate on %s '
        'for each statement execute function streamer.%I()', tbl, feed_name || '_truncate');
    -- A running service picks the feed_name up on this signal, or within seconds when it polls.
    perform streamer.feeds_changed();
end
$enable$;



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
    if exists (select from pg_publication p where p.pubname = 'streamer') then
        perform streamer.publish('streamer.tombstones'::regclass, source = 'wal');
    end if;
    update streamer.config set source = use_source.source;
    for feed in select f.tbl, f.owner_column, f.event, f.terminal, f.columns from streamer.feeds f loop
        perform streamer.enable_feed(feed.tbl, feed.owner_column, feed.event, feed.terminal,
                                     feed.columns, replace => true);
    end loop;
    -- Services reading either way hear of it at once: those reading the other one are deaf now.
    perform pg_notify(streamer.channel(), '');
    if logical then
        perform pg_logical_emit_message(true, 'streamer', '');
    end if;
end
$use$;


-- Feeds enabled by an earlier release get the new triggers now; the earlier release's
-- processes still LISTENing on `streamer` are told they cannot read on (at commit).
do $upgrade$
declare
    f record;
    notice text := '{"ev":2,"why":"the feeds notify on a channel of their own (sql/007_secret_channel.sql): upgrade this process"}';
begin
    for f in select * from streamer.feeds loop
        perform streamer.enable_feed(f.tbl, f.owner_column, f.event, f.terminal, f.columns,
                                     replace => true);
    end loop;
    perform pg_notify('streamer', encode(sha256(streamer.signing_opad()
        || sha256(streamer.signing_ipad() || convert_to(notice, 'UTF8'))), 'hex') || notice);
end
$upgrade$;
