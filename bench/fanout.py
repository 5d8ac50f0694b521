"""Scenario 2: fan-out. 100 users x 10 tabs; the offered commit rate steps up to flat out.

Each commit updates `rows` rows of distinct users, so one commit is `rows` notifications
and `rows x 10` events. The figure is the highest delivered events/s at which p99 stays
under 100 ms with nothing lost. The floor gets the same steps (one LISTEN, so its events
are the notifications themselves); the naive design opens what Postgres lets it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.load import Context
from bench.phase import measure, running
from bench.profile import recording

P99_LIMIT_MS = 100.0


@dataclass(frozen=True)
class Settings:
    users: int
    tabs: int
    rows: int  # rows per commit
    steps: tuple[float | None, ...]  # offered rows (notifications) per second; None: flat out
    seconds: float
    warmup: float
    profile_seconds: float


FULL = Settings(100, 10, 10, (1000, 2500, 5000, 6000, 7500, None), 6, 1, 10)
QUICK = Settings(20, 10, 5, (200, 1000, None), 3, 0.5, 3)


def best(steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The step with the most events delivered per second within the latency limit."""
    good = [s for s in steps if s["p99_ms"] < P99_LIMIT_MS and s["lost"] == 0]
    return max(good, key=lambda s: s["delivered_per_s"], default=None)


def broken(step: dict[str, Any]) -> bool:
    p99 = step["p99_ms"]
    return bool(step["lost"] > 0 or not p99 < 10 * P99_LIMIT_MS)  # NaN: nothing arrived


def run(ctx: Context) -> dict[str, Any]:
    s = QUICK if ctx.quick else FULL
    streams = s.users * s.tabs
    out: dict[str, Any] = {"users": s.users, "tabs": s.tabs, "rows_per_commit": s.rows}
    for design in ("floor", "service", "naive"):
        steps: list[dict[str, Any]] = []
        with running(ctx, design, s.users, s.tabs) as (server, receivers):
            receivers.open(1 if design == "floor" else streams)
            for offered in s.steps:
                step = measure(
                    ctx,
                    design,
                    server,
                    receivers,
                    rate=None if offered is None else offered / s.rows,
                    seconds=s.seconds,
                    rows=s.rows,
                    users=s.users,
                    warmup=s.warmup,
                )
                step["offered_rows_per_s"] = offered
                step.pop("cdf_ms")
                steps.append(step)
                # The naive design past its breaking point only takes time to drain.
                if design == "naive" and broken(step):
                    break
            if design == "service" and ctx.profile and server is not None:
                # A separate flat-out run under the profiler, so it does not skew the steps.
                path = Path(ctx.results) / "profile-fanout"
                with recording(server.pid, s.profile_seconds, path) as profile:
                    ctx.writer.run(None, s.profile_seconds, s.rows, s.users)
                receivers.drain(2**62, timeout=10, quiet=1.0)
                receivers.collect()
                out["profile"] = profile
        out[design] = {"live_streams": len(receivers.live), "steps": steps, "best": best(steps)}
    return out
