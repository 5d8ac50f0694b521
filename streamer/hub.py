"""Fan-out inside one process: every stream is a Subscriber of one (feed, owner).

The dispatcher hands each change to `Hub.dispatch` once; its event is encoded there once
and the same message goes to every stream of that owner in that feed. A stream that stops
reading is cut when its buffer overflows or stays unsent past the write timeout; it
resumes from its cursor. The hub knows no HTTP: a live stream writes into its Sink.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from streamer.errors import TooManyStreams, Unavailable
from streamer.feed import CatchUp, Feed, Gone, Notification, Row, Snapshot, format_cursor
from streamer.metrics import Metrics
from streamer.sse import HeartbeatEvent, Message, Sink, frame, now

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (feed, owner)
DRAIN_POLL = 0.005  # seconds between looks at whether a recovery's clients took its batch


@dataclass(frozen=True, slots=True)
class Envelope:
    message: Message  # a whole SSE message, shared by every stream it goes to
    row_id: str | None = None
    xid: int | None = None  # the writer's transaction; None: deliver whatever the snapshot
    # A catch-up's snapshot: a stream that read the database at least as late skips it.
    read_in: Snapshot | None = None
    ends_row: bool = False  # a terminal state or a delete: a one-row stream ends after it
    closes: bool = False  # every stream ends after it (token-expired)


def envelope(
    data: bytes,
    *,
    row_id: str | None = None,
    xid: int | None = None,
    read_in: Snapshot | None = None,
    ends_row: bool = False,
    closes: bool = False,
) -> Envelope:
    return Envelope(Message(data), row_id, xid, read_in, ends_row, closes)


class Subscriber:
    """One open stream.

    While the stream is being set up (reading the database) its envelopes wait in a bounded
    queue. Once live, an envelope is appended to the stream's pending writes and the hub
    writes every pending stream's messages into its sink once per loop iteration: no task
    wakes up per event, and one burst of changes is one send() per stream. The connection's
    own write buffer is then the stream's buffer: the hub cuts a stream whose buffer grows
    past its limit or stays unsent past the write timeout.
    """

    __slots__ = (
        "_hub",
        "_last",
        "_pending",
        "_queue",
        "_seen",
        "_sink",
        "backlog_since",
        "closed",
        "dropped",
        "ended",
        "feed",
        "owner",
        "row_id",
        "user",
    )

    def __init__(self, hub: Hub, feed: Feed, owner: str, user: str, row_id: str | None) -> None:
        self._hub = hub
        self.feed = feed
        self.owner = owner
        self.user = user  # the token's subject: the per-user limit counts across feeds
        self.row_id = row_id
        self._queue: list[Envelope] | None = []
        self._pending: list[Message] | None = None
        self._sink: Sink | None = None
        self._seen: Snapshot | None = None
        self._last = False  # the stream ends once what is pending is written
        self.closed: str | None = None  # why the stream ended
        self.dropped = 0  # envelopes left undelivered when it was cut
        self.backlog_since: float | None = None  # when its connection last had unsent bytes
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    @property
    def key(self) -> Key:
        return (self.feed.name, self.owner)

    def push(self, envelope: Envelope) -> bool:
        """Take an envelope; False when it overflowed the set-up queue and the stream was cut."""
        if self.closed is not None or self._last:
            return True
        if self.row_id is not None and envelope.row_id not in (None, self.row_id):
            return True
        queue = self._queue
        if queue is not None:
            if len(queue) >= self._hub.queue_limit:
                self.dropped = len(queue) + 1
                return False
            queue.append(envelope)
            return True
        self._write(envelope)
        return True

    def _write(self, envelope: Envelope) -> None:
        seen = self._seen
        if seen is not None:
            if envelope.xid is not None and seen.sees(envelope.xid):
                return  # already in what this stream read from the database
            if envelope.read_in is not None and seen.covers(envelope.read_in):
                return  # a dispatcher's catch-up older than this stream's own read
        if self._pending is None:
            self._pending = [envelope.message]
            self._hub.mark_pending(self)
        else:
            self._pending.append(envelope.message)
        if envelope.closes or (self.row_id is not None and envelope.ends_row):
            self._last = True

    def go_live(self, sink: Sink, seen: Snapshot) -> None:
        """From now on write into `sink`; first what queued during set-up, except what the
        stream's own read of the database (`seen`) already covered."""
        queue, self._queue = self._queue, None
        self._sink = sink
        self._seen = seen if seen.xmax else None
        for envelope in queue or ():
            self._write(envelope)
            if self._last:
                break

    def flush(self) -> int:
        """Write what is pending; returns how many events went out."""
        pending, self._pending = self._pending, None
        sink = self._sink
        if not pending or sink is None or self.closed is not None:
            return 0
        if sink.closing:
            self.close("gone")
            return 0
        sink.write(pending)
        if sink.unsent() > self._hub.buffer_limit:
            self.dropped = len(pending)  # still in the buffer when the connection is aborted
            self._hub.cut(self)
        elif self._last:
            self.close("end")
        return len(pending)

    def unsent(self) -> int:
        return 0 if self._sink is None else self._sink.unsent()

    def close(self, reason: str) -> None:
        """End the stream: what is pending is written first, unless it is cut for being slow
        (then the connection is aborted, and what it had not taken is counted as dropped)."""
        if self.closed is not None:
            return
        self.closed = reason
        pending, self._pending = self._pending, None
        queue, self._queue = self._queue, None
        sink = self._sink
        if reason == "slow":
            self.dropped = self.dropped or len(pending or queue or ())
            if sink is not None:
                sink.abort()
        elif pending and sink is not None and not sink.closing:
            sink.write(pending)
        if not self.ended.done():
            self.ended.set_result(reason)


