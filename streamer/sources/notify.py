"""The NOTIFY source: one dedicated asyncpg connection LISTENing on the feeds' channel.

The channel's name is the feeds' secret (sql/007_secret_channel.sql): this connection
LISTENs through `select streamer.listen()`, so the name is never in its query text, and
never learns it. asyncpg hands a notification only to the callbacks of a channel it
LISTENed on itself (`add_listener` runs `LISTEN "<name>"`), so this connection's class
takes every notification instead: it LISTENs on nothing else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg

from streamer.changes import CHANNEL, Payload, Signed, later_format_notice, marker_text, read
from streamer.tasks import set_within

LISTEN = "select streamer.listen()"
MARK = "select pg_notify(streamer.channel(), $1)"
# The ping also tells processes of an earlier release, LISTENing on CHANNEL (where nothing
# else is sent now), that they cannot read on: one that reconnects after the migration
# hears it within a ping.
PING = f"select pg_notify('{CHANNEL}', $1)"


class ListeningConnection(asyncpg.Connection):  # type: ignore[misc]
    """An asyncpg connection that passes every notification it gets to `notified`.

    Overrides asyncpg's (private) `_process_notification(pid, channel, payload)`, which its
    protocol calls for each NotificationResponse; tests/test_secret_channel.py fails first
    should a release of asyncpg change that."""

    __slots__ = ("notified",)

    def _process_notification(self, pid: int, channel: str, payload: str) -> None:
        notified: Callable[[str], None] | None = getattr(self, "notified", None)
        if notified is not None:
            notified(payload)


class NotifySource:
    name = "notify"
    description = "listening on channel streamer.channel() (the feeds' secret)"

    def __init__(
        self,
        dsn: str,
        pool: asyncpg.Pool,
        signed: Signed | None = None,
        *,
        ping_interval: float = 5.0,
        ping_timeout: float = 5.0,
    ) -> None:
        self.dsn = dsn
        self.pool = pool
        self.signed = signed or Signed()  # the key: what earlier releases are told is signed
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.connection: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._notice = ""

    @property
    def pid(self) -> int | None:
        """The LISTEN connection's backend process id on the server, while connected."""
        conn = self.connection
        return None if conn is None or conn.is_closed() else conn.get_server_pid()

    async def connect(self, receive: Callable[[Payload], None]) -> None:
        self._lost.clear()
        async with asyncio.timeout(10):
            conn = await asyncpg.connect(self.dsn, connection_class=ListeningConnection)
        self.connection = conn
        conn.add_termination_listener(lambda _: self._lost.set())
        await self.signed.load()
        self._notice = later_format_notice(self.signed.key)
        conn.notified = lambda text: receive(read(text))  # before the first can arrive
        await conn.execute(LISTEN)
        await conn.execute(PING, self._notice)

    async def mark(self, token: str) -> None:
        # Through the pool: a NOTIFY of the listening connection itself would also do, but
        # would wait behind a ping.
        await self.pool.execute(MARK, marker_text(token))

    async def watch(self) -> None:
        """Return when the connection is gone, or does not answer a ping (half-open)."""
        conn = self.connection
        assert conn is not None
        while not self._lost.is_set():
            if await set_within(self._lost, self.ping_interval):
                return
            async with asyncio.timeout(self.ping_timeout):
                await conn.execute(PING, self._notice)

    async def close(self) -> None:
        conn, self.connection = self.connection, None
        if conn is not None and not conn.is_closed():
            conn.terminate()
