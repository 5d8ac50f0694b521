"""One open stream, as the hub holds it: what it waits for, what it already has, where its
bytes go. The hub (streamer/hub.py) decides who gets a change; a Subscriber takes it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from streamer.changes import Snapshot
from streamer.feeds import Feed
from streamer.sse import Message, Sink
from streamer.views import PLAIN, View

Key = tuple[str, str]  # (feed, owner)


class Holder(Protocol):
    """What a stream needs of the registry that holds it (streamer/registry.py)."""

    queue_limit: int  # envelopes a stream may queue while it is set up
    buffer_limit: int  # unsent bytes a live stream may hold

    def mark_pending(self, sub: Subscriber) -> None: ...

    def cut(self, sub: Subscriber) -> None: ...


class Ended(StrEnum):
    """Why a stream ended."""

    END = "end"  # its last event was written: a one-row stream's end, token-expired
    GONE = "gone"  # the client left
    SLOW = "slow"  # cut for not reading; it resumes from its cursor
    SHUTDOWN = "shutdown"  # the process stops
    UNAVAILABLE = "unavailable"  # this process cannot follow the database's changes
    TRUNCATED = "truncated"  # the table was truncated: the stream starts over in place
    RESET = "reset"  # a catch-up could not be honoured: the client resumes with a reset
    DISABLED = "disabled"  # the feed was disabled or changed


@dataclass(frozen=True, slots=True)
class Envelope:
    message: Message  # a whole SSE message, shared by every stream it goes to
    row_id: str | None = None
    xid: int | None = None  # the writer's transaction; None: deliver whatever the snapshot
    # A catch-up's snapshot: a stream that read the database at least as late skips it.
    read_in: Snapshot | None = None
    ends_row: bool = False  # a terminal state or a delete: a one-row stream ends after it
    closes: bool = False  # every stream ends after it (token-expired)
    # A row leaving a filtered view (deleted, moved or no longer matching): sent only to a
    # stream that holds it. Any other row event of a filtered view adds the row.
    leaves: bool = False


def envelope(
    data: bytes,
    *,
    row_id: str | None = None,
    xid: int | None = None,
    read_in: Snapshot | None = None,
    ends_row: bool = False,
    closes: bool = False,
    leaves: bool = False,
) -> Envelope:
    return Envelope(Message(data), row_id, xid, read_in, ends_row, closes, leaves)


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
        "_held",
        "_last",
        "_pending",
        "_queue",
        "_registry",
        "_seen",
        "_sink",
        "backlog_since",
        "beat",
        "closed",
        "dropped",
        "ended",
        "expiry",
        "feed",
        "owners",
        "row_id",
        "user",
        "view",
    )

    def __init__(
        self,
        registry: Holder,
        feed: Feed,
        owners: tuple[str, ...],
        user: str,
        row_id: str | None,
        view: View = PLAIN,
    ) -> None:
        self._registry = registry
        self.feed = feed
        self.owners = owners  # sorted: the sub, or the owners of the token's claim
        self.user = user  # the token's subject: the per-user limit counts across feeds
        self.row_id = row_id
        self.view = view
        # The ids of the rows its client holds, for a filtered view (None otherwise): known
        # once its read of the database is done (go_live).
        self._held: set[str] | None = None
        self._queue: list[Envelope] | None = []
        self._pending: list[Message] | None = None
        self._sink: Sink | None = None
        self._seen: Snapshot | None = None
        self._last = False  # the stream ends once what is pending is written
        self.closed: Ended | None = None
        self.dropped = 0  # envelopes left undelivered when it was cut
        self.backlog_since: float | None = None  # when its connection last had unsent bytes
        self.beat = 0  # its heartbeat group (the registry's)
        self.ended: asyncio.Future[Ended] = asyncio.get_running_loop().create_future()
        self.expiry: asyncio.TimerHandle | None = None  # its token's expiry (the registry's)

    @property
    def keys(self) -> tuple[Key, ...]:
        return tuple((self.feed.name, owner) for owner in self.owners)

    def push(self, envelope: Envelope) -> bool:
        """Take an envelope; False when it overflowed the set-up queue and the stream was cut."""
        if self.closed is not None or self._last:
            return True
        if self.row_id is not None and envelope.row_id not in (None, self.row_id):
            return True
        queue = self._queue
        if queue is not None:
            if len(queue) >= self._registry.queue_limit:
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
        held = self._held
        if held is not None and envelope.row_id is not None:
            if envelope.leaves:
                if envelope.row_id not in held:
                    return  # a row its client does not have
                held.discard(envelope.row_id)
            else:
                held.add(envelope.row_id)
        if self._pending is None:
            self._pending = [envelope.message]
            self._registry.mark_pending(self)
        else:
            self._pending.append(envelope.message)
        if envelope.closes or (self.row_id is not None and envelope.ends_row):
            self._last = True

    def go_live(self, sink: Sink, seen: Snapshot, held: set[str] | None = None) -> None:
        """From now on write into `sink`; first what queued during set-up, except what the
        stream's own read of the database (`seen`) already covered. `held`: the rows of a
        filtered view its client holds after that read."""
        queue, self._queue = self._queue, None
        self._sink = sink
        self._seen = seen if seen.xmax else None
        self._held = held if self.view.filtered else None
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
            self.close(Ended.GONE)
            return 0
        sink.write(pending)
        if sink.unsent() > self._registry.buffer_limit:
            self.dropped = len(pending)  # still in the buffer when the connection is aborted
            self._registry.cut(self)
        elif self._last:
            self.close(Ended.END)
        return len(pending)

    def unsent(self) -> int:
        return 0 if self._sink is None else self._sink.unsent()

    async def drained(self) -> None:
        """Return once its client took most of what was written (see Sink.drained)."""
        if self._sink is not None and self.closed is None:
            await self._sink.drained()

    def close(self, reason: Ended) -> None:
        """End the stream: what is pending is written first, unless it is cut for being slow
        (then the connection is aborted, and what it had not taken is counted as dropped)."""
        if self.closed is not None:
            return
        self.closed = reason
        pending, self._pending = self._pending, None
        queue, self._queue = self._queue, None
        sink = self._sink
        if reason is Ended.SLOW:
            self.dropped = self.dropped or len(pending or queue or ())
            if sink is not None:
                sink.abort()
        elif pending and sink is not None and not sink.closing:
            sink.write(pending)
        if not self.ended.done():
            self.ended.set_result(reason)
