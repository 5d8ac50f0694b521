"""Where committed changes come from. A source connects, receives and marks; everything
that does not depend on how changes travel (ordered dispatch, read-back, recovery) is the
dispatcher's (streamer/dispatch.py), so a new source is one module here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import asyncpg
import psycopg2

# What a lost connection looks like, whatever the source (psycopg2: the WAL's): retried
# with backoff.
CONNECTION_ERRORS = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    TimeoutError,
    psycopg2.Error,
)


class Source(Protocol):
    name: str  # what STREAMER_SOURCE names it: notify or wal
    description: str  # for the log, once changes flow: "listening on channel 'streamer'"

    async def connect(self, receive: Callable[[str], None]) -> None:
        """Open the change connection. From then on every payload committed to the feed's
        channel (signed changes, markers, hints) is passed to `receive`, in commit order."""

    async def mark(self, payload: str) -> None:
        """Commit `payload` so that it reaches `receive` after every payload committed
        before it."""

    async def watch(self) -> None:
        """Return when the connection is lost (or raise): the dispatcher then recovers."""

    async def close(self) -> None:
        """Drop the connection, if any."""
