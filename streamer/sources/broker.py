"""A fleet's node: changes come through the broker (Redis pub/sub) from the fleet's one
reader (streamer/fleet.py), and only those of the (feed, owner)s streamed here.

Channels, under a prefix of the fleet's own (from the database's signing key, so that
fleets can share one Redis):

    <prefix>:o:<feed>:<owner>   the changes of one owner of one feed (a change of owner:
                                on both owners' channels)
    <prefix>:all                what every node needs: TRUNCATEs, hints, markers, ticks

One pub/sub connection carries them all, so they are read in the order the reader
published them. Every message is `<mac> <epoch> <kind>\\n<text>` (the mac: see `message`),
with the epoch of the reader that sent it (a transaction id, taken when it was elected: a
later reader's is larger). A message of an earlier epoch is a stale reader's and is
dropped; a later epoch means a new reader, which may not have published what the last one
read: a gap. A gap of any kind (a
new reader, the broker lost, no tick from any reader, the broker cutting this slow
consumer) ends the session, and the dispatcher catches every stream up from its cursor,
as after a lost LISTEN.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from streamer.changes import Forged, Hint, Marker, Payload, Progress, Signed, Unreadable
from streamer.errors import CONNECTION_ERRORS as DATABASE_ERRORS
from streamer.metrics import Metrics
from streamer.tasks import set_within, stopped

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (feed, owner)
# What a lost broker (or database) looks like here; what leaves this module is a
# ConnectionError, which the dispatcher retries like a lost LISTEN.
CONNECTION_ERRORS = (*DATABASE_ERRORS, RedisError)
CHANGE, MARKER, HINT, TICK = "c", "m", "h", "t"


def fleet_prefix(key: bytes) -> str:
    return "streamer:" + hashlib.sha256(b"fleet:" + key).hexdigest()[:16]


def owner_channel(prefix: str, feed: str, owner: str) -> str:
    return f"{prefix}:o:{feed}:{owner}"


def all_channel(prefix: str) -> str:
    return f"{prefix}:all"


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, b"broker:" + body, hashlib.sha256).hexdigest()[:32].encode()


def message(key: bytes, epoch: int, kind: str, text: str = "") -> bytes:
    """A message of the reader's: authenticated with the database's signing key, which
    only the fleet's processes hold, so that another client of the broker can neither
    forge one nor fake an epoch."""
    body = f"{epoch} {kind}\n{text}".encode()
    return _mac(key, body) + b" " + body


def read_message(key: bytes, data: bytes) -> tuple[int, str, str]:
    """(epoch, kind, text); ValueError for what no reader of this fleet sent."""
    mac, _, body = data.partition(b" ")
    if not hmac.compare_digest(mac, _mac(key, body)):
        raise ValueError("not signed by a reader of this fleet")
    head, _, text = body.decode().partition("\n")
    epoch, kind = head.split(" ")
    return int(epoch), kind, text


class BrokerSource:
    description = "receiving changes through the fleet's broker"

    def __init__(
        self,
        url: str,
        signed: Signed,
        mark: Callable[[str], Awaitable[None]],
        *,
        name: str,
        metrics: Metrics,
        tick_timeout: float = 5.0,
    ) -> None:
        self.url = url
        self.signed = signed
        self._mark = mark  # commits a marker to the database, which the reader relays
        self.name = name  # how the database's feeds send (the reader reads that way)
        self.metrics = metrics
        self.tick_timeout = tick_timeout  # no tick from any reader this long: a gap
        self.epoch = 0  # the latest reader's, over every session
        self._session_epoch: int | None = None
        self._prefix = ""
        self._following: set[Key] = set()
        self._confirming: dict[bytes, asyncio.Future[None]] = {}
        self._client: redis.Redis | None = None
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._receive: Callable[[Payload], None] = lambda _payload: None
        self._lost = asyncio.Event()
        self._ticked = asyncio.Event()
        self._last_tick = 0.0
        self._failure: Exception | None = None
        self._unsubscribing: set[asyncio.Task[None]] = set()  # and subscribing
        self._asked: list[str] = []  # channels to subscribe, in the next command

    async def connect(self, receive: Callable[[Payload], None]) -> None:
        self._lost.clear()
        self._ticked.clear()
        self._asked = []  # this session subscribes every key followed
        self._failure = None
        self._session_epoch = None
        self._receive = receive
        await self.signed.load()
        self._prefix = fleet_prefix(self.signed.key)
        self._client = redis.Redis.from_url(self.url, socket_connect_timeout=5)
        self._pubsub = self._client.pubsub()
        channels = [owner_channel(self._prefix, *key) for key in self._following]
        try:
            await self._pubsub.subscribe(all_channel(self._prefix), *channels)
        except RedisError as exc:
            raise ConnectionError(f"the broker: {exc}") from exc
        self._reader = asyncio.create_task(self._read())
        # The first tick names the reader this session starts with: any later is a gap.
        async with asyncio.timeout(self.tick_timeout):
            await self._ticked.wait()
        if self._failure is not None:
            raise ConnectionError(f"the broker: {self._failure}") from self._failure

    def follow(self, key: Key) -> Awaitable[None] | None:
        """Subscribe to `key`'s channel; done once the broker confirmed it (changes
        published from then on come here). The keys followed within one turn of the loop
        (a crowd arriving) are subscribed in one command."""
        self._following.add(key)
        if self._pubsub is None or self._lost.is_set():
            return None  # the next session subscribes it, and its recovery catches it up
        channel = owner_channel(self._prefix, *key)
        confirmed = self._confirming.get(channel.encode())
        if confirmed is None or confirmed.cancelled():  # cancelled: its stream left
            confirmed = asyncio.get_running_loop().create_future()
            self._confirming[channel.encode()] = confirmed
            self._asked.append(channel)
            if len(self._asked) == 1:
                task = asyncio.ensure_future(self._subscribe(self._pubsub))
                self._unsubscribing.add(task)
                task.add_done_callback(self._unsubscribing.discard)
        return confirmed

    async def _subscribe(self, pubsub: redis.client.PubSub) -> None:
        """Subscribe, in the session `follow` was called in, every channel asked since. It
        runs a moment later: that session may have ended meanwhile (its confirmations are
        then given up on, and the next session subscribes every key followed)."""
        if pubsub is not self._pubsub:
            return  # a new session: it subscribed every key followed, these too
        channels, self._asked = self._asked, []
        try:
            await pubsub.subscribe(*channels)
            return
        except CONNECTION_ERRORS:
            pass
        except Exception:  # redis's client, its connection reset under it meanwhile
            log.warning("subscribing at the broker failed; starting a new session", exc_info=True)
        if pubsub is self._pubsub:
            self._lost.set()  # the session ends; the next one subscribes them
        for channel in channels:
            confirmed = self._confirming.pop(channel.encode(), None)
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(None)

    def unfollow(self, key: Key) -> None:
        self._following.discard(key)
        if self._pubsub is not None and not self._lost.is_set():
            task = asyncio.create_task(self._unsubscribe(owner_channel(self._prefix, *key)))
            self._unsubscribing.add(task)
            task.add_done_callback(self._unsubscribing.discard)

    async def _unsubscribe(self, channel: str) -> None:
        with contextlib.suppress(*CONNECTION_ERRORS):
            await self._pubsub.unsubscribe(channel)

    async def _read(self) -> None:
        try:
            async for item in self._pubsub.listen():
                if item["type"] == "message":
                    self._message(item["data"])
                elif item["type"] == "subscribe":
                    confirmed = self._confirming.pop(item["channel"], None)
                    if confirmed is not None and not confirmed.done():
                        confirmed.set_result(None)
        except CONNECTION_ERRORS as exc:
            self._failure = exc
        finally:
            self._lost.set()
            for confirmed in self._confirming.values():
                if not confirmed.done():
                    confirmed.set_result(None)  # given up on: the next session covers it
            self._confirming.clear()

    def _message(self, data: bytes) -> None:
        try:
            epoch, kind, text = read_message(self.signed.key, data)
        except ValueError:
            self._receive(Forged())  # counted and dropped: the broker is not the arbiter
            return
        if epoch < self.epoch:
            self.metrics.broker_stale.inc()  # a reader that lost its election: not believed
            return
        if self._session_epoch is not None and epoch != self._session_epoch:
            log.info("a new reader for the fleet (epoch %d): catching up", epoch)
            self.epoch = epoch
            self._lost.set()
            return
        self.epoch, self._session_epoch = epoch, epoch
        if kind == CHANGE:
            self._receive(self.signed.read(text))
        elif kind == TICK:
            self._last_tick = asyncio.get_running_loop().time()
            self._ticked.set()
            self._receive(Progress(int(text)))
        elif kind == MARKER:
            self._receive(Marker(text))
        elif kind == HINT:
            self._receive(Hint())
        else:
            self._receive(Unreadable(f"a broker message of kind {kind!r}"))

    async def mark(self, token: str) -> None:
        await self._mark(token)

    async def watch(self) -> None:
        """Return when the broker's connection is lost or a new reader came; raise when no
        reader has been heard of for `tick_timeout` (none is reading: streams wait)."""
        loop = asyncio.get_running_loop()
        while not self._lost.is_set():
            lost = await set_within(self._lost, self.tick_timeout / 2)
            if not lost and loop.time() - self._last_tick > self.tick_timeout:
                raise TimeoutError("no tick from the fleet's reader")
        if self._failure is not None:
            raise ConnectionError(f"the broker: {self._failure}") from self._failure

    async def close(self) -> None:
        reader, self._reader = self._reader, None
        pubsub, self._pubsub = self._pubsub, None
        client, self._client = self._client, None
        if reader is not None:
            await stopped(reader)
        with contextlib.suppress(*CONNECTION_ERRORS):
            if pubsub is not None:
                await pubsub.aclose()
            if client is not None:
                await client.aclose()
