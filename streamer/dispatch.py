"""Whatever the source: recover, and feed the hub every change in commit order.

A source delivers payloads in commit order; they are dispatched in that order. When a
payload carries only a reference (the row was too big to travel), the row is read back
and the payloads behind it wait, so order holds.

When the source's connection is lost (a restart, pg_terminate_backend, a network cut, a
ping that does not come back), open streams stay open: the dispatcher reconnects with
jittered backoff and catches every open stream up from the hub's watermark before
dispatching what arrived meanwhile. Nothing is lost and no client notices. Anything else
that fails ends the session and is raised to the task's supervisor, which restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from pydantic import ValidationError

from streamer.feed import (
    CatchUp,
    Feed,
    Feeds,
    Forged,
    Notification,
    Reads,
    Row,
    Snapshot,
    decode,
)
from streamer.hub import Hub, Key
from streamer.metrics import Metrics
from streamer.sources import CONNECTION_ERRORS, Source

log = logging.getLogger(__name__)

MARKER = '{"marker":"'  # not a change: see Dispatcher._mark
DEAF = "This server cannot read the database's changes now; retry shortly."


class Deaf(Exception):
    """This process cannot follow the database's changes (see Dispatcher.stop_reading)."""


NOTHING = Snapshot(0, 0, frozenset())


@dataclass(slots=True)
class Held:
    """A payload held during a recovery, decoded (None: nothing to dispatch)."""

    change: Notification | None
    sent: bool = False  # went out early (see Dispatcher._release_early)


