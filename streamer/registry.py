"""Who streams here, within which limits, and their writes: the hub's registry of open
streams (streamer/hub.py decides what each gets)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Iterable
from typing import Protocol

from streamer.errors import TooManyStreams, Unavailable
from streamer.feeds import Feed
from streamer.metrics import Metrics
from streamer.sse import TokenExpiredEvent, frame, now
from streamer.subscriber import Ended, Key, Subscriber, envelope
from streamer.views import PLAIN, View

log = logging.getLogger(__name__)

# Streams get their heartbeats in this many groups, one group each 1/BEAT_GROUPS of the
# period: a round over every stream at once is the busiest moment of a process and of its
# clients (and of a proxy between them), and an event that arrives then waits behind it.
BEAT_GROUPS = 10


class Interest(Protocol):
    """What a source is told of the streams here: a fleet's node receives only the changes
    of the (feed, owner)s it follows (streamer/sources/broker.py)."""

    def follow(self, key: Key) -> Awaitable[None] | None:
        """A first stream of `key` opened: receive its changes from now on; what is
        returned (if anything) is done once they flow."""

    def unfollow(self, key: Key) -> None:
        """The last stream of `key` ended."""


class Everything:
    """The interest of a source that receives every change (notify, wal)."""

    def follow(self, key: Key) -> None:
        return None

    def unfollow(self, key: Key) -> None:
        return None


class Registry:
    """The open streams of this process, by (feed, owner) and by user; their limits; and
    their writes, one per stream per loop iteration."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        max_streams_per_owner: int,
        max_streams: int,
        queue_limit: int,
        buffer_limit: int,
    ) -> None:
        self.metrics = metrics
        self.max_streams_per_owner = max_streams_per_owner
        self.max_streams = max_streams
        self.queue_limit = queue_limit  # envelopes a stream may queue while it is set up
        self.buffer_limit = buffer_limit  # unsent bytes a live stream may hold
        self._pending: list[Subscriber] = []
        self.interest: Interest = Everything()
        self._following: dict[Key, asyncio.Future[None]] = {}
        self._by_key: dict[Key, set[Subscriber]] = {}
        self._per_user: dict[str, int] = {}
        # Every stream, in the heartbeat group it joined (the smallest then), for its life.
        self.beats: list[set[Subscriber]] = [set() for _ in range(BEAT_GROUPS)]
        self.count = 0
        self.stopping = False
        self.refusing: str | None = None  # why new streams get 503 (see refuse)

    def owners(self) -> dict[str, list[str]]:
        """The owners with an open stream, by feed."""
        found: dict[str, list[str]] = {}
        for feed, owner in self._by_key:
            found.setdefault(feed, []).append(owner)
        return found

    def subscribers(self) -> Iterable[Subscriber]:
        """Every open stream once (a stream of several owners is held under each)."""
        for (_, owner), subs in self._by_key.items():
            for sub in subs:
                if sub.owners[0] == owner:
                    yield sub

    # -- subscriptions --------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def subscription(
        self,
        feed: Feed,
        owners: str | tuple[str, ...],
        user: str,
        row_id: str | None,
        *,
        expires_at: float,
        view: View = PLAIN,
    ) -> AsyncIterator[Subscriber]:
        """A stream's place in the hub for the block's length (see `open`)."""
        sub = await self.open(feed, owners, user, row_id, expires_at=expires_at, view=view)
        try:
            yield sub
        finally:
            self.release(sub)

    async def open(
        self,
        feed: Feed,
        owners: str | tuple[str, ...],
        user: str,
        row_id: str | None,
        *,
        expires_at: float,
        view: View = PLAIN,
    ) -> Subscriber:
        """A stream's place in the hub until `release`, given once its changes flow to this
        process; at `expires_at` (epoch seconds, the token's `exp`) it gets `token-expired`
        and ends."""
        sub = self.subscribe(feed, owners, user, row_id, view)
        loop = asyncio.get_running_loop()
        delay = max(0.0, expires_at - time.time())
        sub.expiry = loop.call_at(loop.time() + delay, _expire, sub)
        try:
            for key in sub.keys:
                following = self._following.get(key)
                if following is not None:
                    await asyncio.shield(following)
        except BaseException:
            self.release(sub)
            raise
        return sub

    def release(self, sub: Subscriber) -> None:
        """The stream's place is given up (again: nothing)."""
        if sub.expiry is not None:
            sub.expiry.cancel()
            sub.expiry = None
        self.unsubscribe(sub)

    def subscribe(
        self,
        feed: Feed,
        owners: str | tuple[str, ...],
        user: str,
        row_id: str | None = None,
        view: View = PLAIN,
    ) -> Subscriber:
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
        owners = (owners,) if isinstance(owners, str) else owners
        sub = Subscriber(self, feed, owners, user, row_id, view)
        for key in sub.keys:
            subs = self._by_key.get(key)
            if subs is None:
                subs = self._by_key[key] = set()
                following = self.interest.follow(key)
                if following is not None:
                    self._following[key] = asyncio.ensure_future(following)
            subs.add(sub)
        sub.beat = min(range(BEAT_GROUPS), key=lambda group: len(self.beats[group]))
        self.beats[sub.beat].add(sub)
        self._per_user[user] = self._per_user.get(user, 0) + 1
        self.count += 1
        self.metrics.streams_open.inc()
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        first = self._by_key.get(sub.keys[0])
        if first is None or sub not in first:
            return
        for key in sub.keys:
            subs = self._by_key[key]
            subs.discard(sub)
            if not subs:
                del self._by_key[key]
                self.interest.unfollow(key)
                following = self._following.pop(key, None)
                if following is not None and not following.done():
                    following.cancel()
        self.beats[sub.beat].discard(sub)
        left = self._per_user[sub.user] - 1
        if left:
            self._per_user[sub.user] = left
        else:
            del self._per_user[sub.user]
        self.count -= 1
        self.metrics.streams_open.dec()

    def close_all(self, reason: Ended, feed: str | None = None) -> None:
        for sub in list(self.subscribers()):
            if feed is None or sub.feed.name == feed:
                sub.close(reason)

    def refuse(self, message: str) -> None:
        """End every stream and refuse new ones with `message` (503) until `accept`: this
        process cannot tell them what changes."""
        self.refusing = message
        self.close_all(Ended.UNAVAILABLE)

    def accept(self) -> None:
        self.refusing = None

    def shutdown(self) -> None:
        """End every stream and refuse new ones: the process is stopping."""
        self.stopping = True
        self.close_all(Ended.SHUTDOWN)

    # -- writes ---------------------------------------------------------------------

    def cut(self, sub: Subscriber) -> None:
        """A stream whose client does not keep up: abort it; it resumes from its cursor."""
        if sub.closed is not None:
            return
        sub.close(Ended.SLOW)
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


def _expire(sub: Subscriber) -> None:
    sub.push(envelope(frame(TokenExpiredEvent(timestamp=now())), closes=True))
