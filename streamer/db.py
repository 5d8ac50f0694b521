"""Where the database is: what a source needs of it, the pool, the embedded server
(migrations: streamer/migrations.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg
import psycopg
import psycopg2
from psycopg import sql
from psycopg2.extras import LogicalReplicationConnection

from streamer.config import Settings
from streamer.embedded import EmbeddedPostgres
from streamer.migrations import applied_problem, pending, server_problem
from streamer.migrations import migrate as migrate
from streamer.migrations import migrations as migrations

log = logging.getLogger(__name__)

EMBEDDED_DATABASE = "streamer"


def source_problem(
    dsn: str, source: str, *, switching: bool = False, migrated: bool = True
) -> str | None:
    """What keeps this process's change source from working with the database, in one line
    for the operator; None when nothing does. Only reads: a refusal changes nothing.

    `switching`: the database may be switched to `source` (then only the server is
    checked); `migrated`: the migrations should all be applied by now."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        problem = applied_problem(conn)
        if problem is not None:
            return problem
        waiting = pending(conn)
        if migrated and waiting:
            return f"the database needs migrating ({', '.join(waiting)}): run `streamer migrate`"
        configured = conn.execute("select to_regclass('streamer.config')").fetchone() != (None,)
        row = conn.execute("select source from streamer.config").fetchone() if configured else None
        recorded = row[0] if row else "notify"
        if configured and recorded != source and not switching:
            return (
                f"STREAMER_SOURCE is {source}, but the database's feeds send through"
                f" {recorded}: switch them with `STREAMER_SOURCE={source} streamer migrate`"
                f" (or serve with STREAMER_SOURCE={recorded})"
            )
        problem = server_problem(conn, source)
    if problem is not None or source != "wal":
        return problem
    return replication_problem(dsn)


def fresh(dsn: str) -> bool:
    """The database has no feeds yet: nothing can be running against it."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("select to_regclass('streamer.config')").fetchone() == (None,)


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
