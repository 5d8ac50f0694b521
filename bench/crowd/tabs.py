"""The crowd's load generator: one process holds thousands of lean browser tabs.

A tab is an `asyncio.Protocol` on a raw socket from a source address of its process's own
(127.0.0.2, 127.0.0.3, ...: one address has ~28,000 ephemeral ports). It sends the request
Chrome sends for an EventSource with a cookie (`access_token`), decodes HTTP/1.1 chunked
framing, and reads just enough SSE to know where it is: each event's name, its `id:` (the
cursor it resumes from) and, of a row's update, the row's `version` and the writer's
commit key (to time the delivery, as bench/clients.py does). It keeps the highest version
it was sent: its state, compared with the database's at the end.

Like EventSource, a tab whose connection is lost (or refused) reconnects after the
server's `retry:`, here jittered upwards by up to `jitter` of it, with `Last-Event-ID`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from array import array
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from bench.agent import Reply, now_ns, serve
from bench.chrome import eventsource_headers
from bench.clients import MARK, Recorder, commit_key

OPEN_TIMEOUT = 120.0  # SYNs dropped by a full backlog are retried after 1, 3, 7 s...
DEFAULT_RETRY_MS = 3000  # EventSource's own, until the server sends `retry:`
# Chrome's request for `new EventSource(url, {withCredentials: true})` from a page of a
# sibling origin: the cookie carries the token (EventSource cannot set Authorization).
HEADERS = eventsource_headers(
    referer="http://app.127.0.0.1.nip.io:5173/files",
    site="same-site",
    origin="http://app.127.0.0.1.nip.io:5173",
)
VERSION = b'"version":'


@dataclass(frozen=True)
class CrowdSpec:
    name: str
    address: str  # the source address of every tab of this process
    port: int
    path: str
    tabs: list[tuple[int, str]]  # (stream index, token)
    out_dir: str
    jitter: float  # a reconnect waits retry x (1 + uniform(0, jitter))


class Tab(asyncio.Protocol):
    __slots__ = (
        "beat_ns", "chunk_left", "crowd", "head", "in_body", "index", "last_id", "live",
        "need_crlf", "raw", "rest", "resumed", "retry_ms", "synced_id", "synced_ns", "token",
        "transport", "version",
    )  # fmt: skip

    def __init__(self, crowd: Crowd, index: int, token: str) -> None:
        self.crowd = crowd
        self.index = index
        self.token = token
        self.transport: asyncio.Transport | None = None
        self.last_id: bytes | None = None
        self.version = 0
        self.retry_ms = DEFAULT_RETRY_MS
        self.live = False  # synced on this connection
        self.synced_ns = 0  # when this tab was last synced
        self.synced_id: bytes | None = None  # the cursor `synced` gave it then
        self.resumed: bytes | None = None  # the cursor its last request resumed from
        self.beat_ns = 0
        self._reset()

    def _reset(self) -> None:
        self.head = b""
        self.in_body = False
        self.raw = b""
        self.rest = b""
        self.chunk_left = 0
        self.need_crlf = False
        self.live = False

    def request(self) -> bytes:
        self.resumed = self.last_id
        resume = f"Last-Event-ID: {self.last_id.decode()}\r\n" if self.last_id else ""
        return (
            f"GET {self.crowd.spec.path} HTTP/1.1\r\nHost: 127.0.0.1:{self.crowd.spec.port}\r\n"
            f"{HEADERS}Cookie: access_token={self.token}\r\n{resume}\r\n"
        ).encode()

    # -- the connection ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._reset()
        self.transport = transport
        transport.write(self.request())

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        was_live = self.live
        self.live = False
        self.crowd.lost(self, was_live)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

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
                self.crowd.refused[f"HTTP {status.decode()}"] += 1
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
            if length == 0:  # the server ended the response: EventSource reconnects
                self.close()
                break
            self.chunk_left = length
        self.raw = buf[pos:]
        if out:
            self._events(b"".join(out))

    # -- just enough SSE ------------------------------------------------------------

    def _events(self, text: bytes) -> None:
        text = self.rest + text if self.rest else text
        blocks = text.split(b"\n\n")
        self.rest = blocks.pop()
        t = now_ns()
        for block in blocks:
            name, data = b"message", b""
            for line in block.split(b"\n"):
                if line.startswith(b"data: "):
                    data = line[6:]
                elif line.startswith(b"event: "):
                    name = line[7:]
                elif line.startswith(b"id: "):
                    self.last_id = line[4:]
                elif line.startswith(b"retry: "):
                    self.retry_ms = int(line[7:])
            if name == b"file-update":
                self._update(data, t)
            elif name == b"heartbeat":
                self.crowd.heartbeat(self, t)
            elif name == b"synced":
                self.live = True
                self.synced_ns = t
                self.synced_id = self.last_id
                self.crowd.synced(self)
            elif name == b"reset":
                self.version = 0
                self.crowd.resets += 1
            elif name == b"file-deleted":
                self.version = 0
            elif name != b"message":
                self.crowd.other += 1

    def _update(self, data: bytes, t: int) -> None:
        at = data.rfind(VERSION)
        if at >= 0:
            end = at + len(VERSION)
            while data[end : end + 1] == b" ":  # jsonb renders `"version": 7`
                end += 1
            stop = end
            while stop < len(data) and 48 <= data[stop] <= 57:
                stop += 1
            self.version = max(self.version, int(data[end:stop]))
        if self.live:
            start = data.find(MARK.encode())
            if start >= 0:
                self.crowd.recorder.add(self.index, commit_key(data.decode(), start), t)


class Crowd:
    """The tabs of one process and what they saw."""

    def __init__(self, spec: CrowdSpec) -> None:
        self.spec = spec
        self.tabs = [Tab(self, index, token) for index, token in spec.tabs]
        self.by_index = {tab.index: tab for tab in self.tabs}
        self.recorder = Recorder(spec.name)
        self.rng = random.Random(spec.name)
        self.stopping = False
        self.live = 0
        self.refused: Counter[str] = Counter()
        self.drops = 0  # live streams lost
        self.reconnects = 0  # attempts after a loss
        self.resets = 0
        self.other = 0
        self.beats = 0
        self.gaps: array[int] | None = None  # heartbeat gaps (ns) while measured
        self.waiting: asyncio.Future[None] | None = None
        self.want = 0
        self.connecting: set[asyncio.Future[bool]] = set()

    async def handle(self, command: str, args: dict[str, Any]) -> Reply:
        if command == "open":
            return await self._open(args["concurrency"])
        if command == "stats":
            return self._stats()
        if command == "beats":  # start (or stop) recording heartbeat gaps
            gaps, self.gaps = self.gaps, array("q") if args["record"] else None
            return {"gaps": list(gaps) if gaps is not None else [], **self._stats()}
        if command == "dump":
            return {"path": self.recorder.dump(self.spec.out_dir), **self._stats()}
        if command == "synced_since":  # when each tab was last synced, if after `t`
            t = args["t"]
            return {"synced": [tab.synced_ns for tab in self.tabs if tab.synced_ns > t]}
        if command == "state":
            tabs = self.tabs
            return {
                "index": [t.index for t in tabs],
                "version": [t.version for t in tabs],
                "live": [t.live for t in tabs],
            }
        if command == "detail":  # of the tabs asked for (by stream index): where they are
            return {"tabs": [self._detail(self.by_index[i]) for i in args["index"]]}
        if command == "stop":
            self.stopping = True
            for tab in self.tabs:
                tab.close()
            await asyncio.sleep(0.2)
            return self._stats()
        raise ValueError(f"unknown command {command!r}")

    def _detail(self, tab: Tab) -> dict[str, Any]:
        sockname = tab.transport.get_extra_info("sockname") if tab.transport else None
        text = {"last_id": tab.last_id, "synced_id": tab.synced_id, "resumed": tab.resumed}
        return {
            "index": tab.index,
            "version": tab.version,
            "live": tab.live,
            "synced_ns": tab.synced_ns,
            "sockname": list(sockname) if sockname else None,
            **{k: None if v is None else v.decode() for k, v in text.items()},
        }

    def _stats(self) -> Reply:
        return {
            "tabs": len(self.tabs),
            "live": self.live,
            "events": self.recorder.total,
            "heartbeats": self.beats,
            "drops": self.drops,
            "reconnects": self.reconnects,
            "resets": self.resets,
            "other": self.other,
            "refused": dict(self.refused),
        }

    async def _open(self, concurrency: int) -> Reply:
        """Open every tab, `concurrency` connecting at a time; return once all are synced
        (or OPEN_TIMEOUT passed)."""
        started = now_ns()
        gate = asyncio.Semaphore(concurrency)

        async def one(tab: Tab) -> None:
            async with gate:
                await self._connect(tab)

        self.want = len(self.tabs)
        self.waiting = asyncio.get_running_loop().create_future()
        await asyncio.gather(*(one(tab) for tab in self.tabs))
        if self.live < self.want:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.waiting), OPEN_TIMEOUT)
        return {"seconds": (now_ns() - started) / 1e9, **self._stats()}

    async def _connect(self, tab: Tab) -> bool:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(
                lambda: tab, "127.0.0.1", self.spec.port, local_addr=(self.spec.address, 0)
            )
        except OSError as exc:
            self.refused[f"connect: {exc.strerror or exc.__class__.__name__}"] += 1
            if not self.stopping:
                self._later(tab)
            return False
        return True

    def _later(self, tab: Tab) -> None:
        delay = tab.retry_ms / 1000 * (1 + self.rng.uniform(0, self.spec.jitter))
        asyncio.get_running_loop().call_later(delay, self._reconnect, tab)

    def _reconnect(self, tab: Tab) -> None:
        if self.stopping or tab.transport is not None:
            return
        self.reconnects += 1
        task = asyncio.ensure_future(self._connect(tab))
        self.connecting.add(task)
        task.add_done_callback(self.connecting.discard)

    def lost(self, tab: Tab, was_live: bool) -> None:
        if was_live:
            self.live -= 1
            self.drops += 1
        if not self.stopping:
            self._later(tab)

    def synced(self, tab: Tab) -> None:
        self.live += 1
        if self.waiting is not None and self.live >= self.want and not self.waiting.done():
            self.waiting.set_result(None)

    def heartbeat(self, tab: Tab, t: int) -> None:
        self.beats += 1
        if self.gaps is not None and tab.beat_ns:
            self.gaps.append(t - tab.beat_ns)
        tab.beat_ns = t


def crowd_main(conn: Connection, spec: CrowdSpec) -> None:
    serve(conn, Crowd(spec))
