"""results.md and the plots, from the results of one run (results.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.report import big_user, crowd, fleet, plots, sections, shapes, targets


def write(results: dict[str, Any], out: Path) -> None:
    lines = [*header(results), *targets.section(results)]
    if "latency" in results:
        lines += sections.latency(results["latency"])
        plots.plot_latency(results["latency"], out / "latency_cdf.png")
    if "fanout" in results:
        lines += sections.fanout(results["fanout"])
        plots.plot_fanout(results["fanout"], out / "fanout.png")
    if "capacity" in results:
        lines += sections.capacity(results["capacity"])
        plots.plot_rss(results["capacity"], out / "rss.png")
    if "writer_cost" in results:
        lines += sections.writer_cost(results["writer_cost"])
    if "sources" in results:
        lines += sections.sources(results["sources"])
    if "big_user" in results:
        lines += big_user.section(results["big_user"])
    if "fleet" in results:
        lines += fleet.section(results["fleet"])
    if "shapes" in results:
        lines += shapes.section(results["shapes"])
    if "crowd" in results:
        lines += crowd.section(results["crowd"])
    if "fanout" in results:
        lines += sections.profile(results["fanout"])
    lines += METHOD
    (out / "results.md").write_text("\n".join(lines))


def header(results: dict[str, Any]) -> list[str]:
    meta = results["meta"]
    m = meta["machine"]
    before = meta["load_before"]
    scale = "quick (smoke) scale" if meta["quick"] else "full scale"
    lines = [
        "# streamer benchmarks",
        "",
        f"Run {meta['date']} on commit `{meta['commit']}`, {scale}, {meta.get('seconds', 0):.0f} s "
        "in all (`make bench`).",
        "",
    ]
    if meta.get("service_code"):
        lines += [
            f"The service measured is that of another checkout: `{meta['service_code']}` "
            "(its own migrations, on a fresh database).",
            "",
        ]
    if meta.get("uncommitted"):
        lines += [
            "The service was measured from the working tree, with changes not yet "
            f"committed in: {', '.join(meta['uncommitted'])}.",
            "",
        ]
    shares = [
        f"{name} {results[name]['machine']['others_pct']:.0f}% of the machine"
        for name in ("latency", "fanout", "capacity", "writer_cost", "big_user")
        if name in results and "machine" in results[name]
    ]
    during = f" Other processes used, during each scenario: {'; '.join(shares)}." if shares else ""
    return [
        *lines,
        f"Machine: {m['nproc']} x {m['cpu']}, {m['memory']}, Linux {m['kernel']}, Python "
        f"{m['python']}. PostgreSQL 18 (embedded), fsync {'on' if meta['fsync'] else 'off'}, "
        f"max_connections={plots.MAX_CONNECTIONS}. Postgres, the service, the writers and the "
        "load generators all share these cores.",
        "",
        f"Load from other processes: the machine was {before['busy_pct']:.0f}% busy in the 2 s "
        f"before the run (load average {before['loadavg'][0]:.2f}).{during}",
        "",
    ]


METHOD = [
    "## How it is measured",
    "",
    "- Everything runs on this machine: an embedded PostgreSQL 18, the service as deployed "
    "(`streamer serve` with DATABASE_URL and STREAMER_JWT_SECRET), writer and client "
    "processes (multiprocessing). Clients hold many streams per process over raw asyncio "
    "sockets (HTTP/1.1 chunked decoded by hand, SSE read by `streamer.sse.Parser` as an "
    "EventSource reads it), and send the request headers Chrome sends with an EventSource "
    "(the server keeps them for the stream's life).",
    "- Writers stamp each commit `processing_stage = 'bench:<writer>:<seq>;'` and record "
    "the time just before COMMIT is sent and when it returns. A client records its arrival "
    "time for each event; all on CLOCK_MONOTONIC, which every process on Linux shares. "
    "Latency is from the midpoint of COMMIT; the *ack* figures, from COMMIT returned. The "
    "notification is sent after the commit record is flushed, so the midpoint overstates "
    "latency by up to half a COMMIT round trip, and *ack* understates it by the writer's "
    "own delay in reading the reply (it can go below zero when the writer is busy).",
    "- Lost: every event of every commit must arrive at every live stream of its user "
    "within 10 s after the last commit; misrouted: an event at a stream of another user.",
    "- The floor: one bare asyncpg connection LISTENing on channel `streamer`, parsing "
    "each notification as it arrives. The naive design (`bench/naive.py`): an aiohttp "
    "server whose every stream opens its own asyncpg connection and LISTENs.",
    "",
]