class Hub:
    def __init__(
        self,
        metrics: Metrics,
        *,
        max_streams_per_owner: int,
        max_streams: int,
        queue_limit: int,
        write_timeout: float,
        buffer_limit: int = 4 * 1024 * 1024,
    ) -> None:
        self.metrics = metrics
        self.max_streams_per_owner = max_streams_per_owner
        self.max_streams = max_streams
        self.queue_limit = queue_limit
        self.write_timeout = write_timeout
        self.buffer_limit = buffer_limit
        self._pending: list[Subscriber] = []
        self._by_key: dict[Key, set[Subscriber]] = {}
        self._per_user: dict[str, int] = {}
        self.count = 0
        self.stopping = False
        self.refusing: str | None = None  # why new streams get 503 (see refuse)
        # Every change not yet dispatched was made by a transaction with id >= watermark.
        # Transaction ids are database-wide: one watermark serves every feed.
        self.watermark = 0
        # feed -> the transaction of its last TRUNCATE: a stream's fresh snapshot must see it
        self.truncated_by: dict[str, int] = {}

    @property
    def cursor(self) -> str:
        return format_cursor(self.watermark)

    def serves(self, feed: str, owner: str) -> bool:
        return (feed, owner) in self._by_key

    def owners(self) -> dict[str, list[str]]:
        """The owners with an open stream, by feed."""
        found: dict[str, list[str]] = {}
        for feed, owner in self._by_key:
            found.setdefault(feed, []).append(owner)
        return found

    def subscribers(self) -> Iterable[Subscriber]:
        for subs in self._by_key.values():
            yield from subs

    # -- subscriptions --------------------------------------------------------------

    def subscribe(self, feed: Feed, owner: str, user: str, row_id: str | None = None) -> Subscriber:
        if self.stopping:
            raise Unavailable("This server is shutting down; retry shortly.")
        if self.refusing is not None:
            raise Unavailable(self.refusing)
        if self._per_user.get(user, 0) >= self.max_streams_per_owner:
            self.metrics.rejected_streams.labels("per_user").inc()
            raise TooManyStreams()
        if self.count >= self.max_streams:
            self.metrics.rejected_streams.labels("per_process").inc()
            raise TooManyStreams("This server has too many open streams; try another.")
        sub = Subscriber(self, feed, owner, user, row_id)
        self._by_key.setdefault(sub.key, set()).add(sub)
        self._per_user[user] = self._per_user.get(user, 0) + 1
        self.count += 1
        self.metrics.streams_open.inc()
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        subs = self._by_key.get(sub.key)
        if subs is None or sub not in subs:
            return
        subs.discard(sub)
        if not subs:
            del self._by_key[sub.key]
        left = self._per_user[sub.user] - 1
        if left:
            self._per_user[sub.user] = left
        else:
            del self._per_user[sub.user]
        self.count -= 1
        self.metrics.streams_open.dec()

    def close_all(self, reason: str, feed: str | None = None) -> None:
        for sub in list(self.subscribers()):
            if feed is None or sub.feed.name == feed:
                sub.close(reason)

    def refuse(self, message: str) -> None:
        """End every stream and refuse new ones with `message` (503) until `accept`: this
        process cannot tell them what changes."""
        self.refusing = message
        self.close_all("unavailable")

    def accept(self) -> None:
        self.refusing = None

    def shutdown(self) -> None:
        """End every stream and refuse new ones: the process is stopping."""
        self.stopping = True
        self.close_all("shutdown")

    # -- fan-out --------------------------------------------------------------------

    def _publish(self, key: Key, envelope: Envelope, skip: frozenset[Key] = frozenset()) -> None:
        subs = self._by_key.get(key)
        if not subs or key in skip:
            return
        for sub in tuple(subs):
            if not sub.push(envelope):
                self.cut(sub)

    def cut(self, sub: Subscriber) -> None:
        """A stream whose client does not keep up: abort it; it resumes from its cursor."""
        if sub.closed is not None:
            return
        sub.close("slow")
        log.info("stream cut for not reading; %d events undelivered", sub.dropped)
        self.metrics.slow_disconnects.inc()
        self.metrics.events_dropped.inc(sub.dropped)

    def mark_pending(self, sub: Subscriber) -> None:
        """`sub` has messages to write: they go out with everyone else's at the end of this
        loop iteration, so a burst of changes costs one write per stream."""
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(sub)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        sent = 0
        for sub in pending:
            sent += sub.flush()
        if sent:
            self.metrics.events_sent.inc(sent)

    def advance(self, horizon: int) -> None:
        self.watermark = max(self.watermark, horizon)

    def rebase(self, snapshot: Snapshot) -> None:
        """Follow the database once every change `snapshot` saw was dispatched (the
        dispatcher knows when), even back in time: a database restored, or one that lost
        its last commits in a crash, is behind the cursors already given out. Those get a
        reset; the cursors given out next must be its own."""
        if self.watermark > snapshot.xmax:
            self.watermark = snapshot.xmin
        else:
            self.advance(snapshot.xmin)

    def dispatch(
        self,
        feed: Feed,
        change: Notification,
        current: Row | None,
        skip: frozenset[Key] = frozenset(),
    ) -> None:
        """Hand one committed change of `feed` to its owners' streams, except those in `skip`.

        `current` is the row read back for an update too big to travel (None: the one in
        the payload, made only for an owner with a stream here). A row read back may belong
        to someone else by now, or be a later version of it; it then goes nowhere: the
        change that moved it or made that version follows, and a newer version sent first
        would go out ahead of older ones.
        """
        cursor = self.cursor
        name = feed.name
        if change.op == "t":
            self.truncated_by[name] = change.xid
            self._truncated(feed, cursor)
            return
        assert change.owner is not None
        # Most changes are of owners this process has no stream of: nothing is encoded then.
        if change.op == "d":
            if (name, change.owner) in self._by_key:
                gone = self._gone(feed, change.row_id, change.xid)
                self._publish((name, change.owner), gone, skip)
            return
        moved_from = change.old_owner if change.old_owner != change.owner else None
        if moved_from is not None and (name, moved_from) in self._by_key:
            self._publish((name, moved_from), self._gone(feed, change.row_id, change.xid), skip)
        if (name, change.owner) not in self._by_key:
            return
        if current is None:
            current = change.current()
        if current is None or current.owner != change.owner or current.version != change.version:
            return
        update = envelope(
            feed.update_frame(current, cursor),
            row_id=current.id,
            xid=change.xid,
            ends_row=current.terminal,
        )
        self._publish((name, current.owner), update, skip)

    def _gone(
        self, feed: Feed, row_id: str, xid: int | None, read_in: Snapshot | None = None
    ) -> Envelope:
        return envelope(
            feed.deleted_frame(row_id, self.cursor),
            row_id=row_id,
            xid=xid,
            read_in=read_in,
            ends_row=True,
        )

    def _truncated(self, feed: Feed, cursor: str) -> None:
        """Every row is gone at once: a one-row stream ends with its row's delete, every
        other stream of the feed starts over (reset, then a fresh snapshot)."""
        for sub in list(self.subscribers()):
            if sub.feed.name != feed.name:
                continue
            if sub.row_id is None:
                sub.close("truncated")
            elif not sub.push(self._gone(feed, sub.row_id, None)):
                self.cut(sub)

    def dispatch_catch_up(self, feed: Feed, result: CatchUp) -> None:
        """After the dispatcher was down: what changed meanwhile, to every open stream."""
        if result.reset:
            # Gone past retention, or the database went back in time: each stream
            # reconnects and gets its own reset + snapshot.
            self.close_all("reset", feed.name)
            return
        cursor, read_in = self.cursor, result.snapshot
        for item in result.items:
            key = (feed.name, item.owner)
            if isinstance(item, Gone):
                self._publish(key, self._gone(feed, item.id, None, read_in))
            else:
                update = envelope(
                    feed.update_frame(item, cursor),
                    row_id=item.id,
                    read_in=read_in,
                    ends_row=item.terminal,
                )
                self._publish(key, update)

    async def drained(self, feed: str, owners: set[str]) -> None:
        """Wait until every open stream of these owners holds at most half its buffer's
        limit of bytes its client has not taken. A client that stops reading is cut by the
        sweep within the write timeout, so this ends."""
        limit = self.buffer_limit // 2
        while True:
            await asyncio.sleep(0)  # what was dispatched is written at the loop's next turn
            if not any(
                sub.closed is None and sub.unsent() > limit
                for owner in owners
                for sub in self._by_key.get((feed, owner), ())
            ):
                return
            await asyncio.sleep(DRAIN_POLL)

    # -- heartbeats and stuck writers -----------------------------------------------

    def heartbeat(self) -> None:
        beat = envelope(frame(HeartbeatEvent(timestamp=now())))
        for sub in list(self.subscribers()):
            if not sub.push(beat):
                self.cut(sub)

    async def run_heartbeats(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.heartbeat()

    def sweep(self) -> None:
        """Cut every stream whose connection has held unsent bytes for longer than the
        write timeout: its client stopped reading and the socket buffers are full. Without
        new events its buffer would never overflow, so only this notices it."""
        moment = time.monotonic()
        for sub in list(self.subscribers()):
            if sub.closed is not None or not sub.unsent():
                sub.backlog_since = None
            elif sub.backlog_since is None:
                sub.backlog_since = moment
            elif moment - sub.backlog_since > self.write_timeout:
                self.cut(sub)

    async def run_sweeps(self) -> None:
        """Sweep twice per write timeout: a stuck stream is cut within 1.5 timeouts,
        whatever the heartbeat interval."""
        while True:
            await asyncio.sleep(self.write_timeout / 2)
            self.sweep()
