-- Feeds for real databases: any table, any writer role, signed notifications, TRUNCATE.
--
-- Why it looks like this:
-- * Writers are rarely the table's owner and have no rights on schema `streamer`: the
--   trigger that records tombstones and signs notifications is SECURITY DEFINER, with a
--   pinned search_path (pg_catalog first, nothing a writer could plant a function in) and
--   EXECUTE revoked from PUBLIC (a trigger fires whatever the writer's rights; only
--   attaching it to another table needs EXECUTE, and rights on this schema).
-- * Any role that can connect can NOTIFY channel `streamer`, and function sources are
--   public: every payload is signed with an HMAC-SHA256 under a key in
--   `streamer.signing_key`, which only this schema's owner (the service) can read. The
--   service drops what does not verify.
-- * The row passes through: the trigger renders it as Postgres renders JSON (in UTC,
--   whatever the writer's time zone), the service splices that text into the event. A new
--   column or status value is just sent. The payload is `<hmac hex>` + an envelope line the
--   service routes on + "\n" + the row, or the envelope alone when the row would not fit in
--   NOTIFY's 8000 bytes (the service then reads it back with `streamer.<feed>_row`).
-- * A TRUNCATE deletes rows without row triggers: a statement trigger tells the service,
--   and raises the feed's horizon past it so a cursor from before it gets a reset.
-- * Feeds are rows of `streamer.feeds`: a running service reads them to find its routes.
-- * With STREAMER_SOURCE=wal (`streamer.config`, set by `streamer.use_source` in
--   004_sources.sql) the triggers write the same signed payload as a transactional logical
--   message instead of a NOTIFY: no commit-time lock for writers, no size limit.

-- Owners and ids of any feed's table are kept as text (uuid, bigint or text keys).
alter table streamer.tombstones alter column owner_id type text using owner_id::text;
alter table streamer.tombstones alter column row_id type text using row_id::text;

create table if not exists streamer.feeds (
    name         text primary key,       -- the table's name: /api/<name>/events
    tbl          regclass not null unique,
    owner_column text not null,
    owner_type   text not null,          -- uuid or text: how a JWT sub is checked
    id_type      text not null,          -- uuid, bigint or text: how an id is parsed and rendered
    event        text not null,          -- <event>-update, <event>-deleted, data key <event>
    terminal     text,                   -- an SQL expression over the row; null: never
    columns      text[],                 -- what is sent; null: every column but the owner
    enabled_at   timestamptz not null default now()
);

create table if not exists streamer.signing_key (
    one  boolean primary key default true check (one),
    key  bytea not null,
    ipad bytea not null,  -- the key padded to SHA-256's 64-byte block, xor 0x36 (HMAC)
    opad bytea not null   -- the same, xor 0x5c
);
revoke all on streamer.signing_key from public;

do $$
declare
    -- 32 bytes from the server's strong random source (gen_random_uuid uses it).
    k bytea := uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid());
    padded bytea := k || '\x'::bytea || decode(repeat('00', 32), 'hex');
    i bytea := padded;
    o bytea := padded;
