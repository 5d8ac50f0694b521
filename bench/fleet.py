"""Scenario: a fleet (issue 21). 1, 2, 4 and 8 `streamer serve` processes share the database
and one Redis; the writers commit single-row UPDATEs at 1,000 commits/s over 1,000 users, of
whom 200 have a stream (one each): process k streams the users u with u % N == k, so each
streams 1/N of those owners, and receives only their changes. The
same processes without a broker (each reading the database itself) at the smallest and the
largest size, for contrast.

Measured per size: Postgres's CPU per commit besides the writers' own backends (what
reading the changes costs it: the change connections, the pools' queries, its background
processes), each process's CPU, the broker's, and delivery latency from COMMIT to the
client, through the broker or direct.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis

from bench.harness import ServerProcess, sampling, start_service
from bench.load import Context, Receivers, expected_events, plan
from bench.phase import DRAIN_TIMEOUT, figures
from bench.procfs import cpu_seconds, tree_cpu
from bench.stats import deliveries
from streamer.embedded import _free_port

REDIS = Path("/usr/bin/redis-server")  # `make broker-deps` installs it


@dataclass(frozen=True)
class Settings:
    sizes: tuple[int, ...]  # processes of a fleet
    direct: tuple[int, ...]  # processes each reading the database, for contrast
    users: int  # written
    streamed: int  # the first of them, one stream each
    rate: float  # commits per second, one row each
    seconds: float
    warmup: float


FULL = Settings((1, 2, 4, 8), (1, 8), 1000, 200, 1000, 15, 2)
QUICK = Settings((1, 2), (2,), 200, 50, 300, 4, 1)


@contextlib.contextmanager
def broker() -> Iterator[ServerProcess]:
    """Debian's redis-server on a free port, persisting nothing, in a directory of its own."""
    if not REDIS.exists():
        raise RuntimeError(f"{REDIS} is missing: install it with `make broker-deps`")
    port = _free_port()
    directory = tempfile.mkdtemp(prefix="bench-redis-")
    command = [
        str(REDIS), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
        "--appendonly", "no", "--dir", directory, "--protected-mode", "no",
    ]  # fmt: skip
    server = ServerProcess("redis", command, {}, port)
    try:
        client = redis.Redis(port=port, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.RedisError as exc:
                if server.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start:\n{server.log_tail()}") from exc
                time.sleep(0.05)
        client.close()
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def processes(ctx: Context, count: int, broker_url: str | None) -> Iterator[list[ServerProcess]]:
    settings = {"STREAMER_BROKER_URL": broker_url} if broker_url else {}
    servers: list[ServerProcess] = []
    try:
        for _ in range(count):
            servers.append(start_service(ctx.pg, code=ctx.code, settings=settings))
        yield servers
    finally:
        for server in servers:
            server.stop()


def reads_for_the_fleet(server: ServerProcess) -> bool:
    with urllib.request.urlopen(server.url("/metrics"), timeout=5) as response:
        text = response.read().decode()
    return any(line.split() == ["streamer_fleet_reader", "1.0"] for line in text.splitlines())


def phase(
    ctx: Context, s: Settings, servers: list[ServerProcess], redis_server: ServerProcess | None
) -> dict[str, Any]:
    """Open one stream per user, each on its user's process; commit; drain; measure."""
    count = len(servers)
    receivers = Receivers.streams(
        "fleet", ctx.population, plan(s.streamed, 1), [server.port for server in servers],
        count, ctx.records,
    )  # fmt: skip
    try:
        receivers.open(s.streamed)
        postmaster = ctx.pg.postmaster_pid()
        writers = ctx.pg.backends("bench-writer")  # kept open for the whole run
        ours = set(ctx.pg.backends("bench-service"))  # the processes' connections
        node0 = [server.cpu() for server in servers]
        broker0 = redis_server.cpu() if redis_server is not None else 0.0
        pg0, writers0 = tree_cpu([postmaster]), sum(cpu_seconds(pid) for pid in writers)
        ours0 = {pid: cpu_seconds(pid) for pid in ours}
        wall0 = time.monotonic()
        with sampling(ctx.pg, None, "bench-service") as peak:
            commits = ctx.writer.run(s.rate, s.seconds, 1, s.users)
            receivers.drain(expected_events(commits, receivers, s.users), timeout=DRAIN_TIMEOUT)
        wall = time.monotonic() - wall0
        pg_cpu = tree_cpu([postmaster]) - pg0
        writers_cpu = sum(cpu_seconds(pid) for pid in writers) - writers0
        service_cpu = backends_cpu(ctx, ours0)
        node_cpu = [server.cpu() - c0 for server, c0 in zip(servers, node0, strict=True)]
        broker_cpu = redis_server.cpu() - broker0 if redis_server is not None else None
        readers = [reads_for_the_fleet(server) for server in servers] if redis_server else None
        arrivals = receivers.collect()
        delivery = deliveries(
            commits, arrivals, receivers.stream_user, receivers.tabs(s.users), s.warmup
        )
    finally:
        receivers.stop()
    result = figures(commits, delivery, 1, s.seconds)
    result.pop("cdf_ms")
    per_commit = 1e6 / max(1, commits.count)
    return {
        **result,
        "processes": count,
        "through": "broker" if redis_server is not None else "direct",
        "live_streams": len(receivers.live),
        "readers": sum(readers) if readers is not None else count,
        # The backends of the processes' own connections (change connections, pools, the
        # election's): what serving the fleet costs Postgres.
        "postgres_us_per_commit": round(service_cpu * per_commit, 1),
        # Every process of Postgres's but the writers' backends (autovacuum, the WAL
        # writer, checkpoints too: noisier).
        "postgres_besides_writers_us_per_commit": round((pg_cpu - writers_cpu) * per_commit, 1),
        "postgres_cpu_pct": round(100 * (pg_cpu - writers_cpu) / wall, 1),
        "postgres_service_ms_per_s": round(1000 * service_cpu / wall, 1),
        "postgres_with_writers_us_per_commit": round(pg_cpu * per_commit, 1),
        "process_cpu_pct": [round(100 * c / wall, 1) for c in node_cpu],
        "reader_cpu_pct": reader_share(node_cpu, readers, wall),
        "processes_us_per_event": round(1e6 * sum(node_cpu) / max(1, delivery.received), 1),
        "broker_cpu_pct": None if broker_cpu is None else round(100 * broker_cpu / wall, 1),
        "broker_us_per_commit": None if broker_cpu is None else round(broker_cpu * per_commit, 1),
        "pg_connections": peak.connections,
    }


def backends_cpu(ctx: Context, before: dict[int, float]) -> float:
    """CPU seconds the processes' backends used since `before` (their pids then): those
    still there now and any opened since (counted from zero); one that ended meanwhile is
    lost, and the processes keep their connections for the phase."""
    total = 0.0
    for pid in set(before) | set(ctx.pg.backends("bench-service")):
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid) - before.get(pid, 0.0)
    return total


