"""Where the database is: migrations (psycopg, synchronous), the pool, the embedded server."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psycopg
from psycopg import sql

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


def migrate(dsn: str) -> list[str]:
    """Apply every migration not yet recorded, in file-name order; returns those applied."""
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
    return applied


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
