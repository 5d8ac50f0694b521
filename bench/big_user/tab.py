"""The big user's tab, a process of its own: one stream read as fast as it comes (or,
stalled, not at all), reopened like EventSource when the server ends it."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import aiohttp

from bench.agent import Reply, now_ns, serve
from bench.load import STREAM_PATH
from streamer.sse import Parser

# The first id in a file-update's data is the row's: Postgres (jsonb) and pydantic alike
# put `id` first.
ROW_ID = re.compile(r'"id": ?"([^"]+)"')


@dataclass
class Tally:
    """What the big user's tab received."""

    requested_ns: int = 0
    headers_ns: int | None = None  # the first response's head
    synced_ns: int | None = None  # the first `synced`
    done_ns: int | None = None  # every expected row in
    updates: int = 0  # file-update events
    updates_at_synced: int | None = None
    ids: set[str] = field(default_factory=set)  # rows seen in a file-update
    events: Counter[str] = field(default_factory=Counter)
    reconnects: int = 0
    ended: str = ""  # why the tab stopped reading
    last_id: str | None = None
    retry_ms: int = 2000
    received: int = 0  # bytes

    def take(self, parser: Parser, chunk: bytes, expect: int | None) -> None:
        """The events `chunk` completes, in order; the stream's last id and retry."""
        events = parser.feed(chunk)
        t = now_ns()
        for event in events:
            self.events[event.name] += 1
            if event.name == "file-update":
                self.updates += 1
                if found := ROW_ID.search(event.data):
                    self.ids.add(found.group(1))
            elif event.name == "synced" and self.synced_ns is None:
                self.updates_at_synced = self.updates
                self.synced_ns = t
        if parser.last_id is not None:
            self.last_id = parser.last_id
        if parser.retry is not None:
            self.retry_ms = parser.retry
        if expect is not None and self.done_ns is None and len(self.ids) >= expect:
            self.done_ns = t

    def reply(self) -> Reply:
        return {
            "requested_ns": self.requested_ns,
            "headers_ns": self.headers_ns,
            "synced_ns": self.synced_ns,
            "done_ns": self.done_ns,
            "updates": self.updates,
            "updates_at_synced": self.updates_at_synced,
            "rows": len(self.ids),
            "events": dict(self.events),
            "reconnects": self.reconnects,
            "ended": self.ended,
            "last_id": self.last_id,
            "bytes": self.received,
        }


