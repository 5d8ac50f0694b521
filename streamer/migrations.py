"""The migrations (psycopg, synchronous): sql/ applied in file-name order, each once.

A run checks everything before it writes anything (the files already applied, the server
a new source needs, a `files` table that is not ours), then applies every pending file and
the source switch in one transaction: it succeeds whole or changes nothing. A released file
is frozen: a database whose applied file differs from the shipped one stops `serve` and
`migrate` in one line.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

# Any constant will do: it only keeps two processes from migrating at once.
MIGRATION_LOCK = 7_140_214_511
FILES = "001_files.sql"
# Where the built-in `files` statements go when it is left out: made and dropped inside the
# run's transaction, so the database never sees them.
LEFT_OUT = "streamer_files_left_out"
# Forms a released file had in an earlier release, before files were frozen: a database
# migrated by that release recorded them (002 changed between 5a255a1 and f9a6801).
EARLIER_FORMS: dict[str, frozenset[str]] = {
    "002_feed.sql": frozenset({"ecb2b6d6b0f4b78beac8fbfb23ae158e584a6c9816bcf5d136de5031d31866b3"}),
}
# What sql/001_files.sql and the `files` feed need of a `files` table that exists already.
FILES_COLUMNS = {
    "id": ("uuid", "bigint", "integer", "text"),
    "user_id": ("uuid", "text"),
    "status": ("text",),
    "updated_at": ("timestamp with time zone",),
}

Connection = psycopg.Connection[Any]


class MigrationError(Exception):
    """The database cannot be migrated as asked; the message is one line, and nothing was
    changed."""


def sql_dir() -> Path:
    """The migrations: inside the installed package, or beside it in a source checkout."""
    packaged = Path(__file__).parent / "sql"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "sql"


def migrations() -> list[Path]:
    return sorted(sql_dir().glob("*.sql"))


def checksum(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def applied(conn: Connection) -> dict[str, str]:
    """Each migration the database has recorded, with its checksum (none: not migrated)."""
    if conn.execute("select to_regclass('streamer.migrations')").fetchone() == (None,):
        return {}
    return dict(conn.execute("select name, checksum from streamer.migrations").fetchall())


def applied_problem(conn: Connection) -> str | None:
    """Why the migrations this database recorded are not the ones shipped, or None."""
    shipped = {path.name: checksum(path.read_text()) for path in migrations()}
    for name, recorded in sorted(applied(conn).items()):
        if name not in shipped:
            return (
                f"the database was migrated by a later release ({name} is not shipped with"
                " this one): upgrade streamer"
            )
        if recorded != shipped[name] and recorded not in EARLIER_FORMS.get(name, ()):
            return (
                f"migration {name} as applied to this database differs from the shipped one"
                f" (sha256 {recorded[:12]}, shipped {shipped[name][:12]}): a released"
                " migration is never edited; ship it as released and add a new file"
            )
    return None


def pending(conn: Connection) -> list[str]:
    done = applied(conn)
    return [path.name for path in migrations() if path.name not in done]


def server_problem(conn: Connection, source: str) -> str | None:
    """What keeps the server from carrying changes through `source`, or None."""
    if source != "wal":
        return None
    level = conn.execute("show wal_level").fetchone()
    if level is None or level[0] != "logical":
        return (
            "STREAMER_SOURCE=wal needs wal_level = logical (the server has"
            f" {level[0] if level else 'unknown'}): set it and restart Postgres"
        )
    role, may = conn.execute(
        "select current_user, rolreplication or rolsuper from pg_roles where rolname = current_user"
    ).fetchone() or ("?", False)
    if not may:
        return (
            f"STREAMER_SOURCE=wal needs a role that may replicate: `alter role {role}"
            " replication` (or connect as one)"
        )
    return None


def files_problem(conn: Connection) -> str | None:
    """Why an existing public.files cannot become the built-in `files` feed, or None."""
    found = dict(
        conn.execute(
            "select a.attname, format_type(a.atttypid, null) from pg_attribute a"
            " where a.attrelid = to_regclass('public.files') and a.attnum > 0"
            " and not a.attisdropped"
        ).fetchall()
    )
    if not found:
        return None
    for column, types in FILES_COLUMNS.items():
        if found.get(column) not in types:
            what = "no column" if column not in found else f"a {found[column]} column"
            return (
                f"a table public.files exists and is not streamer's built-in one (it has"
                f" {what} {column}): leave the built-in files feed out with"
                " STREAMER_FILES_TABLE=false (`streamer migrate --no-files-table`)"
            )
    return None


def migrate(dsn: str, source: str | None = None, *, files_table: bool = True) -> list[str]:
    """Apply every migration not yet recorded, in file-name order, in one transaction;
    returns those applied. With a `source` ('notify' or 'wal'), the feeds' triggers then
    send through it. Without `files_table`, the built-in `files` table is left out."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Held until the connection closes, however the run ends: an unlock in a `finally`
        # fails on a connection cut mid-query (a SIGTERM) and hides why the run ended.
        conn.execute("select pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        waiting = set(pending(conn))
        todo = [path for path in migrations() if path.name in waiting]
        makes_files = FILES in waiting
        leave_out = makes_files and not files_table
        problem = (
            applied_problem(conn)
            or (server_problem(conn, source) if source is not None else None)
            or (files_problem(conn) if makes_files and files_table else None)
        )
        if problem is not None:
            raise MigrationError(problem)
        name = "the migrations table"
        try:
            with conn.transaction():
                # Whatever the role's search path ("$user" first puts a role named streamer's
                # tables in schema streamer): the files go where the docs say.
                conn.execute("set local search_path = public")
                conn.execute("create schema if not exists streamer")
                conn.execute(
                    "create table if not exists streamer.migrations ("
                    " name text primary key, checksum text not null,"
                    " applied_at timestamptz not null default now())"
                )
                if leave_out:
                    conn.execute(sql.SQL("create schema {}").format(sql.Identifier(LEFT_OUT)))
                    into = sql.SQL("set local search_path = {}").format(sql.Identifier(LEFT_OUT))
                    conn.execute(into)
                for path in todo:
                    name, text = path.name, path.read_text()
                    conn.execute(sql.SQL(text))
                    conn.execute(
                        "insert into streamer.migrations (name, checksum) values (%s, %s)",
                        (path.name, checksum(text)),
                    )
                if leave_out:
                    name = "leaving files out"
                    _drop_left_out(conn)
                if source is not None:
                    name = f"switching to {source}"
                    conn.execute("select streamer.use_source(%s)", (source,))
        except psycopg.Error as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise MigrationError(f"{name} failed, nothing was changed: {first}") from None
    for path in todo:
        log.info("applied migration %s", path.name)
    return [path.name for path in todo]


def _drop_left_out(conn: Connection) -> None:
    conn.execute(
        sql.SQL("select streamer.disable_feed({})").format(sql.Literal(f"{LEFT_OUT}.files"))
    )
    conn.execute("delete from streamer.horizon where feed = 'files'")
    conn.execute(sql.SQL("drop schema {} cascade").format(sql.Identifier(LEFT_OUT)))
    conn.execute("set local search_path = public")
