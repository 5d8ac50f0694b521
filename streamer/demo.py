"""`streamer demo`: the service, a simulated file processor writing plain SQL, and a page.

The demo builds its own app, the production one plus a page, a token for its one user and
the simulated processor; the runner serves it like any other."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator
from functools import partial

from aiohttp import web

from streamer import keys
from streamer.app import STATIC, create_app
from streamer.auth import mint_token
from streamer.config import Settings
from streamer.db import Database, migrate
from streamer.runner import run_server
from streamer.simulator import run_simulator

DEMO_TOKEN_TTL = 3600
DEMO_USER = web.AppKey("demo_user", uuid.UUID)
WRITER_STOP_SECONDS = 5.0


async def demo_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "demo.html", headers={"Cache-Control": "no-cache"})


async def demo_token(request: web.Request) -> web.Response:
    """A fresh token for the demo user; the page asks again when one expires."""
    settings = request.app[keys.SETTINGS]
    user = request.app[DEMO_USER]
    assert settings.jwt_secret is not None
    token = mint_token(settings.jwt_secret, user, DEMO_TOKEN_TTL)
    return web.json_response(
        {"token": token, "user_id": str(user)}, headers={"Cache-Control": "no-store"}
    )


async def to_demo(request: web.Request) -> web.Response:
    raise web.HTTPFound("/demo/")


def add_demo_routes(app: web.Application, user: uuid.UUID) -> None:
    """Only in demo mode: a page and a token for anyone who can reach it."""
    app[DEMO_USER] = user
    app.router.add_get("/", to_demo)
    app.router.add_get("/demo/", demo_page)
    app.router.add_get("/demo/token", demo_token)


async def simulated_processor(app: web.Application) -> AsyncIterator[None]:
    """The demo user's files, written by plain SQL from a thread of its own. Added after
    the app's own contexts, it starts once the pool is open and stops before it closes."""
    stop = threading.Event()
    writer = threading.Thread(
        target=run_simulator,
        args=(app[keys.DSN], app[DEMO_USER]),
        kwargs={"stop": stop},
        name="simulated-file-processor",
        daemon=True,
    )
    writer.start()
    yield
    stop.set()
    await asyncio.to_thread(writer.join, WRITER_STOP_SECONDS)


def demo_app(settings: Settings, dsn: str, listen_dsn: str, user: uuid.UUID) -> web.Application:
    app = create_app(settings, dsn, listen_dsn)
    add_demo_routes(app, user)
    app.cleanup_ctx.append(simulated_processor)
    return app


def demo_user(settings: Settings) -> uuid.UUID:
    """One demo user per data dir, so the page shows the same files across runs."""
    path = settings.data_dir / "demo_user"
    if not path.exists():
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(str(uuid.uuid4()))
    return uuid.UUID(path.read_text().strip())


def run_demo(settings: Settings) -> int:
    with Database.from_settings(settings) as database:
        migrate(database.dsn, settings.source if settings.source_given else None)
        user = demo_user(settings)
        print(
            f"\nstreamer demo: open http://{settings.host}:{settings.port}/demo/ "
            f"(user {user}; a simulated file processor is writing to Postgres)\n",
            flush=True,
        )
        # The writer, part of the app, stops before its database does.
        run_server(settings, partial(demo_app, settings, database.dsn, database.listen_dsn, user))
    return 0
