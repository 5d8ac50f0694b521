"""Scenario 3: capacity. Open idle streams step by step up to 10,000 in one process.

At each step: the service's RSS, the Postgres connections it holds and Postgres's own
memory (PSS of the postmaster and its backends). At the top: the CPU that heartbeats cost
(heartbeat every second; CPU time per round from /proc/<pid>/stat, less the idle rate
measured before any stream opened). Every stream asks for `?snapshot=1`, as a browser
page would, so the pool is used while streams open. The naive design gets the same ramp
until Postgres refuses it (max_connections=500).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from bench.harness import Postgres, ServerProcess, sampling
from bench.load import Context, Receivers
from bench.phase import APPLICATION, running

MB = 2**20


@dataclass(frozen=True)
class Settings:
    users: int
    tabs: int
    steps: tuple[int, ...]  # open streams after each step
    naive_steps: tuple[int, ...]
    processes: int
    heartbeat: float
    idle_window: float  # seconds of CPU reading with no stream open
    heartbeat_window: float  # seconds of CPU reading with every stream open


FULL = Settings(1000, 10, (1000, 2500, 5000, 10000), (100, 250, 450, 600), 4, 1.0, 5, 10)
QUICK = Settings(100, 10, (200, 500, 1000), (50, 150), 2, 1.0, 2, 3)
SETTLE = 1.0


def _reading(
    pg: Postgres, server: ServerProcess, receivers: Receivers, connections: int
) -> dict[str, Any]:
    stats = receivers.stats()
    return {
        "streams": stats["open"],
        "rss_mb": round(server.rss() / MB, 2),
        "pg_connections": connections,
        "pg_memory_mb": round(pg.memory() / MB, 1),
    }


def _ramp(
    ctx: Context, design: str, s: Settings, steps: tuple[int, ...]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Readings at 0 and at each step; plus, for the service, the heartbeat cost at the top."""
    readings: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    query = "snapshot=1" if design == "service" else ""
    with running(
        ctx, design, s.users, s.tabs, processes=s.processes, query=query, heartbeat=s.heartbeat
    ) as (server, receivers):
        assert server is not None
        with sampling(ctx.pg, server, APPLICATION[design]) as peak:
            time.sleep(SETTLE)
            cpu0, t0 = server.cpu(), time.monotonic()
            time.sleep(s.idle_window)
            idle_rate = (server.cpu() - cpu0) / (time.monotonic() - t0)
            readings.append(_reading(ctx.pg, server, receivers, peak.current_connections))
            base_rss = readings[0]["rss_mb"]
            opened = 0
            for target in steps:
                step = receivers.open(target - opened, concurrency=32)
                opened = target
                time.sleep(SETTLE)
                reading = _reading(ctx.pg, server, receivers, peak.current_connections)
                reading["open_seconds"] = round(step["seconds"], 2)
                reading["refused"] = dict(receivers.errors)
                if reading["streams"]:
                    per = (reading["rss_mb"] - base_rss) * MB / reading["streams"]
                    reading["rss_per_stream_kb"] = round(per / 1024, 2)
                readings.append(reading)
            if design == "service":
                extra = _heartbeats(server, receivers, s, idle_rate)
            extra["peak_pg_connections"] = peak.connections
            extra["idle_cpu_pct"] = round(100 * idle_rate, 2)
            extra["refused"] = dict(receivers.errors)
    return readings, extra


def _heartbeats(
    server: ServerProcess, receivers: Receivers, s: Settings, idle_rate: float
) -> dict[str, Any]:
    before = receivers.stats()
    cpu0, t0 = server.cpu(), time.monotonic()
    time.sleep(s.heartbeat_window)
    cpu1, t1 = server.cpu(), time.monotonic()
    after = receivers.stats()
    streams = after["open"]
    received = after["heartbeats"] - before["heartbeats"]
    rounds = received / streams if streams else 0.0
    cpu = (cpu1 - cpu0) - idle_rate * (t1 - t0)
    per_round = cpu / rounds if rounds else float("nan")
    return {
        "heartbeat_streams": streams,
        "heartbeat_rounds": round(rounds, 2),
        "heartbeat_cpu_pct": round(100 * (cpu1 - cpu0) / (t1 - t0), 1),
        "heartbeat_ms_per_round": round(1000 * per_round, 1),
        "heartbeat_us_per_stream": round(1e6 * per_round / streams, 2) if streams else None,
        "dropped_streams": after["dropped"],
    }


def run(ctx: Context) -> dict[str, Any]:
    s = QUICK if ctx.quick else FULL
    service, service_extra = _ramp(ctx, "service", s, s.steps)
    naive, naive_extra = _ramp(ctx, "naive", s, s.naive_steps)
    return {
        "heartbeat_seconds": s.heartbeat,
        "service": {"readings": service, **service_extra},
        "naive": {"readings": naive, **naive_extra},
    }
