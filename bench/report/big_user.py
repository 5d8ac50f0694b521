"""Section 5 of results.md: a user with many rows beside everyone else."""

from __future__ import annotations

from typing import Any

from bench.report.sections import PROFILE, files, profile_rows
from bench.report.tables import cpu, ms, n, number, of, table, text
from bench.report.targets import BIG_VARIANTS


def other(o: dict[str, Any]) -> str:
    """The other user's latency over a span."""
    return (
        f"{ms(o['p50_ms'])} / {ms(o['p99_ms'])} / {ms(o['max_ms'])} ms "
        f"({o['commits']} commits, {o['lost']} lost)"
    )


VARIANTS = of([
    ("variant", text("variant")),
    ("seconds", number("seconds", 2)),
    ("rows/s", number("rows_per_s")),
    ("first byte s", number("first_byte_s", 2)),
    ("RSS MB", lambda v: f"+{n(v['rss_peak_growth_mb'], 1)}"),
    ("other user", lambda v: other(v["other"])),
    ("rows", lambda v: f"{v['rows_received']:,}"),
    ("reconnects", text("reconnects")),
    ("whole", lambda v: "yes" if v["whole"] else "no"),
    ("server CPU s", number("server_cpu_s", 1)),
    ("others' CPU", lambda v: cpu(v["machine"]["others_pct"])),
])  # fmt: skip


def section(big: dict[str, Any]) -> list[str]:
    n_rows = big["rows"]
    rows = [{"variant": key, **big[key]} for key, _ in BIG_VARIANTS if big.get(key)]
    return [
        "## 5. A user with many rows beside everyone else",
        "",
        f"One user with {n_rows:,} rows (a 200-byte `error_message` each, {big['row_bytes']} "
        f"bytes of JSON per row), inserted by the table's owner in one statement "
        f"({big['import_s']:.1f} s). Meanwhile another user's stream is live and one of its "
        f"rows is updated every {1000 / big['rate']:.0f} ms, one row per commit. Each variant "
        "runs against a fresh service. *Seconds*: the big user's request to `synced` (for the "
        "recovery: from the service's LISTEN being back to the last row at the open stream). "
        "*RSS*: the service's peak over its RSS just before, sampled every 10 ms. "
        "*Other user*: p50 / p99 / max from the midpoint of COMMIT to the event parsed, "
        "over the same span.",
        "",
        *table(VARIANTS, rows),
        "",
        "*first byte*: the response's head (the service sends it with the first batch). "
        "*whole*: every row exactly once as `file-update`, then `synced`, nothing else, on "
        "the one stream. *others' CPU*: share of the machine used by processes not of this "
        "run, meanwhile.",
        *resume(big),
        *recovery(big),
        *stalled(big),
        *profile(big),
        *logged(big),
        "",
    ]


def resume(big: dict[str, Any]) -> list[str]:
    resume = big.get("resume")
    if not resume or "other_during_update" not in resume:
        return []
    floor = resume.get("floor_during_update")
    beside = f" (at a bare LISTEN beside the service: {other(floor)})" if floor else ""
    return [
        "",
        f"Resume: the {big['rows']:,} rows were updated in one transaction "
        f"({resume['update_s']:.1f} s); the service received a notification for each (their "
        f"owner had no stream open) and took {resume['notifications_s']:.1f} s to be done "
        f"with them. The other user meanwhile: {other(resume['other_during_update'])}{beside}"
        "; the service's listener reconnected "
        f"{resume['metrics'].get('listener_reconnects', 0):.0f} times (a commit it missed "
        "reaches the stream as the row's latest state, its recovery: counted here as lost).",
    ]


def recovery(big: dict[str, Any]) -> list[str]:
    recovery = big.get("recovery")
    if not recovery:
        return []
    return [
        "",
        f"Recovery: the LISTEN connection was terminated and the database refused new "
        f"connections for {recovery['outage_s']:.1f} s while the {big['rows']:,} rows were "
        f"updated in one transaction ({recovery['update_s']:.1f} s). The listener was back "
        f"{n(recovery['relisten_s'], 2)} s after the database (its reconnect backoff); "
        f"from the database back to the last row: {n(recovery['from_open_s'], 2)} s. The "
        "other user's commits while it was down reached its stream as the row's latest state "
        "(a catch-up sends rows, not changes), so they are left out of its latency; the "
        "stream's cuts for not reading: "
        f"{recovery['metrics'].get('slow_client_disconnects', 0):.0f}.",
    ]


def stalled(big: dict[str, Any]) -> list[str]:
    stalled = big.get("stalled")
    if not stalled:
        return []
    probe = stalled["probe_s"]
    synced = "no `synced` within 10 s" if probe is None else f"`synced` in {probe:.2f} s"
    return [
        "",
        f"Stalled: a snapshot whose client read nothing for {stalled['stall_s']:.0f} s held "
        f"+{n(stalled['rss_held_mb'], 1)} MB of the service's RSS; its database "
        f"transaction had then been open {n(stalled['transaction_open_s'], 1)} s. With "
        f"{stalled['stalled_streams']} such streams (the pool's size), another user's "
        f"snapshot got {synced} and /readyz answered {stalled['readyz']}. Read again, the "
        f"first stalled stream ended: {stalled['after']} "
        f"({n(stalled['updates_at_synced'])} file-update events before it).",
    ]


def profile(big: dict[str, Any]) -> list[str]:
    profile = (big.get("resume") or {}).get("profile")
    if not profile or "own" not in profile:
        return []
    return [
        "",
        "py-spy on the service as the resume's notifications arrived "
        f"({profile['busy_pct']:.0f}% of samples with the event loop busy; {files(profile)}):",
        "",
        *table(PROFILE, profile_rows(profile, 8)),
    ]


def logged(big: dict[str, Any]) -> list[str]:
    lines = [
        f"- {key}: `{line}`"
        for key, _ in (*BIG_VARIANTS, ("stalled", ""))
        for line in big.get(key, {}).get("log", [])
    ]
    if not lines:
        return []
    return ["", "What the service logged (cuts, recoveries, warnings):", "", *lines]
