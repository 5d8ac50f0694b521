"""Running the app: one process, or N processes sharing one port (SO_REUSEPORT), each with
its own LISTEN connection, so each sees every event of the users it serves."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import uuid
from types import FrameType

from aiohttp import web

from streamer.config import Settings

log = logging.getLogger(__name__)


def run_server(
    settings: Settings,
    dsn: str,
    listen_dsn: str,
    *,
    reuse_port: bool = False,
    demo_user: uuid.UUID | None = None,
) -> None:
    from streamer.app import create_app
    from streamer.cli import setup_logging
    from streamer.server import server_options

    setup_logging(settings)
    app = create_app(settings, dsn, listen_dsn)
    if demo_user is not None:
        from streamer.demo import add_demo_routes

        add_demo_routes(app, demo_user)
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        reuse_port=reuse_port or None,
        **server_options(),  # the same limits and logs as the tests' server
        handler_cancellation=True,  # a client that leaves releases its stream at once
        shutdown_timeout=1.0,  # open streams are ended on shutdown; do not wait on them long
        print=None,
    )


def serve_workers(settings: Settings, dsn: str, listen_dsn: str) -> int:
    """Start `settings.workers` processes; forward SIGTERM/SIGINT; exit when they all have."""
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(
            target=run_server,
            args=(settings, dsn, listen_dsn),
            kwargs={"reuse_port": True},
            name=f"streamer-worker-{i}",
        )
        for i in range(settings.workers)
    ]
    for worker in workers:
        worker.start()
    log.info("%d workers serving on %s:%d", len(workers), settings.host, settings.port)

    def forward(signum: int, _frame: FrameType | None) -> None:
        # Each worker ends its streams cleanly on SIGTERM; a terminal's Ctrl-C reaches
        # the workers by itself (same process group), so the parent only waits.
        if signum == signal.SIGTERM:
            for worker in workers:
                if worker.pid is not None and worker.is_alive():
                    os.kill(worker.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    for worker in workers:
        worker.join()
        if worker.exitcode not in (0, -signal.SIGTERM):
            code = 1
    sys.stdout.flush()
    return code
