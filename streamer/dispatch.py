"""Whatever the source: recover, then hand the hub every change in commit order.

A source delivers typed payloads in commit order; they are dispatched in that order. When
a change carries only a reference (the row was too big to travel), the row is read back and
the payloads behind it wait, so order holds.

When the source's connection is lost (a restart, pg_terminate_backend, a network cut, a
ping that does not come back), open streams stay open: the dispatcher reconnects with
jittered backoff and catches every open stream up from the hub's watermark
(streamer/recovery.py) before dispatching what arrived meanwhile. Nothing is lost and no
client notices. Anything else that fails ends the session and is raised to the task's
supervisor, which restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable

from streamer.changes import (
    Change,
    Forged,
    Hint,
    Marker,
    Payload,
    Progress,
    Row,
    Snapshot,
    Unreadable,
)
from streamer.errors import CONNECTION_ERRORS
from streamer.feeds import Feed, Feeds
from streamer.hub import Hub
from streamer.metrics import Metrics
from streamer.reads import Reads
from streamer.recovery import Held, Recovery
from streamer.retry import backoff
from streamer.sources import Source
from streamer.tasks import stopped

log = logging.getLogger(__name__)

DEAF = "This server cannot read the database's changes now; retry shortly."


class Deaf(Exception):
    """This process cannot follow the database's changes (see Dispatcher.stop_reading)."""


