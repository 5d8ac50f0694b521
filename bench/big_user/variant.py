"""What every variant of the big user's scenario shares: its settings, a fresh service
with the other user's stream live and written to, the window it is judged over, and the
figures it reports."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.agent import Remote, Reply
from bench.big_user.service import log_lines, scrape
from bench.big_user.tab import tab_main
from bench.harness import ServerProcess, start_service
from bench.load import Context, Receivers, Writer, plan
from bench.procfs import machine_share
from bench.profile import recording
from bench.stats import Arrivals, Commits, deliveries

MB = 2**20


@dataclass(frozen=True)
class Settings:
    rows: int  # the big user's
    rate: float  # the other user's commits per second
    settle: float  # seconds of the other user's stream alone before each variant
    stall: float  # seconds the stalled client reads nothing
    timeout: float  # for the big user's stream to have everything
    profile: float  # seconds of py-spy on the service as the resume's notifications arrive


FULL = Settings(200_000, 20.0, 2.0, 20.0, 180.0, 6.0)
QUICK = Settings(20_000, 20.0, 1.0, 3.0, 60.0, 1.0)


@dataclass
class Bench:
    """What every variant shares: the other user's writer, the big user and its token."""

    ctx: Context
    s: Settings
    writer: Writer
    user: uuid.UUID
    token: str


@dataclass
class Window:
    """The span one variant is judged over; other spans reported beside it."""

    start_ns: int = 0
    end_ns: int = 0
    extra: dict[str, tuple[int, int]] = field(default_factory=dict)
    # While the service cannot listen, a row's changes reach it as the row's latest state
    # (the recovery reads rows, not changes): the commits before the last are left out.
    coalesced: tuple[int, int] | None = None
    floor: Arrivals | None = None  # a bare LISTEN's, over the `extra` spans


def within(commits: Commits, start_ns: int, end_ns: int, *, inside: bool = True) -> Commits:
    """The commits that returned between `start_ns` and `end_ns` (or, not `inside`, the
    others)."""
    keep = (commits.t1 >= start_ns) & (commits.t1 <= end_ns)
    if not inside:
        keep = ~keep
    return Commits(commits.key[keep], commits.t0[keep], commits.t1[keep], commits.users[keep])


def latency(commits: Commits, other: Receivers | None, arrivals: Arrivals) -> dict[str, Any]:
    """The other user's events: from the midpoint of COMMIT (and from COMMIT returned) to
    the event parsed by its client (`other`), or to the notification at a bare LISTEN."""
    if other is None:
        delivery = deliveries(commits, arrivals, None, None, 0.0)
    else:
        delivery = deliveries(commits, arrivals, other.stream_user, other.tabs(1), 0.0)
    return {
        "commits": commits.count,
        "lost": delivery.lost,
        "p50_ms": round(delivery.percentile(50), 2),
        "p99_ms": round(delivery.percentile(99), 2),
        "max_ms": round(delivery.percentile(100), 2),
        "ack_p99_ms": round(delivery.percentile(99, ack=True), 2),
        "commit_max_ms": round(float((commits.t1 - commits.t0).max()) / 1e6, 2)
        if commits.count
        else None,
    }


def variant(
    b: Bench, name: str, body: Callable[[ServerProcess, Remote, Window], dict[str, Any]]
) -> dict[str, Any]:
    """A fresh service, the other user's stream live and written to; `body` does the big
    user's part and sets the window it is judged over."""
    ctx, s = b.ctx, b.s
    server = start_service(ctx.pg, code=ctx.code)
    other = Receivers.streams(
        f"other-{name}", ctx.population, plan(1, 1), server.port, 1, ctx.records
    )
    tab = Remote(f"big-{name}", tab_main, server.port, b.token)
    window = Window()
    try:
        if other.open(1)["opened"] != 1:
            raise RuntimeError(f"the other user's stream did not open: {other.errors}")
        b.writer.start(s.rate, 3600, 1, 1)
        time.sleep(s.settle)
        cpu0 = server.cpu()
        roots = [os.getpid(), ctx.pg.postmaster_pid()]
        with machine_share(roots) as share:
            result = body(server, tab, window)
        result["server_cpu_s"] = round(server.cpu() - cpu0, 2)
        result["machine"] = share
        time.sleep(0.5)  # the other user's last events of the window
        commits = b.writer.finish(now=True)
        other.drain(commits.count, timeout=10, quiet=2)
        arrivals = other.collect()
        result["other"] = latency(within(commits, window.start_ns, window.end_ns), other, arrivals)
        for label, (start, end) in window.extra.items():
            result[f"other_{label}"] = latency(within(commits, start, end), other, arrivals)
            if window.floor is not None:
                result[f"floor_{label}"] = latency(within(commits, start, end), None, window.floor)
        judged = commits
        if window.coalesced is not None:
            judged = within(commits, *window.coalesced, inside=False)
        result["other"]["lost_all_run"] = latency(judged, other, arrivals)["lost"]
        if server.process.poll() is not None:
            raise RuntimeError(f"the service died:\n{server.log_tail()}")
        result["metrics"] = scrape(server)
        result["log"] = log_lines(server)
        return result
    finally:
        tab.stop()
        other.stop()
        server.stop()


def whole(reply: Reply, rows: int, *, before_synced: bool) -> bool:
    """Every row once, as file-update events (before `synced`, for a read), nothing else
    of the feed's (no reset, no delete)."""
    extra = set(reply["events"]) - {"file-update", "synced", "heartbeat"}
    updates = reply["updates_at_synced"] if before_synced else reply["updates"]
    return bool(reply["rows"] == rows and updates == rows and not extra)


def summary(
    reply: Reply,
    end_ns: int | None,
    rss_first: int,
    rss_peak: int,
    rows: int,
    *,
    start_ns: int | None = None,
) -> dict[str, Any]:
    start = reply["requested_ns"] if start_ns is None else start_ns
    seconds = None if end_ns is None else (end_ns - start) / 1e9
    return {
        "seconds": None if seconds is None else round(seconds, 2),
        "rows_per_s": None if not seconds else round(rows / seconds),
        "first_byte_s": None
        if reply["headers_ns"] is None
        else round((reply["headers_ns"] - reply["requested_ns"]) / 1e9, 3),
        "rss_before_mb": round(rss_first / MB, 1),
        "rss_peak_growth_mb": round((rss_peak - rss_first) / MB, 1),
        "rows_received": reply["rows"],
        "updates": reply["updates"],
        "updates_at_synced": reply["updates_at_synced"],
        "events": reply["events"],
        "reconnects": reply["reconnects"],
        "ended": reply["ended"],
        "megabytes": round(reply["bytes"] / MB, 1),
    }


@contextlib.contextmanager
def profiling(b: Bench, server: ServerProcess, name: str) -> Iterator[dict[str, Any]]:
    """py-spy on the service for the first `profile` seconds of the body (unless the run
    has profiles off); the summary lands in the dict, the files beside results.md."""
    if not b.ctx.profile:
        yield {}
        return
    path = Path(b.ctx.results) / f"profile-big-user-{name}"
    with recording(server.pid, b.s.profile, path) as summary:
        yield summary
