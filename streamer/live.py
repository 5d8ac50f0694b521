"""A live stream's connection once aiohttp has let go of it.

aiohttp sets a stream up: its request, the token, errors as JSON, the catch-up, `synced`.
Then all the stream does for hours is take the bytes the hub writes into it, yet aiohttp
would keep for as long the request (its headers twice over, the cookie), the parser, the
handler's task and every frame under it: some 18 KB a stream (bench/FINDINGS.md). So the
connection is handed over: a `Live` becomes its protocol, keeps the transport, the
stream's place in the hub and what it needs to start over after a TRUNCATE, and aiohttp is
told the connection is no longer its own (`take`, checked by tests/test_live.py against
the aiohttp this project pins).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from streamer.errors import ApiError
from streamer.sse import Message
from streamer.subscriber import Ended, Subscriber

log = logging.getLogger(__name__)

LAST_CHUNK = b"0\r\n\r\n"  # a chunked response's end

# Starts the stream over in place (after a TRUNCATE) through the Live given, and returns
# its new place in the hub, live again.
StartOver = Callable[["Live"], Awaitable[Subscriber]]


class Live(asyncio.Protocol):
    """The protocol of a live stream's connection: what the client sends is ignored (an
    EventSource sends nothing), the connection's end ends the stream, and the stream's end
    ends the response (its last chunk) and closes the connection."""

    __slots__ = (
        "_chunked",
        "_paused",
        "_release",
        "_restart",
        "_start_over",
        "_sub",
        "_timeout",
        "_transport",
        "on_slow",
    )

    def __init__(
        self,
        transport: asyncio.Transport,
        *,
        chunked: bool,
        write_timeout: float,
        release: Callable[[Subscriber], None],
        start_over: StartOver,
        on_slow: Callable[[], None],
    ) -> None:
        self._transport = transport
        self._chunked = chunked
        self._timeout = write_timeout
        self._release = release
        self._start_over = start_over
        self.on_slow = on_slow
        self._sub: Subscriber | None = None
        self._restart: asyncio.Task[None] | None = None
        self._paused: asyncio.Future[None] | None = None

    # -- what the stream's set-up uses ----------------------------------------------

    @property
    def transport(self) -> asyncio.Transport:
        return self._transport

    @property
    def chunked(self) -> bool:
        return self._chunked

    @property
    def opened(self) -> bool:
        return True  # its response began long ago

    async def open(self) -> None:
        return None

    async def flush(self) -> None:
        return None  # what it writes goes out at once

    async def write(self, data: bytes) -> None:
        """Write and wait until the client took it, within the write timeout (else the
        connection is cut, and the client resumes from its cursor)."""
        message = Message(data)
        self._transport.write(message.chunk if self._chunked else data)
        try:
            async with asyncio.timeout(self._timeout):
                await self.drain()
        except TimeoutError:
            self.on_slow()
            self._transport.abort()
            raise ConnectionResetError("the client stopped reading during a catch-up") from None
        if self._transport.is_closing():
            raise ConnectionResetError("the client left during a catch-up")

    async def drain(self) -> None:
        """Return once the transport's write buffer is below its limit, or it is closed."""
        transport = self._transport
        limit = transport.get_write_buffer_limits()[1]
        while transport.get_write_buffer_size() > limit and not transport.is_closing():
            if self._paused is None:
                self._paused = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._paused)

    # -- the stream -----------------------------------------------------------------

    def take(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        """Become the protocol of `request`'s connection: aiohttp writes nothing more to it
        (not even the response's end: that is the stream's), forgets it once its handler
        returns, and drops the request."""
        protocol = request.protocol
        self._transport.set_protocol(self)
        response.force_close()  # no keep-alive wait for a next request on it
        protocol.keep_alive(False)  # and its timer for this connection cancelled
        protocol.transport = None
        manager = protocol._manager  # the server, that counts its connections
        if manager is not None:
            manager.connection_lost(protocol, None)

    def attach(self, sub: Subscriber) -> None:
        """Carry `sub`, live, until it ends or the connection does."""
        self._sub = sub
        sub.ended.add_done_callback(self._ended)

    def _ended(self, ended: asyncio.Future[Ended]) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            self._release(sub)
        reason = ended.result()
        transport = self._transport
        if reason is Ended.TRUNCATED and not transport.is_closing():
            self._restart = asyncio.ensure_future(self._again())
            return
        if reason is not Ended.SLOW and self._chunked and not transport.is_closing():
            transport.write(LAST_CHUNK)
        transport.close()

    async def _again(self) -> None:
        """Start over in place: `reset`, a fresh snapshot, `synced`, live again."""
        try:
            sub = await self._start_over(self)
        except (ConnectionError, ApiError):  # the database went away, the client left...
            self._transport.abort()
            return
        except Exception:
            log.exception("a stream could not start over after a TRUNCATE")
            self._transport.abort()
            return
        finally:
            self._restart = None
        self.attach(sub)

    # -- asyncio's protocol ---------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        return None  # a second request on a live stream's connection is never answered

    def eof_received(self) -> bool:
        return False  # the client is done: close (connection_lost follows)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._sub is not None:
            self._sub.close(Ended.GONE)
        if self._restart is not None:
            self._restart.cancel()
        self.resume_writing()

    def pause_writing(self) -> None:
        return None  # `drain` reads the buffer's size itself

    def resume_writing(self) -> None:
        paused, self._paused = self._paused, None
        if paused is not None and not paused.done():
            paused.set_result(None)
