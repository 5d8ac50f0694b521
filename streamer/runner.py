"""One process: the aiohttp app runner, and what SIGTERM does from start-up to the end.

Until the event loop runs, SIGTERM raises `Terminated` so that every `with` block unwinds
(the embedded Postgres that `serve` started is stopped); while it runs, SIGTERM and SIGINT
end every open stream cleanly and return."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Callable
from threading import BrokenBarrierError
from types import FrameType
from typing import TYPE_CHECKING, Any

from aiohttp import web

from streamer import keys
from streamer.config import Settings
from streamer.errors import CONNECTION_ERRORS
from streamer.gate import Gate
from streamer.server import server_options

if TYPE_CHECKING:
    from multiprocessing.synchronize import Barrier

log = logging.getLogger(__name__)

SHUTDOWN_SECONDS = 1.0  # open streams are ended on shutdown; do not wait on them long
LISTENER_START_SECONDS = 30.0

# Makes the app in the process that serves it (a worker's, under --workers): a module-level
# function or a functools.partial of one, so that it can be handed to a worker (pickled).
AppFactory = Callable[[], web.Application]


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
    make_app: AppFactory,
    *,
    reuse_port: bool = False,
    together: Barrier | None = None,
) -> None:
    """Serve the app `make_app` makes on settings.host and settings.port until SIGTERM or
    SIGINT, then end every open stream cleanly and return. With `together` (the workers'),
    the port opens once every worker is ready to open it."""
    on_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        asyncio.run(_serve(settings, make_app, reuse_port=reuse_port, together=together))
    except BaseException:
        # What follows (stopping the embedded Postgres) gets the handler it had before.
        signal.signal(signal.SIGTERM, on_sigterm)
        raise
    # Stopped: another SIGTERM (an impatient operator, a second `kill`) is ignored while
    # the rest ends, rather than cut it short; SIGKILL still ends it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


async def _serve(
    settings: Settings, make_app: AppFactory, *, reuse_port: bool, together: Barrier | None
) -> None:
    # First of all: a signal while the pool and the LISTEN connection come up stops the
    # service as cleanly as one while it serves.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)

    def terminated(_signum: int, _frame: FrameType | None) -> None:
        # Not the loop's signal handling: a closed loop would put SIGTERM back to its
        # default, death on the spot, for a second SIGTERM late in the shutdown.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        loop.call_soon_threadsafe(stop.set)

    signal.signal(signal.SIGTERM, terminated)
    app = make_app()
    runner = web.AppRunner(
        app,
        handle_signals=False,
        **server_options(),  # the same limits and logs as the tests' server
        handler_cancellation=True,  # a client that leaves releases its stream at once
        shutdown_timeout=SHUTDOWN_SECONDS,
    )
    try:
        await runner.setup()
    except CONNECTION_ERRORS as exc:
        raise StartupError(f"cannot use DATABASE_URL: {first_line(exc)}") from None
    try:
        # The port opens once the LISTEN connection is up: under SO_REUSEPORT the kernel
        # hands connections to any open socket, ready or not.
        if not await _first(app[keys.DISPATCHER].ready, stop):
            if stop.is_set():
                return
            kind = "replication" if settings.source == "wal" else "LISTEN"
            raise StartupError(
                f"the {kind} connection did not come up within {LISTENER_START_SECONDS:.0f} s "
                "(STREAMER_LISTEN_DATABASE_URL, or DATABASE_URL)"
            )
        # What exists now lives as long as the process: keep the garbage collector from
        # scanning it in every full collection. That halves the pause a burst of thousands
        # of (re)connecting streams triggers (about 45 to 20 ms at 1,000 streams).
        gc.collect()
        gc.freeze()
        if together is not None and not await _all_ready(together, stop):
            return
        await _listen(runner, app, settings, reuse_port=reuse_port)
        await stop.wait()
        log.info("stopping: ending open streams")
    finally:
        await runner.cleanup()


async def _listen(
    runner: web.AppRunner, app: web.Application, settings: Settings, *, reuse_port: bool
) -> None:
    """Open the port, every connection through the app's gate."""
    reuse, backlog = reuse_port or None, settings.listen_backlog
    site = GatedSite(runner, app[keys.GATE], settings.host, settings.port,
                     reuse_port=reuse, backlog=backlog)  # fmt: skip
    try:
        await site.start()
    except OSError as exc:
        raise StartupError(
            f"cannot listen on {settings.host}:{settings.port}: {first_line(exc)}"
        ) from None
    # The real port: STREAMER_PORT=0 picks a free one.
    log.info("serving on %s", ", ".join(_url(address) for address in runner.addresses))


async def _all_ready(together: Barrier, stop: asyncio.Event) -> bool:
    """Wait until every worker is ready to open the port (False: stopped meanwhile). Under
    SO_REUSEPORT the kernel spreads connections over the sockets open at the time: one
    worker that opened a few seconds before the others would get a whole crowd coming back
    after a restart, past its descriptor limit. A worker that is not ready in time (the
    supervisor stops them all if one exits) is not waited for longer."""
    waiting = asyncio.ensure_future(asyncio.to_thread(together.wait, LISTENER_START_SECONDS))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([waiting, stopped], return_when="FIRST_COMPLETED")
    finally:
        stopped.cancel()
        if not waiting.done():
            together.abort()  # stopping: every worker still waiting goes on (to stop)
    try:
        await waiting
    except BrokenBarrierError:
        if not stop.is_set():
            log.warning("opening the port without waiting longer for the other workers")
    return not stop.is_set()


class GatedSite(web.TCPSite):
    """aiohttp's TCP site, each connection through the gate (streamer/gate.py) before
    aiohttp reads it."""

    def __init__(self, runner: web.BaseRunner, gate: Gate, *args: Any, **kwargs: Any) -> None:
        super().__init__(runner, *args, **kwargs)
        self._gate = gate

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._gate.doors(server),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        self._bound_port = self._server.sockets[0].getsockname()[1]


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
