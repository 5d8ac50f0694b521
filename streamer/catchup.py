"""A stream of every row, set up: its place in the hub (taken *before* the database is
read, so nothing committed in between is missed), its catch-up or snapshot written as it
is read, `synced`, then live, its bytes going straight into its connection. What the read
saw is skipped among what the hub sends later by snapshot visibility, so nothing is sent
twice or older-after-newer. Used by the handler (streamer/streams.py), and by a Live that
starts over after a TRUNCATE (streamer/live.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from streamer import keys
from streamer.changes import NOTHING, Gone, Row, Snapshot
from streamer.errors import CONNECTION_ERRORS, Unavailable
from streamer.feeds import Feed
from streamer.live import Live
from streamer.sse import (
    ResetEvent,
    Sink,
    SyncedEvent,
    deleted_frame,
    frame,
    now,
    timestamp_now,
    update_frame,
)
from streamer.subscriber import Subscriber
from streamer.views import View

SNAPSHOT_CURSOR = "0"  # a stream cut during its snapshot resumes from the very beginning
ROWS_PER_WRITE = 1000  # a catch-up read with others' is written this many rows at a time


class Out(Protocol):
    """Where a stream's set-up writes: an Opening, or the Live of a stream starting over."""

    @property
    def opened(self) -> bool: ...

    async def open(self) -> None: ...

    async def write(self, data: bytes) -> None: ...

    async def flush(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Asked:
    """What a stream of every row asks for: whose rows, through which view, for whom."""

    feed: Feed
    owners: tuple[str, ...]
    view: View
    user: str
    expires_at: float

    def frame(self, item: Row | Gone, cursor: str, stamp: bytes) -> bytes:
        if isinstance(item, Gone):
            return deleted_frame(self.feed, item.id, cursor, stamp)
        return update_frame(self.feed, item, cursor, stamp, text=self.view.text(item))


async def _write_since(
    app: web.Application, out: Out, asked: Asked, since: int | None, *, reset: bool, truncated: bool
) -> tuple[Snapshot, set[str]]:
    """Write the caller's catch-up (or snapshot), and return the snapshot it was read in
    and, for a filtered view, the rows its client now holds. A plain catch-up or snapshot is
    read with others' asked at once (streamer/gather.py); the rest, and a caller with much
    to catch up, read alone."""
    try:
        # A plain catch-up, or a plain snapshot that is not a reset: read with others'.
        if asked.view.plain and not truncated and (since is not None or not reset):
            caught = await app[keys.GATHERER].since(asked.feed, asked.owners, since)
            if caught is not None:
                await out.open()
                shown = SNAPSHOT_CURSOR if since is None else str(since)
                cursor, stamp = asked.view.cursor(shown), timestamp_now()
                for i in range(0, len(caught.items), ROWS_PER_WRITE):
                    part = caught.items[i : i + ROWS_PER_WRITE]
                    await out.write(b"".join(asked.frame(item, cursor, stamp) for item in part))
                return caught.snapshot, set()
        return await _read_alone(app, out, asked, since, reset=reset, truncated=truncated)
    except CONNECTION_ERRORS as exc:
        if not out.opened:
            raise Unavailable("The database is not reachable; retry shortly.") from exc
        raise ConnectionResetError("the database went away during a catch-up") from exc


async def _read_alone(
    app: web.Application, out: Out, asked: Asked, since: int | None, *, reset: bool, truncated: bool
) -> tuple[Snapshot, set[str]]:
    """A catch-up (or snapshot) written as it is read, a batch at a time in the read's own
    snapshot: each batch is written and drained before the next is fetched, so the
    client's pace sets the reader's, and what the stream holds is one batch however many
    rows the caller has."""
    feed, view = asked.feed, asked.view
    # From the WAL a TRUNCATE can come a moment before a new snapshot sees it.
    visible = app[keys.HUB].truncated_by.get(feed.name) if truncated else None
    async with app[keys.READS].since(
        feed, asked.owners, since, shape=view.shape, visible=visible
    ) as read:
        resumed = since is not None and not read.reset
        cursor = view.cursor(str(since) if resumed else SNAPSHOT_CURSOR)
        batches = read.batches()
        part = await anext(batches, None)
        await out.open()
        if reset or truncated or read.reset:
            await out.write(frame(ResetEvent(timestamp=now())))
        while part is not None:
            stamp = timestamp_now()
            await out.write(b"".join(asked.frame(i, cursor, stamp) for i in part.items))
            part = await anext(batches, None)
        return read.snapshot, await read.held()


async def start(
    app: web.Application,
    asked: Asked,
    out: Out,
    live: Live,
    since: int | None,
    *,
    reset: bool = False,
    snapshot: bool = False,
    truncated: bool = False,
) -> Subscriber:
    """Set a stream up: its place in the hub (taken *before* the database is read), its
    catch-up or snapshot if it needs one, `synced`; returns its place, live, its bytes
    going straight into the connection of `live`."""
    hub = app[keys.HUB]
    sub = await hub.open(
        asked.feed, asked.owners, asked.user, None, expires_at=asked.expires_at, view=asked.view
    )
    try:
        held: set[str] = set()
        if since is not None or snapshot or truncated or reset:
            seen, held = await _write_since(
                app, out, asked, since, reset=reset, truncated=truncated
            )
        else:
            # Nothing to read: the stream is live from its subscription on, and everything
            # not yet dispatched is at or above the hub's watermark. (A filtered stream
            # without a snapshot holds nothing yet.)
            seen = NOTHING
            await out.open()
        synced_at = seen.cursor if seen is not NOTHING else hub.cursor
        await out.write(frame(SyncedEvent(timestamp=now()), asked.view.cursor(synced_at)))
        await out.flush()  # all of it, before the hub writes into the connection
        backlog = hub.buffer_limit // 2
        sub.go_live(Sink(live.transport, live.chunked, live.drain, backlog=backlog), seen, held)
        return sub
    except BaseException:
        hub.release(sub)
        raise
