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
from collections import deque
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
SUBSCRIBE, UNSUBSCRIBE = "subscribe", "unsubscribe"


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
        # The session's SUBSCRIBE and UNSUBSCRIBE commands, in the order asked (a run of
        # one kind is one command), sent one at a time by `_send` once the session's first
        # SUBSCRIBE is done; and, per channel, the `subscribe` replies still to come.
        self._commands: deque[tuple[str, dict[bytes, None]]] = deque()
        self._replies: dict[bytes, int] = {}
        self._open = False
        self._sender: asyncio.Task[None] | None = None

    async def connect(self, receive: Callable[[Payload], None]) -> None:
        self._lost.clear()
        self._ticked.clear()
        self._commands.clear()  # this session subscribes every key followed
        self._replies.clear()
        self._open = False
        self._failure = None
        self._session_epoch = None
        self._receive = receive
        await self.signed.load()
        self._prefix = fleet_prefix(self.signed.key)
        self._client = redis.Redis.from_url(self.url, socket_connect_timeout=5)
        self._pubsub = self._client.pubsub()
        channels = [all_channel(self._prefix).encode()]
        channels += [self._channel(key) for key in self._following]
        self._expect(channels)
        try:
            await self._pubsub.subscribe(*channels)
        except RedisError as exc:
            raise ConnectionError(f"the broker: {exc}") from exc
        self._reader = asyncio.create_task(self._read())
        self._open = True
        self._wake()  # what was followed or left meanwhile
        # The first tick names the reader this session starts with: any later is a gap.
        async with asyncio.timeout(self.tick_timeout):
            await self._ticked.wait()
        if self._failure is not None:
            raise ConnectionError(f"the broker: {self._failure}") from self._failure

    def _channel(self, key: Key) -> bytes:
        return owner_channel(self._prefix, *key).encode()

    def follow(self, key: Key) -> Awaitable[None] | None:
        """Subscribe to `key`'s channel; done once the broker confirmed it (changes
        published from then on come here). The keys followed within one turn of the loop
        (a crowd arriving) are subscribed in one command."""
        self._following.add(key)
        if self._pubsub is None or self._lost.is_set():
            return None  # the next session subscribes it, and its recovery catches it up
        channel = self._channel(key)
        confirmed = self._confirming.get(channel)
        if confirmed is None or confirmed.cancelled():  # cancelled: its stream left
            confirmed = asyncio.get_running_loop().create_future()
            self._confirming[channel] = confirmed
            self._command(SUBSCRIBE, channel)
        return confirmed

    def unfollow(self, key: Key) -> None:
        self._following.discard(key)
        if self._pubsub is not None and not self._lost.is_set():
            self._command(UNSUBSCRIBE, self._channel(key))

    def _command(self, kind: str, channel: bytes) -> None:
        """Queue `channel` for the next command of `kind`. Commands go out in the order
        they were asked: a key left and followed again within a turn (its last stream gone,
        a new one come) is unsubscribed, then subscribed, and its confirmation is the reply
        to that last SUBSCRIBE, not to an earlier one still on its way."""
        if self._commands and self._commands[-1][0] == kind:
            batch = self._commands[-1][1]
            if channel in batch:
                return  # one reply for it, however often it is named in one command
            batch[channel] = None
        else:
            self._commands.append((kind, {channel: None}))
        if kind == SUBSCRIBE:
            self._expect([channel])
        self._wake()

    def _expect(self, channels: list[bytes]) -> None:
        for channel in channels:
            self._replies[channel] = self._replies.get(channel, 0) + 1

    def _wake(self) -> None:
        if self._open and self._commands and (self._sender is None or self._sender.done()):
            self._sender = asyncio.ensure_future(self._send(self._pubsub))

    async def _send(self, pubsub: redis.client.PubSub) -> None:
        """Send the queued commands, one at a time, in the session they were asked in (one
        command on the wire at a time: redis-py's pub/sub may open a second connection for
        two at once). A failure ends the session; the next subscribes every key followed."""
        try:
            while self._commands and pubsub is self._pubsub and not self._lost.is_set():
                kind, channels = self._commands.popleft()
                if kind == SUBSCRIBE:
                    await pubsub.subscribe(*channels)
                else:
                    await pubsub.unsubscribe(*channels)
            return
        except CONNECTION_ERRORS:
            pass
        except Exception:  # redis's client, its connection reset under it meanwhile
            log.warning("subscribing at the broker failed; starting a new session", exc_info=True)
        if pubsub is self._pubsub:
            self._lost.set()  # the session ends (and, with it, its confirmations)

    def _confirmed(self, channel: bytes) -> None:
        """A `subscribe` reply: the channel's confirmation once it is the last one asked."""
        left = self._replies.pop(channel, 1) - 1
        if left > 0:
            self._replies[channel] = left
            return
        confirmed = self._confirming.pop(channel, None)
        if confirmed is not None and not confirmed.done():
            confirmed.set_result(None)

    def _give_up(self) -> None:
        """The session ended: every confirmation waited for is given up on (its stream goes
        on; the next session subscribes every key followed, and its recovery catches each
        stream up)."""
        for confirmed in self._confirming.values():
            if not confirmed.done():
                confirmed.set_result(None)
        self._confirming.clear()

    async def _read(self) -> None:
        try:
            async for item in self._pubsub.listen():
                if item["type"] == "message":
                    self._message(item["data"])
                elif item["type"] == "subscribe":
                    self._confirmed(item["channel"])
        except CONNECTION_ERRORS as exc:
            self._failure = exc
        finally:
            self._lost.set()
            self._give_up()

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
        sender, self._sender = self._sender, None
        pubsub, self._pubsub = self._pubsub, None
        client, self._client = self._client, None
        self._open = False
        for task in (sender, reader):
            if task is not None:
                await stopped(task)
        self._give_up()
        with contextlib.suppress(*CONNECTION_ERRORS):
            if pubsub is not None:
                await pubsub.aclose()
            if client is not None:
                await client.aclose()