class Dispatcher:
    def __init__(
        self,
        source: Source,
        reads: Reads,
        hub: Hub,
        feeds: Feeds,
        metrics: Metrics,
        *,
        max_backoff: float = 5.0,
    ) -> None:
        self.source = source
        self.reads = reads
        self.hub = hub
        self.feeds = feeds
        self.metrics = metrics
        self.max_backoff = max_backoff
        self.ready = asyncio.Event()
        self.sessions = 0
        self._lost = asyncio.Event()
        self._failure: Exception | None = None  # raised in a callback, re-raised by run
        self._inbox: deque[Held] = deque()  # arrived, not yet dispatched, in commit order
        self._holding = True  # until the stream of payloads is known to be complete
        self._recovery: Recovery | None = None
        self._reading_back: asyncio.Task[None] | None = None
        self._marker: tuple[str, Snapshot] | None = None
        # Why this process cannot follow the changes (None: it can), and whether that lasts
        # until it is restarted (a change it cannot read) or until the source matches again.
        self.deaf: str | None = None
        self._deaf_for_good = False
        self._hears = asyncio.Event()
        self._hears.set()

    # -- sessions -------------------------------------------------------------------

    async def run(self) -> None:
        """Keep the source connected. A lost connection is retried here, with backoff, for
        as long as it takes; anything else (a bug) is raised after the teardown, for the
        task's supervisor to log, count and restart."""
        failures = 0
        while True:
            await self._hears.wait()
            try:
                await self._session()
                failures = 0
            except CONNECTION_ERRORS as exc:
                log.warning("change connection failed: %s", exc.__class__.__name__)
            except Deaf:
                failures = 0
            finally:
                await self._teardown()
            failures += 1
            await asyncio.sleep(backoff(failures, 0.1, self.max_backoff))

    async def _session(self) -> None:
        self._lost.clear()
        self._failure = None
        self._holding = True
        await self.source.connect(self._receive)
        if self.sessions:
            self.metrics.listener_reconnects.inc()
        recovery = self._recovery = Recovery(self.hub, self.feeds, self._inbox, self._pass)
        try:
            snapshot = await recovery.run(self.reads)
        finally:
            self._recovery = None
        if self._failure is not None:
            raise self._failure  # in a change released early
        self.sessions += 1
        self._holding = False
        self._guarded(self._pump)
        await self._mark(snapshot)
        self.ready.set()
        self.metrics.listener_up.set(1)
        log.info("%s", self.source.description)
        await self._watch()

    async def _mark(self, snapshot: Snapshot) -> None:
        """Move the hub's watermark up to `snapshot` once every change it saw has arrived.

        A change committed before the snapshot may still be on its way; until it is
        dispatched, a cursor past it would skip it on resume. A marker committed now comes
        after the snapshot, and payloads arrive in commit order: when the marker arrives,
        so has everything the snapshot saw."""
        token = uuid.uuid4().hex
        self._marker = (token, snapshot)
        await self.source.mark(token)

    async def _watch(self) -> None:
        """Return when the source's connection is lost or this session gave up on it; raise
        what failed in a callback, for the supervisor to see."""
        watch = asyncio.ensure_future(self.source.watch())
        lost = asyncio.ensure_future(self._lost.wait())
        try:
            await asyncio.wait({watch, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await stopped(watch)
            await stopped(lost)
        if self._failure is not None:
            raise self._failure
        if not watch.cancelled() and (failure := watch.exception()) is not None:
            raise failure

    async def _teardown(self) -> None:
        self.ready.clear()
        self.metrics.listener_up.set(0)
        self._holding = True
        if self._reading_back is not None:
            await stopped(self._reading_back)
            self._reading_back = None
        # What is still in the inbox is caught up after the reconnect, from the watermark.
        self._inbox.clear()
        self._recovery = None
        await self.source.close()

    async def close(self) -> None:
        await self._teardown()

    # -- deafness -------------------------------------------------------------------

    async def check_source(self) -> None:
        """Whether the database's triggers still send the way this process reads (`streamer
        migrate` with another STREAMER_SOURCE switches them); run after each read of the
        feeds, which the switch itself prompts."""
        recorded = await self.reads.source()
        if recorded != self.source.name:
            self.stop_reading(
                f"the database's feeds send through {recorded}, this process reads"
                f" {self.source.name}: serve with STREAMER_SOURCE={recorded}"
            )
        elif self.deaf is not None and not self._deaf_for_good:
            log.info("the database's feeds send through %s again", recorded)
            self.deaf = None
            self.hub.accept()
            self._hears.set()

    def stop_reading(self, why: str, *, for_good: bool = False) -> None:
        """Changes may be passing this process by: every stream ends (its client resumes
        elsewhere from its cursor), new ones get 503, /readyz says why; never open and deaf."""
        if self.deaf is None:
            log.error("%s: ending every stream, not ready", why)
        self.deaf = why
        self._deaf_for_good = self._deaf_for_good or for_good
        self._hears.clear()
        self.ready.clear()
        self.metrics.listener_up.set(0)
        self.hub.refuse(DEAF)
        self._fail(Deaf(why))

    # -- payloads -------------------------------------------------------------------

    def _receive(self, payload: Payload) -> None:
        if isinstance(payload, Forged):
            log.warning("ignored a payload that no feed signed")
            self.metrics.notifications_rejected.inc()
        elif isinstance(payload, Hint):
            self.feeds.changed()
        elif isinstance(payload, Unreadable):
            self.metrics.notifications_rejected.inc()
            self.stop_reading(
                "a change of a format this release cannot read: upgrade this process",
                for_good=True,
            )
        else:
            self._inbox.append(Held(payload))
            if self._recovery is not None:
                self._guarded(self._recovery.arrived)
            elif not self._holding and self._reading_back is None:
                self._guarded(self._pump)

    def _guarded(self, step: Callable[[], None]) -> None:
        """Run a step from a callback, where an exception would only reach asyncio's log: a
        failure ends the session instead (the supervisor logs and restarts it, and the
        recovery catches every stream up on what was not dispatched)."""
        try:
            step()
        except Exception as exc:
            self._recovery = None
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        self._failure = exc
        self._holding = True
        self._lost.set()

    def _pump(self) -> None:
        """Dispatch in commit order until a change needs its row read back."""
        while self._inbox:
            held = self._inbox.popleft()
            payload = held.payload
            if isinstance(payload, Marker):
                self._marked(payload)
                continue
            self.hub.advance(payload.horizon)  # xids are database-wide: whatever the feed
            if isinstance(payload, Progress):
                continue
            if held.sent:
                continue
            feed = self.feeds.get(payload.feed)
            if feed is None:
                self.feeds.changed()  # perhaps enabled a moment ago: nobody streams it yet
            elif not self.hub.wanted(feed.name, payload):
                continue
            elif payload.needs_read_back and self.hub.needs(feed.name, payload.owner, payload.xid):
                self._reading_back = asyncio.create_task(self._read_back(feed, payload))
                return
            else:
                self._pass(feed, payload)

    def _marked(self, marker: Marker) -> None:
        """Our marker arrived: everything its snapshot saw has been dispatched (another
        process's, or an old one of ours, says nothing)."""
        if self._marker is not None and marker.token == self._marker[0]:
            snapshot, self._marker = self._marker[1], None
            self.hub.rebase(snapshot)

    async def _read_back(self, feed: Feed, change: Change) -> None:
        try:
            current = await self.reads.row(feed, change.row_id)
            self._pass(feed, change, current)
        except CONNECTION_ERRORS as exc:
            # Leave the gap to the recovery: drop the connection, catch up.
            log.warning("could not read back a large row: %s", exc.__class__.__name__)
            self._lost.set()
            return
        except Exception as exc:
            self._fail(exc)
            return
        finally:
            self._reading_back = None
        self._guarded(self._pump)

    def _pass(self, feed: Feed, change: Change, current: Row | None = None) -> None:
        self.metrics.notifications.inc()
        if change.at is not None:
            self.metrics.notification_lag.observe(max(0.0, time.time() - change.at))
        self.hub.dispatch(feed, change, current)
