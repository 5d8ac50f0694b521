"""Scenario 1: latency from COMMIT to the event parsed by the client, and nothing lost.

1,000 open streams, over 1,000 users (one tab each) and over 100 users (ten tabs each),
while writers commit one row per transaction at a steady rate. The floor and the naive
design get the same writes, and so does the lean relay (bench/relay.py), which tells
what any relay process costs from what the service's own code costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.load import Context, Receivers
from bench.phase import measure, running


@dataclass(frozen=True)
class Settings:
    shapes: tuple[tuple[int, int], ...]  # (users, tabs per user)
    rate: float  # commits per second
    seconds: float
    warmup: float
    naive_streams: int
    relay: bool  # also the lean relay (bench/relay.py), to tell the hop from the code


FULL = Settings(
    ((1000, 1), (100, 10)), rate=300, seconds=15, warmup=2, naive_streams=1000, relay=True
)
QUICK = Settings(((200, 1), (20, 10)), rate=100, seconds=4, warmup=1, naive_streams=200, relay=True)


def run(ctx: Context) -> dict[str, Any]:
    s = QUICK if ctx.quick else FULL
    phases: list[dict[str, Any]] = []

    def one(design: str, users: int, tabs: int, streams: int) -> None:
        with running(ctx, design, users, tabs) as (server, receivers):
            receivers.open(streams)
            # A bare LISTEN beside the service: what the service adds, commit by commit.
            paired = design in ("service", "relay")
            companion = Receivers.floor(ctx.pg, ctx.records) if paired else None
            try:
                if companion is not None:
                    companion.open(1)
                result = measure(
                    ctx,
                    design,
                    server,
                    receivers,
                    rate=s.rate,
                    seconds=s.seconds,
                    rows=1,
                    users=users,
                    warmup=s.warmup,
                    companion=companion,
                )
            finally:
                if companion is not None:
                    companion.stop()
        label = "floor" if design == "floor" else f"{design} {users} users x {tabs} tabs"
        phases.append({"label": label, "users": users, "tabs": tabs, "streams": streams, **result})

    one("floor", s.shapes[0][0], 1, 1)
    for users, tabs in s.shapes:
        one("service", users, tabs, users * tabs)
    one("naive", s.naive_streams, 1, s.naive_streams)
    if s.relay:
        for users, tabs in s.shapes:
            one("relay", users, tabs, users * tabs)
    return {"rate": s.rate, "seconds": s.seconds, "phases": phases}
