"""The targets, each judged from results.json: a row of what, measured, pass or miss."""

from __future__ import annotations

import math
from typing import Any

from bench.report import crowd, fleet, shapes
from bench.report.tables import Column, Row, ms, n, refused, table, verdict

POOL_SIZE = 4  # the service's default STREAMER_POOL_SIZE
TARGET_LATENCY_RATIO = 1.5
TARGET_P99_MS = 5.0
TARGET_FANOUT = 50_000
TARGET_FANOUT_P99_MS = 100.0
TARGET_STREAMS = 10_000
TARGET_KB_PER_STREAM = 16.0
TARGET_WRITER_RATIO = 0.90  # notify's feed, of a bare one-line NOTIFY trigger
TARGET_WAL_IDLE_RATIO = 0.92  # STREAMER_SOURCE=wal, nobody reading: of no trigger at all
TARGET_WAL_FLOOR_RATIO = 0.95  # STREAMER_SOURCE=wal, the service reading: of the floor
TARGET_BIG_ROWS_PER_S = 33_000.0  # 200,000 rows in 6 s
TARGET_BIG_RSS_MB = 100.0
TARGET_BIG_P99_MS = 100.0
BIG_VARIANTS = (
    ("snapshot", "snapshot to `synced`"),
    ("resume", "resume over every row changed, to `synced`"),
    ("recovery", "listener recovery, to the last row"),
)

COLUMNS = (
    Column("target", lambda row: row["target"]),
    Column("measured", lambda row: row["measured"]),
    Column("result", lambda row: verdict(row["ok"])),
)


def target(what: str, measured: str, ok: bool) -> Row:
    return {"target": what, "measured": measured, "ok": ok}


def section(results: dict[str, Any]) -> list[str]:
    rows = [
        *latency(results.get("latency")),
        *fanout(results.get("fanout")),
        *capacity(results.get("capacity")),
        *writer_cost(results.get("writer_cost")),
        *big_user(results.get("big_user")),
        *fleet.targets(results.get("fleet")),
        *shapes.targets(results.get("shapes")),
        *crowd.targets(results.get("crowd")),
        *connections(results),
    ]
    return ["## Targets", "", *table(COLUMNS, rows), ""] if rows else []


def latency(latency: dict[str, Any] | None) -> list[Row]:
    if not latency:
        return []
    rows = []
    floor = next(p for p in latency["phases"] if p["design"] == "floor")
    for p in latency["phases"]:
        if p["design"] != "service":
            continue
        shape = f"latency, {p['streams']:,} streams, {p['users']:,} users x {p['tabs']} tabs"
        ratio = p["p50_ms"] / floor["p50_ms"] if floor["p50_ms"] > 0 else math.inf
        ack_ratio = p["ack_p50_ms"] / floor["ack_p50_ms"] if floor["ack_p50_ms"] > 0 else math.inf
        rows += [
            target(
                f"{shape}: p50 within {TARGET_LATENCY_RATIO}x the floor",
                f"{ms(p['p50_ms'])} ms vs {ms(floor['p50_ms'])} ms = {ratio:.2f}x (from COMMIT "
                f"returned: {ms(p['ack_p50_ms'])} vs {ms(floor['ack_p50_ms'])} ms = "
                f"{ack_ratio:.1f}x)",
                ratio <= TARGET_LATENCY_RATIO,
            ),
            target(
                f"{shape}: p99 under {TARGET_P99_MS:.0f} ms",
                f"{ms(p['p99_ms'])} ms (from COMMIT returned: {ms(p['ack_p99_ms'])} ms)",
                p["p99_ms"] < TARGET_P99_MS,
            ),
            target(
                f"{shape}: nothing lost",
                f"{p['lost']:,} lost of {p['expected']:,} "
                f"({p['misrouted']} misrouted, {p['duplicates']} duplicates)",
                p["lost"] == 0 and p["misrouted"] == 0 and p["live_streams"] == p["streams"],
            ),
        ]
    return rows


def fanout(fanout: dict[str, Any] | None) -> list[Row]:
    if not fanout:
        return []
    best = fanout["service"]["best"]
    return [
        target(
            f"fan-out, {fanout['users']} users x {fanout['tabs']} tabs: {TARGET_FANOUT:,} "
            f"delivered events/s or more at p99 under {TARGET_FANOUT_P99_MS:.0f} ms",
            f"{n(best['delivered_per_s'])} events/s (p99 {ms(best['p99_ms'])} ms)"
            if best
            else "no step within the limit",
            best is not None and best["delivered_per_s"] >= TARGET_FANOUT,
        )
    ]


def capacity(capacity: dict[str, Any] | None) -> list[Row]:
    if not capacity:
        return []
    top = capacity["service"]["readings"][-1]
    per = top.get("rss_per_stream_kb")
    return [
        target(
            f"capacity: {TARGET_STREAMS:,} open streams in one process",
            f"{top['streams']:,} open ({refused(top.get('refused', {}))} refused)",
            top["streams"] >= TARGET_STREAMS,
        ),
        target(
            f"capacity: {TARGET_KB_PER_STREAM:.0f} KB RSS per stream or less",
            f"{n(per, 1)} KB at {top['streams']:,} streams",
            per is not None and per <= TARGET_KB_PER_STREAM,
        ),
    ]


