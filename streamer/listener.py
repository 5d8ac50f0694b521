"""The one LISTEN connection of a process: connect, recover, and feed the hub in commit order.

Postgres delivers notifications in commit order; they are dispatched in that order. When a
payload carries only a reference (the row was too big for NOTIFY), the row is read back
and the notifications behind it wait, so order holds.

When the connection is lost (a restart, pg_terminate_backend, a network cut, or a ping
that does not come back), open streams stay open: the listener reconnects with jittered
backoff, LISTENs again, and catches every open stream up from the hub's watermark before
dispatching what arrived meanwhile. Nothing is lost and no client notices.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import deque

import asyncpg
from pydantic import ValidationError

from streamer.feed import (
    CHANNEL,
    Feed,
    Forged,
    Notification,
    Row,
    Snapshot,
    catch_up,
    current_snapshot,
    decode,
    fetch_row,
    signing_key,
)
from streamer.hub import Hub
from streamer.metrics import Metrics

log = logging.getLogger(__name__)

MARKER = '{"marker":"'  # not a change: see Listener._mark
CONNECTION_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


class Listener:
    def __init__(
        self,
        dsn: str,
        pool: asyncpg.Pool,
        hub: Hub,
        metrics: Metrics,
        *,
        ping_interval: float = 5.0,
        ping_timeout: float = 5.0,
        max_backoff: float = 5.0,
    ) -> None:
        self.dsn = dsn
        self.pool = pool
        self.hub = hub
        self.feed: Feed = hub.feed
        self.metrics = metrics
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.max_backoff = max_backoff
        self.ready = asyncio.Event()
        self.connection: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._inbox: deque[str] = deque()
        self._holding = True  # until the stream of notifications is known to be complete
        # The last recovery's snapshot and the owners it caught up: a notification that
        # snapshot saw is already in their streams, but not in streams of other owners.
        self._caught_up: tuple[Snapshot, frozenset[str]] = (
            Snapshot(0, 0, frozenset()),
            frozenset(),
        )
        self._drain: asyncio.Task[None] | None = None
        self.sessions = 0
        self._marker: tuple[str, Snapshot] | None = None
        self._key = b""  # what the feed's triggers sign with: read at each connect
        self._failure: Exception | None = None  # raised by a notification callback

    # -- connection lifecycle -------------------------------------------------------

    async def run(self) -> None:
        """Keep the LISTEN connection up. A lost connection is retried here, with backoff,
        for as long as it takes; anything else (a bug, a row that does not decode) is
        raised after the teardown, for the task's supervisor to log, count and restart."""
        failures = 0
        while True:
            try:
                await self._session()
                failures = 0
            except CONNECTION_ERRORS as exc:
                log.warning("LISTEN connection failed: %s", exc.__class__.__name__)
            finally:
                await self._teardown()
            failures += 1
            delay = min(self.max_backoff, 0.05 * 2 ** min(failures, 8)) * random.uniform(0.5, 1)
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        self._lost.clear()
        self._failure = None
        self._holding = True
        conn = await asyncio.wait_for(asyncpg.connect(self.dsn), timeout=10)
        self.connection = conn
        conn.add_termination_listener(lambda _: self._lost.set())
        self._key = await signing_key(conn)
        await conn.add_listener(CHANNEL, self._on_notify)
        if self.sessions:
            self.metrics.listener_reconnects.inc()
        self._caught_up = await self._recover()
        self.sessions += 1
        self._release()
        await self._mark(self._caught_up[0])
        self.ready.set()
        self.metrics.listener_up.set(1)
        log.info("listening on channel %r", CHANNEL)
        await self._watch(conn)

    async def _recover(self) -> tuple[Snapshot, frozenset[str]]:
        """Catch every open stream up on what it missed while the listener was down.

        Streams of other owners may open while this reads: they are not caught up, so the
        notifications this read saw must still reach them (see `_dispatch_ready`)."""
        owners = frozenset(self.hub.owners())
        async with self.pool.acquire() as conn:
            if not owners:
                return await current_snapshot(conn), owners
            result = await catch_up(conn, self.feed, list(owners), self.hub.watermark)
        self.hub.dispatch_catch_up(result, self.hub.cursor)
        log.info("listener recovered; %d rows caught up", len(result.rows) + len(result.gone))
        return result.snapshot, owners

    async def _mark(self, snapshot: Snapshot) -> None:
        """Move the hub's watermark up to `snapshot` once every change it saw has arrived.

        A change committed before the snapshot may still be on its way to this connection;
        until it is dispatched, a cursor past it would skip it on resume. A marker notified
        now commits after the snapshot, and notifications arrive in commit order: when the
        marker arrives, so has everything the snapshot saw."""
        token = uuid.uuid4().hex
        self._marker = (token, snapshot)
        await self.pool.execute("select pg_notify($1, $2)", CHANNEL, MARKER + token + '"}')

    async def _watch(self, conn: asyncpg.Connection) -> None:
        """Return when the connection is gone, or does not answer a ping (half-open); raise
        what failed in a notification callback, for the supervisor to see."""
        while not self._lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), timeout=self.ping_interval)
                break
            await asyncio.wait_for(conn.fetchval("select 1"), timeout=self.ping_timeout)
        if self._failure is not None:
            raise self._failure

    async def _teardown(self) -> None:
        self.ready.clear()
        self.metrics.listener_up.set(0)
        self._holding = True
        if self._drain is not None:
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain
            self._drain = None
        # What is still in the inbox is caught up after the reconnect, from the watermark.
        self._inbox.clear()
        conn, self.connection = self.connection, None
        if conn is not None and not conn.is_closed():
            conn.terminate()

    async def close(self) -> None:
        await self._teardown()

    # -- notifications --------------------------------------------------------------

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self._inbox.append(payload)
        if not self._holding and self._drain is None:
            self._dispatch_guarded()

    def _release(self) -> None:
        """Dispatch what arrived while catching up."""
        self._holding = False
        self._dispatch_guarded()

    def _dispatch_guarded(self) -> None:
        """Dispatch from a callback, where an exception would only reach asyncio's log: a
        failure ends the session instead (the supervisor logs and restarts it, and the
        recovery catches every stream up on what was not dispatched)."""
        try:
            self._dispatch_ready()
        except Exception as exc:
            self._failure = exc
            self._holding = True
            self._lost.set()

    def _already_told(self, change: Notification) -> frozenset[str]:
        """The owners whose streams the last recovery's catch-up already gave this change."""
        snapshot, owners = self._caught_up
        return owners if snapshot.sees(change.xid) else frozenset()

    def _decode(self, payload: str) -> Notification | None:
        if payload.startswith(MARKER):
            marker = self._marker
            if marker is not None and payload == MARKER + marker[0] + '"}':
                self._marker = None
                self.hub.rebase(marker[1])
            return None  # another process's marker, or an old one of ours
        try:
            change = decode(payload, self._key)
        except Forged:
            # Any role that can connect can NOTIFY: only the feed's triggers can sign.
            if payload:  # an empty payload only says the feeds changed
                log.warning("ignored a notification on channel %r that no feed signed", CHANNEL)
                self.metrics.notifications_rejected.inc()
            return None
        except ValidationError:
            log.warning("ignored a signed notification this version cannot read")
            self.metrics.notifications_rejected.inc()
            return None
        return change if change.feed == self.feed.name else None

    def _dispatch_ready(self) -> None:
        """Dispatch in order until a payload needs its row read back."""
        while self._inbox:
            payload = self._inbox.popleft()
            change = self._decode(payload)
            if change is None:
                continue
            told = self._already_told(change)
            if change.op != "t" and {change.owner, change.old_owner or change.owner} <= told:
                continue
            if change.op == "u" and change.row is None and self.hub.serves(change.owner or ""):
                self._drain = asyncio.create_task(self._dispatch_slow(change, told))
                return
            self._dispatch(change, None, told)

    async def _dispatch_slow(self, change: Notification, told: frozenset[str]) -> None:
        try:
            current = await fetch_row(self.pool, self.feed, change.row_id)
            self._dispatch(change, current, told)
        except CONNECTION_ERRORS as exc:
            # Leave the gap to the listener's recovery: drop the connection, catch up.
            log.warning("could not read back a large row: %s", exc.__class__.__name__)
            self._lost.set()
            return
        except Exception as exc:
            self._failure = exc
            self._lost.set()
            return
        finally:
            self._drain = None
        self._dispatch_guarded()

    def _dispatch(
        self,
        change: Notification,
        current: Row | None = None,
        told: frozenset[str] = frozenset(),
    ) -> None:
        self.metrics.notifications.inc()
        if change.at is not None:
            self.metrics.notification_lag.observe(max(0.0, time.time() - change.at))
        self.hub.dispatch(change, current or change.current(), skip=told)
