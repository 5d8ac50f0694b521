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

-- The first form of the feed's triggers. 003_feeds.sql replaced it; when these files are run
-- again in order, this part must not bring the old form back, hence the guard.
do $guard$
begin
    if to_regclass('streamer.feeds') is not null then
        return;
    end if;
    execute $create$
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

        -- Writers pay for every line below on every row they change, so each payload is one
        -- expression (plpgsql runs each expression through the executor) and the row is
        -- row_to_json's plain text, spliced in: the streamer ignores the owner column in it.
        -- txid_current() and txid_snapshot_xmin() give bigints with no text round trip.
        execute format($f$
            create or replace function %1$s() returns trigger language plpgsql as $body$
            begin
                if tg_op = 'INSERT' then
                    new.version := txid_current() * 1024;
                else
                    new.version := greatest(old.version + 1, txid_current() * 1024);
                end if;
                return new;
            end
            $body$
        $f$, stamp_fn);

        execute format($f$
            create or replace function %1$s() returns trigger language plpgsql as $body$
            declare
                xid bigint := txid_current();
                gone_version bigint;
                head text;
                payload text;
            begin
                if tg_op = 'DELETE' then
                    gone_version := greatest(old.version + 1, xid * 1024);
                    insert into streamer.tombstones as t (feed, owner_id, row_id, version)
                    values (%2$L, old.%3$I, old.id, gone_version)
                    on conflict (feed, owner_id, row_id)
                    do update set version = excluded.version, deleted_at = now();
                    perform pg_notify('streamer', '{"f":"' || %2$L || '","o":"d","id":"' || old.id
                        || '","u":"' || old.%3$I || '","v":' || gone_version || ',"x":' || xid
                        || ',"m":' || txid_snapshot_xmin(txid_current_snapshot())
                        || ',"t":' || extract(epoch from clock_timestamp()) || '}');
                    return null;
                end if;

                head := '{"f":"' || %2$L || '","o":"u","id":"' || new.id || '","u":"' || new.%3$I
                    || '","v":' || new.version || ',"x":' || xid
                    || ',"m":' || txid_snapshot_xmin(txid_current_snapshot())
                    || ',"t":' || extract(epoch from clock_timestamp());
                if tg_op = 'UPDATE' and new.%3$I is distinct from old.%3$I then
                    insert into streamer.tombstones as t (feed, owner_id, row_id, version)
                    values (%2$L, old.%3$I, old.id, new.version)
                    on conflict (feed, owner_id, row_id)
                    do update set version = excluded.version, deleted_at = now();
                    head := head || ',"ou":"' || old.%3$I || '"';
                end if;
                payload := head || ',"r":' || row_to_json(new) || '}';
                if octet_length(payload) > 7900 then
                    -- Too big for NOTIFY (8000 bytes): send a reference, the streamer reads the row.
                    payload := head || '}';
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
    $create$;
    perform streamer.enable_feed('files', 'user_id');
end
$guard$;
