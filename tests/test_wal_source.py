"""What only STREAMER_SOURCE=wal does, whichever source the rest of the suite runs with: the
triggers switch to logical messages and back, rows of any size travel inline, a process
leaves no replication slot behind (however it ends) and holds no WAL while it runs, a
half-open replication connection is replaced, and what the server lacks is one start-up
line."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
from psycopg import sql

import streamer.app as app_module
from streamer import keys
from streamer.db import migrate
from streamer.embedded import EmbeddedPostgres
from streamer.sources import wal as wal_module
from streamer.sources.wal import WalSource
from tests.client import open_stream
from tests.conftest import (
    SECRET,
    PostgresServer,
    Service,
    as_role,
    as_writer,
    fresh_database,
    insert_file,
    start_service,
    stop_service,
    token_for,
    wait_until,
)
from tests.test_cli import serving, streamer

EVENTS = "/api/files/events"
OWNER = "streamer_test_owner"  # owns a database and may do nothing else (no REPLICATION)


@pytest.fixture
def wal_url(postgres: PostgresServer, template: str) -> Iterator[str]:
    """A database whose triggers write logical messages (as `STREAMER_SOURCE=wal streamer
    migrate` leaves it)."""
    with fresh_database(postgres, template) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            level = conn.execute("show wal_level").fetchone()
            if level is None or level[0] != "logical":
                pytest.skip("DATABASE_URL's server does not have wal_level = logical")
            conn.execute("select streamer.use_source('wal')")
        yield url


@pytest.fixture
async def wal_service(wal_url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Service]:
    """A service with the WAL source, pinging every 50 ms (every 5 s by default): a test
    sees at once what a ping does (confirm positions, find a connection half-open)."""
    quick = functools.partial(WalSource, ping_interval=0.05, ping_timeout=1.0)
    monkeypatch.setattr(app_module, "WalSource", quick)
    service = await start_service(wal_url, source="wal")
    yield service
    await stop_service(service)


def wal_source(service: Service) -> WalSource:
    source = service.app[keys.DISPATCHER].source
    assert isinstance(source, WalSource)
    return source


async def slots(conn: asyncpg.Connection) -> dict[str, int | None]:
    """The replication slots of the server: name -> the pid of the walsender using it."""
    rows = await conn.fetch("select slot_name, active_pid from pg_replication_slots")
    return {row["slot_name"]: row["active_pid"] for row in rows}


def triggers_and_publication(url: str) -> tuple[set[str], set[str]]:
    """The feed's triggers on `files`, and the tables publication `streamer` publishes."""
    with psycopg.connect(url) as conn:
        triggers = conn.execute(
            "select tgname from pg_trigger where tgrelid = 'files'::regclass and not tgisinternal"
            " and tgname like 'streamer%'"
        ).fetchall()
        published = conn.execute(
            "select schemaname || '.' || tablename from pg_publication_tables"
            " where pubname = 'streamer'"
        ).fetchall()
    return {row[0] for row in triggers}, {row[0] for row in published}


DECODED = (
    {"streamer_stamp", "streamer_deleted", "streamer_moved", "streamer_truncate"},
    {"public.files", "streamer.tombstones"},
)
NOTIFIED = ({"streamer_stamp", "streamer_notify", "streamer_truncate"}, set[str]())


# -- migrate ----------------------------------------------------------------------------


def test_migrate_with_a_source_switches_every_feeds_triggers_and_says_so(database_url: str):
    switched = streamer("migrate", DATABASE_URL=database_url, STREAMER_SOURCE="wal")
    assert switched.returncode == 0, switched.stderr
    assert "the feeds send through wal" in switched.stdout
    # No AFTER trigger on a writer's path but at a delete or a change of owner: the rows
    # themselves are published.
    assert triggers_and_publication(database_url) == DECODED

    # Without STREAMER_SOURCE, migrating leaves the database's choice alone.
    assert streamer("migrate", DATABASE_URL=database_url).returncode == 0
    assert triggers_and_publication(database_url) == DECODED

    back = streamer("migrate", "--source", "notify", DATABASE_URL=database_url)
    assert back.returncode == 0, back.stderr
    assert triggers_and_publication(database_url) == NOTIFIED


# -- start-up lines ---------------------------------------------------------------------


@pytest.mark.parametrize(("database", "process"), [("notify", "wal"), ("wal", "notify")])
def test_serving_with_another_source_than_the_databases_is_one_line_saying_how_to_fix_it(
    database_url: str, database: str, process: str
):
    migrate(database_url, database)
    result = streamer(
        "serve", "--no-migrate", DATABASE_URL=database_url, STREAMER_JWT_SECRET=SECRET,
        STREAMER_SOURCE=process,
    )  # fmt: skip
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert f"STREAMER_SOURCE={process} streamer migrate" in line
    assert f"send through {database}" in line


