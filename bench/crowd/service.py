"""The crowd's service: `streamer serve --workers N` on the harness's Postgres, the workers
one fleet through a Redis broker (so one change connection reads the database for all of
them), started on a fixed port, SIGKILLed whole and started again on it; and what is read
of it from outside: memory of every process, CPU, listening sockets, the kernel's
counters of refused connections, /metrics, the pool probe's figures."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench.harness import REPO, SECRET, Postgres, ServerProcess
from bench.procfs import cpu_seconds, pss_bytes, rss_bytes

PROBE = Path(__file__).parent / "probe"
_EXCEPTION = re.compile(r"^[\w.]+(Error|Exception|Exit): .*")
_LOGGED = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) ([\w.]+)\[\d+\]: (.*)$")


def _tree(pid: int) -> list[int]:
    """`pid` and every process under it."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(parents.get(p, []))
    return found


class Service:
    """The service's processes on one port, across restarts."""

    def __init__(
        self, pg: Postgres, port: int, settings: dict[str, str], code: Path = REPO
    ) -> None:
        self.pg = pg
        self.port = port
        self.code = code
        self.probe_dir = tempfile.mkdtemp(prefix="bench-pool-probe-")
        self.env = {
            "DATABASE_URL": pg.dsn("bench-service"),
            "STREAMER_JWT_SECRET": SECRET,
            "STREAMER_PORT": str(port),
            "STREAMER_LOG_LEVEL": "warning",  # an access line per stream is not the load
            "BENCH_POOL_PROBE": self.probe_dir,
            # The checkout's streamer/ first (as ServerProcess would put it), then the probe.
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(code), str(PROBE), os.environ.get("PYTHONPATH")) if p
            ),
            **settings,
        }
        self.workers = int(settings.get("STREAMER_WORKERS", "1"))
        self.server: ServerProcess | None = None
        self.listen_times: list[float] = []  # seconds into the last start, each worker's listen
        self.listen_cpu = 0.0

    def start(self, timeout: float = 90.0) -> float:
        """Start and wait until every worker listens and the fleet reads; seconds taken."""
        started = time.monotonic()
        command = [sys.executable, "-m", "streamer", "serve", "--no-migrate"]
        self.server = ServerProcess("crowd-service", command, self.env, self.port, self.code)
        deadline = started + timeout
        self.listen_times = []
        while (listening := self.listening()) < self.workers:
            while len(self.listen_times) < listening:
                self.listen_times.append(round(time.monotonic() - started, 2))
            self._starting(deadline, timeout)
            time.sleep(0.05)
        while len(self.listen_times) < self.workers:
            self.listen_times.append(round(time.monotonic() - started, 2))
        self.listen_cpu = self.cpu()  # CPU-s it took to start (its processes are new)
        # /readyz waits its turn at the gate behind a returning crowd: a probe that gave up
        # after 2 s would join the end of the queue again each time.
        while not self.ready(wait=30):
            self._starting(deadline, timeout)
            time.sleep(0.05)
        return time.monotonic() - started

    def _starting(self, deadline: float, timeout: float) -> None:
        """Raise if the service exited, or is not up by `deadline`."""
        assert self.server is not None
        if self.server.process.poll() is not None:
            raise RuntimeError(f"the service exited at start-up:\n{self.server.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the service not ready in {timeout:.0f} s:\n"
                               f"{self.server.log_tail()}")  # fmt: skip

    def errors(self) -> dict[str, int]:
        """The exceptions the service logged so far, by their last line (type: message)."""
        if self.server is None:
            return {}
        found: dict[str, int] = {}
        for line in self.server.log_tail(2_000_000).splitlines():
            match = _EXCEPTION.match(line)
            if match:
                found[match.group(0)[:160]] = found.get(match.group(0)[:160], 0) + 1
        return found

    def logged(self) -> dict[str, Any]:
        """What the service logged so far at warning and above, by message (its numbers
        left out), and the first traceback of each exception."""
        if self.server is None:
            return {}
        lines = self.server.log_tail(2_000_000).splitlines()
        messages: dict[str, int] = {}
        tracebacks: dict[str, str] = {}
        for i, line in enumerate(lines):
            match = _LOGGED.match(line)
            if match:
                text = re.sub(r"\d+", "N", f"{match[1]} {match[2]}: {match[3]}")[:160]
                messages[text] = messages.get(text, 0) + 1
            elif _EXCEPTION.match(line) and line[:160] not in tracebacks:
                start = max(0, i - 40)
                tracebacks[line[:160]] = "\n".join(lines[start : i + 1])
        return {"messages": messages, "tracebacks": tracebacks}

    def sockets(self) -> list[int]:
        """Open sockets of each process of the service (its streams, give or take a few)."""
        counts = []
        for pid in self.pids():
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            count = 0
            for fd in fds:
                with contextlib.suppress(OSError):
                    count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
            counts.append(count)
        return counts

    def ready(self, wait: float = 2) -> bool:
        url = f"http://127.0.0.1:{self.port}/readyz"
        with (
            contextlib.suppress(urllib.error.URLError, OSError),
            urllib.request.urlopen(url, timeout=wait) as answer,
        ):
            return bool(answer.status == 200)
        return False

    def kill(self) -> None:
        """SIGKILL the supervisor and every worker at once (their process group)."""
        assert self.server is not None
        pids = self.pids()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.server.process.pid, signal.SIGKILL)
        self.server.process.wait(10)
        # Until every worker is gone its listening socket is still there: a restart would
        # count it as its own.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (
            any(os.path.exists(f"/proc/{pid}/fd") for pid in pids) or self.listening()
        ):
            time.sleep(0.01)
        self.server.stop()
        self.server = None

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def pids(self) -> list[int]:
        assert self.server is not None
        return _tree(self.server.pid)

    def memory(self) -> dict[str, int]:
        """RSS and PSS of every process of the service, in bytes."""
        rss = pss = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                rss += rss_bytes(pid)
                pss += pss_bytes(pid)
        return {"rss": rss, "pss": pss}

    def cpu(self) -> float:
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                total += cpu_seconds(pid)
        return total

    def listening(self) -> int:
        """Sockets listening on the port (one per worker that serves)."""
        return _sockets(self.port, "0A")

    def metrics(self) -> dict[str, float]:
        """/metrics (every worker's sum), unlabelled samples only."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.port}/metrics", timeout=10
            ) as answer:
                text = answer.read().decode()
        except (urllib.error.URLError, OSError):
            return {}
        found: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or "{" in line:
                continue
            name, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                found[name] = float(value)
        return found

    def pool_waits(self, exclude: frozenset[int] = frozenset()) -> dict[str, float]:
        """The pool probe's figures, over every process the service has had but those of
        `exclude` (pids)."""
        total: dict[str, float] = {}
        for path in Path(self.probe_dir).glob("*.json"):
            if int(path.stem) in exclude:
                continue
            with contextlib.suppress(OSError, ValueError):
                figures = json.loads(path.read_text())
                for key, value in figures.items():
                    if key.startswith("max_"):
                        total[key] = max(total.get(key, 0), value)
                    elif key != "waiting":
                        total[key] = total.get(key, 0) + value
        return total


def _sockets(port: int, state: str) -> int:
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == state and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


TCP_EXT = ("ListenOverflows", "ListenDrops", "SyncookiesSent", "SyncookiesRecv", "TCPReqQFullDrop",
           "TCPReqQFullDoCookies")  # fmt: skip


def tcp_counters() -> dict[str, int]:
    """The kernel's TcpExt counters of a full listen backlog (the whole network namespace:
    other processes' connections count too)."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], (int(v) for v in values.split()[1:]), strict=True))
            return {name: table.get(name, 0) for name in TCP_EXT}
    return {}


def kernel_limits() -> dict[str, str]:
    def read(path: str) -> str:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return "?"

    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {
        "somaxconn": read("/proc/sys/net/core/somaxconn"),
        "tcp_max_syn_backlog": read("/proc/sys/net/ipv4/tcp_max_syn_backlog"),
        "tcp_syncookies": read("/proc/sys/net/ipv4/tcp_syncookies"),
        "ip_local_port_range": " ".join(read("/proc/sys/net/ipv4/ip_local_port_range").split()),
        "nofile": f"{soft}/{hard}",
    }
