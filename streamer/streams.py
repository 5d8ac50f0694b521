"""The two SSE handlers of every feed: all rows of the caller, and one row's progress.

A stream subscribes to its owner in the hub *before* it reads the database, so nothing
committed in between is missed; what the read already saw is then skipped by snapshot
visibility, so nothing is sent twice or older-after-newer.
"""

from __future__ import annotations

import asyncio
import functools
import random
import re
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol

from aiohttp import HttpVersion11, web

from streamer import claims, keys
from streamer.auth import Principal
from streamer.changes import NOTHING, Gone, Row, Snapshot, parse_cursor
from streamer.errors import (
    CONNECTION_ERRORS,
    InvalidCursor,
    InvalidParameter,
    NotFound,
    Unavailable,
)
from streamer.feeds import Feed
from streamer.live import Live
from streamer.shapes import parse_shape
from streamer.sse import (
    ResetEvent,
    Sink,
    SyncedEvent,
    deleted_frame,
    frame,
    now,
    retry_frame,
    timestamp_now,
    update_frame,
)
from streamer.subscriber import Ended, Subscriber
from streamer.views import KEY_LENGTH, View, split_cursor, view

SNAPSHOT_CURSOR = "0"  # a stream cut during its snapshot resumes from the very beginning
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
_VIEW_KEY = re.compile(rf"\.[0-9a-f]{{{KEY_LENGTH}}}")
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _shown(value: str) -> str:
    """What the client sent, quoted for an error message: never whole when long, and never
    a token pasted into the wrong place (every JWT begins with "eyJ", base64 of '{"')."""
    if "eyJ" in value:
        return "what looks like a token (not repeated here)"
    return repr(value if len(value) <= 40 else value[:40] + "…")


def _flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "0")
    if value.lower() in TRUE:
        return True
    if value.lower() in FALSE:
        return False
    raise InvalidParameter(
        f"Query parameter {name} must be 1, true, yes or on (or 0, false, no, off),"
        f" not {_shown(value)}."
    )


def _raw_cursor(request: web.Request) -> tuple[str, str] | None:
    """The cursor the client sent and where: the header its browser sends by itself, or
    the query parameter; None without one."""
    if request.headers.get("Last-Event-ID"):
        return "The Last-Event-ID header", request.headers["Last-Event-ID"]
    if request.query.get("last_event_id"):
        return "The last_event_id parameter", request.query["last_event_id"]
    return None


def _cursor(request: web.Request) -> tuple[int, str] | None:
    """The cursor the client sent, and the suffix that names its view."""
    given = _raw_cursor(request)
    if given is None:
        return None
    where, raw = given
    number, suffix = split_cursor(raw)
    try:
        if suffix and not _VIEW_KEY.fullmatch(suffix):
            raise InvalidCursor()
        return parse_cursor(number), suffix
    except InvalidCursor:
        raise InvalidCursor(
            f"{where} is not a cursor this server issued (an event's id:), it is {_shown(raw)}."
        ) from None


def _feed(request: web.Request) -> Feed:
    feed = request.app[keys.FEEDS].get(request.match_info["feed"])
    if feed is None:
        raise NotFound("No such feed.")
    return feed


async def _caller(request: web.Request) -> tuple[Principal, Feed, tuple[str, ...]]:
    """Who asks (before anything else: not even which feeds exist is told to strangers),
    of which feed, and the owners whose rows they may see in it (a sub that no owner of it
    can be is TOKEN_INVALID; a token without the feed's owner claim, FORBIDDEN)."""
    principal = await request.app[keys.AUTH].authenticate(request)
    feed = _feed(request)
    return principal, feed, claims.owners(principal, feed)


async def _open(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers=SSE_HEADERS)
    if request.version >= HttpVersion11:
        response.enable_chunked_encoding()  # the sink writes whole chunks itself
    await response.prepare(request)
    # Spread: clients that lost their streams at once (a restart) come back spread out.
    retry = request.app[keys.SETTINGS].retry_ms * random.uniform(0.5, 1.5)
    await response.write(retry_frame(round(retry)))
    return response


async def _live(request: web.Request, sub: Subscriber, seen: Snapshot) -> Ended:
    """A one-row stream: the hub writes its events straight into the connection; wait for
    its end (its last event, token expiry, a cut, a shutdown, the client leaving)."""
    transport = request.transport
    if sub.closed is not None:
        return sub.closed
    if transport is None or transport.is_closing():
        return Ended.GONE
    backlog = request.app[keys.HUB].buffer_limit // 2
    sink = Sink(transport, request.version >= HttpVersion11, request.writer.drain, backlog=backlog)
    sub.go_live(sink, seen)
    return await sub.ended


