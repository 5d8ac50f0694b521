"""The WAL source: one logical replication connection per process, reading the signed
payloads that the feed triggers write as transactional logical messages (pgoutput, with
`messages` on and an empty publication: no table's rows are sent, only the messages).

psycopg2, because asyncpg and psycopg 3 cannot speak the replication protocol. Its
connection is asynchronous and read from the event loop (`add_reader` + `read_message`),
with no thread. The slot is TEMPORARY: it dies with its connection, so Postgres never
keeps WAL for a process that is gone; after a reconnect the dispatcher catches streams up
from their cursors, as after a LISTEN reconnect. Every transaction handed on is confirmed
as flushed, so a long-running process holds no WAL either.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import struct
from collections.abc import Callable

import asyncpg
import psycopg2
import psycopg2.extensions
from psycopg2.extras import LogicalReplicationConnection, ReplicationCursor

from streamer.changes import CHANNEL, Payload, Signed, marker_text
from streamer.tasks import set_within

log = logging.getLogger(__name__)
PREFIX = CHANNEL.encode()  # the logical messages' prefix, as the channel is NOTIFY's
BURST = 500  # messages read per wake-up before letting the event loop run others
SLOW_SLOT = 5.0  # seconds: then say why the start waits
_MESSAGE, _COMMIT = ord("M"), ord("C")  # pgoutput's message types (and B(egin), ...)
_TRANSACTIONAL = 1
_LENGTH = struct.Struct("!i")


class WalSource:
    name = "wal"
    description = f"reading messages {CHANNEL!r} from the WAL"

    def __init__(
        self,
        dsn: str,
        pool: asyncpg.Pool,
        signed: Signed | None = None,
        *,
        ping_interval: float = 5.0,
        ping_timeout: float = 5.0,
        connect_timeout: float = 10.0,
        slot_timeout: float = 60.0,
    ) -> None:
        self.dsn = dsn
        self.pool = pool
        self.signed = signed or Signed()  # no key: every payload is Forged
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.connect_timeout = connect_timeout
        # Creating a slot waits for the transactions running at that moment to end.
        self.slot_timeout = slot_timeout
        self.connection: psycopg2.extensions.connection | None = None
        self.slot: str | None = None
        self._cursor: ReplicationCursor | None = None
        self._fd: int | None = None  # the socket the event loop reads
        self._receive: Callable[[Payload], None] = lambda _payload: None
        self._encoding = "utf-8"
        self._lost = asyncio.Event()
        self._heard = asyncio.Event()  # anything came from the server (a ping's answer)
        self._failure: psycopg2.Error | None = None

    @property
    def pid(self) -> int | None:
        """The walsender's process id on the server, while connected."""
        conn = self.connection
        return None if conn is None or conn.closed else conn.info.backend_pid

    async def connect(self, receive: Callable[[Payload], None]) -> None:
        self._lost.clear()
        self._failure = None
        self._receive = receive
        conn = psycopg2.connect(
            self.dsn, connection_factory=LogicalReplicationConnection, async_=True
        )
        self.connection = conn
        async with asyncio.timeout(self.connect_timeout):
            await _completed(conn)
        server_encoding = conn.get_parameter_status("server_encoding") or "UTF8"
        self._encoding = psycopg2.extensions.encodings.get(server_encoding, "utf-8")
        cursor = conn.cursor()
        assert isinstance(cursor, ReplicationCursor)
        slot = f"streamer_{os.getpid()}_{secrets.token_hex(4)}"
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
        await self.signed.load()  # before the first payload can arrive
        # Only messages: the publication is empty, and pgoutput sends the transactional
        # ones in commit order, between the BEGIN and COMMIT of their transaction.
        cursor.start_replication_expert(  # type: ignore[no-untyped-call]
            f"START_REPLICATION SLOT {slot} LOGICAL 0/0 (proto_version '1',"
            f" publication_names '\"{CHANNEL}\"', messages 'true')",
            decode=False,
        )
        async with asyncio.timeout(self.connect_timeout):
            await _completed(conn)
        self._cursor = cursor
        self._fd = conn.fileno()
        asyncio.get_running_loop().add_reader(self._fd, self._read, cursor)
        self.description = f"reading messages {CHANNEL!r} from the WAL (slot {slot})"

    def _read(self, cursor: ReplicationCursor) -> None:
        if cursor is not self._cursor:
            return  # a wake-up scheduled before a reconnect
        self._heard.set()
        try:
            for _ in range(BURST):
                message = cursor.read_message()
                if message is None:
                    return
                payload = message.payload
                kind = payload[0]
                if kind == _MESSAGE:
                    if self._message(payload):
                        continue
                elif kind != _COMMIT:
                    continue
                # The end of a transaction (or a message outside any), handed on: confirmed
                # at once. The slot dies with the connection, so there is no position to
                # resume from, and no WAL to keep for one.
                cursor.send_feedback(flush_lsn=message.data_start)  # type: ignore[no-untyped-call]
            # More may wait in libpq's buffer, where the socket's readiness cannot tell.
            asyncio.get_running_loop().call_soon(self._read, cursor)
        except psycopg2.Error as exc:
            self._failure = exc
            self._lost.set()

    def _message(self, payload: bytes) -> bool:
        """A logical message ('M'); True when it is part of a transaction. Only those with
        the feed's prefix are handed on: others are another tool's, and one outside any
        transaction is not in commit order (the triggers write none). Its layout: 'M',
        flags (1: transactional), LSN (8 bytes), prefix and a zero byte, length (4 bytes),
        content."""
        if not payload[1] & _TRANSACTIONAL:
            return False
        end = payload.index(0, 10)
        if payload[10:end] == PREFIX:
            (length,) = _LENGTH.unpack_from(payload, end + 1)
            start = end + 1 + _LENGTH.size
            self._receive(self.signed.read(payload[start : start + length].decode(self._encoding)))
        return True

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
