"""A fleet costs the database one reader: of every process sharing the database and the
broker, one reads the database's changes (the configured source: LISTEN or the WAL) and
publishes them to the broker, where every node, that one too, receives those of the owners
it streams (streamer/sources/broker.py).

The election is a session-level advisory lock, taken on a connection of the reader's own:
Postgres, which every node already trusts, is the arbiter, and a reader that dies (SIGKILL
included) loses it the moment its session ends. Its session pings every `ping` seconds and
has `idle_session_timeout` at three pings, so a reader that is paused or cut off loses it
within seconds too; the next waiting process gets it at once (`pg_advisory_lock` waits on
the lock itself, no polling). Fencing: the new reader's epoch is a transaction id taken
under the lock, larger than any earlier reader's; nodes drop messages of an older epoch,
so a reader that lost its election and publishes late is never believed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable

import asyncpg
import redis as sync_redis
import redis.asyncio as redis

from streamer.changes import Change, Forged, Hint, Marker, Payload, Unreadable, signed_text
from streamer.metrics import Metrics
from streamer.retry import backoff
from streamer.sources import Source
from streamer.sources.broker import (
    CHANGE,
    CONNECTION_ERRORS,
    HINT,
    MARKER,
    TICK,
    all_channel,
    fleet_prefix,
    message,
    owner_channel,
)

log = logging.getLogger(__name__)

LOCK = int.from_bytes(b"streamer", "big") >> 1  # the advisory lock's key (a bigint)
BATCH = 500  # messages published per round trip


def broker_problem(url: str) -> str | None:
    """Why the broker at `url` cannot serve a fleet, in one line (None: it can): it does
    not answer, or it is older than Redis 7."""
    client = sync_redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    try:
        version = str(client.info("server").get("redis_version", "0"))
    except (sync_redis.RedisError, OSError) as exc:
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    finally:
        client.close()
    if int(version.split(".")[0] or 0) < 7:
        return f"Redis {version} is older than 7"
    return None


class Reader:
    def __init__(
        self,
        dsn: str,
        make_source: Callable[[], Source],
        signing_key: Callable[[], Awaitable[bytes]],
        broker_url: str,
        metrics: Metrics,
        *,
        gave_up: Callable[[str], None],
        ping: float = 1.0,
        max_backoff: float = 5.0,
    ) -> None:
        self.dsn = dsn
        self.make_source = make_source
        self.signing_key = signing_key  # the fleet's channels are named after it
        self.broker_url = broker_url
        self.metrics = metrics
        self.gave_up = gave_up  # this process cannot read the fleet's changes: say so
        self.ping = ping
        self.max_backoff = max_backoff
        self.epoch = 0
        self.leading = asyncio.Event()
        self._horizon = 0
        self._prefix = ""
        self._key = b""
        self._queue: deque[tuple[str, bytes]] = deque()
        self._wake = asyncio.Event()
        self._unreadable: str | None = None

    async def run(self) -> None:
        """Wait for the election, read for the fleet while elected, and wait again; never
        returns but when this release cannot read the changes (then for good)."""
        failures = 0
        while self._unreadable is None:
            try:
                await self._contend()
                failures = 0
            except CONNECTION_ERRORS as exc:
                log.warning("reading for the fleet stopped: %s", exc.__class__.__name__)
            failures += 1
            await asyncio.sleep(backoff(failures, 0.1, self.max_backoff))
        self.gave_up(self._unreadable)
        await asyncio.Event().wait()  # never again: a later release reads for the fleet

    async def _contend(self) -> None:
        timeout = int(self.ping * 3000)
        conn = await asyncpg.connect(
            self.dsn,
            server_settings={"idle_session_timeout": str(timeout), "application_name": "reader"},
        )
        try:
            await conn.execute("select pg_advisory_lock($1)", LOCK)
            self.epoch = int(await conn.fetchval("select pg_current_xact_id()::text"))
            await self._lead(conn)
        finally:
            conn.terminate()  # the lock goes with the session

    async def _lead(self, conn: asyncpg.Connection) -> None:
        source = self.make_source()
        client = redis.Redis.from_url(self.broker_url, socket_connect_timeout=5)
        publishing: asyncio.Future[None] | None = None
        # Ends the publisher even if a cancel is lost inside the broker's client (redis-py
        # can swallow one in a pipeline): it looks at this before every batch.
        done = asyncio.Event()
        watching: asyncio.Future[None] | None = None
        try:
            await client.ping()
            self._key = await self.signing_key()
            self._prefix = fleet_prefix(self._key)
            self._queue.clear()
            await source.connect(self._forward)
            publishing = asyncio.ensure_future(self._publish(client, done))
            watching = asyncio.ensure_future(source.watch())
            self.leading.set()
            self.metrics.reader.set(1)
            log.info("reading the database for the fleet (epoch %d)", self.epoch)
            while True:
                self._send(all_channel(self._prefix), TICK, str(self._horizon))
                await asyncio.wait({publishing, watching}, timeout=self.ping)
                if publishing.done() or watching.done() or self._unreadable is not None:
                    break
                # Postgres ends an idle session (and its lock) after three pings; a ping
                # slower than one, on a busy machine, is no reason to step down.
                async with asyncio.timeout(3 * self.ping):
                    await conn.fetchval("select 1")
            for task in (publishing, watching):
                if task.done() and not task.cancelled() and (failure := task.exception()):
                    raise failure
        finally:
            done.set()
            self._wake.set()
            self.leading.clear()
            self.metrics.reader.set(0)
            # Cancelled itself (the app stops), a `stopped` would raise at the first child
            # and leave the source, and its walsender, running: cancel both, wait for both.
            children = [child for child in (publishing, watching) if child is not None]
            for child in children:
                child.cancel()
            await asyncio.gather(*children, return_exceptions=True)
            await source.close()
            with contextlib.suppress(*CONNECTION_ERRORS):
                await client.aclose()

    def _forward(self, payload: Payload) -> None:
        """What the database source read, to the broker, in commit order."""
        prefix = self._prefix
        if isinstance(payload, Change):
            self._horizon = max(self._horizon, payload.horizon)
            owners = payload.owners()
            text = signed_text(self._key, payload)
            if payload.op == "t" or not owners:
                self._send(all_channel(prefix), CHANGE, text)
            for owner in owners:
                self._send(owner_channel(prefix, payload.feed, owner), CHANGE, text)
        elif isinstance(payload, Marker):
            self._send(all_channel(prefix), MARKER, payload.token)
        elif isinstance(payload, Hint):
            self._send(all_channel(prefix), HINT)
        elif isinstance(payload, Forged):
            log.warning("ignored a payload that no feed signed")
            self.metrics.notifications_rejected.inc()
        elif isinstance(payload, Unreadable):
            self.metrics.notifications_rejected.inc()
            self._unreadable = "a change of a format this release cannot read: upgrade this process"
            self._wake.set()

    def _send(self, channel: str, kind: str, text: str = "") -> None:
        self._queue.append((channel, message(self._key, self.epoch, kind, text)))
        self._wake.set()

    async def _publish(self, client: redis.Redis, done: asyncio.Event) -> None:
        """Publish what was read, in order, a batch per round trip, until `done`."""
        while not done.is_set():
            await self._wake.wait()
            self._wake.clear()
            while self._queue and not done.is_set():
                size = min(len(self._queue), BATCH)
                batch = [self._queue.popleft() for _ in range(size)]
                async with client.pipeline(transaction=False) as pipe:
                    for channel, data in batch:
                        pipe.publish(channel, data)
                    await pipe.execute()
                self.metrics.broker_published.inc(size)
