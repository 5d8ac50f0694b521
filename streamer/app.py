"""The aiohttp app: routes, errors as JSON, lifecycle of the pool, dispatcher and tickers."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp_cors
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from prometheus_client import CONTENT_TYPE_LATEST

from streamer import __version__, keys
from streamer.auth import Authenticator
from streamer.changes import Signed
from streamer.config import Settings
from streamer.db import create_pool
from streamer.dispatch import Dispatcher
from streamer.errors import CONNECTION_ERRORS, ApiError, AuthError
from streamer.feeds import Feeds
from streamer.gate import Gate
from streamer.gather import Gatherer
from streamer.hub import Hub
from streamer.metrics import Metrics
from streamer.reads import PoolReads, Reads
from streamer.sources import Source
from streamer.sources.notify import NotifySource
from streamer.sources.wal import WalSource
from streamer.streams import feed_events, row_events
from streamer.subscriber import Ended
from streamer.tasks import Supervisor, every

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
PRUNE_EVERY = 3600.0
HTTP_CODES = {
    400: "BAD_REQUEST",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, code: str, message: str) -> web.Response:
    response = web.json_response({"error": message, "code": code}, status=status)
    if status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        if not isinstance(exc, AuthError) and exc.status >= 500:
            log.warning("%s %s: %s", request.method, request.path, exc.message)
        return error_response(exc.status, exc.code, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = HTTP_CODES.get(exc.status, "HTTP_ERROR")
        response = error_response(exc.status, code, exc.reason + ".")
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response


_TOKEN_IN_QUERY = re.compile(r"(access_token[^=&;]*=)[^&;]*", re.IGNORECASE)
# Anything shaped like a JWT, wherever a client put it (a mistyped parameter, the path).
_JWT = re.compile(r"eyJ[\w-]*\.[\w-]+\.[\w-]*")


def redact(text: str) -> str:
    return _JWT.sub("[redacted]", _TOKEN_IN_QUERY.sub(r"\1[redacted]", text))


class AccessLogger(AbstractAccessLogger):
    """One line per request, never with a token: the query's access_token and anything
    shaped like a JWT are redacted, and no header is logged."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        path = redact(request.path_qs)
        fields = {
            "remote": request.remote,
            "method": request.method,
            "path": path,
            "status": response.status,
            "seconds": round(time, 3),
        }
        self.logger.info(
            "%s %s %s %d %.3fs",
            request.remote,
            request.method,
            path,
            response.status,
            time,
            extra={"access": fields},  # separate fields for JSON logs
        )


CLIENT_LEFT = 499  # nginx's status for a client that closed before the response began
_PREPARED = web.RequestKey("prepared_response", web.StreamResponse)


async def _remember_response(request: web.Request, response: web.StreamResponse) -> None:
    request[_PREPARED] = response


