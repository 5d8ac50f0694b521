"""The sections of results.md after the targets: each a table described as data (its
columns, its rows from results.json) between the prose that says how to read it."""

from __future__ import annotations

from typing import Any

from bench.report.tables import (
    Column,
    Row,
    count,
    millis,
    ms,
    n,
    number,
    of,
    percent,
    refused,
    table,
    text,
)

LATENCY = of([
    ("design", text("label")),
    ("streams live", lambda p: f"{p['live_streams']:,} / {p['streams']:,}"),
    ("refused", lambda p: refused(p["refused"])),
    ("commits/s", number("commit_rate")),
    ("events/s", number("offered_per_s")),
    ("lost", lambda p: f"{p['lost']:,} / {p['expected']:,}"),
    ("p50", millis("p50_ms")),
    ("p95", millis("p95_ms")),
    ("p99", millis("p99_ms")),
    ("max", millis("max_ms")),
    ("ack p50", millis("ack_p50_ms")),
    ("ack p99", millis("ack_p99_ms")),
    ("COMMIT ms", millis("commit_ms")),
    ("server CPU", percent("server_cpu_pct")),
    ("others' CPU", percent("others_cpu_pct")),
    ("server RSS MB", number("server_rss_mb")),
    ("PG conns", text("pg_connections")),
    ("added p50 / p99", lambda p: f"{ms(p.get('added_p50_ms'))} / {ms(p.get('added_p99_ms'))}"),
])  # fmt: skip

FANOUT = of([
    ("design", text("design")),
    ("offered rows/s", lambda s: "flat out" if s["offered_rows_per_s"] is None
     else n(s["offered_rows_per_s"])),
    ("commits/s", number("commit_rate")),
    ("offered events/s", number("offered_per_s")),
    ("delivered events/s", number("delivered_per_s")),
    ("lost", count("lost")),
    ("streams", count("live_streams")),
    ("p50 ms", millis("p50_ms")),
    ("p99 ms", millis("p99_ms")),
    ("max ms", millis("max_ms")),
    ("CPU: server", percent("server_cpu_pct")),
    ("clients", percent("clients_cpu_pct")),
    ("writer", percent("writer_cpu_pct")),
    ("Postgres", percent("postgres_cpu_pct")),
    ("others", percent("others_cpu_pct")),
    ("streams cut", text("dropped_streams")),
])  # fmt: skip

CAPACITY = of([
    ("design", text("design")),
    ("open streams", count("streams")),
    ("refused", lambda r: refused(r.get("refused", {}))),
    ("server RSS MB", number("rss_mb", 1)),
    ("RSS KB/stream", number("rss_per_stream_kb", 1)),
    ("PG conns", text("pg_connections")),
    ("PG memory MB", number("pg_memory_mb")),
    ("seconds to open the step", number("open_seconds", 1)),
])  # fmt: skip

WRITER_CONFIGS = (
    ("none", "no feed trigger"),
    ("floor", "the floor: published, REPLICA IDENTITY FULL, pg_recvlogical reading"),
    ("wal_idle", "the feed, wal, nobody reading"),
    ("wal", "the feed, wal, the service reading"),
    ("feed", "the feed, notify"),
    ("bare", "bare pg_notify"),
)
WRITER = of([
    ("Postgres", text("postgres")),
    ("triggers", text("triggers")),
    ("TPS", number("tps")),
    ("runs", lambda r: ", ".join(n(t) for t in r["runs_tps"])),
    ("latency ms", millis("latency_ms")),
    ("vs bare", lambda r: f"{r['tps'] / r['bare_tps']:.1%}"),
    ("vs none", lambda r: f"{r['tps'] / r['none_tps']:.1%}"),
    ("CPU per walsender", lambda r: "" if r.get("walsender_cpu_pct") is None
     else f"{r['walsender_cpu_pct']:.0f}%"),
])  # fmt: skip

SOURCES = of([
    ("source", text("source")),
    ("phase", text("phase")),
    ("p50 / p99 ms", lambda r: f"{ms(r['p50_ms'])} / {ms(r['p99_ms'])}"),
    ("lost", text("lost")),
    ("events/s", number("delivered_per_s")),
    ("Postgres CPU", lambda r: f"{r['postgres_cpu_pct']:.0f}%"),
    ("service CPU", lambda r: f"{r['server_cpu_pct']:.0f}%"),
])  # fmt: skip

PROFILE = (
    Column("own time", lambda r: f"{r['pct']:.1f}%"),
    Column("function", lambda r: f"`{r['name']}`"),
)


def profile_rows(profile: dict[str, Any], top: int) -> list[Row]:
    return [{"name": name, "pct": pct} for name, pct in profile["own"][:top]]


def files(profile: dict[str, Any]) -> str:
    return ", ".join(f"[{name}]({name})" for name in profile.get("files", []))


def latency(latency: dict[str, Any]) -> list[str]:
    return [
        "## 1. Latency: COMMIT to event parsed by the client",
        "",
        f"Writers commit one row per transaction at {latency['rate']:.0f} commits/s for "
        f"{latency['seconds']:.0f} s (the first seconds are warm-up, left out of the "
        "percentiles but not of the loss count). Latency in ms from the midpoint of COMMIT; "
        "the *ack* columns from COMMIT returned to the writer.",
        "",
        *table(LATENCY, latency["phases"]),
        "",
        "*others' CPU*: as in the fan-out table below. *added*: for the service and the "
        "relay, a bare LISTEN ran beside them during the same "
        "phase; per event, its arrival at the client minus that LISTEN's arrival of the same "
        "notification: what the design adds over the floor, commit by commit. The *relay* "
        "(bench/relay.py, a diagnostic) is the least a relay process can do: json.loads, one "
        "frame, a socket write per stream; the gap between it and the service is the "
        "service's own code, the gap between it and the floor is one more process hop.",
        "",
        "![latency CDF](latency_cdf.png)",
        "",
    ]