def reader_share(cpu: list[float], readers: list[bool] | None, wall: float) -> float | None:
    """Percent of a core the fleet's reader used (it streams its share too)."""
    if not readers or not any(readers):
        return None
    return round(100 * max(c for c, r in zip(cpu, readers, strict=True) if r) / wall, 1)


def slope(points: list[dict[str, Any]]) -> float | None:
    """Postgres µs per commit added by each process (least squares over the sizes)."""
    if len(points) < 2:
        return None
    x = np.array([p["processes"] for p in points], dtype=float)
    y = np.array([p["postgres_us_per_commit"] for p in points], dtype=float)
    return round(float(np.polyfit(x, y, 1)[0]), 2)


def run(ctx: Context) -> dict[str, Any]:
    s = QUICK if ctx.quick else FULL
    fleet: list[dict[str, Any]] = []
    direct: list[dict[str, Any]] = []
    with broker() as redis_server:
        url = f"redis://127.0.0.1:{redis_server.port}/0"
        for size in s.sizes:
            with processes(ctx, size, url) as servers:
                fleet.append(phase(ctx, s, servers, redis_server))
    for size in s.direct:
        with processes(ctx, size, None) as servers:
            direct.append(phase(ctx, s, servers, None))
    return {
        "rate": s.rate,
        "seconds": s.seconds,
        "users": s.users,
        "streamed": s.streamed,
        "fleet": fleet,
        "direct": direct,
        "fleet_us_per_process": slope(fleet),
        "direct_us_per_process": slope(direct),
    }
