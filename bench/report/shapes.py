"""The shaped streams' section of results.md, and its targets."""

from __future__ import annotations

from typing import Any

from bench.report.tables import Row, cpu, ms, n


def targets(shapes: dict[str, Any] | None) -> list[Row]:
    if not shapes or shapes.get("cpu_ratio") is None:
        return []
    plain, shaped = shapes["plain"], shapes["shaped"]
    indexed = shapes["snapshot"]["with_index"]
    lost = plain["lost"] + shaped["lost"]
    return [
        {
            "target": f"{n(shapes['users'] * shapes['tabs'])} streams over {shapes['shapes']} "
            f"shapes at {n(shapes['rate'])} commits/s: service CPU per delivered event within "
            f"{shapes['target_ratio']}x of plain streams, nothing lost",
            "measured": f"{shapes['cpu_ratio']}x ({shaped['server_us_per_event']} vs "
            f"{plain['server_us_per_event']} µs/event), {lost} lost",
            "ok": shapes["cpu_ratio"] <= shapes["target_ratio"] and lost == 0,
        },
        {
            "target": f"a filtered snapshot of a {n(shapes['snapshot']['rows'])}-row user is "
            "served by an index",
            "measured": f"{indexed['seconds']} s for {n(indexed['rows_sent'])} rows; "
            f"{indexed['plan']}",
            "ok": "using files_user_status" in indexed["plan"],
        },
    ]


def section(shapes: dict[str, Any]) -> list[str]:
    snap = shapes["snapshot"]
    lines = [
        "## Shaped streams",
        "",
        f"{n(shapes['users'])} users x {shapes['tabs']} tabs, one-row commits at "
        f"{n(shapes['rate'])}/s; *plain*: every stream unshaped; *shaped*: {shapes['shapes']} "
        "distinct filters (every row matches them, so both deliver the same events), a "
        "user's tabs under different ones (each change evaluated and framed per shape).",
        "",
        "| streams | delivered | lost | p50 / p99 ms | service CPU | µs/event |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("plain", "shaped"):
        p = shapes[name]
        lines.append(
            f"| {name}: {n(p['live_streams'])} | {n(p['received'])} | {p['lost']} | "
            f"{ms(p['p50_ms'])} / {ms(p['p99_ms'])} | {cpu(p['server_cpu_pct'])} | "
            f"{p['server_us_per_event']} |"
        )
    lines += [
        "",
        f"A user with {n(snap['rows'])} rows, {n(snap['failed'])} failed: "
        "`?snapshot=1&status=eq.failed`, request to `synced` (median of 3):",
        "",
        "| | seconds | rows | plan |",
        "|---|---|---|---|",
    ]
    for name in ("without_index", "with_index"):
        s = snap[name]
        lines.append(
            f"| {name.replace('_', ' ')} | {s['seconds']} | {n(s['rows_sent'])} | {s['plan']} |"
        )
    return [*lines, ""]
