"""Scenario 4: what the feed costs a writer, with either change source. pgbench, 4 clients,
single-row UPDATEs over 1,000 rows, with these on `files`:

- none:     no feed trigger at all;
- floor:    any WAL design's floor: no feed trigger, published, REPLICA IDENTITY FULL, read
            by Postgres's own pg_recvlogical;
- wal_idle: the feed with STREAMER_SOURCE=wal (published, the BEFORE stamp, tombstones at a
            delete or a change of owner only), nobody reading;
- wal:      the same, read by one WAL source as the service reads it (a walsender of its own);
- feed:     the feed with STREAMER_SOURCE=notify (the stamp, a signed NOTIFY AFTER);
- bare:     a one-line `pg_notify(channel, id)` AFTER trigger instead.

The table's own `updated_at` trigger and wal_level = logical in all; one bare LISTEN drains
the channel. Configurations alternate, so that a drift of the machine weighs on all alike;
the walsender's CPU is read from /proc. With fsync on, then off.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from bench.harness import DATABASE, Postgres
from bench.load import Context, Receivers
from bench.procfs import cpu_seconds
from streamer.sources.wal import WalSource

ROWS = 1000
CLIENTS = 4
CONFIGS = ("none", "floor", "wal_idle", "wal", "feed", "bare")
WAL_READERS = {"wal": 1}  # WAL sources reading during the run
FLOOR = "bench_floor"  # the floor's publication and slot
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
    "terminal => $$status in ('ready', 'failed')$$, replace => true)"  # its triggers again
)
DROP_FEED = tuple(
    f"drop trigger if exists {name} on files"
    for name in ("streamer_stamp", "streamer_notify", "streamer_deleted", "streamer_moved")
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
        conn.execute("alter table files replica identity default")
        # The source's own way first (under notify: nothing published), then the feed's
        # triggers as enable_feed makes them, dropped again where the config has none.
        source = "wal" if config in ("wal_idle", "wal") else "notify"
        conn.execute("select streamer.use_source(%s)", (source,))
        conn.execute(ENABLE_FILES)
        if config not in ("wal_idle", "wal", "feed"):
            for statement in DROP_FEED:
                conn.execute(statement)
        if config == "floor":
            if (
                conn.execute("select from pg_publication where pubname = %s", (FLOOR,)).fetchone()
                is None
            ):
                conn.execute(f"create publication {FLOOR} for table files")
            conn.execute("alter table files replica identity full")
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


class WalReaders:
    """`count` WAL sources (streamer/sources/wal.py) reading on an event loop of their own,
    as `count` service processes would, each with its own slot and walsender; what they
    receive is counted and dropped."""

    def __init__(self, pg: Postgres, count: int) -> None:
        self.dsn = pg.dsn("bench-wal-reader")
        self.count = count
        self.received = 0
        self.walsenders: list[int] = []
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="wal-readers", daemon=True)

    def _receive(self, _payload: object) -> None:
        self.received += 1

    def _run(self) -> None:
        try:
            asyncio.run(self._read())
        except BaseException as exc:  # reported by start()
            self._failed = exc
            self._ready.set()

    async def _read(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=2)
        sources = [WalSource(self.dsn, pool) for _ in range(self.count)]
        try:
            for source in sources:
                await source.connect(self._receive)
                assert source.pid is not None
                self.walsenders.append(source.pid)
            self._ready.set()
            await self._stop.wait()
        finally:
            for source in sources:
                await source.close()
            await pool.close()

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(60)
        if self._failed is not None:
            raise RuntimeError(f"WAL readers failed: {self._failed!r}")

    def cpu(self) -> float:
        """CPU seconds the walsenders have used so far."""
        return sum(cpu_seconds(pid) for pid in self.walsenders)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


@contextlib.contextmanager
def recvlogical(pg: Postgres) -> Iterator[None]:
    """Postgres's own reader of the floor's row changes, with a slot of its own."""
    command = [
        str(pg.pgbench()).replace("pgbench", "pg_recvlogical"), "-d", pg.url,
        "--slot", FLOOR, "--create-slot", "--start", "-P", "pgoutput",
        "-o", "proto_version=1", "-o", f"publication_names={FLOOR}",
        "-f", "/dev/null", "-F", "1", "-s", "1",
    ]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    try:
        with pg.connect() as conn:  # reading once its slot is there
            while not conn.execute(
                "select 1 from pg_replication_slots where slot_name = %s and active", (FLOOR,)
            ).fetchone():
                time.sleep(0.05)
        yield
    finally:
        process.terminate()
        process.wait(10)
        with pg.connect() as conn:
            conn.execute("select pg_drop_replication_slot(%s)", (FLOOR,))


@contextlib.contextmanager
def reading(pg: Postgres, config: str) -> Iterator[WalReaders | None]:
    if config == "floor":
        with recvlogical(pg):
            yield None
        return
    count = WAL_READERS.get(config, 0)
    if not count:
        yield None
        return
    readers = WalReaders(pg, count)
    readers.start()
    try:
        yield readers
    finally:
        readers.stop()


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


def edit_notify_function(pg: Postgres, edits: Sequence[tuple[str, str]]) -> None:
    """Replace text in the feed's AFTER function as migrated (pg_get_functiondef's text),
    to measure what a part of it costs."""
    with pg.connect() as conn:
        row = conn.execute("select pg_get_functiondef('streamer.files_notify'::regproc)").fetchone()
        assert row is not None
        definition: str = row[0]
        for text, replacement in edits:
            assert text in definition, f"{text!r} is not in the trigger"
            definition = definition.replace(text, replacement)
        conn.execute(definition)


def alternating(
    names: Sequence[str], rounds: int, one: Callable[[str], float]
) -> dict[str, list[float]]:
    """`one(name)` for every name, `rounds` times, forwards then backwards, so that a drift
    in the machine's load weighs on every variant alike; each result printed as it comes."""
    runs: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else list(reversed(names)):
            runs[name].append(one(name))
            print(f"  {name}: {runs[name][-1]:,.0f} TPS", flush=True)
    return runs


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
            with reading(pg, config) as readers:
                cpu0, t0 = (readers.cpu() if readers else 0.0), time.monotonic()
                run = pgbench(pg, script, seconds / ROUNDS)
                if readers is not None:
                    # Of one core, per walsender: what each service process costs Postgres.
                    busy = (readers.cpu() - cpu0) / (time.monotonic() - t0) / readers.count
                    run["walsender_cpu_pct"] = 100 * busy
            runs[config].append(run)
    out: dict[str, Any] = {}
    for config, parts in runs.items():
        out[config] = {
            "tps": round(statistics.median(p["tps"] for p in parts), 1),
            "latency_ms": round(statistics.median(p["latency_ms"] for p in parts), 3),
            "runs_tps": [round(p["tps"]) for p in parts],
        }
        if config in WAL_READERS:
            cpu = statistics.median(p["walsender_cpu_pct"] for p in parts)
            out[config]["walsender_cpu_pct"] = round(cpu, 1)
            # At this commit rate; a walsender's work grows with the WAL written.
            out[config]["walsender_cpu_pct_per_1000_tps"] = round(
                1000 * cpu / out[config]["tps"], 2
            )
    for config in ("floor", "wal_idle", "wal", "feed", "bare"):
        out[f"{config}_vs_none"] = round(out[config]["tps"] / out["none"]["tps"], 3)
    out["feed_vs_bare"] = round(out["feed"]["tps"] / out["bare"]["tps"], 3)
    out["wal_vs_floor"] = round(out["wal"]["tps"] / out["floor"]["tps"], 3)
    out["wal_vs_feed"] = round(out["wal"]["tps"] / out["feed"]["tps"], 3)
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
            configure(ctx.pg, "feed")  # and the source back to notify
            drain.stop()
    return results
