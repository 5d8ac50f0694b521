-- The change feed: whatever streamer needs beside the user's tables lives in schema
-- `streamer`. A table becomes a feed with `select streamer.enable_feed('files', 'user_id')`;
-- jobs or items later need one more such line, not new code.
--
-- Why it looks like this:
-- * NOTIFY is sent by an AFTER row trigger, so it goes out only on commit and a rolled-back
--   change emits nothing. The payload carries the row when it fits (no query per event in
--   the streamer) and only a reference when it does not: it is always under 8000 bytes.
-- * Every row gets a `version`: strictly increasing per row and never below the writing
--   transaction's id x 1024. "Changed by a transaction with id >= X" is then simply
--   "version >= X x 1024", which lets a cursor be an xid horizon: commit order is not
--   start order, and a horizon (the oldest transaction still running, carried in each
--   payload as `m`) is what a resumed client can safely restart from.
-- * Deletes and ownership changes leave a tombstone, so a reconnecting client learns of
--   them; tombstones are pruned after a retention period and `horizon` remembers how far,
--   so a cursor older than that gets a reset instead of a silent gap.

create schema if not exists streamer;

create table if not exists streamer.tombstones (
    feed       text not null,
    owner_id   uuid not null,
    row_id     uuid not null,
    version    bigint not null,
    deleted_at timestamptz not null default now(),
    primary key (feed, owner_id, row_id)
);
create index if not exists tombstones_catch_up_idx on streamer.tombstones (feed, owner_id, version);
create index if not exists tombstones_age_idx on streamer.tombstones (deleted_at);

create table if not exists streamer.horizon (
    feed         text primary key,
    pruned_below bigint not null default 0
);

-- Drop tombstones older than `keep`; returns how many went. Called by the streamer.
create or replace function streamer.prune(feed_name text, keep interval) returns bigint
language plpgsql as $$
declare
    gone bigint;
    highest bigint;
begin
    with deleted as (
        delete from streamer.tombstones
        where feed = feed_name and deleted_at < now() - keep
        returning version
    )
    select count(*), max(version) into gone, highest from deleted;
    if gone > 0 then
        insert into streamer.horizon as h (feed, pruned_below) values (feed_name, highest + 1)
        on conflict (feed) do update set pruned_below = greatest(h.pruned_below, excluded.pruned_below);
    end if;
    return gone;
end
$$;

-- Turn a table with a uuid `id` and a uuid owner column into a feed on channel `streamer`.
create or replace function streamer.enable_feed(tbl regclass, owner_column text)
returns void
language plpgsql as $enable$
declare
    feed text := (select relname from pg_class where oid = tbl);
    stamp_fn text := format('streamer.%I', feed || '_stamp');
    notify_fn text := format('streamer.%I', feed || '_notify');
begin
    execute format('alter table %s add column if not exists version bigint not null default 0', tbl);
    insert into streamer.horizon (feed) values (feed) on conflict do nothing;

    execute format($f$
        create or replace function %1$s() returns trigger language plpgsql as $body$
        begin
            if tg_op = 'INSERT' then
                new.version := pg_current_xact_id()::text::bigint * 1024;
            else
                new.version := greatest(old.version + 1, pg_current_xact_id()::text::bigint * 1024);
            end if;
            return new;
        end
        $body$
    $f$, stamp_fn);

    execute format($f$
        create or replace function %1$s() returns trigger language plpgsql as $body$
        declare
            xid bigint := pg_current_xact_id()::text::bigint;
            horizon bigint := pg_snapshot_xmin(pg_current_snapshot())::text::bigint;
            at double precision := extract(epoch from clock_timestamp());
            gone_version bigint;
            payload text;
        begin
            if tg_op = 'DELETE' then
                gone_version := greatest(old.version + 1, xid * 1024);
                insert into streamer.tombstones as t (feed, owner_id, row_id, version)
                values (%2$L, old.%3$I, old.id, gone_version)
                on conflict (feed, owner_id, row_id)
                do update set version = excluded.version, deleted_at = now();
                perform pg_notify('streamer', json_build_object(
                    'f', %2$L, 'o', 'd', 'id', old.id, 'u', old.%3$I,
                    'v', gone_version, 'x', xid, 'm', horizon, 't', at)::text);
                return null;
            end if;

            if tg_op = 'UPDATE' and new.%3$I is distinct from old.%3$I then
                insert into streamer.tombstones as t (feed, owner_id, row_id, version)
                values (%2$L, old.%3$I, old.id, new.version)
                on conflict (feed, owner_id, row_id)
                do update set version = excluded.version, deleted_at = now();
                payload := json_build_object(
                    'f', %2$L, 'o', 'u', 'id', new.id, 'u', new.%3$I, 'ou', old.%3$I,
                    'v', new.version, 'x', xid, 'm', horizon, 't', at,
                    'r', to_jsonb(new) - %3$L)::text;
            else
                payload := json_build_object(
                    'f', %2$L, 'o', 'u', 'id', new.id, 'u', new.%3$I,
                    'v', new.version, 'x', xid, 'm', horizon, 't', at,
                    'r', to_jsonb(new) - %3$L)::text;
            end if;

            if octet_length(payload) > 7900 then
                -- Too big for NOTIFY (8000 bytes): send a reference, the streamer reads the row.
                payload := json_build_object(
                    'f', %2$L, 'o', 'u', 'id', new.id, 'u', new.%3$I,
                    'ou', case when tg_op = 'UPDATE' and new.%3$I is distinct from old.%3$I
                               then old.%3$I end,
                    'v', new.version, 'x', xid, 'm', horizon, 't', at)::text;
            end if;
            perform pg_notify('streamer', payload);
            return null;
        end
        $body$
    $f$, notify_fn, feed, owner_column);

    execute format('drop trigger if exists streamer_stamp on %s', tbl);
    execute format(
        'create trigger streamer_stamp before insert or update on %s '
        'for each row execute function %s()', tbl, stamp_fn);
    execute format('drop trigger if exists streamer_notify on %s', tbl);
    execute format(
        'create trigger streamer_notify after insert or update or delete on %s '
        'for each row execute function %s()', tbl, notify_fn);
end
$enable$;

select streamer.enable_feed('files', 'user_id');
