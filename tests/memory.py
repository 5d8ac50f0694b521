"""In-memory stand-ins for a client's connection, for tests of the hub with no sockets."""

from __future__ import annotations

import asyncio

from streamer.sse import Sink


class Transport(asyncio.WriteTransport):
    """A connection whose client takes what it is sent only when the test says so
    (`buffered`: the bytes it has not taken yet)."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.aborted = False
        self._buffered = 0
        self._high: int | None = None
        self._changed = asyncio.Event()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    @property
    def text(self) -> str:
        return b"".join(self.written).decode()

    def is_closing(self) -> bool:
        return self.aborted

    @property
    def buffered(self) -> int:
        return self._buffered

    @buffered.setter
    def buffered(self, size: int) -> None:
        self._buffered = size
        self._changed.set()

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = high

    def abort(self) -> None:
        self.aborted = True
        self._changed.set()

    async def drain(self) -> None:
        """As aiohttp's writer does: return once the buffer is at or below its limit."""
        while not self.aborted and self._high is not None and self._buffered > self._high:
            self._changed.clear()
            await self._changed.wait()


def sink(transport: Transport, *, chunked: bool = False, backlog: int = 2 * 1024 * 1024) -> Sink:
    return Sink(transport, chunked, transport.drain, backlog=backlog)