@pytest.fixture
def owned_database(postgres: PostgresServer) -> Iterator[str]:
    """A database migrated for wal by a role that owns it and has no other right: not a
    superuser, not allowed to replicate."""
    with postgres.admin() as admin:
        if not admin.execute("select 1 from pg_roles where rolname = %s", (OWNER,)).fetchone():
            admin.execute(
                sql.SQL("create role {} login password 'owner'").format(sql.Identifier(OWNER))
            )
    with fresh_database(postgres, None) as url:
        name = url.rsplit("/", 1)[1]
        with postgres.admin() as admin:  # schema public is the database owner's (15+)
            admin.execute(
                sql.SQL("alter database {} owner to {}").format(
                    sql.Identifier(name), sql.Identifier(OWNER)
                )
            )
        owned = as_role(url, OWNER, "owner")
        migrate(owned)
        with psycopg.connect(url, autocommit=True) as conn:  # switched by a superuser
            conn.execute("select streamer.use_source('wal')")
        yield owned


def test_a_role_that_may_not_replicate_is_one_start_up_line(owned_database: str):
    result = streamer(
        "serve", "--no-migrate", DATABASE_URL=owned_database, STREAMER_JWT_SECRET=SECRET,
        STREAMER_SOURCE="wal",
    )  # fmt: skip
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert f"alter role {OWNER} replication" in line


def test_a_server_without_logical_wal_is_one_start_up_line(tmp_path: Path):
    server = EmbeddedPostgres(tmp_path / "pg", fast=True, options="-c wal_level=replica")
    server.start()
    try:
        migrate(server.url())
        # Switched while the server had logical WAL, then lowered (a restart with another
        # postgresql.conf): the process that would read it says so.
        with psycopg.connect(server.url(), autocommit=True) as conn:
            conn.execute("update streamer.config set source = 'wal'")
        result = streamer(
            "serve", "--no-migrate", DATABASE_URL=server.url(), STREAMER_JWT_SECRET=SECRET,
            STREAMER_SOURCE="wal",
        )  # fmt: skip
        assert result.returncode == 1
        [line] = result.stderr.splitlines()
        assert "wal_level = logical" in line and "replica" in line
    finally:
        server.destroy()


# -- a running process ------------------------------------------------------------------


async def test_a_row_of_a_megabyte_travels_inline_with_no_read_back(
    wal_service: Service, wal_url: str, user: uuid.UUID, monkeypatch: pytest.MonkeyPatch
):
    dispatcher = wal_service.app[keys.DISPATCHER]

    async def no_read_back(*_args: object) -> None:
        raise AssertionError("a row was read back")

    monkeypatch.setattr(dispatcher.reads, "row", no_read_back)
    db = await asyncpg.connect(as_writer(wal_url))
    try:
        async with open_stream(
            wal_service.session, wal_service.url(EVENTS), token_for(user)
        ) as stream:
            file_id = await insert_file(db, user, "huge.log")
            await db.execute(
                "update files set error_message = $2 where id = $1", file_id, "é" * 2**20
            )
            await stream.next()
            assert (await stream.next()).file["error_message"] == "é" * 2**20
    finally:
        await db.close()


async def test_a_running_process_confirms_what_it_read_so_postgres_keeps_no_wal_for_it(
    wal_service: Service, wal_url: str, user: uuid.UUID
):
    source = wal_source(wal_service)  # each ping also reports how far it has read
    db = await asyncpg.connect(wal_url)
    try:
        assert source.slot is not None
        assert (await slots(db))[source.slot] == source.pid
        for n in range(20):
            await insert_file(db, user, f"{n}.pdf")
        written = await db.fetchval("select pg_current_wal_lsn()")

        async def confirmed() -> bool:
            flushed = await db.fetchval(
                "select confirmed_flush_lsn from pg_replication_slots where slot_name = $1",
                source.slot,
            )
            return bool(flushed >= written)

        await wait_until(confirmed)
    finally:
        await db.close()


async def test_a_replication_connection_that_stops_answering_is_replaced_and_nothing_is_lost(
    postgres: PostgresServer, wal_service: Service, wal_url: str, user: uuid.UUID
):
    if postgres.embedded is None:
        pytest.skip("DATABASE_URL given: its server's processes are not ours to stop")
    source, dispatcher = wal_source(wal_service), wal_service.app[keys.DISPATCHER]
    db = await asyncpg.connect(wal_url)
    stalled = source.pid
    assert stalled is not None
    try:
        async with open_stream(
            wal_service.session, wal_service.url(EVENTS), token_for(user)
        ) as stream:
            sessions = dispatcher.sessions
            os.kill(stalled, signal.SIGSTOP)  # a half-open connection: nothing comes back
            try:
                file_id = await insert_file(db, user, "written-while-stalled.pdf")
                await wait_until(lambda: dispatcher.sessions > sessions, timeout=20)
                assert source.pid != stalled
            finally:
                os.kill(stalled, signal.SIGCONT)
            assert (await stream.next()).file["id"] == str(file_id)
    finally:
        await db.close()


