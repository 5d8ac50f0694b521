"""Diagnostics behind two of the benchmark's figures; not part of `make bench`.

python -m bench.investigations.diagnose memory [--streams 2000] [--plain]
    Where a stream's memory goes: the service's app runs in this process under
    tracemalloc while client processes open streams; prints the Python heap added per
    stream, by file and by line.

python -m bench.investigations.diagnose triggers [--seconds 4] [--rounds 4]
        [--only "bare;feed;..."] [--fsync-off]
    What each part of the feed's triggers costs a writer: pgbench against variants of
    the AFTER trigger, in alternating rounds, each variant's median TPS against the bare
    one-line pg_notify.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import shutil
import statistics
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from bench.agent import raise_nofile
from bench.clients import scratch_dir
from bench.harness import SECRET, Postgres, cleanup
from bench.load import Population, Receivers, plan
from bench.procfs import rss_bytes
from bench.writer_cost import (
    ENABLE_FILES,
    SCRIPT,
    alternating,
    configure,
    edit_notify_function,
    pgbench,
    seed,
)
from streamer.app import create_app
from streamer.config import Settings
from streamer.embedded import _free_port

# -- memory ---------------------------------------------------------------------------


def _short(filename: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


async def _memory(pg: Postgres, population: Population, streams: int, query: str) -> None:
    settings = Settings(database_url=pg.url, jwt_secret=SECRET)
    app = create_app(settings, pg.url, pg.url)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    users = len(population.users)
    records = scratch_dir()
    receivers = Receivers.streams(
        "diagnose", population, plan(users, streams // users + 2), port, 2, records, query
    )
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, receivers.open, 50)  # warm: imports, pools, caches
    await asyncio.sleep(0.5)
    gc.collect()
    rss0, before = rss_bytes(os.getpid()), tracemalloc.take_snapshot()
    await loop.run_in_executor(None, receivers.open, streams)
    await asyncio.sleep(1)
    gc.collect()
    rss1, after = rss_bytes(os.getpid()), tracemalloc.take_snapshot()
    receivers.stop()
    shutil.rmtree(records, ignore_errors=True)
    stats = after.compare_to(before, "lineno")
    total = sum(s.size_diff for s in stats)
    print(
        f"{streams} streams ({query or 'no query'}): Python heap +{total / streams:,.0f} B per "
        f"stream; RSS +{(rss1 - rss0) / streams:,.0f} B (tracemalloc's own bookkeeping "
        "included)\n\nby file:"
    )
    by_file: dict[str, int] = {}
    for s in stats:
        name = _short(s.traceback[0].filename)
        by_file[name] = by_file.get(name, 0) + s.size_diff
    for name, size in sorted(by_file.items(), key=lambda kv: -kv[1])[:20]:
        print(f"  {size / streams:7,.0f} B  {name}")
    print("\nby line:")
    for s in stats[:30]:
        frame = s.traceback[0]
        print(
            f"  {s.size_diff / streams:7,.0f} B  {s.count_diff / streams:5.1f} blocks  "
            f"{_short(frame.filename)}:{frame.lineno}"
        )
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(runner.cleanup(), 10)


def memory(streams: int, plain: bool) -> None:
    pg = Postgres(fast=True)
    try:
        pg.start()
        population = Population.create(pg, 100)
        tracemalloc.start(1)
        asyncio.run(_memory(pg, population, streams, "" if plain else "snapshot=1"))
    finally:
        cleanup(pg)


# -- triggers -------------------------------------------------------------------------

# The feed's fast path (an UPDATE that keeps its owner, a row that fits) written as one
# format() over row_to_json(new), instead of json_build_object over to_jsonb(new) - owner.
_FAST = """
    if tg_op = 'UPDATE' and new.user_id is not distinct from old.user_id then
        payload := format(
            '{"f":"files","o":"u","id":"%s","u":"%s","v":%s,"x":%s,"m":%s,"t":%s,"r":%s}',
            new.id, new.user_id, new.version, pg_current_xact_id(), HORIZON,
            extract(epoch from clock_timestamp()), row_to_json(new));
        if octet_length(payload) <= 7900 then
            perform pg_notify('streamer', payload);
            return RESULT;
        end if;
    end if;
    perform pg_notify('streamer', new.id::text);"""
_STAMP = """
    new.version := greatest(old.version + 1, pg_current_xact_id()::text::bigint * 1024);"""
_HORIZON = "pg_snapshot_xmin(pg_current_snapshot())"


@dataclass(frozen=True)
class Variant:
    body: str | None  # the AFTER (or BEFORE) trigger's body; None: as configure() leaves it
    stamp: bool = False  # keep the feed's BEFORE version stamp
    before: bool = False  # one BEFORE trigger instead of an AFTER one (it returns new)
    # The feed's own AFTER function with these (text, replacement) edits: what one part of
    # it costs. Only with body None.
    edits: tuple[tuple[str, str], ...] = ()


_NO_TZ = (""" SET "TimeZone" TO 'UTC'\n""", "")
_NO_SEARCH_PATH = (""" SET search_path TO 'pg_catalog', 'pg_temp'\n""", "")
_NO_DEFINER = (" SECURITY DEFINER\n", "")
_NO_TERMINAL = (
    "declare status text := new.status; begin streamer_notify.ended := "
    "coalesce((status in ('ready', 'failed'))::boolean, false); end;",
    "",
)
_NO_SIGNATURE = (
    "encode(sha256(streamer.signing_opad() || sha256(streamer.signing_ipad() || "
    "convert_to(body, 'UTF8'))), 'hex') || body",
    "body",
)
_ROW_TO_JSON = (
    "(((j - 'user_id' - 'version' - 'streamer_version') || "
    "jsonb_build_object('version', j->'streamer_version')))::text",
    "row_to_json(new)::text",
)
# How the trigger proved its origin before sql/007: an HMAC-SHA256 in plpgsql, on channel
# `streamer`, instead of the secret channel.
_HMAC = (
    "encode(sha256(streamer.signing_opad() || sha256(streamer.signing_ipad() || "
    "convert_to(body, 'UTF8'))), 'hex') || body"
)
_SIGNED = ("pg_notify(streamer.channel(), body)", f"pg_notify('streamer', {_HMAC})")
# A cheaper MAC than the HMAC: one md5 over the key (a constant of the plan) and the payload.
_MD5 = (
    "pg_notify(streamer.channel(), body)",
    "pg_notify('streamer', md5(encode(streamer.signing_ipad(), 'hex') || body) || body)",
)
_NO_HORIZON = ("txid_snapshot_xmin(txid_current_snapshot())", "0")


VARIANTS: dict[str, Variant] = {
    "none": Variant(None),
    "bare": Variant("perform pg_notify('streamer', new.id::text);"),
    "bare, 600-byte payload": Variant(
        "perform pg_notify('streamer', repeat('x', 564) || new.id::text);"
    ),
    "row_to_json payload": Variant("perform pg_notify('streamer', row_to_json(new)::text);"),
    "feed stamp + bare": Variant("perform pg_notify('streamer', new.id::text);", stamp=True),
    "feed, fast path": Variant(_FAST.replace("HORIZON", _HORIZON), stamp=True),
    "feed, fast path, no horizon": Variant(_FAST.replace("HORIZON", "0"), stamp=True),
    "feed, one BEFORE trigger": Variant(
        _STAMP + _FAST.replace("HORIZON", _HORIZON).replace("RESULT", "new"), before=True
    ),
    "feed": Variant(None),
    "feed, HMAC-signed": Variant(None, edits=(_SIGNED,)),
    "feed, keyed md5": Variant(None, edits=(_MD5,)),
    "feed, no SET TimeZone": Variant(None, edits=(_NO_TZ,)),
    "feed, no SET clauses": Variant(None, edits=(_NO_TZ, _NO_SEARCH_PATH)),
    "feed, invoker, no SET": Variant(None, edits=(_NO_TZ, _NO_SEARCH_PATH, _NO_DEFINER)),
    "feed, no terminal": Variant(None, edits=(_NO_TERMINAL,)),
    "feed, no horizon": Variant(None, edits=(_NO_HORIZON,)),
    "feed, row_to_json": Variant(None, edits=(_ROW_TO_JSON,)),
}


def _set_variant(pg: Postgres, name: str) -> None:
    variant = VARIANTS[name]
    if name == "none":
        configure(pg, "none")  # no trigger at all (body None means the feed's own)
        return
    configure(pg, "feed" if variant.body is None else "none")
    if variant.body is None:
        if variant.edits:
            edit_notify_function(pg, variant.edits)
        return
    result = "new" if variant.before else "null"
    body = variant.body.replace("RESULT", result)
    with pg.connect() as conn:
        if variant.stamp:
            conn.execute(ENABLE_FILES)
            conn.execute("drop trigger streamer_notify on files")
        conn.execute(
            "create or replace function bench_bare_notify() returns trigger language plpgsql "
            f"as $$ declare payload text; begin {body} return {result}; end $$"
        )
        conn.execute(
            f"create trigger bench_bare_notify {'before' if variant.before else 'after'} "
            "update on files for each row execute function bench_bare_notify()"
        )


def triggers(seconds: float, rounds: int, only: list[str], fsync_off: bool) -> None:
    unknown = [name for name in only if name not in VARIANTS]
    if unknown:
        raise SystemExit(f"no variant {unknown[0]!r}; there are: {', '.join(VARIANTS)}")
    pg = Postgres(fast=fsync_off)
    records = scratch_dir()
    try:
        pg.start()
        seed(pg)
        drain = Receivers.floor(pg, records)
        drain.open(1)
        script = Path(records) / "update.sql"
        script.write_text(SCRIPT)

        def one(name: str) -> float:
            _set_variant(pg, name)
            return pgbench(pg, script, seconds)["tps"]

        runs = alternating(only or list(VARIANTS), rounds, one)
        print_medians(runs, "bare", "the bare one-line pg_notify")
    finally:
        cleanup(pg)
        shutil.rmtree(records, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.investigations.diagnose",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    mem = commands.add_parser("memory", help="memory per stream, by line (tracemalloc)")
    mem.add_argument("--streams", type=int, default=2000)
    mem.add_argument("--plain", action="store_true", help="streams without ?snapshot=1")
    trig = commands.add_parser("triggers", help="writer cost of each part of the triggers")
    trig.add_argument("--seconds", type=float, default=4)
    trig.add_argument("--rounds", type=int, default=4)
    trig.add_argument("--only", default="", help="variants separated by ; (bare among them)")
    trig.add_argument("--fsync-off", action="store_true", help="Postgres with fsync off")
    args = parser.parse_args()
    raise_nofile()
    if args.command == "memory":
        memory(args.streams, args.plain)
    else:
        only = [name.strip() for name in args.only.split(";") if name.strip()]
        triggers(args.seconds, args.rounds, only, args.fsync_off)


if __name__ == "__main__":
    main()


def print_medians(runs: dict[str, list[float]], baseline: str, against: str) -> None:
    """Each variant's median TPS and its share of `baseline`'s, with every run; then the
    median of its round-by-round shares (each against `baseline`'s run of the same round,
    the nearest in time: on a machine others load, the steadier figure), with their range."""
    base = statistics.median(runs[baseline])
    width = max(len(name) for name in runs)
    print(f"\nmedian TPS, and against {against}; paired: median share per round [range]:")
    for name, tps_runs in runs.items():
        tps = statistics.median(tps_runs)
        spread = ", ".join(f"{t:,.0f}" for t in tps_runs)
        shares = [t / b for t, b in zip(tps_runs, runs[baseline], strict=True)]
        paired = f"{statistics.median(shares):6.1%} [{min(shares):.0%}-{max(shares):.0%}]"
        print(f"  {name:{width}s} {tps:8,.0f}  {tps / base:6.1%}   {paired}   ({spread})")
