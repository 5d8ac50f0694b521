"""The receiving side of the load: SSE streams over raw asyncio sockets, and the floor.

One client process holds thousands of streams: each is an `asyncio.Protocol` that decodes
HTTP/1.1 chunked framing itself, reads the SSE in it with `streamer.sse.Parser` (as the
tests do, and as EventSource would), and records for every benchmark event the
(stream, commit key, arrival time) triple. The commit key is in the row's
`processing_stage` as `bench:<writer>:<seq>;` (see bench/writers.py).

The floor is one bare asyncpg connection LISTENing on the feed's channel: what this design
can do at best, with nothing between Postgres and the receiver.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import tempfile
from array import array
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np

from bench.agent import Reply, now_ns, serve
from bench.chrome import eventsource_headers
from streamer.sse import Parser

MARK = "bench:"
CHANNEL = "streamer"
OPEN_TIMEOUT = 60.0
# What Chrome sends with an EventSource request (same origin, no cookie): the service
# keeps a stream's request headers until it is live, so they count.
BROWSER_HEADERS = eventsource_headers(referer="http://127.0.0.1/files", site="same-origin")
_CODE = re.compile(rb'"code":\s*"([A-Z_]+)"')


def commit_key(text: str, start: int) -> int:
    """The key of `bench:<writer>:<seq>;` found at `start`: writer << 32 | seq."""
    end = text.find(";", start)
    writer, _, seq = text[start + len(MARK) : end].partition(":")
    return int(writer) << 32 | int(seq)


class Recorder:
    """Arrivals as three flat columns; dumped to a .npz file on request."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stream = array("l")
        self.key = array("q")
        self.t = array("q")
        self.total = 0
        self.dumps = 0

    def add(self, stream: int, key: int, t: int) -> None:
        self.stream.append(stream)
        self.key.append(key)
        self.t.append(t)
        self.total += 1

    def dump(self, directory: str) -> str:
        self.dumps += 1
        path = Path(directory) / f"{self.name}-{self.dumps}.npz"
        np.savez(
            path,
            stream=np.frombuffer(self.stream, dtype=np.int64),
            key=np.frombuffer(self.key, dtype=np.int64),
            t=np.frombuffer(self.t, dtype=np.int64),
        )
        self.stream, self.key, self.t = array("l"), array("q"), array("q")
        return str(path)


