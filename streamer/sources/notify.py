"""The NOTIFY source: one dedicated asyncpg connection LISTENing on the feed's channel."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg

from streamer.changes import CHANNEL, Payload, Signed, marker_text
from streamer.tasks import set_within


class NotifySource:
    name = "notify"
    description = f"listening on channel {CHANNEL!r}"

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
        self.signed = signed or Signed()  # no key: every payload is Forged
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.connection: asyncpg.Connection | None = None
        self._lost = asyncio.Event()

    @property
    def pid(self) -> int | None:
        """The LISTEN connection's backend process id on the server, while connected."""
        conn = self.connection
        return None if conn is None or conn.is_closed() else conn.get_server_pid()

    async def connect(self, receive: Callable[[Payload], None]) -> None:
        self._lost.clear()
        async with asyncio.timeout(10):
            conn = await asyncpg.connect(self.dsn)
        self.connection = conn
        conn.add_termination_listener(lambda _: self._lost.set())
        await self.signed.load()  # before the first payload can arrive
        signed = self.signed
        await conn.add_listener(CHANNEL, lambda _c, _pid, _ch, text: receive(signed.read(text)))

    async def mark(self, token: str) -> None:
        # Through the pool: a NOTIFY of the listening connection itself would also do, but
        # would wait behind a ping.
        await self.pool.execute("select pg_notify($1, $2)", CHANNEL, marker_text(token))

    async def watch(self) -> None:
        """Return when the connection is gone, or does not answer a ping (half-open)."""
        conn = self.connection
        assert conn is not None
        while not self._lost.is_set():
            if await set_within(self._lost, self.ping_interval):
                return
            async with asyncio.timeout(self.ping_timeout):
                await conn.fetchval("select 1")

    async def close(self) -> None:
        conn, self.connection = self.connection, None
        if conn is not None and not conn.is_closed():
            conn.terminate()
