"""One design under one load: bring it up, commit, drain, and measure.

The designs: `floor` (one bare LISTEN connection), `service` (`streamer serve`), `naive`
(bench/naive.py: one LISTEN connection per stream), and, for diagnosis, `relay`
(bench/relay.py: the least a relay process can do).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from bench.harness import (
    ServerProcess,
    sampling,
    start_naive,
    start_relay,
    start_service,
)
from bench.load import Context, Receivers, expected_events, plan
from bench.procfs import busy_seconds, tree_cpu
from bench.stats import Commits, Delivery, added, deliveries

APPLICATION = {
    "service": "bench-service",
    "naive": "bench-naive",
    "relay": "bench-relay",
    "floor": "bench-floor",
}
DRAIN_TIMEOUT = 10.0  # an event later than this after the last commit counts as lost


@contextlib.contextmanager
def running(
    ctx: Context,
    design: str,
    users: int,
    tabs: int,
    *,
    processes: int = 2,
    query: str | tuple[str, ...] = "",
    heartbeat: float = 30.0,
) -> Iterator[tuple[ServerProcess | None, Receivers]]:
    """The design's server (none for the floor) and its receivers, stopped on exit."""
    server: ServerProcess | None = None
    receivers: Receivers | None = None
    try:
        if design == "service":
            server = start_service(ctx.pg, heartbeat=heartbeat, code=ctx.code)
        elif design == "naive":
            server = start_naive(ctx.pg)
        elif design == "relay":
            server = start_relay(ctx.pg)
        if server is None:
            receivers = Receivers.floor(ctx.pg, ctx.records)
        else:
            receivers = Receivers.streams(
                design,
                ctx.population,
                plan(users, tabs),
                server.port,
                processes,
                ctx.records,
                query,
            )
        yield server, receivers
    finally:
        if receivers is not None:
            receivers.stop()
        if server is not None:
            server.stop()


def measure(
    ctx: Context,
    design: str,
    server: ServerProcess | None,
    receivers: Receivers,
    *,
    rate: float | None,
    seconds: float,
    rows: int,
    users: int,
    warmup: float,
    companion: Receivers | None = None,
) -> dict[str, Any]:
    """Commit at `rate` for `seconds`, drain, and report what every live stream got.

    With a `companion` floor listening at the same time, also what the design adds over
    it for the same notifications, event by event."""
    with (
        cpu_shares(ctx, server, receivers) as cpu,
        sampling(ctx.pg, server, APPLICATION[design]) as peak,
    ):
        commits = ctx.writer.run(rate, seconds, rows, users)
        expected = expected_events(commits, receivers, users)
        receivers.drain(expected, timeout=DRAIN_TIMEOUT)
    if server is not None and server.process.poll() is not None:
        raise RuntimeError(f"the {design} server died during the phase:\n{server.log_tail()}")
    arrivals = receivers.collect()
    tabs = receivers.tabs(users)
    delivery = deliveries(commits, arrivals, receivers.stream_user, tabs, warmup)
    stats = receivers.stats()
    extra: dict[str, Any] = {}
    if companion is not None:
        over = added(arrivals, companion.collect())
        if len(over):
            extra = {
                "added_p50_ms": round(float(np.percentile(over, 50)), 3),
                "added_p99_ms": round(float(np.percentile(over, 99)), 3),
            }
    return {
        **extra,
        "design": design,
        "live_streams": len(receivers.live),
        "refused": dict(receivers.errors),
        "dropped_streams": stats.get("dropped", 0),
        **figures(commits, delivery, rows, seconds),
        **cpu,
        "server_rss_mb": round(peak.rss / 2**20, 1) if server is not None else None,
        "pg_connections": peak.connections,
    }


@contextlib.contextmanager
def cpu_shares(
    ctx: Context, server: ServerProcess | None, receivers: Receivers
) -> Iterator[dict[str, float | None]]:
    """Percent of one core used meanwhile by the server, the clients, the writer and
    Postgres, and by processes not of this run (`others`)."""
    shares: dict[str, float | None] = {}
    cpu0 = server.cpu() if server is not None else 0.0
    load = {"clients": receivers.pids(), "writer": [ctx.writer.pid]}
    load_cpu0 = {name: tree_cpu(pids) for name, pids in load.items()}
    postgres_cpu0 = tree_cpu([ctx.pg.postmaster_pid()])
    ours = [os.getpid(), ctx.pg.postmaster_pid()]
    ours0, busy0 = tree_cpu(ours), busy_seconds()
    wall0 = time.monotonic()
    yield shares
    wall = time.monotonic() - wall0
    cpu = server.cpu() - cpu0 if server is not None and server.process.poll() is None else None
    postgres_cpu = tree_cpu([ctx.pg.postmaster_pid()]) - postgres_cpu0
    others_cpu = max(0.0, (busy_seconds() - busy0) - (tree_cpu(ours) - ours0))
    load_cpu = {name: tree_cpu(pids) - load_cpu0[name] for name, pids in load.items()}
    shares.update({
        "server_cpu_pct": None if cpu is None else round(100 * cpu / wall, 1),
        "clients_cpu_pct": round(100 * load_cpu["clients"] / wall, 1),
        "writer_cpu_pct": round(100 * load_cpu["writer"] / wall, 1),
        "postgres_cpu_pct": round(100 * postgres_cpu / wall, 1),
        "others_cpu_pct": round(100 * others_cpu / wall, 1),  # other people's processes
    })  # fmt: skip


def figures(commits: Commits, delivery: Delivery, rows: int, seconds: float) -> dict[str, Any]:
    """What the commits were and what became of them: rates, loss, latency."""
    return {
        "commits": commits.count,
        "commit_rate": round(commits.rate(), 1),
        "rows_per_commit": int(commits.users.shape[1]) if commits.count else rows,
        "commit_ms": round(commits.commit_ms(), 3),
        "offered_per_s": round(delivery.expected / seconds, 1),
        "delivered_per_s": round(delivery.delivered_per_second(), 1),
        "expected": delivery.expected,
        "received": delivery.received,
        "lost": delivery.lost,
        "duplicates": delivery.duplicates,
        "misrouted": delivery.misrouted,
        "p50_ms": round(delivery.percentile(50), 3),
        "p95_ms": round(delivery.percentile(95), 3),
        "p99_ms": round(delivery.percentile(99), 3),
        "max_ms": round(delivery.percentile(100), 3),
        "ack_p50_ms": round(delivery.percentile(50, ack=True), 3),
        "ack_p99_ms": round(delivery.percentile(99, ack=True), 3),
        "cdf_ms": delivery.cdf(),
    }
