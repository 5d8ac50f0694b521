"""Where the database is: migrations (psycopg, synchronous), the pool, the embedded server."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psycopg
import psycopg2
from psycopg import sql
from psycopg2.extras import LogicalReplicationConnection

from streamer.config import Settings
from streamer.embedded import EmbeddedPostgres

log = logging.getLogger(__name__)

# Any constant will do: it only keeps two processes from migrating at once.
MIGRATION_LOCK = 7_140_214_511
EMBEDDED_DATABASE = "streamer"


def sql_dir() -> Path:
    """The migrations: inside the installed package, or beside it in a source checkout."""
    packaged = Path(__file__).parent / "sql"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "sql"


def migrations() -> list[Path]:
    return sorted(sql_dir().glob("*.sql"))


def migrate(dsn: str, source: str | None = None) -> list[str]:
    """Apply every migration not yet recorded, in file-name order; returns those applied.
    With a `source` ('notify' or 'wal'), the feeds' triggers then send through it."""
    applied: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Held until the connection closes, however the run ends: an unlock in a `finally`
        # fails on a connection cut mid-query (a SIGTERM) and hides why the run ended.
        conn.execute("select pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        conn.execute("create schema if not exists streamer")
        conn.execute(
            "create table if not exists streamer.migrations ("
            " name text primary key, checksum text not null,"
            " applied_at timestamptz not null default now())"
        )
        done = {name for (name,) in conn.execute("select name from streamer.migrations")}
        for path in migrations():
            if path.name in done:
                continue
            text = path.read_text()
            with conn.transaction():
                conn.execute(sql.SQL(text))
                conn.execute(
                    "insert into streamer.migrations (name, checksum) values (%s, %s)",
                    (path.name, hashlib.sha256(text.encode()).hexdigest()),
                )
            applied.append(path.name)
            log.info("applied migration %s", path.name)
        if source is not None:
            conn.execute("select streamer.use_source(%s)", (source,))
    return applied


def source_problem(dsn: str, source: str) -> str | None:
    """What keeps this process's change source from working with the database, in one line
    for the operator; None when nothing does."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            row = conn.execute("select source from streamer.config").fetchone()
        except psycopg.errors.UndefinedTable:
            return "the database has no feeds yet: run `streamer migrate` first"
        recorded = row[0] if row else "notify"
        if recorded != source:
            return (
                f"STREAMER_SOURCE is {source}, but the database's feeds send through"
                f" {recorded}: run `STREAMER_SOURCE={source} streamer migrate`"
                f" (or serve with STREAMER_SOURCE={recorded})"
            )
        if source != "wal":
            return None
        level = conn.execute("show wal_level").fetchone()
        if level is None or level[0] != "logical":
            return (
                "STREAMER_SOURCE=wal needs wal_level = logical (the server has"
                f" {level[0] if level else 'unknown'}): set it and restart Postgres"
            )
        role, may = conn.execute(
            "select current_user, rolreplication or rolsuper from pg_roles"
            " where rolname = current_user"
        ).fetchone() or ("?", False)
        if not may:
            return (
                f"STREAMER_SOURCE=wal needs a role that may replicate: `alter role {role}"
                " replication` (or connect as one)"
            )
    return replication_problem(dsn)


def replication_problem(dsn: str) -> str | None:
    """Open a logical replication connection as the WAL source will (pg_hba.conf,
    max_wal_senders): its error in one line, or None."""
    try:
        conn = psycopg2.connect(dsn, connection_factory=LogicalReplicationConnection)
    except psycopg2.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"STREAMER_SOURCE=wal cannot open a replication connection: {first}"
    conn.close()
    return None


def ensure_database(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        exists = conn.execute("select 1 from pg_database where datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))


@dataclass
class Database:
    """The database the service uses: the configured one, or an embedded server.

    Used as a context manager by each command: an embedded server the command started is
    stopped when it exits; one that was already running is left running."""

    dsn: str
    listen_dsn: str
    embedded: EmbeddedPostgres | None = None
    started_embedded: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        if settings.database_url is not None:
            return cls(settings.database_url, settings.listen_database_url or settings.database_url)
        server = EmbeddedPostgres(settings.data_dir / "postgres")
        database = cls("", "", server, started_embedded=not server.is_running())
        try:
            server.start()
            database.dsn = database.listen_dsn = server.url(EMBEDDED_DATABASE)
            ensure_database(server.url(), EMBEDDED_DATABASE)
        except BaseException:  # a failure, or SIGTERM or Ctrl-C: stop what was started
            database.close()
            raise
        return database

    def close(self) -> None:
        if self.embedded is not None and self.started_embedded:
            self.started_embedded = False
            log.info("stopping the embedded Postgres")
            try:
                self.embedded.stop()
            except RuntimeError as exc:  # at exit: say so in one line, not a traceback
                log.error("could not stop the embedded Postgres: %s", str(exc).splitlines()[0])

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


async def create_pool(dsn: str, size: int) -> asyncpg.Pool:
    # Rows are rendered as JSON by Postgres in the session's time zone: UTC on the wire.
    pool: asyncpg.Pool = await asyncpg.create_pool(
        dsn, min_size=1, max_size=size, command_timeout=30, server_settings={"TimeZone": "UTC"}
    )
    return pool
