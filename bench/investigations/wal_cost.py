"""Where a writer's cost goes with STREAMER_SOURCE=wal; not part of `make bench`.

    python -m bench.investigations.wal_cost [--seconds 5] [--rounds 5] [--parts]

pgbench as in writer_cost (4 clients, single-row UPDATEs, fsync on) against variants, in
alternating rounds, each one's median TPS against no trigger at all: the message alone,
the feed's triggers with nobody reading, with a C reader (pg_recvlogical) and with the
service's own (streamer/sources/wal.py); and, for the design not taken, the table itself
published with REPLICA IDENTITY FULL and its row changes decoded instead of messages.
Everything shares this machine's cores: a reader's CPU (the walsender's and its client's)
is taken from the writers. With --parts, what parts of the feed's AFTER function cost
instead (nobody reading).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.clients import scratch_dir
from bench.harness import Postgres, cleanup, install_signal_handlers
from bench.writer_cost import (
    ENABLE_FILES,
    SCRIPT,
    WalReaders,
    alternating,
    configure,
    edit_notify_function,
    pgbench,
    print_medians,
    seed,
)

EMIT = "perform pg_logical_emit_message(true, 'streamer', new.id::text);"
PUBLICATION_HAS_FILES = (
    "select 1 from pg_publication_tables where pubname = 'streamer' and tablename = 'files'"
)


def _plain(pg: Postgres) -> None:
    """Messages only: the publication empty, the table's replica identity its default."""
    with pg.connect() as conn:
        conn.execute("select streamer.use_source('wal')")  # creates the publication
        if conn.execute(PUBLICATION_HAS_FILES).fetchone():
            conn.execute("alter publication streamer drop table files")
        conn.execute("alter table files replica identity default")


def _none(pg: Postgres) -> None:
    configure(pg, "none")
    _plain(pg)


def _message_only(pg: Postgres) -> None:
    """The feed's triggers replaced by one that writes a message of the row's id."""
    configure(pg, "none")
    _plain(pg)
    with pg.connect() as conn:
        conn.execute(
            "create or replace function bench_bare_notify() returns trigger language plpgsql "
            f"as $$ begin {EMIT} return null; end $$"
        )
        conn.execute(
            "create trigger bench_bare_notify after update on files "
            "for each row execute function bench_bare_notify()"
        )


def _feed(pg: Postgres) -> None:
    configure(pg, "wal")
    _plain(pg)


def _published(pg: Postgres, stamp: bool) -> None:
    """No AFTER trigger: the table's row changes themselves are decoded (the old row whole,
    for its owner on a delete)."""
    configure(pg, "none")
    _plain(pg)
    with pg.connect() as conn:
        conn.execute("alter publication streamer add table files")
        conn.execute("alter table files replica identity full")
        if stamp:  # the version stamp cursors rely on
            conn.execute(ENABLE_FILES)
            conn.execute("drop trigger streamer_notify on files")


# name: (set-up, reader: None, "c" for pg_recvlogical, "python" for the WAL source)
VARIANTS: dict[str, tuple[Callable[[Postgres], None], str | None]] = {
    "no trigger": (_none, None),
    "a one-line message trigger": (_message_only, None),
    "the same, read by pg_recvlogical": (_message_only, "c"),
    "feed triggers (wal), nobody reading": (_feed, None),
    "feed triggers (wal), read by pg_recvlogical": (_feed, "c"),
    "feed triggers (wal), read by the WAL source": (_feed, "python"),
    "rows published (no trigger), read by pg_recvlogical": (
        lambda pg: _published(pg, stamp=False),
        "c",
    ),
    "rows published + version stamp, read by pg_recvlogical": (
        lambda pg: _published(pg, stamp=True),
        "c",
    ),
}