class BigTab:
    """One stream of the big user, read as fast as it comes (or, stalled, not at all)."""

    def __init__(self, port: int, token: str) -> None:
        self.url = f"http://127.0.0.1:{port}{STREAM_PATH}"
        self.token = token
        self.session: aiohttp.ClientSession | None = None
        self.task: asyncio.Task[None] | None = None
        self.tally = Tally()
        self.synced = asyncio.Event()
        self.stalled: list[aiohttp.ClientResponse] = []

    async def handle(self, command: str, args: dict[str, Any]) -> Reply:
        if self.session is None:
            self.session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_read=None)
            )
        commands = {
            "read": self.read,
            "start": self.start,
            "wait": self.wait,
            "stall": self.stall,
            "unstall": self.unstall,
            "probe": self.probe,
            "stop": self.stop,
        }
        if command not in commands:
            raise ValueError(f"unknown command {command!r}")
        return await commands[command](self.session, args)

    async def read(self, _session: aiohttp.ClientSession, args: dict[str, Any]) -> Reply:
        """Until `synced` (and, with `expect`, until that many rows)."""
        self.tally = Tally()
        await self._read(args.get("query", ""), args.get("last_id"), args.get("expect"))
        return self.tally.reply()

    async def start(self, _session: aiohttp.ClientSession, args: dict[str, Any]) -> Reply:
        """The same in the background; answers once synced."""
        self.tally, self.synced = Tally(), asyncio.Event()
        self.task = asyncio.create_task(self._read("", None, args["expect"]))
        await asyncio.wait_for(self.synced.wait(), args.get("timeout", 60))
        return self.tally.reply()

    async def wait(self, _session: aiohttp.ClientSession, args: dict[str, Any]) -> Reply:
        assert self.task is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.task), args["timeout"])
        if not self.task.done():
            self.task.cancel()
            self.tally.ended = "timeout"
        return self.tally.reply()

    async def stall(self, session: aiohttp.ClientSession, _args: dict[str, Any]) -> Reply:
        """Open one more snapshot, read its head, then nothing."""
        self.tally = Tally(requested_ns=now_ns())
        response = await session.get(
            self.url, params={"snapshot": "1"}, headers=self._headers(None)
        )
        self.tally.headers_ns = now_ns()
        self.stalled.append(response)
        return {"status": response.status}

    async def unstall(self, _session: aiohttp.ClientSession, args: dict[str, Any]) -> Reply:
        """Read the rest of the first stalled stream; close the others."""
        first = self.stalled[0]
        self.tally = Tally(requested_ns=now_ns())
        try:
            self.tally.ended = await self._consume(first, args.get("expect"))
        except aiohttp.ClientError as exc:  # the server cut it for not reading
            self.tally.ended = f"cut: {exc.__class__.__name__}"
        for response in self.stalled:
            response.close()
        self.stalled = []
        return self.tally.reply()

    async def probe(self, session: aiohttp.ClientSession, args: dict[str, Any]) -> Reply:
        """Another user's snapshot: seconds to `synced`, or None."""
        t0 = now_ns()
        headers = {"Authorization": f"Bearer {args['token']}"}
        try:
            async with (
                asyncio.timeout(args["seconds"]),
                session.get(self.url, params={"snapshot": "1"}, headers=headers) as response,
            ):
                parser = Parser()
                async for chunk in response.content.iter_any():
                    if any(event.name == "synced" for event in parser.feed(chunk)):
                        return {"seconds": (now_ns() - t0) / 1e9}
        except TimeoutError:
            pass
        return {"seconds": None}

    async def stop(self, session: aiohttp.ClientSession, _args: dict[str, Any]) -> Reply:
        if self.task is not None:
            self.task.cancel()
        for response in self.stalled:
            response.close()
        await session.close()
        return {}

    def _headers(self, last_id: str | None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "text/event-stream"}
        if last_id is not None:
            headers["Last-Event-ID"] = last_id
        return headers

    async def _read(self, query: str, last_id: str | None, expect: int | None) -> None:
        """Like EventSource: when the server ends the stream, reopen it after `retry`, with
        the last id received."""
        assert self.session is not None
        tally = self.tally
        tally.requested_ns = now_ns()
        params = dict(p.split("=", 1) for p in query.split("&") if p)
        while True:
            try:
                async with self.session.get(
                    self.url, params=params, headers=self._headers(tally.last_id or last_id)
                ) as response:
                    if tally.headers_ns is None:
                        tally.headers_ns = now_ns()
                    if response.status != 200:
                        tally.ended = f"HTTP {response.status}"
                        return
                    tally.ended = await self._consume(response, expect)
            except aiohttp.ClientError as exc:
                tally.ended = f"cut: {exc.__class__.__name__}"
            if tally.ended in ("synced", "all rows"):
                return
            tally.reconnects += 1
            await asyncio.sleep(tally.retry_ms / 1000)

    async def _consume(self, response: aiohttp.ClientResponse, expect: int | None) -> str:
        """Read until `synced` (no `expect`) or until `expect` rows arrived; or the end."""
        tally, parser = self.tally, Parser()
        while True:
            chunk = await response.content.readany()
            if not chunk:
                return "server ended the stream"
            tally.received += len(chunk)
            tally.take(parser, chunk, expect)
            if tally.synced_ns is not None:
                self.synced.set()
                if expect is None:
                    return "synced"
            if tally.done_ns is not None:
                return "all rows"


def tab_main(conn: Connection, port: int, token: str) -> None:
    serve(conn, BigTab(port, token))
