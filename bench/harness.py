"""What a benchmark runs against: an embedded Postgres, the service as deployed (`streamer
serve` in a subprocess), the naive server, and readings from pg_stat_activity while a
phase runs (/proc readings are procfs.py's).

Everything started here is registered and ended by `cleanup()`, which the runner calls in
a `finally` (Ctrl-C and SIGTERM included).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg

from bench.agent import stop_all
from bench.procfs import children_of, cpu_seconds, pss_bytes, rss_bytes
from streamer.db import ensure_database, migrate
from streamer.embedded import POSTGRES_BIN_PATH, EmbeddedPostgres, _free_port

DATABASE = "bench"
# The checkout this bench/ is in: its streamer/ is the one measured, whatever is installed.
REPO = Path(__file__).resolve().parent.parent
SECRET = "bench-secret-for-hs256-tokens-32-bytes-long"


# -- Postgres -------------------------------------------------------------------------


class Postgres:
    """The embedded server: started fresh in a temporary directory, destroyed at the end."""

    def __init__(self, *, fast: bool) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="streamer-bench-"))
        self.server = EmbeddedPostgres(self.root / "pg", fast=fast)
        self.fast = fast
        self.url = ""
        self._monitor: psycopg.Connection[tuple[Any, ...]] | None = None
        self._monitor_lock = threading.Lock()

    def start(self, code: Path = REPO) -> str:
        """Start the server, with the database migrated by the service of checkout `code`
        (another one's migrations by its own `streamer migrate`)."""
        admin = self.server.start()
        ensure_database(admin, DATABASE)
        self.url = self.server.url(DATABASE)
        if code == REPO:
            migrate(self.url)
        else:
            subprocess.run(
                [sys.executable, "-m", "streamer", "migrate"],
                cwd=code,
                env={**os.environ, "PYTHONPATH": str(code), "DATABASE_URL": self.url},
                check=True,
                stdout=subprocess.DEVNULL,
            )
        self.connections("bench-monitor")  # opens the monitoring connection now
        return self.url

    def dsn(self, application: str) -> str:
        """The database URL naming the client, so pg_stat_activity tells who holds what."""
        return f"{self.url}?application_name={application}"

    def connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(self.dsn("bench-harness"), autocommit=True)

    def postmaster_pid(self) -> int:
        return int((self.server.pgdata / "postmaster.pid").read_text().split()[0])

    def memory(self) -> int:
        """PSS of the postmaster and all its backends, in bytes."""
        pid = self.postmaster_pid()
        return sum(pss_bytes(p) for p in [pid, *children_of(pid)])

    def connections(self, application: str) -> int:
        """Connections named `application`, counted over a connection opened at the start,
        so the count works even when the naive design has taken every other slot."""
        with self._monitor_lock:
            if self._monitor is None or self._monitor.closed:
                self._monitor = psycopg.connect(self.dsn("bench-monitor"), autocommit=True)
            row = self._monitor.execute(
                "select count(*) from pg_stat_activity where application_name = %s",
                (application,),
            ).fetchone()
        return int(row[0]) if row else 0

    def backends(self, application: str) -> list[int]:
        """The process ids of the backends of connections named `application`."""
        with self._monitor_lock:
            if self._monitor is None or self._monitor.closed:
                self._monitor = psycopg.connect(self.dsn("bench-monitor"), autocommit=True)
            rows = self._monitor.execute(
                "select pid from pg_stat_activity where application_name = %s", (application,)
            ).fetchall()
        return [int(row[0]) for row in rows]

    def pgbench(self) -> Path:
        return POSTGRES_BIN_PATH / "pgbench"

    def destroy(self) -> None:
        if self._monitor is not None:
            with contextlib.suppress(psycopg.Error):
                self._monitor.close()
        self.server.destroy()
        with contextlib.suppress(OSError):
            self.root.rmdir()


# -- servers under test ---------------------------------------------------------------


class ServerProcess:
    """A server under test in its own session, so that cleanup can end it and its children."""

    live: set[ServerProcess] = set()

    def __init__(
        self, name: str, command: list[str], env: dict[str, str], port: int, code: Path = REPO
    ) -> None:
        self.name = name
        self.port = port
        self.log_path = Path(tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")[1])
        self._log = self.log_path.open("wb")
        # `code` first: its streamer/ is the one that runs, whatever is installed.
        path = os.pathsep.join(p for p in (str(code), os.environ.get("PYTHONPATH")) if p)
        self.process = subprocess.Popen(
            command,
            cwd=code,
            env={**os.environ, "PYTHONPATH": path, **env},
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        ServerProcess.live.add(self)

    @property
    def pid(self) -> int:
        return self.process.pid

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_ready(self, path: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start-up:\n{self.log_tail()}")
            with (
                contextlib.suppress(urllib.error.URLError, OSError),
                urllib.request.urlopen(self.url(path), timeout=2) as response,
            ):
                if response.status == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, size: int = 3000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-size:]

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self) -> None:
        ServerProcess.live.discard(self)
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._log.close()
        self.log_path.unlink(missing_ok=True)


def start_service(
    pg: Postgres,
    *,
    heartbeat: float = 30.0,
    code: Path = REPO,
    settings: dict[str, str] | None = None,
) -> ServerProcess:
    """`streamer serve` as deployed (DATABASE_URL and a JWT secret from the environment,
    with `settings` on top), run as `python -m streamer` so that it is the code of checkout
    `code` (this one unless told otherwise)."""
    port = _free_port()
    env = {
        "DATABASE_URL": pg.dsn("bench-service"),
        "STREAMER_JWT_SECRET": SECRET,
        "STREAMER_PORT": str(port),
        "STREAMER_HEARTBEAT_SECONDS": str(heartbeat),
        **(settings or {}),
    }
    command = [sys.executable, "-m", "streamer", "serve", "--no-migrate"]
    server = ServerProcess("service", command, env, port, code)
    server.wait_ready("/readyz")
    return server


def start_naive(pg: Postgres) -> ServerProcess:
    port = _free_port()
    command = [sys.executable, "-m", "bench.naive", "--port", str(port)]
    env = {"DATABASE_URL": pg.dsn("bench-naive"), "STREAMER_JWT_SECRET": SECRET}
    server = ServerProcess("naive", command, env, port)
    server.wait_ready("/healthz")
    return server


def start_relay(pg: Postgres) -> ServerProcess:
    port = _free_port()
    command = [sys.executable, "-m", "bench.relay", "--port", str(port)]
    env = {"DATABASE_URL": pg.dsn("bench-relay"), "STREAMER_JWT_SECRET": SECRET}
    server = ServerProcess("relay", command, env, port)
    server.wait_ready("/healthz")
    return server


# -- sampling while a phase runs ------------------------------------------------------


@dataclass
class Peak:
    """The highest readings seen while a phase ran: server RSS and Postgres connections."""

    rss: int = 0
    connections: int = 0
    current_connections: int = 0
    samples: int = 0
    errors: list[str] = field(default_factory=list)


@contextlib.contextmanager
def sampling(
    pg: Postgres, server: ServerProcess | None, application: str, every: float = 0.5
) -> Iterator[Peak]:
    """Sample the server's RSS and the connections it holds, in a thread, until exit."""
    peak = Peak()
    done = threading.Event()

    def run() -> None:
        while not done.is_set():
            try:
                peak.current_connections = pg.connections(application)
                peak.connections = max(peak.connections, peak.current_connections)
            except (OSError, psycopg.Error) as exc:
                peak.errors.append(repr(exc))
            if server is not None and server.process.poll() is None:
                with contextlib.suppress(OSError):  # it may have just exited
                    peak.rss = max(peak.rss, server.rss())
            peak.samples += 1
            done.wait(every)

    thread = threading.Thread(target=run, name="sampler", daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join(10)


# -- cleanup --------------------------------------------------------------------------


class Interrupted(BaseException):
    """SIGTERM or SIGHUP: unwind like Ctrl-C so that every `finally` runs."""


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def install_signal_handlers() -> None:
    # Even where SIGINT was ignored on start (a background job of a script), Ctrl-C or
    # kill -INT ends the run through the same cleanup.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)


def cleanup(pg: Postgres | None) -> None:
    """End every process the harness started: clients, writers, servers, Postgres."""
    # No second Ctrl-C half-way through: the cleanup itself is short.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stop_all()
        for server in list(ServerProcess.live):
            server.stop()
        if pg is not None:
            pg.destroy()
    finally:
        signal.signal(signal.SIGINT, previous)
