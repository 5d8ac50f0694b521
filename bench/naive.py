"""The naive design, for comparison: each SSE stream opens its own LISTEN connection.

This is what most tutorials show: on every request, `asyncpg.connect()`, LISTEN on the
channel, decode every notification and keep the caller's. It needs no hub and no cursor,
and it costs one Postgres backend per open stream; Postgres refuses connections past
max_connections. Same channel, same payloads and same token check as the service.

    python -m bench.naive --port 8081   # DATABASE_URL and STREAMER_JWT_SECRET from the env
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
from typing import Any

import asyncpg
import jwt
from aiohttp import web

HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
DSN = web.AppKey("dsn", str)
SECRET = web.AppKey("secret", str)


def _error(status: int, code: str) -> web.Response:
    return web.json_response({"error": code.lower(), "code": code}, status=status)


async def events(request: web.Request) -> web.StreamResponse:
    token = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    try:
        claims = jwt.decode(token, request.app[SECRET], algorithms=["HS256"])
    except jwt.PyJWTError:
        return _error(401, "TOKEN_INVALID")
    user = claims["sub"]
    try:
        conn = await asyncpg.connect(request.app[DSN])
    except asyncpg.TooManyConnectionsError:
        return _error(503, "TOO_MANY_CONNECTIONS")
    except (OSError, asyncpg.PostgresError) as exc:
        return _error(503, "DATABASE_" + exc.__class__.__name__.upper())
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def notified(_conn: object, _pid: int, _channel: str, payload: str) -> None:
        envelope, _, row = payload.partition("\n")
        change = json.loads(envelope)
        if change["u"] == user and change["o"] == "u" and row:
            queue.put_nowait(json.loads(row))

    try:
        # The feeds' channel, named as the owner may (tutorials LISTEN on the name).
        await conn.add_listener(await conn.fetchval("select streamer.channel()"), notified)
        response = web.StreamResponse(headers=HEADERS)
        await response.prepare(request)
        await response.write(b'retry: 2000\n\nevent: synced\ndata: {"eventType":"synced"}\n\n')
        with contextlib.suppress(ConnectionResetError):
            while True:
                row = await queue.get()
                body = json.dumps({"eventType": "file-update", "file": row})
                await response.write(f"event: file-update\ndata: {body}\n\n".encode())
        return response
    finally:
        with contextlib.suppress(OSError, asyncpg.InterfaceError, TimeoutError):
            await conn.close(timeout=2)


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args()
    app = web.Application()
    app[DSN] = os.environ["DATABASE_URL"]
    app[SECRET] = os.environ["STREAMER_JWT_SECRET"]
    app.router.add_get("/api/files/events", events)
    app.router.add_get("/healthz", healthz)
    web.run_app(
        app, host="127.0.0.1", port=args.port, print=None, handler_cancellation=True,
        shutdown_timeout=1.0, access_log=None,
    )  # fmt: skip


if __name__ == "__main__":
    main()
