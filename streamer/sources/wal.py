"""The WAL source: one logical replication connection per process, reading the feed
tables' own row changes (pgoutput, publication `streamer`: the feed tables and the
tombstones), decoded by streamer/sources/decoder.py, and the service's own logical messages
(recovery markers, the feeds-changed hint: `messages` on).

psycopg2, because asyncpg and psycopg 3 cannot speak the replication protocol. Its
connection is asynchronous and read from the event loop (`add_reader` + `read_message`),
with no thread, in UTC and ISO dates (the row renderer reads values in that form). The
slot is TEMPORARY: it dies with its connection, so Postgres never keeps WAL for a process
that is gone; after a reconnect the dispatcher catches streams up from their cursors, as
after a LISTEN reconnect. Every transaction handed on is confirmed as flushed, so a
long-running process holds no WAL either.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import Awaitable, Callable

import asyncpg
import psycopg2
import psycopg2.extensions
from psycopg2.extras import LogicalReplicationConnection, ReplicationCursor

from streamer import pgoutput, pgtypes, queries
from streamer.changes import CHANNEL, Payload, Signed, marker_text
from streamer.errors import CONNECTION_ERRORS
from streamer.feeds import Feed, Feeds
from streamer.sources.decoder import SAMPLE, Decoder, Horizons
from streamer.tasks import set_within, stopped

log = logging.getLogger(__name__)
BURST = 500  # messages read per wake-up before letting the event loop run others
SLOW_SLOT = 5.0  # seconds: then say why the start waits
SAMPLE_EVERY = 0.1  # seconds between horizon samples (a cursor lags by about that)
OPTIONS = "-c TimeZone=UTC -c DateStyle=ISO,MDY -c client_encoding=UTF8"


class WalSource:
    name = "wal"
    description = "decoding the feed tables' changes from the WAL"

    def __init__(
        self,
        dsn: str,
        pool: asyncpg.Pool,
        signed: Signed | None = None,
        feeds: Feeds | None = None,
        *,
        ping_interval: float = 5.0,
        ping_timeout: float = 5.0,
        connect_timeout: float = 10.0,
        slot_timeout: float = 60.0,
    ) -> None:
        self.dsn = dsn
        self.pool = pool  # the horizon's samples, the markers
        self.signed = signed or Signed()  # only a fleet's reader signs (what it relays)
        self.feeds = feeds if feeds is not None else Feeds(pool_feeds(pool), lambda _name: None)
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.connect_timeout = connect_timeout
        # Creating a slot waits for the transactions running at that moment to end.
        self.slot_timeout = slot_timeout
        self.connection: psycopg2.extensions.connection | None = None
        self.slot: str | None = None
        self._cursor: ReplicationCursor | None = None
        self._fd: int | None = None  # the socket the event loop reads
        self._decoder: Decoder | None = None
        self._horizons = Horizons()
        self._sampling: asyncio.Task[None] | None = None
        self._refreshing: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        self._heard = asyncio.Event()  # anything came from the server (a ping's answer)
        self._failure: BaseException | None = None

    @property
    def pid(self) -> int | None:
        """The walsender's process id on the server, while connected."""
        conn = self.connection
        return None if conn is None or conn.closed else conn.info.backend_pid

    async def connect(self, receive: Callable[[Payload], None]) -> None:
        self._lost.clear()
        self._failure = None
        self._horizons = Horizons()
        conn = psycopg2.connect(
            self.dsn, connection_factory=LogicalReplicationConnection, async_=True,
            options=OPTIONS,
        )  # fmt: skip
        self.connection = conn
        async with asyncio.timeout(self.connect_timeout):
            await _completed(conn)
        cursor = conn.cursor()
        assert isinstance(cursor, ReplicationCursor)
        slot = f"streamer_{os.getpid()}_{secrets.token_hex(4)}"
        # Before the slot exists: every commit it decodes is after this sample's position.
        await self._sample()
        cursor.execute(
            f"CREATE_REPLICATION_SLOT {slot} TEMPORARY LOGICAL pgoutput (SNAPSHOT 'nothing')"
        )
        creating = asyncio.ensure_future(_completed(conn))
        try:
            async with asyncio.timeout(self.slot_timeout):
                if not (await asyncio.wait({creating}, timeout=SLOW_SLOT))[0]:
                    log.warning(
                        "replication slot %s waits for the transactions open when it was"
                        " created to end (a writer idle in a transaction?)",
                        slot,
                    )
                await creating
        finally:
            creating.cancel()
        self.slot = slot
        await self.signed.load()
        await self.feeds.refresh()  # the feeds the rows are decoded for
        self._decoder = Decoder(self.feeds, self._horizons, self.signed, receive)
        cursor.start_replication_expert(  # type: ignore[no-untyped-call]
            f"START_REPLICATION SLOT {slot} LOGICAL 0/0 (proto_version '1',"
            f" publication_names '\"{CHANNEL}\"', messages 'true')",
            decode=False,
        )
        async with asyncio.timeout(self.connect_timeout):
            await _completed(conn)
        self._cursor = cursor
        self._fd = conn.fileno()
        self._sampling = asyncio.create_task(self._sample_forever())
        asyncio.get_running_loop().add_reader(self._fd, self._read, cursor)
        self.description = f"decoding the feed tables' changes from the WAL (slot {slot})"

    async def _sample(self) -> None:
        xmin, lsn = await self.pool.fetchrow(SAMPLE)
        self._horizons.add(int(lsn), int(xmin))

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_EVERY)
            try:
                await self._sample()
            except CONNECTION_ERRORS as exc:  # an older sample is still a safe horizon
                log.warning("could not sample the horizon: %s", exc.__class__.__name__)

    def _read(self, cursor: ReplicationCursor) -> None:
        if cursor is not self._cursor or self._refreshing is not None:
            return  # a wake-up scheduled before a reconnect, or while the feeds are read
        decoder = self._decoder
        assert decoder is not None
        self._heard.set()
        try:
            for _ in range(BURST):
                message = cursor.read_message()
                if message is None:
                    return
                parsed = pgoutput.parse(message.payload)
                if isinstance(parsed, pgoutput.Relation):
                    # A table's layout: its types, and the feeds (one enabled a moment
                    # ago?), read before anything after it is decoded.
                    self._refreshing = asyncio.create_task(self._learn(cursor, parsed))
                    return
                decoder.handle(parsed)
                if isinstance(parsed, pgoutput.Commit):
                    # Handed on: confirmed at once. The slot dies with the connection, so
                    # there is no position to resume from, and no WAL to keep for one.
                    cursor.send_feedback(flush_lsn=message.data_start)  # type: ignore[no-untyped-call]
            # More may wait in libpq's buffer, where the socket's readiness cannot tell.
            asyncio.get_running_loop().call_soon(self._read, cursor)
        except Exception as exc:  # a callback's: raised from watch(), never lost in the loop
            self._failure = exc
            self._lost.set()

    async def _learn(self, cursor: ReplicationCursor, relation: pgoutput.Relation) -> None:
        try:
            await self.feeds.refresh()
            oids = [column.type_oid for column in relation.columns]
            types = pgtypes.type_infos(await self.pool.fetch(pgtypes.TYPES, oids))
        except CONNECTION_ERRORS as exc:
            self._failure = exc
            self._lost.set()
            return
        finally:
            self._refreshing = None
        if cursor is self._cursor and self._decoder is not None:
            self._decoder.learn(relation, types)
            self._read(cursor)

    async def mark(self, token: str) -> None:
        await self.pool.execute(
            "select pg_logical_emit_message(true, $1, $2)", CHANNEL, marker_text(token)
        )

    async def watch(self) -> None:
        """Return when the connection is lost; raise when it does not answer a ping (a
        half-open connection) or failed."""
        try:
            while not self._lost.is_set():
                if await set_within(self._lost, self.ping_interval):
                    break
                cursor = self._cursor
                assert cursor is not None
                self._heard.clear()
                # The server answers with a keepalive.
                cursor.send_feedback(reply=True)  # type: ignore[no-untyped-call]
                if not await set_within(self._heard, self.ping_timeout):
                    raise TimeoutError("the replication connection did not answer a ping")
        finally:
            if self._failure is not None:
                failure, self._failure = self._failure, None
                raise failure

    async def close(self) -> None:
        conn, self.connection, self._cursor, self.slot = self.connection, None, None, None
        if self._fd is not None:
            asyncio.get_running_loop().remove_reader(self._fd)
            self._fd = None
        if conn is not None:
            conn.close()  # the server ends its walsender, and the temporary slot with it
        # Last: a close of a cancelled dispatcher ends here, with the connection closed.
        tasks, self._sampling, self._refreshing = (self._sampling, self._refreshing), None, None
        for task in tasks:
            if task is not None:
                task.cancel()
        for task in tasks:
            if task is not None:
                await stopped(task)


def pool_feeds(pool: asyncpg.Pool) -> Callable[[], Awaitable[dict[str, Feed]]]:
    """The feeds, read through `pool` (for a source made without the app's registry)."""

    async def load() -> dict[str, Feed]:
        return {record["name"]: Feed.of(record) for record in await pool.fetch(queries.FEEDS)}

    return load


async def _completed(conn: psycopg2.extensions.connection) -> None:
    """Wait, on the event loop, until the asynchronous connection's operation is done."""
    loop = asyncio.get_running_loop()
    while True:
        state = conn.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        waiter = loop.create_future()
        fd = conn.fileno()
        if state == psycopg2.extensions.POLL_READ:
            loop.add_reader(fd, waiter.set_result, None)
            remove = loop.remove_reader
        else:
            loop.add_writer(fd, waiter.set_result, None)
            remove = loop.remove_writer
        try:
            await waiter
        finally:
            remove(fd)
