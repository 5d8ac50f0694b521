"""N workers: `streamer serve --workers N` runs N processes sharing one port (SO_REUSEPORT),
each with its own LISTEN connection, so each sees every event of the users it serves.

A worker that exits stops them all: serving on with fewer would hide the failure, so the
service stops whole and its own supervisor (systemd, Kubernetes) restarts it."""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
from multiprocessing.synchronize import Barrier
from types import FrameType

from streamer.config import Settings
from streamer.logs import setup_logging
from streamer.metrics import MULTIPROCESS_DIR
from streamer.runner import AppFactory, StartupError, run_server

log = logging.getLogger(__name__)

# What a worker imports, imported once by the process every worker is forked from (1.4
# CPU-s a process, paid six times over by a restart under a returning crowd otherwise).
PRELOAD = ["streamer.app", "streamer.runner", "streamer.cli"]
FLEET_PRELOAD = ["streamer.fleet", "streamer.sources.broker"]  # only a fleet needs the broker's


def serve_workers(settings: Settings, make_app: AppFactory) -> int:
    """Start `settings.workers` processes, each serving the app `make_app` makes, and wait
    for them; 0 when all stopped on a signal.

    Their metrics are kept in a shared directory, so /metrics reports every worker."""
    made_dir = not os.environ.get(MULTIPROCESS_DIR)
    if made_dir:
        os.environ[MULTIPROCESS_DIR] = tempfile.mkdtemp(prefix="streamer-metrics-")
    try:
        return _supervise(settings, make_app)
    finally:
        if made_dir:
            shutil.rmtree(os.environ.pop(MULTIPROCESS_DIR), ignore_errors=True)


def _worker(settings: Settings, make_app: AppFactory, together: Barrier) -> None:
    setup_logging(settings)  # the fork server has none
    try:
        run_server(settings, make_app, reuse_port=True, together=together)
    except StartupError as exc:
        log.error("%s", exc)
        sys.exit(1)


def _supervise(settings: Settings, make_app: AppFactory) -> int:
    from prometheus_client.multiprocess import mark_process_dead

    # Forked from a server process that imported them, not spawned to import it all again
    # (nor forked from this one: its signal handlers, and whatever it has started).
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD + (FLEET_PRELOAD if settings.broker_url else []))
    together = context.Barrier(settings.workers)  # they open the port at once
    workers = [
        context.Process(
            target=_worker, args=(settings, make_app, together), name=f"streamer-worker-{i}"
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
