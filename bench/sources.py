"""Scenario: the service with each change source, side by side (STREAMER_SOURCE=notify, then
wal, on the same database): latency at a steady commit rate (as scenario 1), fan-out steps
up to flat out (as scenario 2), and what Postgres spends meanwhile (the walsender of the
WAL source included). Writer cost for both is scenario 4 (writer_cost).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from bench import fanout
from bench.load import Context
from bench.phase import measure, running

SOURCES = ("notify", "wal")


@dataclass(frozen=True)
class Settings:
    latency_users: int
    rate: float  # commits per second, one row each
    seconds: float
    warmup: float
    fanout_users: int
    tabs: int
    rows: int  # rows per commit in the fan-out steps
    steps: tuple[float | None, ...]  # offered rows per second; None: flat out
    step_seconds: float


FULL = Settings(1000, 300, 15, 2, 100, 10, 10, (2500, 5000, 7500, None), 6)
QUICK = Settings(200, 100, 4, 1, 20, 10, 5, (1000, None), 3)


@contextlib.contextmanager
def source(ctx: Context, name: str) -> Iterator[None]:
    """The database's triggers and the service processes started meanwhile on `name`."""
    with ctx.pg.connect() as conn:
        conn.execute("select streamer.use_source(%s)", (name,))
    before = os.environ.get("STREAMER_SOURCE")
    os.environ["STREAMER_SOURCE"] = name  # the service's environment (harness.ServerProcess)
    try:
        yield
    finally:
        if before is None:
            del os.environ["STREAMER_SOURCE"]
        else:
            os.environ["STREAMER_SOURCE"] = before
        with ctx.pg.connect() as conn:
            conn.execute("select streamer.use_source('notify')")


def run(ctx: Context) -> dict[str, Any]:
    s = QUICK if ctx.quick else FULL
    out: dict[str, Any] = {"rate": s.rate, "seconds": s.seconds, "rows_per_commit": s.rows}
    for name in SOURCES:
        with source(ctx, name):
            with running(ctx, "service", s.latency_users, 1) as (server, receivers):
                receivers.open(s.latency_users)
                latency = measure(
                    ctx, "service", server, receivers, rate=s.rate, seconds=s.seconds, rows=1,
                    users=s.latency_users, warmup=s.warmup,
                )  # fmt: skip
                latency.pop("cdf_ms")
            steps: list[dict[str, Any]] = []
            with running(ctx, "service", s.fanout_users, s.tabs) as (server, receivers):
                receivers.open(s.fanout_users * s.tabs)
                for offered in s.steps:
                    step = measure(
                        ctx, "service", server, receivers,
                        rate=None if offered is None else offered / s.rows,
                        seconds=s.step_seconds, rows=s.rows, users=s.fanout_users,
                        warmup=s.warmup,
                    )  # fmt: skip
                    step["offered_rows_per_s"] = offered
                    step.pop("cdf_ms")
                    steps.append(step)
        out[name] = {"latency": latency, "fanout": {"steps": steps, "best": fanout.best(steps)}}
    return out
