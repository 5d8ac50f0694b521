"""Scenario 4: what the feed costs a writer. pgbench, 4 clients, single-row UPDATEs over
1,000 rows, with three sets of triggers on `files`:

- feed:  the feed's own (version stamp BEFORE, tombstone + NOTIFY with the row AFTER);
- bare:  the feed's dropped, replaced by a one-line `pg_notify(channel, id)` AFTER trigger;
- none:  no notify trigger at all.

The table's own `updated_at` trigger stays in all three. One bare LISTEN connection drains
the channel throughout, as the service would. Configurations run in the order
feed, bare, none, none, bare, feed (half the time each), so that a drift of the machine
over the run weighs on all three alike. With fsync on, and again with it off.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import DATABASE, Postgres
from bench.load import Context, Receivers

ROWS = 1000
CLIENTS = 4
CONFIGS = ("feed", "bare", "none")
ROUNDS = 5
ROW_ID = "('00000000-0000-0000-0000-' || lpad(:n::text, 12, '0'))::uuid"
SCRIPT = f"""\\set n random(1, {ROWS})
update files set progress = (random()*100)::int where id = {ROW_ID};
"""
BARE_NOTIFY = """
create or replace function bench_bare_notify() returns trigger language plpgsql as $$
begin
    perform pg_notify('streamer', coalesce(new.id, old.id)::text);
    return null;
end $$;
"""
# The files feed as sql/003_feeds.sql enables it.
ENABLE_FILES = (
    "select streamer.enable_feed('files', owner_column => 'user_id', event => 'file', "
    "terminal => $$status in ('ready', 'failed')$$)"
)
DROP_FEED = (
    "drop trigger if exists streamer_stamp on files",
    "drop trigger if exists streamer_notify on files",
)
_TPS = re.compile(r"tps = ([\d.]+) \(without initial connection time\)")
_LATENCY = re.compile(r"latency average = ([\d.]+) ms")


@dataclass(frozen=True)
class Settings:
    seconds: float  # per configuration, over its ROUNDS runs
    fsync_off_seconds: float  # the same with fsync off; 0: skip


FULL = Settings(15, 10)  # 5 runs of 3 s (2 s) per configuration
QUICK = Settings(3, 0)


def configure(pg: Postgres, config: str) -> None:
    with pg.connect() as conn:
        conn.execute("drop trigger if exists bench_bare_notify on files")
        for statement in DROP_FEED:
            conn.execute(statement)
        if config == "feed":
            conn.execute(ENABLE_FILES)
        elif config == "bare":
            conn.execute(BARE_NOTIFY)
            conn.execute(
                "create trigger bench_bare_notify after insert or update or delete on files "
                "for each row execute function bench_bare_notify()"
            )


def seed(pg: Postgres) -> None:
    """The rows pgbench updates, with ids it can compute from 1..ROWS."""
    with pg.connect() as conn:
        conn.execute(
            f"insert into files (id, user_id, filename) "
            f"select ('00000000-0000-0000-0000-' || lpad(n::text, 12, '0'))::uuid, "
            f"gen_random_uuid(), 'pgbench-' || n from generate_series(1, {ROWS}) n "
            f"on conflict (id) do nothing"
        )
        conn.execute("vacuum analyze files")


def pgbench(pg: Postgres, script: Path, seconds: float) -> dict[str, float]:
    with pg.connect() as conn:
        conn.execute("checkpoint")
    port = str(pg.server.port)
    command = [
        str(pg.pgbench()), "-h", "127.0.0.1", "-p", port, "-U", "postgres", "-n",
        "-c", str(CLIENTS), "-j", "2", "-T", str(max(1, round(seconds))), "-M", "prepared",
        "-f", str(script), DATABASE,
    ]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + 120, check=False
    )
    tps = _TPS.search(result.stdout)
    latency = _LATENCY.search(result.stdout)
    if result.returncode != 0 or tps is None:
        raise RuntimeError(f"pgbench failed:\n{result.stdout}\n{result.stderr}")
    return {
        "tps": float(tps.group(1)),
        "latency_ms": float(latency.group(1)) if latency else float("nan"),
    }


def set_fsync(pg: Postgres, on: bool) -> None:
    with pg.connect() as conn:
        if on:
            conn.execute("alter system reset fsync")
            conn.execute("alter system reset synchronous_commit")
        else:
            conn.execute("alter system set fsync = off")
            conn.execute("alter system set synchronous_commit = off")
        conn.execute("select pg_reload_conf()")
    time.sleep(0.5)


def measure(pg: Postgres, script: Path, seconds: float) -> dict[str, Any]:
    """Each configuration `ROUNDS` times for seconds / ROUNDS, in alternating order; the
    median run, so that a burst of someone else's load on the machine does not decide."""
    runs: dict[str, list[dict[str, float]]] = {c: [] for c in CONFIGS}
    for round_ in range(ROUNDS):
        for config in CONFIGS if round_ % 2 == 0 else tuple(reversed(CONFIGS)):
            configure(pg, config)
            runs[config].append(pgbench(pg, script, seconds / ROUNDS))
    out: dict[str, Any] = {}
    for config, parts in runs.items():
        out[config] = {
            "tps": round(statistics.median(p["tps"] for p in parts), 1),
            "latency_ms": round(statistics.median(p["latency_ms"] for p in parts), 3),
            "runs_tps": [round(p["tps"]) for p in parts],
        }
    out["feed_vs_bare"] = round(out["feed"]["tps"] / out["bare"]["tps"], 3)
    out["feed_vs_none"] = round(out["feed"]["tps"] / out["none"]["tps"], 3)
    out["bare_vs_none"] = round(out["bare"]["tps"] / out["none"]["tps"], 3)
    return out


def run(ctx: Context) -> dict[str, Any]:
    s = QUICK if ctx.quick else FULL
    seed(ctx.pg)
    results: dict[str, Any] = {"clients": CLIENTS, "rows": ROWS, "seconds": s.seconds}
    drain = Receivers.floor(ctx.pg, ctx.records)
    with tempfile.TemporaryDirectory(prefix="streamer-pgbench-") as tmp:
        script = Path(tmp) / "update.sql"
        script.write_text(SCRIPT)
        try:
            drain.open(1)
            if ctx.pg.fast:
                results["fsync_off"] = measure(ctx.pg, script, s.seconds)
            else:
                results["fsync_on"] = measure(ctx.pg, script, s.seconds)
                if s.fsync_off_seconds:
                    set_fsync(ctx.pg, on=False)
                    try:
                        results["fsync_off"] = measure(ctx.pg, script, s.fsync_off_seconds)
                    finally:
                        set_fsync(ctx.pg, on=True)
        finally:
            configure(ctx.pg, "feed")
            drain.stop()
    return results