# Edits of the feed's AFTER function as migrated (pg_get_functiondef's text).
NO_SET = (
    (""" SET "TimeZone" TO 'UTC'\n""", ""),
    (""" SET search_path TO 'pg_catalog', 'pg_temp'\n""", ""),
)
NO_DEFINER = ((" SECURITY DEFINER\n", ""),)
UNSIGNED = (
    (
        "encode(sha256(streamer.signing_opad() || sha256(streamer.signing_ipad() || "
        "convert_to(body, 'UTF8'))), 'hex') || body",
        "body",
    ),
)
NO_HORIZON = (("txid_snapshot_xmin(txid_current_snapshot())", "0"),)
ROW_TO_JSON = (("((j - 'user_id'))::text", "row_to_json(new)::text"),)


def _edited(*edits: tuple[str, str]) -> Callable[[Postgres], None]:
    def set_up(pg: Postgres) -> None:
        _feed(pg)
        edit_notify_function(pg, edits)

    return set_up


def _stamp_and_message(pg: Postgres) -> None:
    _message_only(pg)
    with pg.connect() as conn:
        conn.execute(ENABLE_FILES)
        conn.execute("drop trigger streamer_notify on files")


PARTS: dict[str, tuple[Callable[[Postgres], None], str | None]] = {
    "no trigger": (_none, None),
    "the BEFORE stamp and a one-line message trigger": (_stamp_and_message, None),
    "feed triggers (wal)": (_feed, None),
    "... without the SET clauses": (_edited(*NO_SET), None),
    "... and not SECURITY DEFINER": (_edited(*NO_SET, *NO_DEFINER), None),
    "... unsigned": (_edited(*UNSIGNED), None),
    "... with no horizon": (_edited(*NO_HORIZON), None),
    "... row_to_json(new)": (_edited(*ROW_TO_JSON), None),
    "... all of these at once": (
        _edited(*NO_SET, *NO_DEFINER, *UNSIGNED, *NO_HORIZON, *ROW_TO_JSON),
        None,
    ),
}


@contextlib.contextmanager
def reader(pg: Postgres, kind: str | None) -> Iterator[None]:
    if kind == "python":
        readers = WalReaders(pg, 1)
        readers.start()
        try:
            yield
        finally:
            readers.stop()
        return
    if kind is None:
        yield
        return
    command = [
        str(pg.pgbench()).replace("pgbench", "pg_recvlogical"), "-d", pg.url,
        "--slot", "bench_wal_cost", "--create-slot", "--start", "-P", "pgoutput",
        "-o", "proto_version=1", "-o", "publication_names=streamer", "-o", "messages=true",
        "-f", "/dev/null", "-F", "1", "-s", "1",
    ]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    try:
        with pg.connect() as conn:  # reading once its slot is there
            while not conn.execute(
                "select 1 from pg_replication_slots where slot_name = 'bench_wal_cost' and active"
            ).fetchone():
                time.sleep(0.05)
        yield
    finally:
        process.terminate()
        process.wait(10)
        with pg.connect() as conn:
            conn.execute("select pg_drop_replication_slot('bench_wal_cost')")


def run(seconds: int, rounds: int, parts: bool = False) -> None:
    variants = PARTS if parts else VARIANTS
    pg = Postgres(fast=False)
    records = scratch_dir()
    try:
        pg.start()
        seed(pg)
        script = Path(records) / "update.sql"
        script.write_text(SCRIPT)

        def one(name: str) -> float:
            set_up, kind = variants[name]
            set_up(pg)
            with reader(pg, kind):
                return pgbench(pg, script, seconds)["tps"]

        print_medians(alternating(list(variants), rounds, one), "no trigger", "no trigger")
    finally:
        cleanup(pg)
        shutil.rmtree(records, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.investigations.wal_cost", description=__doc__
    )
    parser.add_argument("--seconds", type=int, default=5, help="one pgbench run (5)")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each variant (5)")
    parser.add_argument("--parts", action="store_true", help="the AFTER function's parts")
    args = parser.parse_args()
    install_signal_handlers()  # SIGTERM too ends in run's cleanup
    run(args.seconds, args.rounds, args.parts)


if __name__ == "__main__":
    main()
