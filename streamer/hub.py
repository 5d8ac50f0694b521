"""Fan-out inside one process: every stream is a Subscriber of one (feed, owner) (held in
the Registry it extends), and the hub is the one owner of who here gets a change and
whether a stream has it already.

The dispatcher hands each change to `Hub.dispatch` once; its event is encoded there once
and the same message goes to every stream of that owner in that feed. A stream that stops
reading is cut when its buffer overflows or stays unsent past the write timeout; it
resumes from its cursor. The hub knows no HTTP: a live stream writes into its Sink.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from streamer.changes import NOTHING, CatchUp, Change, Gone, Row, Snapshot, format_cursor
from streamer.feeds import Feed
from streamer.metrics import Metrics
from streamer.registry import Registry
from streamer.shapes import load_row
from streamer.sse import HeartbeatEvent, deleted_frame, frame, now, timestamp_now, update_frame
from streamer.subscriber import Ended, Envelope, Key, envelope
from streamer.views import View

HEARTBEAT_SLICE = 500  # streams given their heartbeat at once, before the loop runs others

log = logging.getLogger(__name__)


class Hub(Registry):
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
        super().__init__(
            metrics,
            max_streams_per_owner=max_streams_per_owner,
            max_streams=max_streams,
            queue_limit=queue_limit,
            buffer_limit=buffer_limit,
        )
        self.write_timeout = write_timeout
        # Every change not yet dispatched was made by a transaction with id >= watermark.
        # Transaction ids are database-wide: one watermark serves every feed.
        self.watermark = 0
        # feed -> the transaction of its last TRUNCATE: a stream's fresh snapshot must see it
        self.truncated_by: dict[str, int] = {}
        # The last recovery's snapshot and the streams it caught up: a change that snapshot
        # saw is already in those streams, but not in streams opened since.
        self._caught_up: tuple[Snapshot, frozenset[Key]] = (NOTHING, frozenset())
        self._turn = 0  # the heartbeat group whose turn is next

    @property
    def cursor(self) -> str:
        return format_cursor(self.watermark)

    # -- who has what ---------------------------------------------------------------

    def needs(self, feed: str, owner: str | None, xid: int) -> bool:
        """Whether a stream here of this owner may still need the change made by `xid`."""
        if owner is None or (feed, owner) not in self._by_key:
            return False
        snapshot, keys = self._caught_up
        return (feed, owner) not in keys or not snapshot.sees(xid)

    def wanted(self, feed: str, change: Change) -> bool:
        """Whether any stream here may still need `change` (a TRUNCATE: always)."""
        return change.op == "t" or any(self.needs(feed, o, change.xid) for o in change.owners())

    def caught_up(self, snapshot: Snapshot, keys: frozenset[Key]) -> None:
        """The streams of `keys` were given everything `snapshot` saw (a recovery's)."""
        self._caught_up = (snapshot, keys)

    # -- fan-out --------------------------------------------------------------------

    def _publish(self, key: Key, build: Callable[[View], Envelope | None]) -> None:
        """To every stream of `key` the envelope `build` makes for its view: made once per
        distinct view (once, for streams that take every row as it is)."""
        made: dict[str, Envelope | None] = {}
        for sub in tuple(self._by_key.get(key, ())):
            view = sub.view
            if view.suffix in made:
                envelope = made[view.suffix]
            else:
                envelope = made[view.suffix] = build(view)
            if envelope is not None and not sub.push(envelope):
                self.cut(sub)

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

    def dispatch(self, feed: Feed, change: Change, current: Row | None) -> None:
        """Hand one committed change of `feed` to the streams here that need it.

        `current` is the row read back for an update too big to travel (None: the one in
        the payload, made only for an owner with a stream here). A row read back may belong
        to someone else by now, or be a later version of it; it then goes nowhere: the
        change that moved it or made that version follows, and a newer version sent first
        would go out ahead of older ones.
        """
        name = feed.name
        if change.op == "t":
            self.truncated_by[name] = change.xid
            self._truncated(feed)
            return
        # Most changes are of owners this process has no stream of: nothing is encoded then.
        moved_from = change.old_owner if change.old_owner != change.owner else None
        gone_from = change.owner if change.op == "d" else moved_from
        if self.needs(name, gone_from, change.xid):
            assert gone_from is not None
            self._publish((name, gone_from), self._gone_of(feed, change.row_id, change.xid))
        if change.op == "d" or not self.needs(name, change.owner, change.xid):
            return
        current = current or change.current()
        if current is None or current.owner != change.owner or current.version != change.version:
            return
        self._publish((name, current.owner), self._row_of(feed, Through(current), change.xid))

    def _row_of(
        self, feed: Feed, row: Through, xid: int | None, read_in: Snapshot | None = None
    ) -> Callable[[View], Envelope]:
        return lambda view: self._row(feed, view, row, xid, read_in)

    def _gone_of(
        self, feed: Feed, row_id: str, xid: int | None, read_in: Snapshot | None = None
    ) -> Callable[[View], Envelope]:
        return lambda view: self._gone(feed, view, row_id, xid, read_in)

    def _row(
        self, feed: Feed, view: View, row: Through, xid: int | None, read_in: Snapshot | None = None
    ) -> Envelope:
        """A row's update as `view` shows it: a delete where it does not match."""
        if view.filtered and not view.shape.matches(row.values()):
            return self._gone(feed, view, row.row.id, xid, read_in)
        text = row.row.json if view.plain else view.text(row.row, row.values())
        return envelope(
            update_frame(feed, row.row, view.cursor(self.cursor), row.stamp(), text=text),
            row_id=row.row.id,
            xid=xid,
            read_in=read_in,
            ends_row=row.row.terminal,
        )

    def _gone(
        self,
        feed: Feed,
        view: View,
        row_id: str,
        xid: int | None,
        read_in: Snapshot | None = None,
    ) -> Envelope:
        return envelope(
            deleted_frame(feed, row_id, view.cursor(self.cursor)),
            row_id=row_id,
            xid=xid,
            read_in=read_in,
            ends_row=True,
            leaves=view.filtered,
        )

    def _truncated(self, feed: Feed) -> None:
        """Every row is gone at once: a one-row stream ends with its row's delete, every
        other stream of the feed starts over (reset, then a fresh snapshot)."""
        for sub in list(self.subscribers()):
            if sub.feed.name != feed.name:
                continue
            if sub.row_id is None:
                sub.close(Ended.TRUNCATED)
            elif not sub.push(self._gone(feed, sub.view, sub.row_id, None)):
                self.cut(sub)

    def dispatch_catch_up(self, feed: Feed, result: CatchUp) -> None:
        """After the dispatcher was down: what changed meanwhile, to every open stream."""
        if result.reset:
            # Gone past retention, or the database went back in time: each stream
            # reconnects and gets its own reset + snapshot.
            self.close_all(Ended.RESET, feed.name)
            return
        read_in = result.snapshot
        for item in result.items:
            key = (feed.name, item.owner)
            if isinstance(item, Gone):
                self._publish(key, self._gone_of(feed, item.id, None, read_in))
            else:
                self._publish(key, self._row_of(feed, Through(item), None, read_in))

    async def drained(self, feed: str, owners: set[str]) -> None:
        """Wait until every open stream of these owners holds at most half its buffer's
        limit of bytes its client has not taken. A client that stops reading is cut by the
        sweep within the write timeout, so this ends."""
        await asyncio.sleep(0)  # what was dispatched is written at the loop's next turn
        subs = [sub for owner in owners for sub in self._by_key.get((feed, owner), ())]
        await asyncio.gather(*(sub.drained() for sub in subs))

    # -- heartbeats and stuck writers -----------------------------------------------

    async def heartbeat(self) -> None:
        """The heartbeats of the next group of streams (the groups take turns, one each
        1/BEAT_GROUPS of the period: every stream gets one a period, and the period's work
        is spread over it), HEARTBEAT_SLICE streams at a time, the loop running whatever
        else is ready in between: thousands of streams in one pass (18 µs each) would hold
        an event that arrives meanwhile for hundreds of ms."""
        group, self._turn = self.beats[self._turn], (self._turn + 1) % len(self.beats)
        beat = envelope(frame(HeartbeatEvent(timestamp=now())))
        subs = list(group)
        for start in range(0, len(subs), HEARTBEAT_SLICE):
            if start:
                await asyncio.sleep(0)
            for sub in subs[start : start + HEARTBEAT_SLICE]:
                if not sub.push(beat):
                    self.cut(sub)

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


class Through:
    """A row on its way to streams: its JSON decoded once, by the first filtered or
    selecting view that needs it, for every other."""

    __slots__ = ("_stamp", "_values", "row")

    def __init__(self, row: Row) -> None:
        self.row = row
        self._values: dict[str, Any] | None = None
        self._stamp: bytes | None = None

    def stamp(self) -> bytes:
        """The events' timestamp: one for every view of this change."""
        if self._stamp is None:
            self._stamp = timestamp_now()
        return self._stamp

    def values(self) -> dict[str, Any]:
        if self._values is None:
            self._values = load_row(self.row.json)
        return self._values
