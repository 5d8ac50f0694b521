"""The recovery after the change connection was lost: every open stream caught up from the
hub's watermark in one snapshot, while the changes that arrive meanwhile are held.

Streams are caught up owner by owner, the owners with fewest changes first (see
Reads.changes). A held change goes out early, before the recovery ends, as soon as every
stream it is for has its catch-up and nothing held before it is for those streams (their
order is commit order). The rest waits for the end of the recovery: a TRUNCATE (its whole
feed), a row to read back, anything behind a marker (it proves what came before it). The
watermark is not raised here: events sent early carry the cursor from before the outage,
and resuming from it repeats only what the client has.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from streamer.changes import CatchUp, Change, Marker, Progress, Snapshot
from streamer.feeds import Feed, Feeds
from streamer.hub import Hub
from streamer.reads import Reads
from streamer.subscriber import Key

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Held:
    """A payload waiting for its turn, in commit order."""

    payload: Change | Marker | Progress
    sent: bool = False  # went out early, during the recovery


@dataclass
class Recovery:
    """One recovery under way: the streams it catches up (`keys`), those it has caught up,
    and the held payloads (the dispatcher's inbox) it looks at as they arrive."""

    hub: Hub
    feeds: Feeds
    inbox: deque[Held]
    send: Callable[[Feed, Change], None]  # the dispatcher's: counted, then to the hub
    keys: frozenset[Key] = frozenset()
    done: set[Key] = field(default_factory=set)
    snapshot: Snapshot | None = None  # the recovery's, once it has caught any stream up
    rows: int = 0  # rows and deletes caught up
    # What the last look at the held payloads found.
    seen: int = 0
    blocked: set[Key] = field(default_factory=set)
    feeds_blocked: set[str] = field(default_factory=set)

    async def run(self, reads: Reads) -> Snapshot:
        """Catch every open stream up; the snapshot it was read in."""
        owners = self.hub.owners()
        await self.feeds.refresh()
        served = [
            (feed, feed_owners)
            for name, feed_owners in owners.items()
            if (feed := self.feeds.get(name)) is not None
        ]
        self.keys = frozenset((name, owner) for name, os in owners.items() for owner in os)
        snapshot = await reads.changes(served, self.hub.watermark, self._deliver, self._caught_up)
        self.hub.caught_up(snapshot, self.keys)
        if served:
            log.info("recovered; %d rows caught up", self.rows)
        return snapshot

    async def _deliver(self, feed: Feed, part: CatchUp) -> None:
        self.rows += len(part.items)
        self.hub.dispatch_catch_up(feed, part)
        # The next batch waits for the clients this one went to, as a stream's own
        # catch-up does: their buffers stay bounded (one that stops reading is cut).
        await self.hub.drained(feed.name, {item.owner for item in part.items})

    def _caught_up(self, feed: Feed, owners: list[str], snapshot: Snapshot) -> None:
        if self.snapshot is None:
            self.snapshot = snapshot
            self.hub.caught_up(snapshot, self.keys)
        self.done.update((feed.name, owner) for owner in owners)
        self.look(again=True)

    def arrived(self) -> None:
        """A payload was added to the inbox."""
        if self.snapshot is not None:
            self.look(again=False)

    def look(self, *, again: bool) -> None:
        """Send what may go out early: `again` after more streams were caught up, from the
        first held payload; otherwise only what arrived since the last look."""
        if again:
            self.blocked, self.feeds_blocked, self.seen = set(), set(), 0
        for held in itertools.islice(self.inbox, self.seen, None):
            if isinstance(held.payload, Marker):
                return  # never before what it proves: looked at again next time
            self.seen += 1
            if isinstance(held.payload, Change) and not held.sent:
                held.sent = self._send_early(held.payload)

    def _send_early(self, change: Change) -> bool:
        feed = self.feeds.get(change.feed)
        name = change.feed
        keys = {(name, owner) for owner in change.owners()} or {(name, "")}
        if (
            feed is None
            or change.op == "t"
            or name in self.feeds_blocked
            or keys & self.blocked
            or not all(key in self.done or key not in self.keys for key in keys)
            or (change.needs_read_back and self.hub.needs(name, change.owner, change.xid))
        ):
            if feed is None or change.op == "t":
                self.feeds_blocked.add(name)
            self.blocked |= keys
            return False
        if self.hub.wanted(name, change):
            self.send(feed, change)
        return True
