"""At most `most` connections of a process being set up at once; the others wait unread.

A crowd comes back at once: after a restart, some 16,000 connections a worker within a
second or two. Until its stream is live, each costs aiohttp's request and parser, a
handler task and its catch-up, some 20 KB; all at once that is hundreds of MB a worker,
which the allocator keeps once they are done (its arenas pinned by the live streams made
among them): 17 KB of memory a stream in the end where a live one holds 4
(bench/FINDINGS.md). And every catch-up would queue at the pool at once.

So a connection is accepted at once (the kernel's backlog empties: no SYN is dropped) but
read only while fewer than `most` are being set up: until then its request stays in the
kernel's socket buffer and it costs the process a socket and a small object. A
connection's set-up ends when its request is answered or its stream goes live (the app
calls `leave`), when it closes, or at the latest SLOT_SECONDS after it was let in (a slow
client, a big catch-up read at its client's pace): the gate paces, it turns nobody away.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from streamer.metrics import Metrics

SLOT_SECONDS = 5.0  # the longest a connection's set-up keeps its place

ProtocolFactory = Callable[[], asyncio.Protocol]


class Gate:
    """The connections of a process being set up (see the module's doc)."""

    def __init__(
        self, most: int, metrics: Metrics | None = None, slot_seconds: float = SLOT_SECONDS
    ) -> None:
        self.most = most
        self.slot_seconds = slot_seconds
        self._metrics = metrics
        self._inside: dict[asyncio.BaseTransport, float] = {}  # let in, and when
        self._queue: deque[_Door] = deque()
        self._sweep: asyncio.TimerHandle | None = None
        self.let_in = 0  # connections let in after waiting (for the tests and metrics)

    @property
    def inside(self) -> int:
        return len(self._inside)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def doors(self, make: ProtocolFactory) -> ProtocolFactory:
        """A protocol factory for loop.create_server: each connection through the gate,
        then into a protocol `make` makes."""
        return lambda: _Door(self, make)

    def leave(self, transport: asyncio.BaseTransport | None) -> None:
        """The connection's set-up is over (answered, live): let the next one in."""
        if transport is not None and self._inside.pop(transport, None) is not None:
            self._let_in()

    def close(self) -> None:
        """Shutting down: those still waiting are closed unread (their clients come back)."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        while self._queue:
            self._next().transport.abort()

    def _next(self) -> _Door:
        if self._metrics is not None:
            self._metrics.connections_waiting.dec()
        return self._queue.popleft()

    def _arrive(self, door: _Door) -> None:
        if self._queue or len(self._inside) >= self.most:
            door.transport.pause_reading()  # its request stays in the kernel until then
            self._queue.append(door)
            if self._metrics is not None:
                self._metrics.connections_waiting.inc()
        else:
            self._enter(door)

    def _let_in(self) -> None:
        while self._queue and len(self._inside) < self.most:
            door = self._next()
            if not door.transport.is_closing():
                self.let_in += 1
                if self._metrics is not None:
                    self._metrics.connections_waited.inc()
                self._enter(door)

    def _enter(self, door: _Door) -> None:
        loop = asyncio.get_running_loop()
        self._inside[door.transport] = loop.time()
        if self._sweep is None:
            self._sweep = loop.call_later(self.slot_seconds / 5, self._expire)
        door.open()

    def _expire(self) -> None:
        """Those let in more than `slot_seconds` ago give their place up (the oldest first:
        the dict is in the order they came in)."""
        self._sweep = None
        loop = asyncio.get_running_loop()
        oldest = loop.time() - self.slot_seconds
        for transport, since in list(self._inside.items()):
            if since > oldest:
                break
            del self._inside[transport]
        self._let_in()
        if self._inside:
            self._sweep = loop.call_later(self.slot_seconds / 5, self._expire)


class _Door(asyncio.Protocol):
    """A connection's protocol until its stream goes live (a Live takes the transport
    over): it waits at the gate unread, then passes everything on to the protocol behind
    it, and tells the gate when the connection ends."""

    __slots__ = ("_gate", "_inner", "_make", "transport")

    def __init__(self, gate: Gate, make: ProtocolFactory) -> None:
        self._gate = gate
        self._make = make
        self._inner: asyncio.Protocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._gate._arrive(self)

    def open(self) -> None:
        self._inner = self._make()
        self._inner.connection_made(self.transport)
        self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._gate.leave(self.transport)
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()
