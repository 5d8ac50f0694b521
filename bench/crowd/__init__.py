"""Scenario: a crowd on one machine (issue 24). `streamer serve --workers N`, its workers one
fleet through Redis (one change connection reads Postgres for all of them), holds U users x
2 tabs of lean browser tabs (bench/crowd/tabs.py) from several client processes over
several loopback source addresses, while 1% of the users change their row each second.

Measured, in order:
- opening: every tab opened at once (a few hundred connecting at a time per process):
  the time until all are synced, and the kernel's counters of a full listen backlog;
- memory: RSS and PSS of every process of the service, less the same before any stream,
  per stream;
- heartbeats (every `heartbeat` s, nothing else written): the gaps between two heartbeats
  at each tab, and the service's CPU per round (less its idle rate);
- delivery: COMMIT to event parsed at every tab of the user, p50 / p99, nothing lost;
- the herd: the writers keep writing; the whole service (supervisor and workers) is
  SIGKILLed and started again at once, as systemd's `Restart=` would; every tab reconnects
  after its `retry:` (jittered) with Last-Event-ID. The time to the last tab synced again,
  the pool's waits (a probe in the service's processes times every acquire), the
  Postgres connections it held, and at the end every tab's row version against the
  database's: nothing lost.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from bench.agent import Remote, call_all, now_ns
from bench.crowd.restart import restarted, resynced_since, to_all_back
from bench.crowd.service import Service, kernel_limits, tcp_counters
from bench.crowd.state import settled
from bench.crowd.tabs import CrowdSpec, crowd_main
from bench.fleet import broker
from bench.harness import SECRET, Postgres, sampling
from bench.load import STREAM_PATH, TOKEN_TTL, Context, Population, Writer, plan
from bench.stats import deliveries, late_windows
from streamer.auth import mint_token
from streamer.embedded import _free_port

KB = 1024
# A page opens its stream with the rows' current state; its tab then knows every version.
PATH = STREAM_PATH + "?snapshot=1"
METRICS = ("streamer_streams_open", "streamer_listener_reconnects_total", "streamer_fleet_reader")


@dataclass(frozen=True)
class Settings:
    users: int  # each with 2 tabs and one row
    workers: int
    processes: int  # client processes, each from a source address of its own
    heartbeat: float
    change_share: float  # of the users, changing their row each second
    steady: float  # seconds of delivery measured
    warmup: float
    herd_timeout: float  # seconds the restart may take, to the last tab resynced
    concurrency: int  # connections opening at once, per client process
    jitter: float
    tabs: int = 2

    @property
    def streams(self) -> int:
        return self.users * self.tabs

    @property
    def rate(self) -> float:
        return self.users * self.change_share


FULL = Settings(50_000, 6, 8, 5.0, 0.01, 30, 3, 300, 256, 0.5)
QUICK = Settings(1_000, 2, 2, 5.0, 0.01, 10, 2, 90, 128, 0.5)


def settings_for(ctx: Context) -> Settings:
    s = QUICK if ctx.quick else FULL
    given = {k: v for k, v in (ctx.crowd or {}).items() if v is not None}
    return replace(s, **given) if given else s


def population(pg: Postgres, users: int) -> Population:
    """`users` new users, each with one row (the run's other users are left alone)."""
    with pg.connect() as conn:
        rows = conn.execute(
            "insert into files (user_id, filename, status) select gen_random_uuid(),"
            " 'crowd-' || i, 'processing' from generate_series(1, %s) i returning user_id, id",
            (users,),
        ).fetchall()
        conn.execute("vacuum analyze files")
    owners = [uuid.UUID(str(u)) for u, _ in rows]
    return Population(owners, [str(r) for _, r in rows], [
        mint_token(SECRET, u, TOKEN_TTL) for u in owners
    ])  # fmt: skip


def clients(ctx: Context, s: Settings, people: Population, port: int) -> list[Remote]:
    """Stream i is user i % users's; client process p holds the streams i % processes == p,
    from 127.0.0.(2 + p)."""
    stream_user = plan(s.users, s.tabs)
    remotes = []
    for p in range(s.processes):
        tabs = [(int(i), people.tokens[int(stream_user[i])])
                for i in range(p, len(stream_user), s.processes)]  # fmt: skip
        spec = CrowdSpec(f"crowd-{p}", f"127.0.0.{2 + p}", port, PATH, tabs,
                         ctx.records, s.jitter)  # fmt: skip
        remotes.append(Remote(f"crowd-{p}", crowd_main, spec))
    return remotes


def total(replies: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for reply in replies:
        for key, value in reply.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[key] = out.get(key, 0) + value
            elif isinstance(value, dict):
                merged = out.setdefault(key, {})
                for k, v in value.items():
                    merged[k] = merged.get(k, 0) + v
    return out


def pct(values: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if len(values) else None


def run(ctx: Context) -> dict[str, Any]:
    s = settings_for(ctx)
    out: dict[str, Any] = {"settings": {**s.__dict__, "streams": s.streams, "rate": s.rate},
                           "kernel": kernel_limits()}  # fmt: skip
    people = population(ctx.pg, s.users)
    writer = Writer(ctx.pg, people, 8, ctx.records)
    remotes: list[Remote] = []
    try:
        with broker() as redis_server:
            port = _free_port()
            service = Service(ctx.pg, port, {
                "STREAMER_WORKERS": str(s.workers),
                "STREAMER_BROKER_URL": f"redis://127.0.0.1:{redis_server.port}/0",
                "STREAMER_HEARTBEAT_SECONDS": str(s.heartbeat),
            }, ctx.code)  # fmt: skip
            try:
                out["start_s"] = round(service.start(), 2)
                time.sleep(2)
                base = service.memory()
                cpu0, t0 = service.cpu(), time.monotonic()
                time.sleep(3)
                idle = (service.cpu() - cpu0) / (time.monotonic() - t0)
                out["baseline"] = {"rss_mb": round(base["rss"] / 2**20, 1),
                                   "pss_mb": round(base["pss"] / 2**20, 1),
                                   "idle_cpu_pct": round(100 * idle, 2)}  # fmt: skip
                remotes = clients(ctx, s, people, port)
                out["open"] = opening(remotes, s)
                time.sleep(2)
                out["memory"] = memory(service, base, out["open"]["live"])
                out["open"]["sockets"] = service.sockets()
                out["open"]["listen_s"] = service.listen_times
                out["metrics_open"] = service.metrics().get("streamer_streams_open")
                out["heartbeats"] = heartbeats(service, remotes, s, idle)
                out["delivery"] = delivery(ctx, s, service, remotes, writer)
                out["herd"] = herd(ctx, s, service, remotes, writer, people)
            finally:
                for remote in remotes:
                    remote.stop()
                service.stop()
    finally:
        writer.stop()
        with ctx.pg.connect() as conn:
            conn.execute("delete from files where filename like 'crowd-%'")
    return out


def opening(remotes: list[Remote], s: Settings) -> dict[str, Any]:
    before = tcp_counters()
    started = time.monotonic()
    replies = call_all(remotes, "open", timeout=600, concurrency=s.concurrency)
    seconds = time.monotonic() - started
    after = tcp_counters()
    sums = total(replies)
    return {
        "streams": s.streams,
        "live": sums["live"],
        "seconds": round(seconds, 1),
        "slowest_process_s": round(max(r["seconds"] for r in replies), 1),
        "refused": sums.get("refused", {}),
        "kernel": {k: after[k] - before.get(k, 0) for k in after},
    }


def memory(service: Service, base: dict[str, int], streams: int) -> dict[str, Any]:
    now = service.memory()
    per = {k: (now[k] - base[k]) / max(1, streams) / KB for k in now}
    return {
        "rss_mb": round(now["rss"] / 2**20, 1),
        "pss_mb": round(now["pss"] / 2**20, 1),
        "rss_kb_per_stream": round(per["rss"], 2),
        "pss_kb_per_stream": round(per["pss"], 2),
        "processes": len(service.pids()),
    }


def heartbeats(service: Service, remotes: list[Remote], s: Settings, idle: float) -> dict[str, Any]:
    call_all(remotes, "beats", record=True)
    cpu0, t0 = service.cpu(), time.monotonic()
    time.sleep(3 * s.heartbeat + 0.5)
    cpu, wall = service.cpu() - cpu0, time.monotonic() - t0
    replies = call_all(remotes, "beats", record=False)
    gaps = np.array([g for r in replies for g in r["gaps"]], dtype=np.float64) / 1e9
    live = total(replies)["live"]
    rounds = len(gaps) / live if live else 0.0
    work = cpu - idle * wall
    late = float(s.heartbeat + 1.0)
    return {
        "seconds": s.heartbeat,
        "rounds": round(rounds, 2),
        "gap_p50_s": pct(gaps, 50),
        "gap_p99_s": pct(gaps, 99),
        "gap_max_s": round(float(gaps.max()), 2) if len(gaps) else None,
        "late": int((gaps > late).sum()),  # more than a second past the heartbeat
        "gaps": len(gaps),
        "cpu_pct": round(100 * cpu / wall, 1),
        "ms_per_round": round(1000 * work / rounds, 1) if rounds else None,
        "us_per_stream": round(1e6 * work / rounds / live, 2) if rounds and live else None,
    }


def live_tabs(remotes: list[Remote], s: Settings) -> tuple[np.ndarray, np.ndarray]:
    """Of every tab: its user, and whether it is synced now."""
    replies = call_all(remotes, "state")
    index = np.array([i for r in replies for i in r["index"]], dtype=np.int64)
    live = np.array([x for r in replies for x in r["live"]], dtype=np.bool_)
    users = plan(s.users, s.tabs)[index]
    return users, live


def delivery(
    ctx: Context, s: Settings, service: Service, remotes: list[Remote], writer: Writer
) -> dict[str, Any]:
    users, live = live_tabs(remotes, s)
    tabs = np.bincount(users[live], minlength=s.users).astype(np.int64)
    cpu0, t0 = service.cpu(), time.monotonic()
    commits = writer.run(s.rate, s.steady, 1, s.users)
    cpu = service.cpu() - cpu0
    wall = time.monotonic() - t0
    expected = int(tabs[commits.users].sum())
    deadline = time.monotonic() + 15
    while total(call_all(remotes, "stats"))["events"] < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    from bench.stats import Arrivals

    arrivals = Arrivals.load([r["path"] for r in call_all(remotes, "dump", timeout=300)])
    got = deliveries(commits, arrivals, plan(s.users, s.tabs), tabs, s.warmup)
    lat = got.latencies_ms
    return {
        "commits": commits.count,
        "commit_rate": round(commits.rate(), 1),
        "expected": got.expected,
        "received": got.received,
        "lost": got.lost,
        "misrouted": got.misrouted,
        "duplicates": got.duplicates,
        "p50_ms": pct(lat, 50),
        "p99_ms": pct(lat, 99),
        "p999_ms": pct(lat, 99.9),
        "max_ms": round(float(lat.max()), 1) if len(lat) else None,
        "service_cpu_pct": round(100 * cpu / wall, 1),
        "late_windows": late_windows(got.late_at_s, s.heartbeat),
    }


def herd(
    ctx: Context,
    s: Settings,
    service: Service,
    remotes: list[Remote],
    writer: Writer,
    people: Population,
) -> dict[str, Any]:
    """SIGKILL the whole service under the open tabs and start it again at once."""
    writer.start(s.rate, s.herd_timeout + 60, 1, s.users)
    time.sleep(2)
    old = frozenset(service.pids())
    metrics_before = service.metrics()
    killed = now_ns()
    with sampling(ctx.pg, None, "bench-service", every=0.25) as peak:
        restart_s, restart_error, restart_cpu = restarted(service, remotes, s.herd_timeout)
        synced = resynced_since(remotes, killed, s.streams, s.herd_timeout)
        restart_cpu.update(to_all_back(service, remotes, restart_cpu))
        resynced = np.array(synced, dtype=np.int64)
        time.sleep(2)
    commits = writer.finish(now=True)
    time.sleep(3)  # the last commits' events
    stats = total(call_all(remotes, "stats"))
    call_all(remotes, "dump")  # the arrivals of this phase are not timed
    state = settled(ctx, remotes, people, plan(s.users, s.tabs), service.port)
    after = (resynced - killed) / 1e9
    return {
        "restart_s": None if restart_s is None else round(restart_s, 2),
        "restart_error": restart_error,
        "restart_cpu": restart_cpu,
        "errors": service.errors(),  # what the restarted service logged
        "logged": service.logged(),
        "listen_s": service.listen_times,  # each worker's, into the restart
        "sockets": service.sockets(),  # of each process, once all are back
        "resynced": len(resynced),
        "streams": s.streams,
        "last_resync_s": round(float(after.max()), 2) if len(after) else None,
        "resync_p50_s": pct(after, 50),
        "resync_p99_s": pct(after, 99),
        **state,
        "commits": commits.count,
        "refused": stats.get("refused", {}),
        "reconnects": stats.get("reconnects", 0),
        "resets": stats.get("resets", 0),
        "pool": service.pool_waits(exclude=old),
        "pg_connections_peak": peak.connections,
        "listener_reconnects_before": metrics_before.get("streamer_listener_reconnects_total"),
        "metrics_after": {k: v for k, v in service.metrics().items() if k in METRICS},
    }
