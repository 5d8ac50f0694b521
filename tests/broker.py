"""A real Redis for a fleet's tests: Debian's redis-server, started by the test on
127.0.0.1 with a free port, nothing persisted (`--save "" --appendonly no`), in a temporary
directory, and killed at the end. It can be killed (SIGKILL) and restarted on the same port,
and paused (SIGSTOP) and resumed (SIGCONT), as a broker that dies or hangs.

    from tests.broker import broker  # the fixture, in any test file
    async def test_...(broker): ... broker.url ... broker.kill(); broker.start() ...
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis as sync_redis

from tests.conftest import free_port

REDIS = Path("/usr/bin/redis-server")  # `make broker-deps` installs it
START = 10.0  # seconds a starting Redis may take to answer


@dataclass
class Broker:
    """One redis-server on a port of its own, which it keeps across restarts."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    paused: bool = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.directory / "redis.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start it (again, on the same port) and return once it answers PING."""
        assert not self.running, "already running"
        command = [
            str(REDIS),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--logfile", str(self.log),
            "--daemonize", "no",
            "--protected-mode", "no",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
        )
        self.paused = False
        deadline = time.monotonic() + START
        while not self.answers():
            code = self.process.poll()
            if code is not None:
                raise AssertionError(f"redis-server exited ({code}): {self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"redis-server did not answer within {START} s: {self.tail()}")
            time.sleep(0.01)

    def answers(self) -> bool:
        client = sync_redis.Redis(
            host="127.0.0.1", port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5
        )
        try:
            return bool(client.ping())
        except (sync_redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: gone at once, with everything it held (subscriptions, messages)."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.paused = False

    def restart(self) -> None:
        """Killed, then started again on the same port."""
        self.kill()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: its sockets stay open and accept connections, and nothing answers."""
        assert self.running
        os.kill(self.process.pid, signal.SIGSTOP)  # type: ignore[union-attr]
        self.paused = True

    def resume(self) -> None:
        """SIGCONT: it answers again, with everything it had queued."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)
        self.paused = False

    def tail(self) -> str:
        return self.log.read_text()[-2000:] if self.log.exists() else "(no log)"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            if self.paused:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.process.pid, signal.SIGCONT)
            self.kill()


@contextlib.contextmanager
def running_broker() -> Iterator[Broker]:
    """A Redis for the duration of the block, killed and removed at its end."""
    if not REDIS.exists():
        pytest.skip(f"no {REDIS} (make broker-deps installs Debian's redis-server)")
    directory = Path(tempfile.mkdtemp(prefix="streamer-redis-"))
    server = Broker(directory)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def broker() -> Iterator[Broker]:
    """A Redis of the test's own (it may kill, restart, pause it)."""
    with running_broker() as server:
        yield server