async def test_no_slot_is_left_behind_when_a_serving_process_is_killed(wal_url: str):
    db = await asyncpg.connect(wal_url)
    try:
        async with serving(wal_url, STREAMER_PORT="0", STREAMER_SOURCE="wal") as server:
            [line] = await server.wait_for(1, lambda line: "from the WAL (slot" in line)
            slot = json.loads(line)["message"].rsplit("slot ", 1)[1].rstrip(")")
            assert slot in await slots(db)
            os.killpg(server.process.pid, signal.SIGKILL)
            await server.process.wait()

        async def slot_gone() -> bool:
            return slot not in await slots(db)

        await wait_until(slot_gone, timeout=20)
    finally:
        await db.close()


async def test_a_service_stopped_cleanly_leaves_no_slot_either(wal_url: str):
    service = await start_service(wal_url, source="wal")
    slot = wal_source(service).slot
    db = await asyncpg.connect(wal_url)
    try:
        assert slot in await slots(db)
        await stop_service(service)

        async def slot_gone() -> bool:
            return slot not in await slots(db)

        await wait_until(slot_gone)
    finally:
        await db.close()


async def test_a_commit_that_a_crash_takes_back_was_never_sent(tmp_path: Path, user: uuid.UUID):
    """With synchronous_commit off a crash loses the last commits. The WAL source reads only
    flushed WAL, so no stream was told of them and no cursor given out is past them: after
    the restart streams go on with no reset (compare test_restarts with NOTIFY)."""
    server = EmbeddedPostgres(tmp_path / "pg", fast=True, options="-c wal_writer_delay=10s")
    await asyncio.to_thread(server.start)
    try:
        url = server.url()
        await asyncio.to_thread(migrate, url, "wal")
        service = await start_service(url, source="wal")
        db = await asyncpg.connect(url)
        try:
            async with open_stream(service.session, service.url(EVENTS), token_for(user)) as stream:
                async with db.transaction():
                    await db.execute("set local synchronous_commit = on")  # flushed: sent
                    kept = await insert_file(db, user, "kept.pdf")
                assert (await stream.next()).file["id"] == str(kept)
                await insert_file(db, user, "lost.pdf")  # not flushed yet
                await asyncio.to_thread(server.stop, "immediate")
                await asyncio.to_thread(server.start)
                await db.close(timeout=1)
                db = await asyncpg.connect(url)
                assert await db.fetchval("select count(*) from files") == 1, "nothing was lost"
                async with db.transaction():
                    await db.execute("set local synchronous_commit = on")
                    later = await insert_file(db, user, "later.pdf")
                while (event := await stream.next()).file["id"] != str(later):
                    assert event.file["id"] == str(kept)  # a repeat of what it has: allowed
                assert {e.name for e in stream.events} == {"synced", "file-update"}  # no reset
                assert "lost.pdf" not in "".join(e.data for e in stream.events)
                cursor = stream.last_id
                assert cursor is not None
            async with open_stream(
                service.session, service.url(EVENTS), token_for(user),
                headers={"Last-Event-ID": cursor},
            ) as resumed:  # fmt: skip
                assert "reset" not in [e.name for e in resumed.events]
        finally:
            await db.close()
            await stop_service(service)
    finally:
        await asyncio.to_thread(server.destroy)


async def test_a_writer_idle_in_a_transaction_delays_the_start_and_the_log_says_why(
    wal_url: str, user: uuid.UUID, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    monkeypatch.setattr(wal_module, "SLOW_SLOT", 0.05)
    writer = await asyncpg.connect(as_writer(wal_url))
    idle = writer.transaction()
    await idle.start()
    await insert_file(writer, user, "left-open.pdf")  # holds a transaction id
    pool = await asyncpg.create_pool(wal_url, min_size=1, max_size=2)
    source = WalSource(wal_url, pool)
    connecting = asyncio.create_task(source.connect(lambda _payload: None))
    try:
        await wait_until(lambda: any("waits for the transactions" in m for m in caplog.messages))
        assert not connecting.done()
        await idle.commit()
        await asyncio.wait_for(connecting, 10)
        assert source.slot is not None
    finally:
        connecting.cancel()
        await source.close()
        await writer.close()
        await pool.close()
