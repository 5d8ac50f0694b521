-- The change source (STREAMER_SOURCE): how the feed triggers send their signed payloads.
--
-- * notify (the default): NOTIFY on channel `streamer`; each service process LISTENs. Simple,
--   but every notifying commit takes a database-wide lock (writers queue on it), and a
--   payload must stay under 8000 bytes (larger rows are read back by the service).
-- * wal: a transactional logical message with prefix `streamer`
--   (`pg_logical_emit_message(true, ...)`): written to the WAL with the transaction, and
--   decoded in commit order by each service process through a temporary logical
--   replication slot of its own (pgoutput, `messages` on). No lock, no size limit. It needs
--   `wal_level = logical` and a role that may replicate.
--
-- `streamer migrate` with STREAMER_SOURCE set calls `streamer.use_source`: it records the
-- source and regenerates every feed's triggers. The publication exists only because pgoutput
-- needs one to name: it publishes no table, since only the messages are read.
create or replace function streamer.use_source(source text) returns void
language plpgsql as $use$
declare
    feed record;
begin
    if source is null or source not in ('notify', 'wal') then
        raise exception 'streamer: the source is notify or wal, not %', source;
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
                                     feed.columns);
    end loop;
end
$use$;