@dataclass
class Recovery:
    """A recovery under way: the streams it catches up (`keys`), those it has caught up."""

    keys: frozenset[Key]
    done: set[Key] = field(default_factory=set)
    snapshot: Snapshot | None = None  # the recovery's, once it has caught any up
    # What the last look at the held payloads found (see Dispatcher._release_early).
    seen: int = 0
    blocked: set[Key] = field(default_factory=set)
    feeds_blocked: set[str] = field(default_factory=set)

    def may_send(self, keys: set[Key]) -> bool:
        """Whether a held change for these streams may go out: each was caught up (or was
        not being caught up: opened since, its own read sorts it out), and nothing held
        before it for them waits."""
        return not keys & self.blocked and all(
            key in self.done or key not in self.keys for key in keys
        )


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
        self._inbox: deque[str] = deque()
        self._holding = True  # until the stream of payloads is known to be complete
        # While a recovery reads: what it has caught up, and the held payloads decoded so
        # far, each with whether it went out early (see _release_early).
        self._recovery: Recovery | None = None
        self._held: list[Held] = []  # in the inbox's order
        self._held_at = 0  # how many of them _dispatch_ready has taken from the inbox
        # The last recovery's snapshot and the streams it caught up: a change that snapshot
        # saw is already in their streams, but not in streams opened since.
        self._caught_up: tuple[Snapshot, frozenset[Key]] = (NOTHING, frozenset())
        self._drain: asyncio.Task[None] | None = None
        self._marker: tuple[str, Snapshot] | None = None
        self._key = b""  # what the feed's triggers sign with: read at each connect
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
            delay = min(self.max_backoff, 0.05 * 2 ** min(failures, 8)) * random.uniform(0.5, 1)
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        self._lost.clear()
        self._failure = None
        self._holding = True
        await self.source.connect(self._receive)
        self._key = await self.reads.signing_key()
        if self.sessions:
            self.metrics.listener_reconnects.inc()
        self._caught_up = await self._recover()
        if self._failure is not None:
            raise self._failure  # in a change released early
        self.sessions += 1
        self._release()
        await self._mark(self._caught_up[0])
        self.ready.set()
        self.metrics.listener_up.set(1)
        log.info("%s", self.source.description)
        await self._watch()

    async def _recover(self) -> tuple[Snapshot, frozenset[Key]]:
        """Catch every open stream up on what it missed while the source was down, in one
        snapshot for every feed, a batch at a time.

        Streams may open while this reads: they are not caught up, so the changes this read
        saw must still reach them (see `_dispatch_ready`)."""
        owners = self.hub.owners()
        await self.feeds.refresh()
        served = [
            (feed, feed_owners)
            for name, feed_owners in owners.items()
            if (feed := self.feeds.get(name)) is not None
        ]
        caught = 0
        keys = frozenset((name, owner) for name, os in owners.items() for owner in os)
        recovery = self._recovery = Recovery(keys)

        async def deliver(feed: Feed, part: CatchUp) -> None:
            nonlocal caught
            caught += len(part.items)
            self.hub.dispatch_catch_up(feed, part)
            # The next batch waits for the clients this one went to, as a stream's own
            # catch-up does: their buffers stay bounded (one that stops reading is cut).
            await self.hub.drained(feed.name, {item.owner for item in part.items})

        def caught_up(feed: Feed, feed_owners: list[str], snapshot: Snapshot) -> None:
            recovery.snapshot = snapshot
            recovery.done.update((feed.name, owner) for owner in feed_owners)
            self._release_early(recovery, again=True)

        try:
            snapshot = await self.reads.changes(served, self.hub.watermark, deliver, caught_up)
        finally:
            self._recovery = None
        if served:
            log.info("recovered; %d rows caught up", caught)
        return snapshot, keys

    async def _mark(self, snapshot: Snapshot) -> None:
        """Move the hub's watermark up to `snapshot` once every change it saw has arrived.

        A change committed before the snapshot may still be on its way; until it is
        dispatched, a cursor past it would skip it on resume. A marker committed now comes
        after the snapshot, and payloads arrive in commit order: when the marker arrives,
        so has everything the snapshot saw."""
        token = uuid.uuid4().hex
        self._marker = (token, snapshot)
        await self.source.mark(MARKER + token + '"}')

    async def _watch(self) -> None:
        """Return when the source's connection is lost or this session gave up on it; raise
        what failed in a callback, for the supervisor to see."""
        watch = asyncio.ensure_future(self.source.watch())
        lost = asyncio.ensure_future(self._lost.wait())
        try:
            await asyncio.wait({watch, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watch, lost):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._failure is not None:
            raise self._failure
        if watch.done() and not watch.cancelled() and watch.exception() is not None:
            raise watch.exception()  # type: ignore[misc]

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
        self._recovery = None
        self._held, self._held_at = [], 0
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

    def _receive(self, payload: str) -> None:
        self._inbox.append(payload)
        if not self._holding and self._drain is None:
            self._dispatch_guarded()
        elif self._recovery is not None and self._recovery.snapshot is not None:
            self._release_early(self._recovery, again=False)

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
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        self._failure = exc
        self._holding = True
        self._lost.set()

    def _already_told(self, change: Notification) -> frozenset[Key]:
        """The streams the last recovery's catch-up already gave this change."""
        snapshot, caught_up = self._caught_up
        return caught_up if snapshot.sees(change.xid) else frozenset()

    def _decode(self, payload: str) -> Notification | None:
        if payload.startswith(MARKER):
            marker = self._marker
            if marker is not None and payload == MARKER + marker[0] + '"}':
                self._marker = None
                self.hub.rebase(marker[1])
            return None  # another process's marker, or an old one of ours
        try:
            return decode(payload, self._key)
        except Forged:
            # Any role that can connect can NOTIFY: only the feed's triggers can sign.
            if payload:
                log.warning("ignored a payload that no feed signed")
                self.metrics.notifications_rejected.inc()
            else:  # enable_feed or disable_feed: read the feeds again
                self.feeds.changed()
        except ValidationError:
            # Signed: a real change, that streams would miss. A later release's, met during
            # a rolling deploy: leave it to the processes that can read it.
            self.metrics.notifications_rejected.inc()
            self.stop_reading(
                "a change of a format this release cannot read: upgrade this process",
                for_good=True,
            )
        return None

    def _dispatch_ready(self) -> None:
        """Dispatch in order until a payload needs its row read back."""
        while self._inbox:
            payload = self._inbox.popleft()
            sent = False
            if self._held_at < len(self._held):  # decoded during the recovery
                held = self._held[self._held_at]
                change, sent = held.change, held.sent
                self._held_at += 1
            else:
                if self._held:
                    self._held, self._held_at = [], 0
                change = self._decode(payload)
            if change is None:
                continue
            self.hub.advance(change.horizon)  # xids are database-wide: whatever the feed
            if sent:
                continue
            feed = self.feeds.get(change.feed)
            if feed is None:
                self.feeds.changed()  # perhaps enabled a moment ago: nobody streams it yet
                continue
            told = self._already_told(change)
            owner = change.owner or ""  # "" only for a TRUNCATE, which names no owner
            if (
                change.op != "t"
                and {(feed.name, owner), (feed.name, change.old_owner or owner)} <= told
            ):
                continue
            if change.op == "u" and change.row is None and self.hub.serves(feed.name, owner):
                self._drain = asyncio.create_task(self._dispatch_slow(feed, change, told))
                return
            self._dispatch(feed, change, None, told)

    def _release_early(self, recovery: Recovery, *, again: bool) -> None:
        """While a recovery reads, send the held changes of streams it has caught up.

        Streams are caught up owner by owner, the owners with fewest changes first; a
        change held meanwhile goes out as soon as every stream it is for has its catch-up,
        and nothing held before it is for those streams (their order is commit order). The
        rest waits for the end of the recovery, as before: a TRUNCATE (its feed), a row to
        read back, a marker (everything). The watermark is not raised here: the events sent
        early carry the cursor from before the outage, and resuming from it repeats only
        what the client has. `again` after more owners were caught up: from the first held
        payload; otherwise only what arrived since the last look."""
        if self._recovery is not recovery:
            return  # over, or failed
        try:
            if again:
                recovery.blocked, recovery.feeds_blocked, recovery.seen = set(), set(), 0
            for payload in itertools.islice(self._inbox, recovery.seen, None):
                if recovery.seen == len(self._held):
                    if payload.startswith(MARKER):
                        return  # never before what it proves: looked at again next time
                    self._held.append(Held(self._decode(payload)))
                held = self._held[recovery.seen]
                recovery.seen += 1
                if held.change is not None and not held.sent:
                    held.sent = self._send_early(recovery, held.change)
        except Exception as exc:
            self._recovery = None
            self._fail(exc)

    def _send_early(self, recovery: Recovery, change: Notification) -> bool:
        """Send a held change now if it may go out early (see _release_early)."""
        feed = self.feeds.get(change.feed)
        name = feed.name if feed is not None else change.feed
        owner = change.owner or ""
        keys = {(name, owner), (name, change.old_owner or owner)}
        if (
            feed is None
            or change.op == "t"
            or name in recovery.feeds_blocked
            or not recovery.may_send(keys)
            or (change.op == "u" and change.row is None and self.hub.serves(name, owner))
        ):
            if feed is None or change.op == "t":
                recovery.feeds_blocked.add(name)
            recovery.blocked |= keys
            return False
        assert recovery.snapshot is not None
        told = recovery.keys if recovery.snapshot.sees(change.xid) else frozenset()
        if not keys <= told:
            self._dispatch(feed, change, None, told)
        return True

    async def _dispatch_slow(self, feed: Feed, change: Notification, told: frozenset[Key]) -> None:
        try:
            current = await self.reads.row(feed, change.row_id)
            self._dispatch(feed, change, current, told)
        except CONNECTION_ERRORS as exc:
            # Leave the gap to the recovery: drop the connection, catch up.
            log.warning("could not read back a large row: %s", exc.__class__.__name__)
            self._lost.set()
            return
        except Exception as exc:
            self._fail(exc)
            return
        finally:
            self._drain = None
        self._dispatch_guarded()

    def _dispatch(
        self,
        feed: Feed,
        change: Notification,
        current: Row | None,
        told: frozenset[Key] = frozenset(),
    ) -> None:
        self.metrics.notifications.inc()
        if change.at is not None:
            self.metrics.notification_lag.observe(max(0.0, time.time() - change.at))
        self.hub.dispatch(feed, change, current, skip=told)