begin
    if exists (select from streamer.signing_key) then
        return;
    end if;
    for n in 0..63 loop
        i := set_byte(i, n, get_byte(padded, n) # 54);
        o := set_byte(o, n, get_byte(padded, n) # 92);
    end loop;
    insert into streamer.signing_key (key, ipad, opad) values (k, i, o);
end
$$;

-- How the triggers send: 'notify', or 'wal' (see 004_sources.sql).
create table if not exists streamer.config (
    one    boolean primary key default true check (one),
    source text not null default 'notify' check (source in ('notify', 'wal'))
);
insert into streamer.config default values on conflict do nothing;

-- Tells running services to read streamer.feeds again, the way the triggers send.
create or replace function streamer.feeds_changed() returns void
language plpgsql as $$
begin
    if (select c.source from streamer.config c) = 'wal' then
        perform pg_logical_emit_message(true, 'streamer', '');
    else
        perform pg_notify('streamer', '');
    end if;
end
$$;

-- The pads as constants for the triggers: IMMUTABLE, so Postgres folds each into a trigger's
-- cached plan once per session instead of reading the table for every row a writer changes.
-- Like the table, only this schema's owner may call them.
create or replace function streamer.signing_ipad() returns bytea
language sql immutable as 'select ipad from streamer.signing_key';
create or replace function streamer.signing_opad() returns bytea
language sql immutable as 'select opad from streamer.signing_key';
revoke all on function streamer.signing_ipad() from public;
revoke all on function streamer.signing_opad() from public;

-- Remove a feed: its triggers and functions go, its routes 404, its open streams end.
create or replace function streamer.disable_feed(tbl regclass) returns void
language plpgsql as $disable$
declare
    feed_name text := (select f.name from streamer.feeds f where f.tbl = disable_feed.tbl);
begin
    if feed_name is null then
        raise exception 'streamer: % is not a feed', tbl;
    end if;
    execute format('drop trigger if exists streamer_stamp on %s', tbl);
    execute format('drop trigger if exists streamer_notify on %s', tbl);
    execute format('drop trigger if exists streamer_truncate on %s', tbl);
    execute format('drop function if exists streamer.%I()', feed_name || '_stamp');
    execute format('drop function if exists streamer.%I()', feed_name || '_notify');
    execute format('drop function if exists streamer.%I()', feed_name || '_truncate');
    execute format('drop function if exists streamer.%I(%s)', feed_name || '_row', tbl);
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

drop function if exists streamer.enable_feed(regclass, text);

-- Turn a table with a primary key `id` (uuid, bigint or text) and an owner column (uuid or
-- text) into a feed. Re-running it with other arguments reconfigures the feed.
create or replace function streamer.enable_feed(
    tbl regclass,
    owner_column text,
    event text default null,
    terminal text default null,
    columns text[] default null
) returns void
language plpgsql as $enable$
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
begin
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
        raise exception 'streamer: the id of % must be uuid, bigint or text', tbl;
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
    if columns is not null then
        select string_agg(quote_literal(c), ', ') into missing
        from unnest(columns) c
        where not exists (
            select from pg_attribute a
            where a.attrelid = tbl and a.attname = c and a.attnum > 0 and not a.attisdropped);
        if missing is not null then
            raise exception 'streamer: % has no column %', tbl, missing;
        end if;
        -- Every event carries the row's id and version, whatever else is listed.
        select 'jsonb_build_object(' || string_agg(format('%L, __row__->%L', c, c), ', ' order by n)
                || ')',
            array_agg(c order by n)
        into row_json, columns
        from (
            select c, min(n) n
            from unnest('{id}' || columns || '{version}') with ordinality u(c, n) group by c
        ) s;
    else
        row_json := format('(__row__ - %L)', owner_column);
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

    execute format('alter table %s add column if not exists version bigint not null default 0', tbl);
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
                new.version := txid_current() * 1024;
            else
                new.version := greatest(old.version + 1, txid_current() * 1024);
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
                gone_version := case tg_op when 'DELETE' then greatest(old.version + 1, xid * 1024)
                                else new.version end;
                insert into streamer.tombstones as t (feed, owner_id, row_id, version)
                values (%2$L, old.%3$I::text, old.id::text, gone_version)
                on conflict (feed, owner_id, row_id)
                do update set version = excluded.version, deleted_at = now();
                body := '{"f":' || %4$L || ',"o":"d","id":' || to_json(old.id) || ',"u":'
                    || to_json(old.%3$I::text) || ',"v":' || gone_version || tail || '}';
            else
                %5$s
                body := '{"f":' || %4$L || ',"o":"u","id":' || to_json(new.id) || ',"u":'
                    || to_json(new.%3$I::text) || ',"v":' || new.version || tail
                    || ',"e":' || ended;
                if tg_op = 'UPDATE' and new.%3$I is distinct from old.%3$I
                        and old.%3$I is not null then
                    insert into streamer.tombstones as t (feed, owner_id, row_id, version)
                    values (%2$L, old.%3$I::text, old.id::text, new.version)
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

select streamer.enable_feed('files', owner_column => 'user_id', event => 'file',
    terminal => $$status in ('ready', 'failed')$$);
