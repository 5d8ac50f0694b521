"""A real Postgres (DATABASE_URL, or the embedded server) and a real HTTP server per test.

Each test gets a fresh database cloned from a migrated template, which takes milliseconds.
The whole suite runs with the change source STREAMER_SOURCE names (notify by default; `make
test` runs it with wal too): the template's triggers send through it, and every service
reads from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import psycopg
import pytest
from aiohttp.test_utils import TestServer
from psycopg import sql
from yarl import URL

from streamer import keys
from streamer.app import create_app
from streamer.auth import mint_token
from streamer.config import Settings
from streamer.db import migrate
from streamer.embedded import EmbeddedPostgres
from streamer.runner import GatedSite
from streamer.server import server_options
from streamer.sources.notify import LISTEN, PING, NotifySource
from streamer.sources.wal import WalSource

SECRET = "test-secret-for-hs256-tokens-32-bytes-long"
# Writers in production are never the table's owner: the tests write as such a role, with
# rights on `files` only and none on the feed's schema.
WRITER = "streamer_test_writer"
WRITER_PASSWORD = "writer-password"
_counter = itertools.count()
# The change source under test, as `streamer serve` would read it.
SOURCE = Settings().source
# How long wait_until waits for a condition by default, and how often it checks it.
WAIT = 10.0
POLL = 0.005


def pytest_report_header() -> str:
    return f"change source: {SOURCE} (STREAMER_SOURCE)"


def migrate_for_tests(url: str) -> list[str]:
    """Migrate as `STREAMER_SOURCE=<the source under test> streamer migrate` does."""
    return migrate(url, SOURCE)


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def as_role(url: str, role: str, password: str) -> str:
    """The same database, reached as another role."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{role}:{password}@{host}"))


def as_writer(url: str) -> str:
    return as_role(url, WRITER, WRITER_PASSWORD)


def create_writer_role(conn: psycopg.Connection[Any]) -> None:
    """The role exists once per server (roles are cluster-wide); its grants are per database."""
    exists = conn.execute("select 1 from pg_roles where rolname = %s", (WRITER,)).fetchone()
    if not exists:
        with contextlib.suppress(psycopg.errors.DuplicateObject):  # another test run's
            conn.execute(
                sql.SQL("create role {} login password {}").format(
                    sql.Identifier(WRITER), sql.Literal(WRITER_PASSWORD)
                )
            )


PG15_BIN = Path("/usr/lib/postgresql/15/bin")


@contextlib.contextmanager
def system_postgres15(*options: str) -> Iterator[tuple[str, str]]:
    """A throwaway cluster of the system's PostgreSQL 15 (users bring their own server),
    started with these server options: (TCP URL, Unix socket URL). Skips without one."""
    if not (PG15_BIN / "postgres").exists():
        pytest.skip("no system PostgreSQL 15 installed")
    from streamer.embedded import _free_port, ensure_system_user

    root = Path(tempfile.mkdtemp(prefix="streamer-pg15-"))
    data, port = root / "data", _free_port()
    user = None
    if os.geteuid() == 0:  # Postgres refuses to run as root
        user = ensure_system_user().pw_name
        shutil.chown(root, user)

    def run(*args: object, check: bool = True) -> None:
        subprocess.run([str(a) for a in args], check=check, capture_output=True, user=user)

    run(PG15_BIN / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "--no-sync")
    server = " ".join((f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off", *options))
    run(PG15_BIN / "pg_ctl", "-D", data, "-w", "-l", root / "log", "-o", server, "start")
    try:
        tcp = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        yield tcp, f"postgresql://postgres@/postgres?host={root}&port={port}"
    finally:
        run(PG15_BIN / "pg_ctl", "-D", data, "-w", "-m", "immediate", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class PostgresServer:
    admin_url: str
    embedded: EmbeddedPostgres | None

    def admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.admin_url, autocommit=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    url = os.environ.get("DATABASE_URL")
    if url:
        yield PostgresServer(url, None)
        return
    server = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="streamer-test-")), fast=True)
    server.start()
    try:
        yield PostgresServer(server.url(), server)
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def template(postgres: PostgresServer) -> Iterator[str]:
    name = f"streamer_template_{os.getpid()}"
    with postgres.admin() as conn:
        conn.execute(
            sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    url = with_database(postgres.admin_url, name)
    migrate_for_tests(url)
    with postgres.admin() as conn:
        create_writer_role(conn)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("grant select, insert, update, delete on files to {}").format(
                sql.Identifier(WRITER)
            )
        )
    yield name
    with postgres.admin() as conn:
        conn.execute(
            sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name))
        )


@contextlib.contextmanager
def fresh_database(postgres: PostgresServer, template: str | None) -> Iterator[str]:
    """A database of its own, dropped afterwards: a clone of the migrated template, or
    empty when `template` is None."""
    name = f"streamer_test_{os.getpid()}_{next(_counter)}"
    create = sql.SQL("create database {}").format(sql.Identifier(name))
    if template is not None:
        create += sql.SQL(" template {}").format(sql.Identifier(template))
    with postgres.admin() as conn:
        conn.execute(create)
    try:
        yield with_database(postgres.admin_url, name)
    finally:
        with postgres.admin() as conn:
            conn.execute(
                sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name))
            )