def fanout(fanout: dict[str, Any]) -> list[str]:
    designs = ("floor", "service", "naive")
    rows = [{"design": d, **step} for d in designs for step in fanout[d]["steps"]]
    lines = [
        "## 2. Fan-out",
        "",
        f"{fanout['users']} users x {fanout['tabs']} tabs; each commit updates "
        f"{fanout['rows_per_commit']} rows of distinct users, so every notification becomes "
        f"{fanout['tabs']} events (the floor's one LISTEN gets each notification once). The "
        "offered rate steps up to writers flat out. Delivered events/s: events received "
        "over the time from the step's first commit to its last arrival.",
        "",
        *table(FANOUT, rows),
        "",
        "CPU columns: percent of one core, over the step (the machine has two cores in "
        "all). *others*: CPU time not charged to any process of the run: other people's "
        "processes, and kernel work such as loopback network softirqs (large under the naive "
        "design's hundreds of connections).",
    ]
    for design in ("service", "naive"):
        best = fanout[design]["best"]
        verdict = (
            f"{n(best['delivered_per_s'])} events/s at p99 {ms(best['p99_ms'])} ms"
            if best
            else "no step had p99 under 100 ms with nothing lost"
        )
        lines += ["", f"Best {design} step within p99 < 100 ms and nothing lost: {verdict}."]
    return [*lines, "", "![fan-out](fanout.png)", ""]


def capacity(capacity: dict[str, Any]) -> list[str]:
    service, naive = capacity["service"], capacity["naive"]
    rows = [{"design": d, **r} for d in ("service", "naive") for r in capacity[d]["readings"]]
    return [
        "## 3. Capacity: idle streams in one process",
        "",
        "Streams opened step by step (the service's with `?snapshot=1`); readings one second "
        "after each step. RSS per stream: (RSS now - RSS with no stream) / streams. Postgres "
        "memory: PSS of the postmaster and all its backends.",
        "",
        *table(CAPACITY, rows),
        "",
        f"Heartbeats every {capacity['heartbeat_seconds']:.0f} s to "
        f"{service.get('heartbeat_streams', 0):,} streams: the service used "
        f"{n(service.get('heartbeat_cpu_pct'), 1)}% of a core, "
        f"{n(service.get('heartbeat_ms_per_round'), 1)} ms of CPU per round "
        f"({n(service.get('heartbeat_us_per_stream'), 1)} us per stream; idle rate "
        f"{n(service.get('idle_cpu_pct'), 2)}% subtracted); "
        f"{service.get('dropped_streams', 0)} streams cut. Highest Postgres connections held "
        f"by the service: {service['peak_pg_connections']}; by the naive server: "
        f"{naive['peak_pg_connections']}.",
        "",
        "![RSS against open streams](rss.png)",
        "",
    ]


def writer_cost(writer: dict[str, Any]) -> list[str]:
    rows = [
        {**w[config], "postgres": label, "triggers": name,
         "bare_tps": w["bare"]["tps"], "none_tps": w["none"]["tps"]}
        for key, label in (("fsync_on", "fsync on"), ("fsync_off", "fsync off"))
        if (w := writer.get(key))
        for config, name in WRITER_CONFIGS
        if config in w
    ]  # fmt: skip
    return [
        "## 4. Writer cost",
        "",
        f"pgbench, {writer['clients']} clients, single-row `update files set progress = "
        f"(random()*100)::int where id = :id` over {writer['rows']:,} rows; "
        "the configurations take turns in short runs, in alternating order, while a bare "
        "LISTEN drains the channel (and with wal, one WAL source reads, with its own "
        "walsender, as the service's reader does). TPS and latency: the median run of each "
        "configuration; a walsender's CPU is of one core.",
        "",
        *table(WRITER, rows),
        "",
    ]


def sources(results: dict[str, Any]) -> list[str]:
    rows: list[Row] = []
    for name in ("notify", "wal"):
        rows.append({**results[name]["latency"], "source": name, "phase": "latency"})
        for step in results[name]["fanout"]["steps"]:
            offered = step["offered_rows_per_s"]
            phase = f"fan-out, {'flat out' if offered is None else n(offered) + ' rows/s'}"
            rows.append({**step, "source": name, "phase": phase})
    return [
        "## The change sources side by side",
        "",
        f"The service with STREAMER_SOURCE=notify, then wal, on the same database: latency "
        f"with {results['notify']['latency']['live_streams']:,} streams (one per user) at "
        f"{n(results['rate'])} commits/s, and fan-out to 10 tabs per user, offered rates "
        "stepping up to flat out. Postgres CPU includes the walsender of the WAL source.",
        "",
        *table(SOURCES, rows),
        "",
    ]


def profile(fanout: dict[str, Any]) -> list[str]:
    profile = fanout.get("profile")
    if not profile:
        return []
    if "error" in profile:
        return ["## Profile", "", f"py-spy failed: {profile['error']}", ""]
    return [
        "## Profile of the service, writers flat out (fan-out)",
        "",
        f"py-spy, {profile['busy_pct']:.0f}% of samples with the event loop busy. Files: "
        f"{files(profile)}.",
        "",
        *table(PROFILE, profile_rows(profile, 10)),
        "",
    ]
