"""Per-owner fan-out inside one process: every stream is a Subscriber of its owner.

The listener hands each change to `Hub.dispatch` once; the event is encoded there once and
the same bytes are queued for every stream of that owner. A stream that stops reading
overflows its bounded queue and is cut; it resumes later from its cursor.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from uuid import UUID

from streamer.errors import TooManyStreams, Unavailable
from streamer.events import HeartbeatEvent, frame, now
from streamer.feed import CatchUp, Feed, Gone, Notification, Snapshot, format_cursor
from streamer.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Envelope:
    data: bytes  # a whole SSE message, shared by every stream it goes to
    row_id: UUID | None = None
    xid: int | None = None  # the writer's transaction; None: deliver whatever the snapshot
    # A catch-up's snapshot: a stream that read the database at least as late skips it.
    read_in: Snapshot | None = None
    ends_row: bool = False  # a terminal status or a delete: a one-row stream ends after it
    closes: bool = False  # every stream ends after it (token-expired)


class Subscriber:
    """One open stream: a bounded queue of envelopes and the means to wake its writer."""

    __slots__ = (
        "_queue",
        "_waiter",
        "abort",
        "closed",
        "dropped",
        "limit",
        "owner",
        "row_id",
        "writing_since",
    )

    def __init__(self, owner: UUID, row_id: UUID | None, limit: int) -> None:
        self.owner = owner
        self.row_id = row_id
        self.limit = limit
        self._queue: deque[Envelope] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.closed: str | None = None  # why the stream must end
        self.dropped = 0  # envelopes left undelivered when it was closed
        self.abort: Callable[[], None] | None = None  # cuts the connection under a stuck write
        self.writing_since: float | None = None

    def push(self, envelope: Envelope) -> bool:
        """Queue an envelope; False when it overflowed the queue and the stream was cut."""
        if self.closed is not None:
            return True
        if self.row_id is not None and envelope.row_id not in (None, self.row_id):
            return True
        if len(self._queue) >= self.limit:
            self.close("slow", undelivered=1)
            return False
        self._queue.append(envelope)
        self._wake()
        return True

    def close(self, reason: str, *, undelivered: int = 0) -> None:
        if self.closed is None:
            self.closed = reason
            self.dropped = len(self._queue) + undelivered
            self._queue.clear()
            if self.writing_since is not None and self.abort is not None:
                self.abort()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next_batch(self) -> list[Envelope]:
        """Everything queued so far, waiting for at least one; empty once closed."""
        while not self._queue and self.closed is None:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        batch = list(self._queue)
        self._queue.clear()
        return batch


class Hub:
    def __init__(
        self,
        feed: Feed,
        metrics: Metrics,
        *,
        max_streams_per_owner: int,
        max_streams: int,
        queue_limit: int,
        write_timeout: float,
    ) -> None:
        self.feed = feed
        self.metrics = metrics
        self.max_streams_per_owner = max_streams_per_owner
        self.max_streams = max_streams
        self.queue_limit = queue_limit
        self.write_timeout = write_timeout
        self._by_owner: dict[UUID, set[Subscriber]] = {}
        self.count = 0
        self.stopping = False
        # Every change not yet dispatched was made by a transaction with id >= watermark.
        self.watermark = 0

    @property
    def cursor(self) -> str:
        return format_cursor(self.watermark)

    def owners(self) -> list[UUID]:
        return list(self._by_owner)

    def subscribers(self) -> Iterable[Subscriber]:
        for subs in self._by_owner.values():
            yield from subs

    # -- subscriptions --------------------------------------------------------------

    def subscribe(self, owner: UUID, row_id: UUID | None = None) -> Subscriber:
        if self.stopping:
            raise Unavailable("This server is shutting down; retry shortly.")
        subs = self._by_owner.get(owner)
        if subs is not None and len(subs) >= self.max_streams_per_owner:
            self.metrics.rejected_streams.labels("per_user").inc()
            raise TooManyStreams()
        if self.count >= self.max_streams:
            self.metrics.rejected_streams.labels("per_process").inc()
            raise TooManyStreams("This server has too many open streams; try another.")
        sub = Subscriber(owner, row_id, self.queue_limit)
        self._by_owner.setdefault(owner, set()).add(sub)
        self.count += 1
        self.metrics.streams_open.inc()
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        subs = self._by_owner.get(sub.owner)
        if subs is None or sub not in subs:
            return
        subs.discard(sub)
        if not subs:
            del self._by_owner[sub.owner]
        self.count -= 1
        self.metrics.streams_open.dec()

    def close_all(self, reason: str) -> None:
        for sub in list(self.subscribers()):
            sub.close(reason)

    def shutdown(self) -> None:
        """End every stream and refuse new ones: the process is stopping."""
        self.stopping = True
        self.close_all("shutdown")

    # -- fan-out --------------------------------------------------------------------

    def _publish(
        self, owner: UUID, envelope: Envelope, skip: frozenset[UUID] = frozenset()
    ) -> None:
        subs = self._by_owner.get(owner)
        if not subs or owner in skip:
            return
        for sub in tuple(subs):
            if not sub.push(envelope):
                self._cut(sub)

    def _cut(self, sub: Subscriber) -> None:
        sub.close("slow")
        log.info("stream cut for not reading; %d events undelivered", sub.dropped)
        self.metrics.slow_disconnects.inc()
        self.metrics.events_dropped.inc(sub.dropped)

    def advance(self, horizon: int) -> None:
        self.watermark = max(self.watermark, horizon)

    def dispatch(
        self,
        change: Notification,
        current: tuple[UUID, object] | None,
        skip: frozenset[UUID] = frozenset(),
    ) -> None:
        """Hand one committed change to its owners' streams, except the owners in `skip`.

        `current` is (owner, row) for an update: the row in the payload, or read back when
        it was too big to travel. A row read back may belong to someone else by now; it
        then goes nowhere (the change that moved it follows).
        """
        self.advance(change.horizon)
        cursor = self.cursor
        if change.op == "d":
            self._publish(change.owner, self._gone(change.id, change.xid, cursor), skip)
            return
        if change.old_owner is not None and change.old_owner != change.owner:
            self._publish(change.old_owner, self._gone(change.id, change.xid, cursor), skip)
        if current is None:
            return
        owner, row = current
        if owner != change.owner or owner not in self._by_owner:
            return
        assert isinstance(row, self.feed.row_model)
        envelope = Envelope(
            frame(self.feed.update_event(row), cursor),
            row_id=row.id,
            xid=change.xid,
            ends_row=self.feed.is_terminal(row),
        )
        self._publish(owner, envelope, skip)

    def _gone(
        self, row_id: UUID, xid: int | None, cursor: str, read_in: Snapshot | None = None
    ) -> Envelope:
        event = self.feed.delete_event(row_id)
        return Envelope(
            frame(event, cursor), row_id=row_id, xid=xid, read_in=read_in, ends_row=True
        )

    def dispatch_catch_up(self, result: CatchUp, cursor: str) -> None:
        """After the listener was down: what changed meanwhile, to every open stream."""
        if result.reset:
            # Gone past retention: each stream reconnects and gets its own reset + snapshot.
            self.close_all("reset")
            self.advance(result.snapshot.xmin)
            return
        read_in = result.snapshot
        for owner, item in result.in_order():
            if isinstance(item, Gone):
                self._publish(owner, self._gone(item.id, None, cursor, read_in))
            else:
                event = self.feed.update_event(item)
                envelope = Envelope(
                    frame(event, cursor),
                    row_id=item.id,
                    read_in=read_in,
                    ends_row=self.feed.is_terminal(item),
                )
                self._publish(owner, envelope)
        self.advance(result.snapshot.xmin)

    # -- heartbeats and stuck writers -----------------------------------------------

    def heartbeat(self) -> None:
        envelope = Envelope(frame(HeartbeatEvent(timestamp=now())))
        for sub in list(self.subscribers()):
            if not sub.push(envelope):
                self._cut(sub)

    async def run_heartbeats(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.heartbeat()

    def sweep(self) -> None:
        """Cut every stream whose write has not finished within the write timeout: its
        client stopped reading and the socket buffers are full. Without new events its
        queue would never overflow, so only this notices it."""
        stuck_before = time.monotonic() - self.write_timeout
        for sub in list(self.subscribers()):
            stuck = sub.writing_since is not None and sub.writing_since < stuck_before
            if stuck and sub.closed is None:  # a closed one is being aborted already
                self._cut(sub)

    async def run_sweeps(self) -> None:
        """Sweep twice per write timeout: a stuck stream is cut within 1.5 timeouts,
        whatever the heartbeat interval."""
        while True:
            await asyncio.sleep(self.write_timeout / 2)
            self.sweep()