@pytest.fixture
def database_url(postgres: PostgresServer, template: str) -> Iterator[str]:
    with fresh_database(postgres, template) as url:
        yield url


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A writer's connection: what a file processor or a person at psql does, as a role
    that may only select, insert, update and delete rows of `files`."""
    conn = await asyncpg.connect(as_writer(database_url))
    yield conn
    await conn.close()


@pytest.fixture
async def owner_db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """The tables' owner: schema changes, TRUNCATE, and looking at the server."""
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


def token_for(user: uuid.UUID, ttl: int = 3600, secret: str = SECRET) -> str:
    return mint_token(secret, user, ttl)


class GatedTestServer(TestServer):
    """aiohttp's test server, its connections through the app's gate (streamer/gate.py) as
    `streamer serve` serves them."""

    async def start_server(self, loop: Any = None, **kwargs: Any) -> None:
        self.runner = await self._make_runner(handler_cancellation=True, **kwargs)
        await self.runner.setup()
        site = GatedSite(self.runner, self.app[keys.GATE], self.host, 0)
        await site.start()
        assert site._server is not None
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self.scheme = "http"
        self._root = URL(f"http://{self.host}:{self.port}")


@dataclass
class Service:
    server: TestServer
    session: aiohttp.ClientSession
    settings: Settings

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    @property
    def app(self) -> Any:
        return self.server.app


async def start_service(database_url: str, **overrides: Any) -> Service:
    values: dict[str, Any] = {"jwt_secret": SECRET, "database_url": database_url, "source": SOURCE}
    values.update(overrides)
    settings = Settings(**values)
    app = create_app(settings, database_url)
    server = GatedTestServer(app, host="127.0.0.1")
    # Set up as `streamer serve` sets it up: the same limits, logs and access log, the gate.
    await server.start_server(**server_options())
    # Changes flow: from now on every commit reaches the service (a failure, not a hang).
    await asyncio.wait_for(app[keys.DISPATCHER].ready.wait(), 30)
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=30))
    return Service(server, session, settings)


async def stop_service(service: Service) -> None:
    await service.session.close()
    await service.server.close()


def change_source(service: Service) -> NotifySource | WalSource:
    """The service's change source, whichever it is: its `dsn`, and the `pid` of its
    connection's backend (LISTEN) or walsender (WAL)."""
    source = service.app[keys.DISPATCHER].source
    assert isinstance(source, NotifySource | WalSource)
    return source


async def send_raw(conn: asyncpg.Connection, payload: str) -> None:
    """Send `payload` where the service under test reads the feed triggers' payloads: a
    transactional logical message with prefix `streamer` in the WAL (any role that can
    connect may), or a NOTIFY on the feeds' secret channel (only with the rights of schema
    streamer's owner: `conn` is owner_db)."""
    if SOURCE == "wal":
        await conn.execute("select pg_logical_emit_message(true, 'streamer', $1)", payload)
    else:
        await conn.execute("select pg_notify(streamer.channel(), $1)", payload)


async def kill_change_connection(service: Service, admin: asyncpg.Connection) -> None:
    """Terminate the service's change connection on the server, as `admin` (an owner or a
    superuser: a writer may not)."""
    pid = change_source(service).pid
    assert pid is not None
    assert await admin.fetchval("select pg_terminate_backend($1)", pid)


@pytest.fixture
async def service(database_url: str) -> AsyncIterator[Service]:
    svc = await start_service(database_url)
    yield svc
    await stop_service(svc)


@pytest.fixture
def user() -> uuid.UUID:
    return uuid.uuid4()


@pytest.fixture
def other_user() -> uuid.UUID:
    return uuid.uuid4()


async def insert_file(
    db: asyncpg.Connection, user: uuid.UUID, filename: str = "report.pdf", **columns: Any
) -> uuid.UUID:
    names = ["user_id", "filename", *columns]
    values = [user, filename, *columns.values()]
    placeholders = ", ".join(f"${i}" for i in range(1, len(values) + 1))
    file_id: uuid.UUID = await db.fetchval(
        f"insert into files ({', '.join(names)}) values ({placeholders}) returning id", *values
    )
    return file_id


async def backend_count(db: asyncpg.Connection) -> int:
    """Connections to the test database other than `db`'s own."""
    count: int = await db.fetchval(
        "select count(*) from pg_stat_activity where datname = current_database()"
        " and pid <> pg_backend_pid()"
    )
    return count


async def change_connections(db: asyncpg.Connection) -> int:
    """Connections to the test database that carry changes to a service: LISTENing backends
    (NOTIFY) or walsenders (WAL)."""
    count: int = await db.fetchval(
        "select count(*) from pg_stat_activity where datname = current_database()"
        " and (query = any($1::text[]) or backend_type = 'walsender')",
        [LISTEN, PING],
    )
    return count


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]], timeout: float = WAIT
) -> None:
    """Check a condition that no event announces every few milliseconds until it holds
    (`condition` may be a coroutine function); TimeoutError after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while True:
            held = condition()
            if inspect.isawaitable(held):
                held = await held
            if held:
                return
            await asyncio.sleep(POLL)


def free_port() -> int:
    """A port nothing listens on now, for a server that must keep its port across restarts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def nothing_logged_at_error(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A client's mistake is never the server's error: no error-level log line at all."""
    caplog.set_level(logging.INFO)
    yield
    records = caplog.get_records("setup") + caplog.get_records("call")
    errors = [f"{r.name}: {r.getMessage()}" for r in records if r.levelno >= logging.ERROR]
    assert errors == []
