"""The two SSE handlers: every file of the caller, and one file's progress.

A stream subscribes to its owner in the hub *before* it reads the database, so nothing
committed in between is missed; what the read already saw is then skipped by snapshot
visibility, so nothing is sent twice or older-after-newer.
"""

from __future__ import annotations

import asyncio
import time
from uuid import UUID

import asyncpg
from aiohttp import HttpVersion11, web

from streamer import keys
from streamer.errors import InvalidId, InvalidParameter, NotFound, Unavailable
from streamer.events import ResetEvent, SyncedEvent, TokenExpiredEvent, frame, now, retry_frame
from streamer.feed import CatchUp, Gone, Snapshot, catch_up, current_snapshot, parse_cursor
from streamer.hub import Envelope, Subscriber

SNAPSHOT_CURSOR = "0"  # a stream cut during its snapshot resumes from the very beginning
NOTHING_SEEN = Snapshot(0, 0, frozenset())
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)
TRUE, FALSE = ("1", "true", "yes"), ("0", "false", "no", "")


def _flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "0").lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise InvalidParameter(f"Query parameter {name} must be 1 or 0.")


def _cursor(request: web.Request) -> int | None:
    raw = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
    return None if raw is None or raw == "" else parse_cursor(raw)


async def _open(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers=SSE_HEADERS)
    if request.version >= HttpVersion11:
        response.enable_chunked_encoding()  # the hub writes whole chunks itself
    await response.prepare(request)
    await response.write(retry_frame(request.app[keys.SETTINGS].retry_ms))
    return response


def _expire_at(sub: Subscriber, expires_at: float) -> asyncio.TimerHandle:
    loop = asyncio.get_running_loop()
    envelope = Envelope(frame(TokenExpiredEvent(timestamp=now())), closes=True)
    delay = max(0.0, expires_at - time.time())
    return loop.call_at(loop.time() + delay, lambda: sub.push(envelope))


async def _live(
    request: web.Request, response: web.StreamResponse, sub: Subscriber, seen: Snapshot
) -> web.StreamResponse:
    """Hand the connection to the hub, which writes every later event straight into it,
    and wait for the stream's end: token expiry, a one-row stream's last event, a cut, a
    shutdown, or the client leaving (then aiohttp cancels this handler)."""
    transport = request.transport
    if transport is None or transport.is_closing() or sub.closed is not None:
        return response
    sub.go_live(transport, request.version >= HttpVersion11, seen)
    await sub.ended
    return response


async def _read_since(
    request: web.Request, owner: UUID, since: int | None
) -> tuple[CatchUp, bytes]:
    """The caller's catch-up (or snapshot) and its events, encoded. A function of its own so
    the rows and bytes are freed once written, not held for the stream's whole life."""
    feed = request.app[keys.HUB].feed
    try:
        async with request.app[keys.POOL].acquire() as conn:
            result = await catch_up(conn, feed, [owner], since)
    except DB_ERRORS as exc:
        raise Unavailable("The database is not reachable; retry shortly.") from exc
    resumed = since is not None and not result.reset
    cursor = str(since) if resumed else SNAPSHOT_CURSOR
    chunks = [frame(ResetEvent(timestamp=now()))] if result.reset else []
    for _owner, item in result.in_order():
        if isinstance(item, Gone):
            chunks.append(frame(feed.delete_event(item.id), cursor))
        else:
            chunks.append(frame(feed.update_event(item), cursor))
    return result, b"".join(chunks)


async def file_events(request: web.Request) -> web.StreamResponse:
    """GET /api/files/events: every file of the caller, live, resumable by cursor."""
    app = request.app
    principal = await app[keys.AUTH].authenticate(request)
    since = _cursor(request)
    snapshot = _flag(request, "snapshot")
    hub = app[keys.HUB]
    sub = hub.subscribe(principal.user_id)
    expiry = _expire_at(sub, principal.expires_at)
    try:
        if since is not None or snapshot:
            result, caught_up = await _read_since(request, principal.user_id, since)
            seen = result.snapshot
            del result
        else:
            # Nothing to read: the stream is live from its subscription on, and everything
            # not yet dispatched is at or above the hub's watermark. No query at all.
            seen, caught_up = NOTHING_SEEN, b""
        response = await _open(request)
        if caught_up:
            await response.write(caught_up)
            del caught_up
        synced_at = seen.cursor if seen is not NOTHING_SEEN else hub.cursor
        await response.write(frame(SyncedEvent(timestamp=now()), synced_at))
        return await _live(request, response, sub, seen)
    except ConnectionResetError:
        return web.Response()  # the client left during set-up: nothing to answer
    finally:
        expiry.cancel()
        hub.unsubscribe(sub)


async def _read_one(
    request: web.Request, owner: UUID, row_id: UUID
) -> tuple[Snapshot, bytes, bool]:
    """The file's current state as an encoded event, the snapshot it was read in, and
    whether it is already terminal; NotFound when it is missing or someone else's."""
    feed = request.app[keys.HUB].feed
    try:
        async with (
            request.app[keys.POOL].acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            seen = await current_snapshot(conn)
            record = await conn.fetchrow(
                f"select {feed.select_list} from {feed.name} "
                f"where id = $1 and {feed.owner_column} = $2",
                row_id,
                owner,
            )
    except DB_ERRORS as exc:
        raise Unavailable("The database is not reachable; retry shortly.") from exc
    if record is None:
        raise NotFound()
    row = feed.row_model.model_validate(dict(record))
    return seen, frame(feed.update_event(row), seen.cursor), feed.is_terminal(row)


async def file_item_events(request: web.Request) -> web.StreamResponse:
    """GET /api/files/{id}/events: one file's state, then its updates until the end."""
    app = request.app
    principal = await app[keys.AUTH].authenticate(request)
    try:
        row_id = UUID(request.match_info["id"])
    except ValueError:
        raise InvalidId() from None
    hub = app[keys.HUB]
    sub = hub.subscribe(principal.user_id, row_id)
    expiry = _expire_at(sub, principal.expires_at)
    try:
        seen, current, terminal = await _read_one(request, principal.user_id, row_id)
        response = await _open(request)
        await response.write(current)
        del current
        if terminal:
            return response
        return await _live(request, response, sub, seen)
    except ConnectionResetError:
        return web.Response()
    finally:
        expiry.cancel()
        hub.unsubscribe(sub)