@web.middleware
async def through_the_gate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A request answered (or a stream live: its handler returns then) ends its connection's
    set-up: the next connection waiting at the gate is read (streamer/gate.py)."""
    transport = request.transport  # before a Live takes it over
    try:
        return await handler(request)
    finally:
        request.app[keys.GATE].leave(transport)


@web.middleware
async def log_when_client_leaves(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp writes no access line for a request whose client left (its handler is
    cancelled); most streams end that way, so the line is written here."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        return await handler(request)
    except asyncio.CancelledError:
        logger = request.protocol.access_logger
        if logger is not None and logger.enabled:
            response = request.get(_PREPARED) or web.StreamResponse(status=CLIENT_LEFT)
            logger.log(request, response, loop.time() - started)
        raise


# -- lifecycle ---------------------------------------------------------------------


async def _database(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    pool = await create_pool(app[keys.DSN], settings.pool_size)
    app[keys.POOL] = pool
    hub = app[keys.HUB]
    reads = app[keys.READS] = PoolReads(pool, app[keys.METRICS])
    # Half the pool for catch-ups read together; the rest for snapshots, big catch-ups,
    # recoveries and the feeds.
    app[keys.GATHERER] = Gatherer(reads.many, lanes=max(1, settings.pool_size // 2), most=500)
    feeds = app[keys.FEEDS] = Feeds(reads.feeds, lambda name: hub.close_all(Ended.DISABLED, name))
    await feeds.refresh()

    def direct() -> Source:
        if settings.source == "wal":
            return WalSource(app[keys.LISTEN_DSN], pool, Signed(reads.signing_key), feeds)
        return NotifySource(app[keys.LISTEN_DSN], pool, Signed(reads.signing_key))

    source = direct()
    if settings.broker_url is not None:
        # Imported only for a fleet: the broker's client costs every process's start-up.
        from streamer.fleet import Reader
        from streamer.sources.broker import BrokerSource

        source = BrokerSource(
            settings.broker_url,
            Signed(reads.signing_key),
            source.mark,
            name=settings.source,
            metrics=app[keys.METRICS],
        )
        hub.interest = source
    dispatcher = Dispatcher(source, reads, hub, feeds, app[keys.METRICS])
    app[keys.DISPATCHER] = dispatcher
    feeds.after = dispatcher.check_source
    # The owner of every long-lived task of the app: made first, stopped last, before
    # the pool those tasks use is closed.
    tasks = app[keys.TASKS] = Supervisor(app[keys.METRICS])
    tasks.start("listener", dispatcher.run)  # the name operators know from /metrics
    tasks.start("feeds", feeds.run)
    if settings.broker_url is not None:
        reader = Reader(
            app[keys.LISTEN_DSN],
            direct,
            reads.signing_key,
            settings.broker_url,
            app[keys.METRICS],
            gave_up=lambda why: dispatcher.stop_reading(why, for_good=True),
        )
        tasks.start("reader", reader.run)
    yield
    await tasks.stop()
    await dispatcher.close()
    await pool.close()


async def _prune_forever(reads: Reads, feeds: Feeds, keep_hours: float) -> None:
    while True:
        for feed in list(feeds.by_name.values()):
            try:
                gone = await reads.prune(feed, keep_hours)
                if gone:
                    log.info("pruned %d %s tombstones older than %sh", gone, feed.name, keep_hours)
            except CONNECTION_ERRORS as exc:
                log.warning("tombstone pruning failed: %s", exc.__class__.__name__)
        await asyncio.sleep(PRUNE_EVERY)


async def _background(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    auth = app[keys.AUTH]
    await auth.start()
    hub = app[keys.HUB]
    tasks = app[keys.TASKS]  # stops them with the dispatcher, in _database's clean-up
    beat_every = settings.heartbeat_seconds / len(hub.beats)  # a group's turn
    tasks.start("heartbeats", lambda: every(beat_every, hub.heartbeat))
    # Twice per write timeout: a stuck stream is cut within 1.5 timeouts.
    tasks.start("sweeps", lambda: every(settings.write_timeout_seconds / 2, hub.sweep))
    feeds, reads = app[keys.FEEDS], app[keys.READS]
    keep = settings.tombstone_retention_hours
    tasks.start("pruning", lambda: _prune_forever(reads, feeds, keep))
    yield
    await app[keys.GATHERER].close()
    await auth.close()


async def _end_streams(app: web.Application) -> None:
    """On shutdown (SIGTERM): every stream ends cleanly, and its client reconnects elsewhere;
    so do those still waiting at the gate."""
    app[keys.GATE].close()
    app[keys.HUB].shutdown()


# -- operations --------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


async def readyz(request: web.Request) -> web.Response:
    dispatcher = request.app[keys.DISPATCHER]
    problems = []
    if dispatcher.deaf is not None:
        problems.append(dispatcher.deaf)
    elif not dispatcher.ready.is_set():
        problems.append("listener down")
    try:
        async with asyncio.timeout(2):
            await request.app[keys.READS].ping()
    except CONNECTION_ERRORS:
        problems.append("database unreachable")
    if problems:
        return error_response(503, "UNAVAILABLE", "Not ready: " + ", ".join(problems) + ".")
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[keys.METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _vary_by_origin(request: web.Request, response: web.StreamResponse) -> None:
    # The CORS headers depend on Origin: a cache must not serve one origin's answer to another.
    if "Origin" not in response.headers.getall("Vary", []):
        response.headers.add("Vary", "Origin")


def _static_files() -> Handler:
    """The demo's files, by name, from a list made at start-up: nothing else under /static
    (a missing file is a JSON 404, and no path ever reaches the filesystem)."""
    files = {path.name: path for path in STATIC.glob("*") if path.is_file()}

    async def static(request: web.Request) -> web.StreamResponse:
        path = files.get(request.match_info["name"])
        if path is None:
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    return static


def create_app(settings: Settings, dsn: str, listen_dsn: str | None = None) -> web.Application:
    middlewares = [through_the_gate, log_when_client_leaves, errors_as_json]
    app = web.Application(middlewares=middlewares)
    app.on_response_prepare.append(_remember_response)
    app[keys.SETTINGS] = settings
    app[keys.DSN] = dsn
    app[keys.LISTEN_DSN] = listen_dsn or dsn
    app[keys.METRICS] = Metrics()
    app[keys.GATE] = Gate(settings.max_opening, app[keys.METRICS])
    app[keys.HUB] = Hub(
        app[keys.METRICS],
        max_streams_per_owner=settings.max_streams_per_user,
        max_streams=settings.max_streams,
        queue_limit=settings.queue_limit,
        write_timeout=settings.write_timeout_seconds,
        buffer_limit=settings.buffer_limit_bytes,
    )
    app[keys.AUTH] = Authenticator(settings)
    app.cleanup_ctx.append(_database)
    app.cleanup_ctx.append(_background)
    app.on_shutdown.append(_end_streams)

    streams = [
        app.router.add_get("/api/{feed}/events", feed_events, allow_head=False),
        app.router.add_get("/api/{feed}/{id}/events", row_events, allow_head=False),
    ]
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/static/{name}", _static_files())

    origins = settings.cors_origin_list
    if origins:
        options = aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]
            allow_credentials=True,
            allow_headers=("Authorization", "Last-Event-ID", "Cache-Control"),
            allow_methods=("GET",),
            max_age=600,
        )
        cors = aiohttp_cors.setup(app, defaults={origin: options for origin in origins})
        for route in streams:
            cors.add(route)
        app.on_response_prepare.append(_vary_by_origin)
    return app