class SseStream(asyncio.Protocol):
    """One stream: request, response head, chunked body, SSE events."""

    def __init__(self, client: SseClient, index: int, request: bytes) -> None:
        self.client = client
        self.index = index
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.live = False
        self.head = b""
        self.in_body = False
        self.raw = b""  # chunked body not yet decoded
        self.chunk_left = 0
        self.need_crlf = False
        self.parser = Parser()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_result("closed before synced")
        self.client.closed(self)

    def data_received(self, data: bytes) -> None:
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end], self.head[end + 4 :]
            self.head = b""
            status = head.split(b" ", 2)[1]
            if status != b"200":
                found = _CODE.search(data)
                code = found.group(1).decode() if found else "?"
                self.ready.set_result(f"HTTP {status.decode()} {code}")
                self.close()
                return
            self.in_body = True
        self._body(data)

    def _body(self, data: bytes) -> None:
        buf = self.raw + data if self.raw else data
        pos, size, out = 0, len(buf), []
        while pos < size:
            if self.chunk_left:
                take = min(self.chunk_left, size - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self.chunk_left -= take
                if self.chunk_left:
                    break
                self.need_crlf = True
            if self.need_crlf:
                if size - pos < 2:
                    break
                pos += 2
                self.need_crlf = False
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                break
            length = int(buf[pos:line_end].split(b";", 1)[0], 16)
            pos = line_end + 2
            if length == 0:  # the server ended the response
                self.close()
                break
            self.chunk_left = length
        self.raw = buf[pos:]
        if out:
            self._events(b"".join(out))

    def _events(self, text: bytes) -> None:
        events = self.parser.feed(text)
        t = now_ns()
        client = self.client
        for event in events:
            name = event.name
            if name == "file-update":
                if self.live:
                    start = event.data.find(MARK)
                    if start >= 0:
                        client.recorder.add(self.index, commit_key(event.data, start), t)
                    else:
                        client.other += 1
            elif name == "heartbeat":
                client.heartbeats += 1
            elif name == "synced":
                self.live = True
                if not self.ready.done():
                    self.ready.set_result(None)
            elif name != "message":  # data with no `event:` line is nothing of ours
                client.other += 1

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@dataclass(frozen=True)
class ClientSpec:
    name: str
    port: int
    path: str
    streams: list[tuple[int, str]]  # (stream index, token), opened in this order
    out_dir: str
    # Stream i asks for path?queries[i % len(queries)] (a shaped stream), when given.
    queries: tuple[str, ...] = ()


class SseClient:
    def __init__(self, spec: ClientSpec) -> None:
        self.spec = spec
        self.recorder = Recorder(spec.name)
        self.next = 0
        self.open: dict[int, SseStream] = {}
        self.heartbeats = 0
        self.other = 0
        self.dropped = 0  # streams the server ended while they were live
        self.stopping = False

    def closed(self, stream: SseStream) -> None:
        if self.open.pop(stream.index, None) is not None and stream.live and not self.stopping:
            self.dropped += 1

    async def handle(self, command: str, args: dict[str, Any]) -> Reply:
        if command == "open":
            return await self._open(args["count"], args.get("concurrency", 64))
        if command == "stats":
            return self._stats()
        if command == "dump":
            return {"path": self.recorder.dump(self.spec.out_dir), **self._stats()}
        if command == "stop":
            self.stopping = True
            for stream in list(self.open.values()):
                stream.close()
            await asyncio.sleep(0.2)
            return self._stats()
        raise ValueError(f"unknown command {command!r}")

    def _stats(self) -> Reply:
        return {
            "events": self.recorder.total,
            "heartbeats": self.heartbeats,
            "other": self.other,
            "open": len(self.open),
            "dropped": self.dropped,
        }

    async def _open(self, count: int, concurrency: int) -> Reply:
        loop = asyncio.get_running_loop()
        todo = self.spec.streams[self.next : self.next + count]
        self.next += len(todo)
        gate = asyncio.Semaphore(concurrency)
        errors: Counter[str] = Counter()
        opened: list[int] = []
        started = now_ns()

        async def one(index: int, token: str) -> None:
            queries = self.spec.queries
            path = self.spec.path
            if queries:
                path += "?" + queries[index % len(queries)]
            request = (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.spec.port}\r\n"
                f"Authorization: Bearer {token}\r\n{BROWSER_HEADERS}\r\n"
            ).encode()
            async with gate:
                stream = SseStream(self, index, request)
                try:
                    await loop.create_connection(lambda: stream, "127.0.0.1", self.spec.port)
                except OSError as exc:
                    errors[f"connect: {exc.strerror or exc.__class__.__name__}"] += 1
                    return
                self.open[index] = stream
                try:
                    error = await asyncio.wait_for(asyncio.shield(stream.ready), OPEN_TIMEOUT)
                except TimeoutError:
                    error = "no synced event in time"
                    stream.close()
            if error is None:
                opened.append(index)
            else:
                errors[error] += 1

        await asyncio.gather(*(one(index, token) for index, token in todo))
        return {
            "opened": opened,
            "errors": dict(errors),
            "seconds": (now_ns() - started) / 1e9,
        }


def client_main(conn: Connection, spec: ClientSpec) -> None:
    serve(conn, SseClient(spec))


# -- the floor ------------------------------------------------------------------------


class Floor:
    """A bare asyncpg LISTEN: the notification parsed as soon as it arrives."""

    def __init__(self, dsn: str, out_dir: str) -> None:
        self.dsn = dsn
        self.out_dir = out_dir
        self.recorder = Recorder("floor")
        self.conn: asyncpg.Connection | None = None

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        t = now_ns()
        start = payload.find(MARK)
        if start >= 0:
            self.recorder.add(0, commit_key(payload, start), t)

    async def handle(self, command: str, args: dict[str, Any]) -> Reply:
        if command == "open":
            self.conn = await asyncpg.connect(self.dsn)
            # The feeds' channel, and `streamer` (where writer_cost's bare trigger sends).
            for channel in (await self.conn.fetchval("select streamer.channel()"), CHANNEL):
                await self.conn.add_listener(channel, self._notified)
            return {"opened": [0], "errors": {}}
        if command == "stats":
            return {"events": self.recorder.total, "open": 1, "dropped": 0}
        if command == "dump":
            return {"path": self.recorder.dump(self.out_dir), "events": self.recorder.total}
        if command == "stop":
            if self.conn is not None:
                with contextlib.suppress(OSError, asyncpg.InterfaceError):
                    await self.conn.close(timeout=5)
            return {"events": self.recorder.total}
        raise ValueError(f"unknown command {command!r}")


def floor_main(conn: Connection, dsn: str, out_dir: str) -> None:
    serve(conn, Floor(dsn, out_dir))


def scratch_dir() -> str:
    return tempfile.mkdtemp(prefix="streamer-bench-records-")