class Opening:
    """Where a stream's set-up writes while aiohttp serves it: the response, begun once the
    first read is in (a database that cannot be read is a 503 then, not a broken stream)."""

    __slots__ = ("_request", "response")

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.response: web.StreamResponse | None = None

    @property
    def opened(self) -> bool:
        return self.response is not None and self.response.prepared

    async def open(self) -> None:
        if self.response is None:
            self.response = await _open(self._request)

    async def write(self, data: bytes) -> None:
        """Write and wait until the client took it, within the write timeout: a client that
        stops reading during a catch-up is cut (it resumes from its cursor)."""
        request = self._request
        await self.open()
        assert self.response is not None
        try:
            async with asyncio.timeout(request.app[keys.SETTINGS].write_timeout_seconds):
                await self.response.write(data)
        except TimeoutError:
            request.app[keys.METRICS].slow_disconnects.inc()
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError("the client stopped reading during a catch-up") from None


class Out(Protocol):
    """Where a stream's set-up writes: an Opening, or the Live of a stream starting over."""

    @property
    def opened(self) -> bool: ...

    async def open(self) -> None: ...

    async def write(self, data: bytes) -> None: ...


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
    """Write the caller's catch-up (or snapshot) as it is read, a batch at a time in the
    read's own snapshot: each batch is written and drained before the next is fetched, so
    the client's pace sets the reader's, and what the stream holds is one batch however
    many rows the caller has. Returns the read's snapshot and, for a filtered view, the
    rows its client now holds."""
    feed, view = asked.feed, asked.view
    # From the WAL a TRUNCATE can come a moment before a new snapshot sees it.
    visible = app[keys.HUB].truncated_by.get(feed.name) if truncated else None
    try:
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
    except CONNECTION_ERRORS as exc:
        if not out.opened:
            raise Unavailable("The database is not reachable; retry shortly.") from exc
        raise ConnectionResetError("the database went away during a catch-up") from exc


async def _start(
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
        backlog = hub.buffer_limit // 2
        sub.go_live(Sink(live.transport, live.chunked, live.drain, backlog=backlog), seen, held)
        return sub
    except BaseException:
        hub.release(sub)
        raise


async def feed_events(request: web.Request) -> web.StreamResponse:
    """GET /api/{feed}/events: every row of the caller (that its shape takes), live,
    resumable by cursor.

    Once live, its connection is handed over to a Live (streamer/live.py), which keeps
    nothing of aiohttp's, and this handler returns."""
    principal, feed, owners = await _caller(request)
    shape = parse_shape(request.query.items(), feed.column_types)
    chosen = view(shape, owners, claimed=feed.owner_claim is not None)
    asked = Asked(feed, owners, chosen, principal.subject, principal.expires_at)
    cursor = _cursor(request)
    since = None if cursor is None else cursor[0]
    # A cursor of another view: its client's rows are another set. Start over.
    reset = cursor is not None and cursor[1] != chosen.suffix
    if reset:
        since = None
    snapshot = _flag(request, "snapshot")
    app, transport = request.app, request.transport
    if transport is None or transport.is_closing():
        return web.Response()  # the client left already
    live = Live(
        transport,
        chunked=request.version >= HttpVersion11,
        write_timeout=app[keys.SETTINGS].write_timeout_seconds,
        release=app[keys.HUB].release,
        start_over=functools.partial(_start_over, app, asked),
        on_slow=app[keys.METRICS].slow_disconnects.inc,
    )
    out = Opening(request)
    try:
        sub = await _start(app, asked, out, live, since, reset=reset, snapshot=snapshot)
    except ConnectionResetError:
        return web.Response()  # the client left during set-up: nothing to answer
    assert out.response is not None
    live.take(request, out.response)
    live.attach(sub)
    return out.response


def _start_over(app: web.Application, asked: Asked, live: Live) -> Awaitable[Subscriber]:
    return _start(app, asked, live, live, None, truncated=True)


async def row_events(request: web.Request) -> web.StreamResponse:
    """GET /api/{feed}/{id}/events: one row's state, then its updates until the end."""
    principal, feed, owners = await _caller(request)
    row_id = feed.parse_id(request.match_info["id"])
    subscription = request.app[keys.HUB].subscription(
        feed, owners, principal.subject, row_id, expires_at=principal.expires_at
    )
    async with subscription as sub:
        try:
            seen, row = await request.app[keys.READS].one(feed, owners, row_id)
        except CONNECTION_ERRORS as exc:
            raise Unavailable("The database is not reachable; retry shortly.") from exc
        reconnect = _raw_cursor(request) is not None
        if row is None:
            if reconnect:
                return web.Response(status=204)  # a reconnect: over, a browser stops
            raise NotFound(f"No such {feed.event}.")
        if row.terminal and reconnect:
            # Its last state was sent when it ended; a plain EventSource, told 204,
            # stops reconnecting instead of asking again every `retry:`.
            return web.Response(status=204)
        try:
            response = await _open(request)
            await response.write(update_frame(feed, row, seen.cursor))
            if not row.terminal:
                await _live(request, sub, seen)
        except ConnectionResetError:
            return web.Response()
        return response
