"""A stream as its client sees it: its raw bytes, its events, and the files its client knows
of (a file-update with a higher version replaces, file-deleted removes, reset clears)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg

TIMEOUT = 10.0


@dataclass
class Watcher:
    """One open stream: its raw bytes, its events, and the files its client knows of."""

    user: int
    target: uuid.UUID | None  # a one-file stream's file; None for the user stream
    response: aiohttp.ClientResponse
    opened_at: int  # the step it opened at: every later write of its user's is for it
    known: dict[uuid.UUID, dict[str, Any]] = field(default_factory=dict)
    raw: bytearray = field(default_factory=bytearray)
    events: list[tuple[str, str | None, dict[str, Any]]] = field(default_factory=list)
    ended: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None

    @property
    def cursor(self) -> str | None:
        ids = [cursor for _, cursor, _ in self.events if cursor is not None]
        return ids[-1] if ids else None

    def names(self) -> list[str]:
        return [name for name, _, _ in self.events]

    async def read(self) -> None:
        buffer = b""
        try:
            async for chunk in self.response.content.iter_any():
                self.raw += chunk
                buffer += chunk
                *messages, buffer = buffer.split(b"\n\n")
                for message in messages:
                    self._receive(message.decode())
        except (aiohttp.ClientError, ConnectionError):
            pass
        finally:
            self.ended = True
            self.changed.set()

    def _receive(self, message: str) -> None:
        name, cursor, data = "message", None, ""
        for line in message.split("\n"):
            key, _, value = line.partition(": ")
            if key == "event":
                name = value
            elif key == "id":
                cursor = value
            elif key == "data":
                data = value
        if not data:
            return  # the retry: line
        payload = json.loads(data)
        self.events.append((name, cursor, payload))
        if name == "reset":
            self.known.clear()
        elif name == "file-update":
            file = payload["file"]
            file_id = uuid.UUID(file["id"])
            if file_id not in self.known or self.known[file_id]["version"] < file["version"]:
                self.known[file_id] = file
        elif name == "file-deleted":
            self.known.pop(uuid.UUID(payload["file"]["id"]), None)
        self.changed.set()

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        try:
            async with asyncio.timeout(TIMEOUT):
                while not condition():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(f"{what}; events: {self.names()}") from None

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader
        self.response.close()


def describe(watcher: Watcher) -> str:
    def event(name: str, cursor: str | None, payload: dict[str, Any]) -> str:
        file = payload.get("file", {})
        return f"{name}({str(file.get('id', ''))[:8]} v{file.get('version', '')} id:{cursor})"

    kind = f"file {watcher.target}" if watcher.target else "user"
    return f"{kind} stream of user {watcher.user}: " + ", ".join(event(*e) for e in watcher.events)


def state(file: dict[str, Any] | asyncpg.Record) -> tuple[Any, ...]:
    return (file["filename"], file["status"], file["progress"], file["version"])