def writer_cost(writer: dict[str, Any] | None) -> list[Row]:
    rows: list[Row] = []
    for key, label in (("fsync_on", "fsync on"), ("fsync_off", "fsync off")):
        w = (writer or {}).get(key)
        if not w:
            continue
        rows.append(
            target(
                f"writer cost ({label}): feed triggers keep {TARGET_WRITER_RATIO:.0%} or more "
                "of the bare-NOTIFY TPS",
                f"{w['feed_vs_bare']:.1%} ({n(w['feed']['tps'])} vs {n(w['bare']['tps'])} TPS)",
                w["feed_vs_bare"] >= TARGET_WRITER_RATIO,
            )
        )
        if "wal_vs_floor" in w:
            rows += [
                target(
                    f"writer cost ({label}): with STREAMER_SOURCE=wal and nobody reading, the "
                    f"feed keeps {TARGET_WAL_IDLE_RATIO:.0%} or more of the no-trigger TPS",
                    f"{w['wal_idle_vs_none']:.1%} ({n(w['wal_idle']['tps'])} vs "
                    f"{n(w['none']['tps'])} TPS)",
                    w["wal_idle_vs_none"] >= TARGET_WAL_IDLE_RATIO,
                ),
                target(
                    f"writer cost ({label}): with STREAMER_SOURCE=wal and the service reading, "
                    f"the feed keeps {TARGET_WAL_FLOOR_RATIO:.0%} or more of the floor's TPS",
                    f"{w['wal_vs_floor']:.1%} ({n(w['wal']['tps'])} vs {n(w['floor']['tps'])} TPS)",
                    w["wal_vs_floor"] >= TARGET_WAL_FLOOR_RATIO,
                ),
            ]
    return rows


def big_user(big: dict[str, Any] | None) -> list[Row]:
    if not big:
        return []
    rows = []
    for key, label in BIG_VARIANTS:
        if big.get(key):
            rows += big_user_variant(f"{big['rows']:,}-row user, {label}", key, big)
    if big.get("stalled"):
        rows += big_user_stalled(big)
    return rows


def big_user_variant(name: str, key: str, big: dict[str, Any]) -> list[Row]:
    v, other = big[key], big[key]["other"]
    limit_s = big["rows"] / TARGET_BIG_ROWS_PER_S
    at_synced = v["updates_at_synced"] if key != "recovery" else v["updates"]
    return [
        target(
            f"{name}: within {limit_s:.1f} s ({TARGET_BIG_ROWS_PER_S:,.0f} rows/s)",
            f"{n(v['seconds'], 2)} s = {n(v['rows_per_s'])} rows/s",
            v["seconds"] is not None and v["seconds"] <= limit_s,
        ),
        target(
            f"{name}: the service's peak RSS growth under {TARGET_BIG_RSS_MB:.0f} MB",
            f"+{n(v['rss_peak_growth_mb'], 1)} MB",
            v["rss_peak_growth_mb"] < TARGET_BIG_RSS_MB,
        ),
        target(
            f"{name}: another user's p99 under {TARGET_BIG_P99_MS:.0f} ms meanwhile",
            f"{ms(other['p99_ms'])} ms (max {ms(other['max_ms'])}, {other['commits']} "
            f"commits, {other['lost']} lost)",
            other["p99_ms"] < TARGET_BIG_P99_MS and other["lost"] == 0,
        ),
        target(
            f"{name}: every row once, then `synced`"
            if key != "recovery"
            else f"{name}: every row, on the open stream",
            f"{v['rows_received']:,} rows in {n(at_synced)} file-update events, "
            f"{v['reconnects']} reconnects ({v['ended']})",
            v["whole"],
        ),
    ]


def big_user_stalled(big: dict[str, Any]) -> list[Row]:
    stalled, probe = big["stalled"], big["stalled"]["probe_s"]
    return [
        target(
            f"{big['rows']:,}-row user, a snapshot whose client stops reading: memory held "
            f"under {TARGET_BIG_RSS_MB:.0f} MB",
            f"+{n(stalled['rss_held_mb'], 1)} MB after {stalled['stall_s']:.0f} s "
            f"(peak +{n(stalled['rss_peak_growth_mb'], 1)} MB)",
            stalled["rss_held_mb"] < TARGET_BIG_RSS_MB,
        ),
        target(
            f"{big['rows']:,}-row user, {stalled['stalled_streams']} snapshots whose client "
            "stops reading: another user's snapshot still opens",
            "no `synced` within 10 s" if probe is None else f"`synced` in {probe:.2f} s",
            probe is not None,
        ),
    ]


def connections(results: dict[str, Any]) -> list[Row]:
    """The most Postgres connections the service held, over every service phase."""
    phases = results.get("latency", {}).get("phases", [])
    steps = results.get("fanout", {}).get("service", {}).get("steps", [])
    seen = [p["pg_connections"] for p in phases if p["design"] == "service"]
    seen += [step["pg_connections"] for step in steps]
    if capacity := results.get("capacity", {}).get("service"):
        seen.append(capacity["peak_pg_connections"])
    if not seen:
        return []
    return [
        target(
            f"Postgres connections held by the service: at most 1 + pool size ({1 + POOL_SIZE})",
            f"{max(seen)} at most, over every service phase",
            max(seen) <= 1 + POOL_SIZE,
        )
    ]
