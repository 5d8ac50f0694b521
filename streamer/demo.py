"""`streamer demo`: the service, a simulated file processor writing plain SQL, and a page."""

from __future__ import annotations

import threading
import uuid

from aiohttp import web

from streamer import keys
from streamer.auth import mint_token
from streamer.config import Settings

DEMO_TOKEN_TTL = 3600
DEMO_USER = web.AppKey("demo_user", uuid.UUID)


async def demo_page(request: web.Request) -> web.FileResponse:
    from streamer.app import STATIC

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


def demo_user(settings: Settings) -> uuid.UUID:
    """One demo user per data dir, so the page shows the same files across runs."""
    path = settings.data_dir / "demo_user"
    if not path.exists():
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(str(uuid.uuid4()))
    return uuid.UUID(path.read_text().strip())


def run_demo(settings: Settings) -> int:
    from streamer.db import Database, migrate
    from streamer.simulator import run_simulator
    from streamer.workers import run_server

    with Database.from_settings(settings) as database:
        migrate(database.dsn)
        user = demo_user(settings)
        stop = threading.Event()
        writer = threading.Thread(
            target=run_simulator,
            args=(database.dsn, user),
            kwargs={"stop": stop},
            name="simulated-file-processor",
            daemon=True,
        )
        writer.start()
        print(
            f"\nstreamer demo: open http://{settings.host}:{settings.port}/demo/ "
            f"(user {user}; a simulated file processor is writing to Postgres)\n",
            flush=True,
        )
        try:
            run_server(settings, database.dsn, database.listen_dsn, demo_user=user)
        finally:
            # The writer stops before its database does.
            stop.set()
            writer.join(timeout=5)
    return 0
