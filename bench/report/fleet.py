"""The fleet's section of results.md, and its target: Postgres pays for one reader."""

from __future__ import annotations

from typing import Any

from bench.report.tables import Row, cpu, ms, n, number, of, table, text

TARGET_US_PER_PROCESS = 3.0  # Postgres CPU per commit added by each process of a fleet

PHASES = of([
    ("processes", text("processes")),
    ("through", text("through")),
    ("readers", text("readers")),
    ("streams", lambda p: f"{p['live_streams']:,}"),
    ("commits/s", number("commit_rate")),
    ("lost", lambda p: f"{p['lost']:,} / {p['expected']:,}"),
    ("p50 / p99 ms", lambda p: f"{ms(p['p50_ms'])} / {ms(p['p99_ms'])}"),
    ("Postgres µs/commit", number("postgres_us_per_commit", 1)),
    ("ms/s", number("postgres_service_ms_per_s", 1)),
    ("besides writers", number("postgres_besides_writers_us_per_commit", 1)),
    ("Postgres CPU", lambda p: cpu(p["postgres_cpu_pct"])),
    ("each process's CPU", lambda p: " ".join(cpu(c) for c in p["process_cpu_pct"])),
    ("reader's CPU", lambda p: cpu(p["reader_cpu_pct"])),
    ("processes µs/event", number("processes_us_per_event", 1)),
    ("broker CPU", lambda p: cpu(p["broker_cpu_pct"])),
    ("broker µs/commit", number("broker_us_per_commit", 1)),
])  # fmt: skip


def targets(fleet: dict[str, Any] | None) -> list[Row]:
    if not fleet or fleet.get("fleet_us_per_process") is None:
        return []
    added = fleet["fleet_us_per_process"]
    sizes = ", ".join(str(p["processes"]) for p in fleet["fleet"])
    lost = sum(p["lost"] for p in fleet["fleet"])
    direct = fleet.get("direct_us_per_process")
    return [
        {
            "target": f"a fleet of {sizes} processes at {n(fleet['rate'])} commits/s: Postgres "
            f"CPU per commit grows by at most {TARGET_US_PER_PROCESS:.0f} µs per process, "
            "nothing lost",
            "measured": f"{added:+.1f} µs per process (without a broker: "
            f"{'n/a' if direct is None else f'{direct:+.1f}'} µs), {lost} lost",
            "ok": added <= TARGET_US_PER_PROCESS and lost == 0,
        }
    ]


def section(fleet: dict[str, Any]) -> list[str]:
    rows = [*fleet["fleet"], *fleet["direct"]]
    return [
        "## A fleet: one reader, through Redis",
        "",
        f"1 to {max(p['processes'] for p in rows)} `streamer serve` processes on one database, "
        f"single-row UPDATEs of {fleet['users']:,} users' rows at {n(fleet['rate'])} commits/s, "
        f"{fleet.get('streamed', fleet['users']):,} of them with one stream each, process k "
        f"streaming the users u with u % N = k; for "
        f"{fleet['seconds']:.0f} s. *broker*: one Redis, one process elected to read; *direct*: "
        "every process reads the database itself. Postgres µs/commit is the CPU of the "
        "backends of the processes' own connections (change connections, pools, the "
        "election's) per commit; Postgres CPU, that of all its processes but the writers' "
        "backends; processes µs/event is all the processes' "
        "CPU per event delivered. Postgres per commit, by least squares over the sizes: "
        f"{fleet['fleet_us_per_process']:+.1f} µs per process through the broker, "
        f"{direct_slope(fleet)} µs per process direct.",
        "",
        *table(PHASES, rows),
        "",
    ]


def direct_slope(fleet: dict[str, Any]) -> str:
    slope = fleet.get("direct_us_per_process")
    return "n/a" if slope is None else f"{slope:+.1f}"
