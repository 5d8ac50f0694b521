"""The two SSE handlers of every feed: all rows of the caller, and one row's progress
(a stream of every row is set up by streamer/catchup.py).
"""

from __future__ import annotations

import asyncio
import functools
import random
import re
from collections.abc import Awaitable

from aiohttp import HttpVersion11, web

from streamer import claims, keys
from streamer.auth import Principal
from streamer.catchup import Asked, start
from streamer.changes import Snapshot, parse_cursor
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
    Sink,
    retry_frame,
    update_frame,
)
from streamer.subscriber import Ended, Subscriber
from streamer.views import KEY_LENGTH, split_cursor, view

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
_VIEW_KEY = re.compile(rf"\.[0-9a-f]{{{KEY_LENGTH}}}")
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")
HOLD_BYTES = 64 * 1024  # what a stream's set-up holds before it writes (see Opening)


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


class EventStream(web.StreamResponse):
    """An SSE response whose headers go out with its first bytes (the `retry:` and what
    follows it), in one send, not in a send of their own: a returning crowd's 100,000
    set-ups spent a sixth of their time in sends."""

    _send_headers_immediately = False  # aiohttp's, as web.Response has it


async def _open(request: web.Request) -> tuple[web.StreamResponse, bytes]:
    """The response, begun (its headers not sent yet), and the `retry:` to write first."""
    response = EventStream(status=200, headers=SSE_HEADERS)
    if request.version >= HttpVersion11:
        response.enable_chunked_encoding()  # the sink writes whole chunks itself
    await response.prepare(request)
    # Spread: clients that lost their streams at once (a restart) come back spread out.
    retry = request.app[keys.SETTINGS].retry_ms * random.uniform(0.5, 1.5)
    return response, retry_frame(round(retry))


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
    request.app[keys.GATE].leave(transport)  # set up: the next connection is read
    return await sub.ended


class Opening:
    """Where a stream's set-up writes while aiohttp serves it: the response, begun once the
    first read is in (a database that cannot be read is a 503 then, not a broken stream).
    What is written is held until HOLD_BYTES of it or `flush`: a small catch-up goes out
    with the headers, the `retry:` and `synced` in one send."""

    __slots__ = ("_held", "_request", "_size", "response")

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.response: web.StreamResponse | None = None
        self._held: list[bytes] = []
        self._size = 0

    @property
    def opened(self) -> bool:
        return self.response is not None and self.response.prepared

    async def open(self) -> None:
        if self.response is None:
            self.response, retry = await _open(self._request)
            self._hold(retry)

    async def write(self, data: bytes) -> None:
        await self.open()
        self._hold(data)
        if self._size >= HOLD_BYTES:
            await self.flush()

    def _hold(self, data: bytes) -> None:
        self._held.append(data)
        self._size += len(data)

    async def flush(self) -> None:
        """Write what is held and wait until the client took it, within the write timeout:
        a client that stops reading during a catch-up is cut (it resumes from its cursor)."""
        request = self._request
        if self.response is None or not self._held:
            return
        data, self._held, self._size = b"".join(self._held), [], 0
        try:
            async with asyncio.timeout(request.app[keys.SETTINGS].write_timeout_seconds):
                await self.response.write(data)
        except TimeoutError:
            request.app[keys.METRICS].slow_disconnects.inc()
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError("the client stopped reading during a catch-up") from None


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
        sub = await start(app, asked, out, live, since, reset=reset, snapshot=snapshot)
    except ConnectionResetError:
        # The client left, stopped reading, or the database went away in the middle of
        # its catch-up: the connection is cut, and its client resumes from its cursor. Never
        # a response of another kind after this one began (its headers may still be held).
        transport.abort()
        return web.Response()
    assert out.response is not None
    live.take(request, out.response)
    live.attach(sub)
    return out.response


def _start_over(app: web.Application, asked: Asked, live: Live) -> Awaitable[Subscriber]:
    return start(app, asked, live, live, None, truncated=True)


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
            response, retry = await _open(request)
            await response.write(retry + update_frame(feed, row, seen.cursor))
            if not row.terminal:
                await _live(request, sub, seen)
        except ConnectionResetError:
            return web.Response()
        return response
