"""Where committed changes come from. A source connects, receives and marks: it hands on
typed payloads (streamer/changes.py) in commit order, and nothing that does not depend on
how changes travel (ordered dispatch, read-back, recovery: streamer/dispatch.py), so a new
source is one module here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from streamer.changes import Payload


class Source(Protocol):
    name: str  # what STREAMER_SOURCE names it: notify or wal
    description: str  # for the log, once changes flow: "listening on channel ..."

    async def connect(self, receive: Callable[[Payload], None]) -> None:
        """Open the change connection. From then on every payload committed for the feeds
        (changes, markers, hints, and what a forger sent) is passed to `receive`, in
        commit order."""

    async def mark(self, token: str) -> None:
        """Commit the marker `token`, so that it reaches `receive` (as a Marker) after
        every payload committed before it."""

    async def watch(self) -> None:
        """Return when the connection is lost (or raise): the dispatcher then recovers."""

    async def close(self) -> None:
        """Drop the connection, if any."""
