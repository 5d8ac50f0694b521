"""`make bench`: every scenario against a real Postgres and the real service, side by side
with the floor and the naive design; writes bench/results/ (results.md, results.json, PNGs).

    python -m bench.run                      # everything, full scale (~20 min: the crowd 10)
    python -m bench.run --quick              # a smoke run at small scale
    python -m bench.run --only latency,capacity
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import (
    big_user,
    capacity,
    crowd,
    fanout,
    fleet,
    latency,
    report,
    shapes,
    sources,
    writer_cost,
)
from bench.agent import raise_nofile
from bench.clients import scratch_dir
from bench.harness import REPO, Interrupted, Postgres, cleanup, install_signal_handlers
from bench.load import Context, Population, Writer
from bench.procfs import loadavg, machine, machine_busy, machine_share

RESULTS = Path(__file__).parent / "results"
SCENARIOS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "latency": latency.run,
    "fanout": fanout.run,
    "capacity": capacity.run,
    "writer_cost": writer_cost.run,
    "sources": sources.run,
    "big_user": big_user.run,
    "fleet": fleet.run,
    "shapes": shapes.run,
    "crowd": crowd.run,  # last: it adds (and then deletes) its own users' rows
}
POPULATION = 1000  # users, each with one row: enough for every scenario
WRITER_CONNECTIONS = 8


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small scale, a few seconds each")
    parser.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"comma-separated scenarios (default: all of {','.join(SCENARIOS)})",
    )
    parser.add_argument(
        "--fsync-off",
        action="store_true",
        help="run Postgres with fsync off (default: on, as deployed)",
    )
    parser.add_argument(
        "--no-profile", action="store_true", help="skip the py-spy profiles of the service"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the results")
    parser.add_argument(
        "--service-code",
        type=Path,
        default=REPO,
        help="measure the service of another checkout (e.g. a git worktree of an older "
        "commit): its streamer/, and its own migrations on the fresh database",
    )
    parser.add_argument(
        "--crowd-users",
        type=int,
        help="the crowd's users, 2 tabs each (default 50,000; 1,000 with --quick)",
    )
    parser.add_argument(
        "--crowd-workers", type=int, help="the crowd's `--workers` (default 6; 2 with --quick)"
    )
    parser.add_argument(
        "--crowd-processes",
        type=int,
        help="the crowd's client processes, one source address each (default 8; 2 with --quick)",
    )
    args = parser.parse_args(argv)
    args.scenarios = [name.strip() for name in args.only.split(",") if name.strip()]
    args.service_code = args.service_code.resolve()
    if not (args.service_code / "streamer").is_dir():
        parser.error(f"--service-code: no streamer/ in {args.service_code}")
    unknown = [name for name in args.scenarios if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    return args


def git_commit(code: Path = REPO) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=code,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def uncommitted(code: Path = REPO) -> list[str]:
    """Files of the service with changes not committed: what was measured is the tree."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", "streamer", "sql"],
            capture_output=True,
            text=True,
            check=True,
            cwd=code,
        )
    except (OSError, subprocess.CalledProcessError):
        return []
    return [line[3:] for line in out.stdout.splitlines() if line.strip()]


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def metadata(args: argparse.Namespace, nofile: int) -> dict[str, Any]:
    """What was measured, where, and how busy the machine was before the start."""
    busy_before = machine_busy(2.0)
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "commit": git_commit(args.service_code),
        "uncommitted": uncommitted(args.service_code),
        "service_code": None if args.service_code == REPO else str(args.service_code),
        "quick": args.quick,
        "fsync": not args.fsync_off,
        "nofile": nofile,
        "load_before": {"loadavg": loadavg(), "busy_pct": round(100 * busy_before, 1)},
    }


def scenario(name: str, ctx: Context) -> dict[str, Any]:
    """One scenario's results, with its time and how busy the machine was meanwhile."""
    log(f"{name} ...")
    t0 = time.monotonic()
    with machine_share([os.getpid(), ctx.pg.postmaster_pid()]) as share:
        result = SCENARIOS[name](ctx)
    result["seconds_taken"] = round(time.monotonic() - t0, 1)
    result["machine"] = {**share, "loadavg": loadavg()[0]}
    log(
        f"{name} done in {result['seconds_taken']:.0f} s; machine {share['busy_pct']:.0f}% "
        f"busy, {share['others_pct']:.0f}% by other processes"
    )
    return result


def write(results: dict[str, Any], out: Path) -> None:
    text = json.dumps(results, indent=1)
    # Lists of numbers (the CDFs) on one line each.
    text = re.sub(
        r"\[\s+([-\d.,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text
    )
    (out / "results.json").write_text(text + "\n")
    report.write(results, out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_signal_handlers()
    nofile = raise_nofile()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    meta = metadata(args, nofile)
    log(
        f"machine busy {meta['load_before']['busy_pct']:.0f}% before start (load average "
        f"{meta['load_before']['loadavg'][0]:.2f}); scenarios: {', '.join(args.scenarios)}"
    )
    results: dict[str, Any] = {"meta": meta}
    records = scratch_dir()
    pg: Postgres | None = None
    try:
        pg = Postgres(fast=args.fsync_off)
        pg.start(args.service_code)
        population = Population.create(pg, POPULATION)
        writer = Writer(pg, population, WRITER_CONNECTIONS, records)
        ctx = Context(
            pg,
            population,
            writer,
            records,
            str(args.out),
            args.quick,
            not args.no_profile,
            args.service_code,
            {
                "users": args.crowd_users,
                "workers": args.crowd_workers,
                "processes": args.crowd_processes,
            },
        )
        for name in args.scenarios:
            results[name] = scenario(name, ctx)
    except (KeyboardInterrupt, Interrupted):
        log("interrupted: cleaning up")
        return 130
    finally:
        cleanup(pg)
        shutil.rmtree(records, ignore_errors=True)
    meta["seconds"] = round(time.monotonic() - started, 1)
    meta["load_after"] = {"loadavg": loadavg()}
    write(results, args.out)
    log(f"wrote {args.out}/results.md in {meta['seconds']:.0f} s total")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
