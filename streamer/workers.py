"""Running the app: one process, or N processes sharing one port (SO_REUSEPORT), each with
its own LISTEN connection, so each sees every event of the users it serves."""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import uuid
from types import FrameType
from typing import Any

import asyncpg
from aiohttp import web

from streamer.config import Settings
from streamer.metrics import MULTIPROCESS_DIR

log = logging.getLogger(__name__)

SHUTDOWN_SECONDS = 1.0  # open streams are ended on shutdown; do not wait on them long
LISTENER_START_SECONDS = 30.0
DATABASE_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class StartupError(Exception):
    """The service could not start (database, port); the message is one line."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Python would otherwise die on the spot. Like Ctrl-C's
    KeyboardInterrupt, asyncio and subprocess let it through, so every `with` block unwinds
    and the embedded Postgres that `serve` started is stopped."""


def raise_on_sigterm() -> None:
    """From now until an event loop or the workers' supervisor takes SIGTERM over, it raises
    Terminated; a second one, while the first unwinds, is ignored."""

    def terminated(_signum: int, _frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    signal.signal(signal.SIGTERM, terminated)


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def run_server(
    settings: Settings,
    dsn: str,
    listen_dsn: str,
    *,
    reuse_port: bool = False,
    demo_user: uuid.UUID | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then end every open stream cleanly and return."""
    from streamer.cli import setup_logging

    setup_logging(settings)
    on_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        asyncio.run(_serve(settings, dsn, listen_dsn, reuse_port=reuse_port, demo_user=demo_user))
    finally:
        # A closed loop leaves SIGTERM at its default, death on the spot: what follows
        # (stopping the embedded Postgres) gets the handler it had before.
        signal.signal(signal.SIGTERM, on_sigterm)


async def _serve(
    settings: Settings,
    dsn: str,
    listen_dsn: str,
    *,
    reuse_port: bool,
    demo_user: uuid.UUID | None,
) -> None:
    from streamer import keys
    from streamer.app import create_app
    from streamer.server import server_options

    # First of all: a signal while the pool and the LISTEN connection come up stops the
    # service as cleanly as one while it serves.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    app = create_app(settings, dsn, listen_dsn)
    if demo_user is not None:
        from streamer.demo import add_demo_routes

        add_demo_routes(app, demo_user)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        **server_options(),  # the same limits and logs as the tests' server
        handler_cancellation=True,  # a client that leaves releases its stream at once
        shutdown_timeout=SHUTDOWN_SECONDS,
    )
    try:
        await runner.setup()
    except DATABASE_ERRORS as exc:
        raise StartupError(f"cannot use DATABASE_URL: {first_line(exc)}") from None
    try:
        # The port opens once the LISTEN connection is up: under SO_REUSEPORT the kernel
        # hands connections to any open socket, ready or not.
        if not await _first(app[keys.LISTENER].ready, stop):
            if stop.is_set():
                return
            raise StartupError(
                f"the LISTEN connection did not come up within {LISTENER_START_SECONDS:.0f} s "
                "(STREAMER_LISTEN_DATABASE_URL, or DATABASE_URL)"
            )
        # What exists now lives as long as the process: keep the garbage collector from
        # scanning it in every full collection. That halves the pause a burst of thousands
        # of (re)connecting streams triggers (about 45 to 20 ms at 1,000 streams).
        gc.collect()
        gc.freeze()
        site = web.TCPSite(runner, settings.host, settings.port, reuse_port=reuse_port or None)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {settings.host}:{settings.port}: {first_line(exc)}"
            ) from None
        # The real port: STREAMER_PORT=0 picks a free one.
        log.info("serving on %s", ", ".join(_url(address) for address in runner.addresses))
        await stop.wait()
        log.info("stopping: ending open streams")
    finally:
        await runner.cleanup()


async def _first(ready: asyncio.Event, stop: asyncio.Event) -> bool:
    """Wait until `ready` (True), or `stop` or the start-up timeout (False)."""
    waits = [asyncio.create_task(ready.wait()), asyncio.create_task(stop.wait())]
    try:
        await asyncio.wait(waits, timeout=LISTENER_START_SECONDS, return_when="FIRST_COMPLETED")
    finally:
        for wait in waits:
            wait.cancel()
    return ready.is_set() and not stop.is_set()


def _url(address: Any) -> str:
    host, port = address[0], address[1]
    return f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"


def _worker(settings: Settings, dsn: str, listen_dsn: str) -> None:
    try:
        run_server(settings, dsn, listen_dsn, reuse_port=True)
    except StartupError as exc:
        log.error("%s", exc)
        sys.exit(1)


def serve_workers(settings: Settings, dsn: str, listen_dsn: str) -> int:
    """Start `settings.workers` processes and wait for them; 0 when all stopped on a signal.

    Their metrics are kept in a shared directory, so /metrics reports every worker."""
    made_dir = not os.environ.get(MULTIPROCESS_DIR)
    if made_dir:
        os.environ[MULTIPROCESS_DIR] = tempfile.mkdtemp(prefix="streamer-metrics-")
    try:
        return _supervise(settings, dsn, listen_dsn)
    finally:
        if made_dir:
            shutil.rmtree(os.environ.pop(MULTIPROCESS_DIR), ignore_errors=True)


def _supervise(settings: Settings, dsn: str, listen_dsn: str) -> int:
    from prometheus_client.multiprocess import mark_process_dead

    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(
            target=_worker, args=(settings, dsn, listen_dsn), name=f"streamer-worker-{i}"
        )
        for i in range(settings.workers)
    ]
    stopping = False

    def stop_workers() -> None:
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        stop_workers()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for worker in workers:
        worker.start()
    log.info("started %d workers on port %d", len(workers), settings.port)

    code = 0
    running = {worker.sentinel: worker for worker in workers}
    while running:
        for sentinel in multiprocessing.connection.wait(list(running)):
            assert isinstance(sentinel, int)  # a process sentinel is a file descriptor
            worker = running.pop(sentinel)
            worker.join()
            mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
            if stopping and worker.exitcode in (0, -signal.SIGTERM):
                continue
            code = 1
            if not stopping:
                # Serving on with fewer workers would hide the failure: stop whole, so the
                # supervisor (systemd, Kubernetes) restarts the service.
                log.error("worker %s exited (%s); stopping the others", worker.pid, worker.exitcode)
                stopping = True
                stop_workers()
    sys.stdout.flush()
    return code
