"""A small SSE client for tests: reads a real HTTP stream with the service's own parser
(streamer.sse.Parser, as a browser reads it) and waits on events, not sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from streamer.sse import Parser

TIMEOUT = 10.0


@dataclass
class Event:
    name: str
    data: str
    id: str | None = None

    @property
    def json(self) -> Any:
        return json.loads(self.data)

    @property
    def file(self) -> dict[str, Any]:
        file: dict[str, Any] = self.json["file"]
        return file


@dataclass
class Stream:
    response: aiohttp.ClientResponse
    retry: int | None = None
    events: list[Event] = field(default_factory=list)
    _queue: asyncio.Queue[Event | None] = field(default_factory=asyncio.Queue)
    _reader: asyncio.Task[None] | None = None
    ended: bool = False

    async def _read(self) -> None:
        parser = Parser()
        try:
            async for chunk in self.response.content.iter_any():
                for parsed in parser.feed(chunk):
                    event = Event(parsed.name, parsed.data, parsed.id)
                    self.events.append(event)
                    self._queue.put_nowait(event)
                self.retry = parser.retry
        except (aiohttp.ClientError, ConnectionError):
            pass
        finally:
            self.ended = True
            self._queue.put_nowait(None)

    async def next(self, timeout: float = TIMEOUT, *, skip_heartbeats: bool = True) -> Event:
        while True:
            event = await asyncio.wait_for(self._queue.get(), timeout)
            if event is None:
                self._queue.put_nowait(None)
                raise EOFError("the stream ended")
            if skip_heartbeats and event.name == "heartbeat":
                continue
            return event

    async def until(self, name: str, timeout: float = TIMEOUT) -> list[Event]:
        """Events up to and including the first one named `name`."""
        seen = []
        while True:
            event = await self.next(timeout, skip_heartbeats=name != "heartbeat")
            seen.append(event)
            if event.name == name:
                return seen

    async def nothing_within(self, timeout: float) -> None:
        """Assert no (non-heartbeat) event arrives within `timeout`."""
        with contextlib.suppress(TimeoutError):
            event = await self.next(timeout)
            raise AssertionError(f"unexpected event {event.name}: {event.data}")

    async def end(self, timeout: float = TIMEOUT) -> list[Event]:
        """Every event left until the server ends the stream."""
        rest = []
        while True:
            try:
                rest.append(await self.next(timeout, skip_heartbeats=False))
            except EOFError:
                return rest

    @property
    def last_id(self) -> str | None:
        ids = [e.id for e in self.events if e.id is not None]
        return ids[-1] if ids else None


@contextlib.asynccontextmanager
async def open_stream(
    session: aiohttp.ClientSession,
    url: str,
    token: str | None = None,
    *,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
    synced: bool = True,
) -> AsyncIterator[Stream]:
    """Open a stream; by default wait for `synced` (the stream is live) before yielding."""
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    async with session.get(url, headers=all_headers, params=params) as response:
        assert response.status == 200, await response.text()
        stream = Stream(response)
        stream._reader = asyncio.create_task(stream._read())
        try:
            if synced:
                await stream.until("synced")
            yield stream
        finally:
            stream._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stream._reader
