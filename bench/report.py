"""results.md and the plots, from the results of one run (results.json)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench import sources

POOL_SIZE = 4  # the service's default STREAMER_POOL_SIZE
TARGET_LATENCY_RATIO = 1.5
TARGET_P99_MS = 5.0
TARGET_FANOUT = 50_000
TARGET_FANOUT_P99_MS = 100.0
TARGET_STREAMS = 10_000
TARGET_KB_PER_STREAM = 16.0
TARGET_WRITER_RATIO = 0.95
TARGET_WAL_WRITER_RATIO = 0.85  # STREAMER_SOURCE=wal: of the TPS with no trigger at all
MAX_CONNECTIONS = 500
TARGET_BIG_ROWS_PER_S = 33_000.0  # 200,000 rows in 6 s
TARGET_BIG_RSS_MB = 100.0
TARGET_BIG_P99_MS = 100.0
BIG_VARIANTS = (
    ("snapshot", "snapshot to `synced`"),
    ("resume", "resume over every row changed, to `synced`"),
    ("recovery", "listener recovery, to the last row"),
)
LOST_AT_MS = 10_000.0  # phase.DRAIN_TIMEOUT

Row = dict[str, Any]


def _n(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def _ms(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:,.0f}"


def _cpu(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}%"


def _verdict(ok: bool) -> str:
    return "**pass**" if ok else "**miss**"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _refused(errors: dict[str, int]) -> str:
    return ", ".join(f"{n} {error}" for error, n in errors.items()) or "0"


# -- targets --------------------------------------------------------------------------


def targets(results: dict[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = []
    latency = results.get("latency")
    if latency:
        floor = next(p for p in latency["phases"] if p["design"] == "floor")
        for p in latency["phases"]:
            if p["design"] != "service":
                continue
            shape = f"{p['streams']:,} streams, {p['users']:,} users x {p['tabs']} tabs"
            ratio = p["p50_ms"] / floor["p50_ms"] if floor["p50_ms"] > 0 else math.inf
            ack_ratio = (
                p["ack_p50_ms"] / floor["ack_p50_ms"] if floor["ack_p50_ms"] > 0 else math.inf
            )
            rows.append([
                f"latency, {shape}: p50 within {TARGET_LATENCY_RATIO}x the floor",
                f"{_ms(p['p50_ms'])} ms vs {_ms(floor['p50_ms'])} ms = {ratio:.2f}x "
                f"(from COMMIT returned: {_ms(p['ack_p50_ms'])} vs {_ms(floor['ack_p50_ms'])} "
                f"ms = {ack_ratio:.1f}x)",
                _verdict(ratio <= TARGET_LATENCY_RATIO),
            ])  # fmt: skip
            rows.append([
                f"latency, {shape}: p99 under {TARGET_P99_MS:.0f} ms",
                f"{_ms(p['p99_ms'])} ms (from COMMIT returned: {_ms(p['ack_p99_ms'])} ms)",
                _verdict(p["p99_ms"] < TARGET_P99_MS),
            ])  # fmt: skip
            rows.append([
                f"latency, {shape}: nothing lost",
                f"{p['lost']:,} lost of {p['expected']:,} "
                f"({p['misrouted']} misrouted, {p['duplicates']} duplicates)",
                _verdict(
                    p["lost"] == 0 and p["misrouted"] == 0 and p["live_streams"] == p["streams"]
                ),
            ])  # fmt: skip
    fanout = results.get("fanout")
    if fanout:
        best = fanout["service"]["best"]
        shape = f"{fanout['users']} users x {fanout['tabs']} tabs"
        measured = (
            f"{_n(best['delivered_per_s'])} events/s (p99 {_ms(best['p99_ms'])} ms)"
            if best
            else "no step within the limit"
        )
        rows.append([
            f"fan-out, {shape}: {TARGET_FANOUT:,} delivered events/s or more at p99 under "
            f"{TARGET_FANOUT_P99_MS:.0f} ms",
            measured,
            _verdict(best is not None and best["delivered_per_s"] >= TARGET_FANOUT),
        ])  # fmt: skip
    capacity = results.get("capacity")
    if capacity:
        top = capacity["service"]["readings"][-1]
        rows.append([
            f"capacity: {TARGET_STREAMS:,} open streams in one process",
            f"{top['streams']:,} open ({_refused(top.get('refused', {}))} refused)",
            _verdict(top["streams"] >= TARGET_STREAMS),
        ])  # fmt: skip
        per = top.get("rss_per_stream_kb")
        rows.append([
            f"capacity: {TARGET_KB_PER_STREAM:.0f} KB RSS per stream or less",
            f"{_n(per, 1)} KB at {top['streams']:,} streams",
            _verdict(per is not None and per <= TARGET_KB_PER_STREAM),
        ])  # fmt: skip
    writer = results.get("writer_cost")
    if writer:
        for key, label in (("fsync_on", "fsync on"), ("fsync_off", "fsync off")):
            if key in writer:
                w = writer[key]
                rows.append([
                    f"writer cost ({label}): feed triggers keep {TARGET_WRITER_RATIO:.0%} or "
                    "more of the bare-NOTIFY TPS",
                    f"{w['feed_vs_bare']:.1%} ({_n(w['feed']['tps'])} vs "
                    f"{_n(w['bare']['tps'])} TPS)",
                    _verdict(w["feed_vs_bare"] >= TARGET_WRITER_RATIO),
                ])  # fmt: skip
                if "wal_vs_none" in w:
                    rows.append([
                        f"writer cost ({label}): with STREAMER_SOURCE=wal the feed keeps "
                        f"{TARGET_WAL_WRITER_RATIO:.0%} or more of the no-trigger TPS",
                        f"{w['wal_vs_none']:.1%} ({_n(w['wal']['tps'])} vs "
                        f"{_n(w['none']['tps'])} TPS)",
                        _verdict(w["wal_vs_none"] >= TARGET_WAL_WRITER_RATIO),
                    ])  # fmt: skip
    big = results.get("big_user")
    if big:
        rows += big_user_targets(big)
    held = service_connections(results)
    if held is not None:
        rows.append([
            f"Postgres connections held by the service: at most 1 + pool size ({1 + POOL_SIZE})",
            f"{held} at most, over every service phase",
            _verdict(held <= 1 + POOL_SIZE),
        ])  # fmt: skip
    return rows


def big_user_targets(big: dict[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = []
    n = big["rows"]
    limit_s = n / TARGET_BIG_ROWS_PER_S
    for key, label in BIG_VARIANTS:
        v = big.get(key)
        if not v:
            continue
        name = f"{n:,}-row user, {label}"
        seconds = v["seconds"]
        rows.append([
            f"{name}: within {limit_s:.1f} s ({TARGET_BIG_ROWS_PER_S:,.0f} rows/s)",
            f"{_n(seconds, 2)} s = {_n(v['rows_per_s'])} rows/s",
            _verdict(seconds is not None and seconds <= limit_s),
        ])  # fmt: skip
        rows.append([
            f"{name}: the service's peak RSS growth under {TARGET_BIG_RSS_MB:.0f} MB",
            f"+{_n(v['rss_peak_growth_mb'], 1)} MB",
            _verdict(v["rss_peak_growth_mb"] < TARGET_BIG_RSS_MB),
        ])  # fmt: skip
        other = v["other"]
        rows.append([
            f"{name}: another user's p99 under {TARGET_BIG_P99_MS:.0f} ms meanwhile",
            f"{_ms(other['p99_ms'])} ms (max {_ms(other['max_ms'])}, {other['commits']} "
            f"commits, {other['lost']} lost)",
            _verdict(other["p99_ms"] < TARGET_BIG_P99_MS and other["lost"] == 0),
        ])  # fmt: skip
        at_synced = v["updates_at_synced"] if key != "recovery" else v["updates"]
        rows.append([
            f"{name}: every row once, then `synced`" if key != "recovery"
            else f"{name}: every row, on the open stream",
            f"{v['rows_received']:,} rows in {_n(at_synced)} file-update events, "
            f"{v['reconnects']} reconnects ({v['ended']})",
            _verdict(v["whole"]),
        ])  # fmt: skip
    stalled = big.get("stalled")
    if stalled:
        rows.append([
            f"{n:,}-row user, a snapshot whose client stops reading: memory held under "
            f"{TARGET_BIG_RSS_MB:.0f} MB",
            f"+{_n(stalled['rss_held_mb'], 1)} MB after {stalled['stall_s']:.0f} s "
            f"(peak +{_n(stalled['rss_peak_growth_mb'], 1)} MB)",
            _verdict(stalled["rss_held_mb"] < TARGET_BIG_RSS_MB),
        ])  # fmt: skip
        probe = stalled["probe_s"]
        rows.append([
            f"{n:,}-row user, {stalled['stalled_streams']} snapshots whose client stops reading: "
            "another user's snapshot still opens",
            "no `synced` within 10 s" if probe is None else f"`synced` in {probe:.2f} s",
            _verdict(probe is not None),
        ])  # fmt: skip
    return rows


def service_connections(results: dict[str, Any]) -> int | None:
    seen: list[int] = []
    for p in results.get("latency", {}).get("phases", []):
        if p["design"] == "service":
            seen.append(p["pg_connections"])
    for step in results.get("fanout", {}).get("service", {}).get("steps", []):
        seen.append(step["pg_connections"])
    capacity = results.get("capacity", {}).get("service")
    if capacity:
        seen.append(capacity["peak_pg_connections"])
    return max(seen) if seen else None


# -- sections -------------------------------------------------------------------------


def latency_section(latency: dict[str, Any]) -> list[str]:
    lines = [
        "## 1. Latency: COMMIT to event parsed by the client",
        "",
        f"Writers commit one row per transaction at {latency['rate']:.0f} commits/s for "
        f"{latency['seconds']:.0f} s (the first seconds are warm-up, left out of the "
        "percentiles but not of the loss count). Latency in ms from the midpoint of COMMIT; "
        "the *ack* columns from COMMIT returned to the writer.",
        "",
    ]
    rows = []
    for p in latency["phases"]:
        rows.append([
            p["label"], f"{p['live_streams']:,} / {p['streams']:,}", _refused(p["refused"]),
            _n(p["commit_rate"]), _n(p["offered_per_s"]), f"{p['lost']:,} / {p['expected']:,}",
            _ms(p["p50_ms"]), _ms(p["p95_ms"]), _ms(p["p99_ms"]), _ms(p["max_ms"]),
            _ms(p["ack_p50_ms"]), _ms(p["ack_p99_ms"]), _ms(p["commit_ms"]),
            _cpu(p["server_cpu_pct"]), _cpu(p.get("others_cpu_pct")),
            _n(p["server_rss_mb"]), str(p["pg_connections"]),
            f"{_ms(p.get('added_p50_ms'))} / {_ms(p.get('added_p99_ms'))}",
        ])  # fmt: skip
    lines += _table(
        ["design", "streams live", "refused", "commits/s", "events/s", "lost", "p50", "p95",
         "p99", "max", "ack p50", "ack p99", "COMMIT ms", "server CPU", "others' CPU",
         "server RSS MB", "PG conns", "added p50 / p99"],
        rows,
    )  # fmt: skip
    lines += [
        "",
        "*others' CPU*: as in the fan-out table below. *added*: for the service and the "
        "relay, a bare LISTEN ran beside them during the same "
        "phase; per event, its arrival at the client minus that LISTEN's arrival of the same "
        "notification: what the design adds over the floor, commit by commit. The *relay* "
        "(bench/relay.py, a diagnostic) is the least a relay process can do: json.loads, one "
        "frame, a socket write per stream; the gap between it and the service is the "
        "service's own code, the gap between it and the floor is one more process hop.",
    ]
    return [*lines, "", "![latency CDF](latency_cdf.png)", ""]


def fanout_section(fanout: dict[str, Any]) -> list[str]:
    lines = [
        "## 2. Fan-out",
        "",
        f"{fanout['users']} users x {fanout['tabs']} tabs; each commit updates "
        f"{fanout['rows_per_commit']} rows of distinct users, so every notification becomes "
        f"{fanout['tabs']} events (the floor's one LISTEN gets each notification once). The "
        "offered rate steps up to writers flat out. Delivered events/s: events received "
        "over the time from the step's first commit to its last arrival.",
        "",
    ]
    rows = []
    for design in ("floor", "service", "naive"):
        for step in fanout[design]["steps"]:
            offered = step["offered_rows_per_s"]
            rows.append([
                design, "flat out" if offered is None else _n(offered),
                _n(step["commit_rate"]), _n(step["offered_per_s"]),
                _n(step["delivered_per_s"]), f"{step['lost']:,}",
                f"{step['live_streams']:,}", _ms(step["p50_ms"]), _ms(step["p99_ms"]),
                _ms(step["max_ms"]),
                _cpu(step["server_cpu_pct"]), _cpu(step["clients_cpu_pct"]),
                _cpu(step["writer_cpu_pct"]), _cpu(step["postgres_cpu_pct"]),
                _cpu(step.get("others_cpu_pct")), str(step["dropped_streams"]),
            ])  # fmt: skip
    lines += _table(
        ["design", "offered rows/s", "commits/s", "offered events/s", "delivered events/s",
         "lost", "streams", "p50 ms", "p99 ms", "max ms", "CPU: server", "clients", "writer",
         "Postgres", "others", "streams cut"],
        rows,
    )  # fmt: skip
    lines += [
        "",
        "CPU columns: percent of one core, over the step (the machine has two cores in "
        "all). *others*: CPU time not charged to any process of the run: other people's "
        "processes, and kernel work such as loopback network softirqs (large under the naive "
        "design's hundreds of connections).",
    ]
    for design in ("service", "naive"):
        best = fanout[design]["best"]
        verdict = (
            f"{_n(best['delivered_per_s'])} events/s at p99 {_ms(best['p99_ms'])} ms"
            if best
            else "no step had p99 under 100 ms with nothing lost"
        )
        lines += ["", f"Best {design} step within p99 < 100 ms and nothing lost: {verdict}."]
    return [*lines, "", "![fan-out](fanout.png)", ""]


def capacity_section(capacity: dict[str, Any]) -> list[str]:
    service, naive = capacity["service"], capacity["naive"]
    lines = [
        "## 3. Capacity: idle streams in one process",
        "",
        "Streams opened step by step (the service's with `?snapshot=1`); readings one second "
        "after each step. RSS per stream: (RSS now - RSS with no stream) / streams. Postgres "
        "memory: PSS of the postmaster and all its backends.",
        "",
    ]
    rows = []
    for design, data in (("service", service), ("naive", naive)):
        for r in data["readings"]:
            rows.append([
                design, f"{r['streams']:,}", _refused(r.get("refused", {})),
                _n(r["rss_mb"], 1), _n(r.get("rss_per_stream_kb"), 1),
                str(r["pg_connections"]), _n(r["pg_memory_mb"], 0),
                _n(r.get("open_seconds"), 1),
            ])  # fmt: skip
    lines += _table(
        ["design", "open streams", "refused", "server RSS MB", "RSS KB/stream", "PG conns",
         "PG memory MB", "seconds to open the step"],
        rows,
    )  # fmt: skip
    lines += [
        "",
        f"Heartbeats every {capacity['heartbeat_seconds']:.0f} s to "
        f"{service.get('heartbeat_streams', 0):,} streams: the service used "
        f"{_n(service.get('heartbeat_cpu_pct'), 1)}% of a core, "
        f"{_n(service.get('heartbeat_ms_per_round'), 1)} ms of CPU per round "
        f"({_n(service.get('heartbeat_us_per_stream'), 1)} us per stream; idle rate "
        f"{_n(service.get('idle_cpu_pct'), 2)}% subtracted); "
        f"{service.get('dropped_streams', 0)} streams cut. Highest Postgres connections held "
        f"by the service: {service['peak_pg_connections']}; by the naive server: "
        f"{naive['peak_pg_connections']}.",
        "",
        "![RSS against open streams](rss.png)",
        "",
    ]
    return lines


def writer_section(writer: dict[str, Any]) -> list[str]:
    lines = [
        "## 4. Writer cost",
        "",
        f"pgbench, {writer['clients']} clients, single-row `update files set progress = "
        f"(random()*100)::int where id = :id` over {writer['rows']:,} rows; "
        "the configurations take turns in short runs, in alternating order, while a bare "
        "LISTEN drains the channel (and with wal, one or four WAL sources read, each with "
        "its own walsender, as that many service processes would). TPS and latency: the "
        "median run of each configuration; a walsender's CPU is of one core.",
        "",
    ]
    rows = []
    for key, label in (("fsync_on", "fsync on"), ("fsync_off", "fsync off")):
        if key not in writer:
            continue
        w = writer[key]
        for config, name in (
            ("feed", "feed triggers, notify"),
            ("wal", "feed triggers, wal (1 reader)"),
            ("wal4", "feed triggers, wal (4 readers)"),
            ("bare", "bare pg_notify"),
            ("none", "no notify trigger"),
        ):
            if config not in w:
                continue
            runs = ", ".join(_n(t) for t in w[config]["runs_tps"])
            walsender = w[config].get("walsender_cpu_pct")
            rows.append([
                label, name, _n(w[config]["tps"]), runs, _ms(w[config]["latency_ms"]),
                f"{w[config]['tps'] / w['bare']['tps']:.1%}",
                f"{w[config]['tps'] / w['none']['tps']:.1%}",
                "" if walsender is None else f"{walsender:.0f}%",
            ])  # fmt: skip
    lines += _table(
        ["Postgres", "triggers", "TPS", "runs", "latency ms", "vs bare", "vs none",
         "CPU per walsender"],
        rows,
    )  # fmt: skip
    return [*lines, ""]


def _other(o: dict[str, Any]) -> str:
    return (
        f"{_ms(o['p50_ms'])} / {_ms(o['p99_ms'])} / {_ms(o['max_ms'])} ms "
        f"({o['commits']} commits, {o['lost']} lost)"
    )


def big_user_section(big: dict[str, Any]) -> list[str]:
    n = big["rows"]
    lines = [
        "## 5. A user with many rows beside everyone else",
        "",
        f"One user with {n:,} rows (a 200-byte `error_message` each, {big['row_bytes']} bytes "
        f"of JSON per row), inserted by the table's owner in one statement "
        f"({big['import_s']:.1f} s). Meanwhile another user's stream is live and one of its "
        f"rows is updated every {1000 / big['rate']:.0f} ms, one row per commit. Each variant "
        "runs against a fresh service. *Seconds*: the big user's request to `synced` (for the "
        "recovery: from the service's LISTEN being back to the last row at the open stream). "
        "*RSS*: the service's peak over its RSS just before, sampled every 10 ms. "
        "*Other user*: p50 / p99 / max from the midpoint of COMMIT to the event parsed, "
        "over the same span.",
        "",
    ]
    rows = []
    for key, _ in BIG_VARIANTS:
        v = big.get(key)
        if not v:
            continue
        rows.append([
            key, _n(v["seconds"], 2), _n(v["rows_per_s"]), _n(v["first_byte_s"], 2),
            f"+{_n(v['rss_peak_growth_mb'], 1)}", _other(v["other"]),
            f"{v['rows_received']:,}", str(v["reconnects"]), "yes" if v["whole"] else "no",
            _n(v["server_cpu_s"], 1), _cpu(v["machine"]["others_pct"]),
        ])  # fmt: skip
    lines += _table(
        ["variant", "seconds", "rows/s", "first byte s", "RSS MB", "other user", "rows",
         "reconnects", "whole", "server CPU s", "others' CPU"],
        rows,
    )  # fmt: skip
    lines += [
        "",
        "*first byte*: the response's head (the service sends it with the first batch). "
        "*whole*: every row exactly once as `file-update`, then `synced`, nothing else, on "
        "the one stream. *others' CPU*: share of the machine used by processes not of this "
        "run, meanwhile.",
    ]
    resume = big.get("resume")
    if resume and "other_during_update" in resume:
        lines += [
            "",
            f"Resume: the {n:,} rows were updated in one transaction ({resume['update_s']:.1f} "
            "s); the service received a notification for each (their owner had no stream "
            f"open) and took {resume['notifications_s']:.1f} s to be done with them. The other "
            f"user meanwhile: {_other(resume['other_during_update'])}"
            + (
                f" (at a bare LISTEN beside the service: {_other(resume['floor_during_update'])})"
                if "floor_during_update" in resume
                else ""
            )
            + "; the service's listener "
            f"reconnected {resume['metrics'].get('listener_reconnects', 0):.0f} times (a "
            "commit it missed reaches the stream as the row's latest state, its recovery: "
            "counted here as lost).",
        ]
    recovery = big.get("recovery")
    if recovery:
        lines += [
            "",
            f"Recovery: the LISTEN connection was terminated and the database refused new "
            f"connections for {recovery['outage_s']:.1f} s while the {n:,} rows were updated "
            f"in one transaction ({recovery['update_s']:.1f} s). The listener was back "
            f"{_n(recovery['relisten_s'], 2)} s after the database (its reconnect backoff); "
            f"from the database back to the last row: {_n(recovery['from_open_s'], 2)} s. "
            "The other "
            "user's commits while it was down reached its stream as the row's latest state "
            "(a catch-up sends rows, not changes), so they are left out of its latency; the "
            f"stream's cuts for not reading: "
            f"{recovery['metrics'].get('slow_client_disconnects', 0):.0f}.",
        ]
    stalled = big.get("stalled")
    if stalled:
        probe = stalled["probe_s"]
        lines += [
            "",
            f"Stalled: a snapshot whose client read nothing for {stalled['stall_s']:.0f} s held "
            f"+{_n(stalled['rss_held_mb'], 1)} MB of the service's RSS; its database "
            f"transaction had then been open {_n(stalled['transaction_open_s'], 1)} s. With "
            f"{stalled['stalled_streams']} such streams (the pool's size), another user's "
            "snapshot got "
            + ("no `synced` within 10 s" if probe is None else f"`synced` in {probe:.2f} s")
            + f" and /readyz answered {stalled['readyz']}. Read again, the first stalled "
            f"stream ended: {stalled['after']} "
            f"({_n(stalled['updates_at_synced'])} file-update events before it).",
        ]
    profile = (resume or {}).get("profile")
    if profile and "own" in profile:
        lines += [
            "",
            "py-spy on the service as the resume's notifications arrived "
            f"({profile['busy_pct']:.0f}% of samples with the event loop busy; "
            + ", ".join(f"[{name}]({name})" for name in profile.get("files", []))
            + "):",
            "",
        ]
        lines += _table(
            ["own time", "function"],
            [[f"{pct:.1f}%", f"`{name}`"] for name, pct in profile["own"][:8]],
        )
    logged = [
        f"- {key}: `{line}`"
        for key, _ in (*BIG_VARIANTS, ("stalled", ""))
        for line in big.get(key, {}).get("log", [])
    ]
    if logged:
        lines += ["", "What the service logged (cuts, recoveries, warnings):", "", *logged]
    return [*lines, ""]


def profile_section(fanout: dict[str, Any]) -> list[str]:
    profile = fanout.get("profile")
    if not profile:
        return []
    if "error" in profile:
        return ["## Profile", "", f"py-spy failed: {profile['error']}", ""]
    lines = [
        "## Profile of the service, writers flat out (fan-out)",
        "",
        f"py-spy, {profile['busy_pct']:.0f}% of samples with the event loop busy. Files: "
        + ", ".join(f"[{name}]({name})" for name in profile.get("files", []))
        + ".",
        "",
    ]
    rows = [[f"{pct:.1f}%", f"`{name}`"] for name, pct in profile["own"][:10]]
    lines += _table(["own time", "function"], rows)
    return [*lines, ""]


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
        *(
            [
                f"The service measured is that of another checkout: `{meta['service_code']}` "
                "(its own migrations, on a fresh database).",
                "",
            ]
            if meta.get("service_code")
            else []
        ),
        *(
            [
                "The service was measured from the working tree, with changes not yet "
                f"committed in: {', '.join(meta['uncommitted'])}.",
                "",
            ]
            if meta.get("uncommitted")
            else []
        ),
        f"Machine: {m['nproc']} x {m['cpu']}, {m['memory']}, Linux {m['kernel']}, Python "
        f"{m['python']}. PostgreSQL 18 (embedded), fsync {'on' if meta['fsync'] else 'off'}, "
        f"max_connections={MAX_CONNECTIONS}. Postgres, the service, the writers and the load "
        "generators all share these cores.",
        "",
        f"Load from other processes: the machine was {before['busy_pct']:.0f}% busy in the 2 s "
        f"before the run (load average {before['loadavg'][0]:.2f}).",
    ]
    shares = [
        f"{name} {results[name]['machine']['others_pct']:.0f}% of the machine"
        for name in ("latency", "fanout", "capacity", "writer_cost", "big_user")
        if name in results and "machine" in results[name]
    ]
    if shares:
        lines[-1] += " Other processes used, during each scenario: " + "; ".join(shares) + "."
    return [*lines, ""]


def method() -> list[str]:
    return [
        "## How it is measured",
        "",
        "- Everything runs on this machine: an embedded PostgreSQL 18, the service as deployed "
        "(`streamer serve` with DATABASE_URL and STREAMER_JWT_SECRET), writer and client "
        "processes (multiprocessing). Clients hold many streams per process over raw asyncio "
        "sockets (HTTP/1.1 chunked, SSE parsed by hand), and send the request headers Chrome "
        "sends with an EventSource (the server keeps them for the stream's life).",
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


def write(results: dict[str, Any], out: Path) -> None:
    lines = header(results)
    rows = targets(results)
    if rows:
        lines += ["## Targets", ""]
        lines += _table(["target", "measured", "result"], rows)
        lines += [""]
    if "latency" in results:
        lines += latency_section(results["latency"])
        plot_latency(results["latency"], out / "latency_cdf.png")
    if "fanout" in results:
        lines += fanout_section(results["fanout"])
        plot_fanout(results["fanout"], out / "fanout.png")
    if "capacity" in results:
        lines += capacity_section(results["capacity"])
        plot_rss(results["capacity"], out / "rss.png")
    if "writer_cost" in results:
        lines += writer_section(results["writer_cost"])
    if "sources" in results:
        lines += sources.section(results["sources"], _table, _ms, _n)
    if "big_user" in results:
        lines += big_user_section(results["big_user"])
    if "fanout" in results:
        lines += profile_section(results["fanout"])
    lines += method()
    (out / "results.md").write_text("\n".join(lines))


# -- plots ----------------------------------------------------------------------------


def plot_latency(latency: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for p in latency["phases"]:
        values = p["cdf_ms"]
        if len(values) < 2:
            continue
        # Log scale: a negative or zero latency (clock granularity) is left off the curve.
        points = [(v, i / (len(values) - 1)) for i, v in enumerate(values) if v > 0]
        ax.plot(
            [v for v, _ in points],
            [f for _, f in points],
            label=f"{p['label']} ({p['live_streams']:,} live)",
        )
    ax.set_xscale("log")
    ax.set_xlabel("latency, COMMIT (midpoint) to event parsed (ms, log)")
    ax.set_ylabel("fraction of events")
    ax.axvline(TARGET_P99_MS, color="grey", linestyle=":", label=f"{TARGET_P99_MS:.0f} ms")
    ax.set_title(f"Latency at {latency['rate']:.0f} commits/s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fanout(fanout: dict[str, Any], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    tabs = fanout["tabs"]
    top = 0.0
    for design, style in (("floor", "s-"), ("service", "o-"), ("naive", "^-")):
        # x: notifications committed per second, the same for every design; in order of x
        # (flat out may commit less than the last paced step, the machine being full).
        steps = sorted(
            fanout[design]["steps"], key=lambda s: s["commit_rate"] * s["rows_per_commit"]
        )
        x = [s["commit_rate"] * s["rows_per_commit"] for s in steps]
        top = max([top, *x])
        if design != "floor":
            left.plot(x, [s["delivered_per_s"] for s in steps], style, label=design)
        right.plot(x, [s["p99_ms"] for s in steps], style, label=design)
        for xi, step in zip(x, steps, strict=True):
            if step["lost"]:  # events that never came: drawn at the drain limit
                right.plot([xi], [LOST_AT_MS], "x", color="red")
                right.annotate(f"{design}: {step['lost']:,} lost", (xi, LOST_AT_MS),
                               fontsize=7, xytext=(4, -10), textcoords="offset points")  # fmt: skip
        for ax, ys in ((left, [s["delivered_per_s"] for s in steps]), (right, None)):
            if ax is left and design == "floor":
                continue
            for i, step in enumerate(steps):
                y = ys[i] if ys is not None else step["p99_ms"]
                if step["offered_rows_per_s"] is None and y == y:  # flat out, not NaN
                    ax.annotate("flat out", (x[i], y), fontsize=7, xytext=(4, -10),
                                textcoords="offset points")  # fmt: skip
    left.plot([0, top], [0, top * tabs], "k:", label=f"every notification x {tabs} tabs")
    left.axhline(TARGET_FANOUT, color="grey", linestyle="--", label=f"{TARGET_FANOUT:,}/s target")
    left.set_xlabel("notifications/s (rows committed per second)")
    left.set_ylabel("delivered events/s")
    left.set_title(f"Fan-out, {fanout['users']} users x {tabs} tabs")
    left.legend(fontsize=8)
    left.grid(True, alpha=0.3)
    right.set_yscale("log")
    right.axhline(TARGET_FANOUT_P99_MS, color="grey", linestyle="--", label="100 ms")
    right.set_xlabel("notifications/s (rows committed per second)")
    right.set_ylabel("p99 latency (ms, log)")
    right.set_title("p99 latency (x: events lost, not delivered within 10 s)")
    right.legend(fontsize=8)
    right.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rss(capacity: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    zoom = 1.2 * max(MAX_CONNECTIONS, *(r["streams"] for r in capacity["naive"]["readings"]))
    for ax, limit in zip(axes, (None, zoom), strict=True):
        for design, style in (("service", "o-"), ("naive", "^-")):
            readings = [
                r for r in capacity[design]["readings"] if limit is None or r["streams"] <= limit
            ]
            streams = [r["streams"] for r in readings]
            base = readings[0]["pg_memory_mb"]
            ax.plot(streams, [r["rss_mb"] for r in readings], style, label=f"{design}: RSS")
            ax.plot(
                streams,
                [r["rss_mb"] + r["pg_memory_mb"] - base for r in readings],
                style,
                alpha=0.45,
                label=f"{design}: RSS + Postgres memory added",
            )
        ax.axvline(MAX_CONNECTIONS, color="grey", linestyle=":", label="max_connections")
        ax.set_xlabel("open streams")
        ax.set_ylabel("MB")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("Server memory against open streams")
    axes[1].set_title(f"The same, up to {zoom:,.0f} streams")
    axes[1].set_xlim(0, zoom)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
