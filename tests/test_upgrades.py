"""Upgrades (the contract's "Upgrades"): a database migrated by an earlier release upgrades
in place and its cursors resume with nothing lost; during a rolling deploy a process of the
previous release goes on delivering after the new migration; a process that meets a change
it cannot read (a later release's) ends its streams and is unready, never silent."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import psycopg
import pytest

from streamer import keys
from streamer.changes import FORMAT
from streamer.embedded import _free_port
from streamer.migrations import MigrationError, checksum, migrate, migrations
from tests.client import open_stream
from tests.conftest import (
    SECRET,
    SOURCE,
    PostgresServer,
    Service,
    fresh_database,
    insert_file,
    send_raw,
    start_service,
    stop_service,
    token_for,
    wait_until,
)

ROOT = Path(__file__).parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
PREVIOUS = "f9a6801"  # release 0.1: its sql/ is 001-004 as shipped
# Release 0.2.0 (sql/ 001-005): the first that ends its streams on a change it cannot read.
RELEASE_0_2_0 = "85e49f1"
EVENTS = "/api/files/events"
# What this release ships beyond the previous one's sql/ (001-004).
SINCE_PREVIOUS = sorted(p.name for p in (ROOT / "sql").glob("*.sql") if p.name >= "005")
SINCE_0_2_0 = [name for name in SINCE_PREVIOUS if name >= "006"]


def bearer(user: uuid.UUID) -> dict[str, str]:
    return {"Authorization": f"Bearer {token_for(user)}"}


def apply_release_5a255a1(url: str) -> None:
    """sql/ as release 5a255a1 shipped it (001 as today, 002 before it changed), recorded as
    its runner recorded it."""
    files = [ROOT / "sql" / "001_files.sql", FIXTURES / "release-5a255a1" / "002_feed.sql"]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("create schema streamer")
        conn.execute(
            "create table streamer.migrations (name text primary key, checksum text not null,"
            " applied_at timestamptz not null default now())"
        )
        for path in files:
            text = path.read_text()
            conn.execute(text)
            conn.execute(
                "insert into streamer.migrations (name, checksum) values (%s, %s)",
                (path.name, checksum(text)),
            )


async def horizon(db: asyncpg.Connection) -> str:
    """A cursor issued now: every later change is made by a transaction at or above it."""
    value: int = await db.fetchval("select txid_snapshot_xmin(txid_current_snapshot())")
    return str(value)


async def test_a_database_of_release_5a255a1_upgrades_in_place_and_its_cursors_resume(
    postgres: PostgresServer,
) -> None:
    user = uuid.uuid4()
    with fresh_database(postgres, None) as url:
        apply_release_5a255a1(url)
        db = await asyncpg.connect(url)
        try:
            kept = await insert_file(db, user, "kept.pdf")
            doomed = await insert_file(db, user, "doomed.pdf")
            cursor = await horizon(db)  # what a browser of that release holds
            # Changed after the cursor, under that release's triggers, while nobody streams.
            await db.execute("update files set progress = 70 where id = $1", kept)
            await db.execute("delete from files where id = $1", doomed)
            old_version = await db.fetchval("select version from files where id = $1", kept)

            applied = migrate(url, SOURCE)
            assert applied == [p.name for p in migrations()][2:]
            service = await start_service(url)
            try:
                async with open_stream(
                    service.session,
                    service.url(EVENTS),
                    token_for(user),
                    headers={"Last-Event-ID": cursor},
                    synced=False,
                ) as stream:
                    caught_up = await stream.until("synced")
            finally:
                await stop_service(service)
        finally:
            await db.close()
    seen = {(e.name, e.file["id"]) for e in caught_up if e.name.startswith("file-")}
    assert seen == {("file-update", str(kept)), ("file-deleted", str(doomed))}
    update = next(e for e in caught_up if e.name == "file-update")
    assert (update.file["progress"], update.file["version"]) == (70, old_version)


async def test_a_change_of_a_later_format_ends_the_streams_and_the_process_stays_unready(
    service: Service, owner_db: asyncpg.Connection, user: uuid.UUID
) -> None:
    key: bytes = await owner_db.fetchval("select key from streamer.signing_key")
    change = {"ev": FORMAT + 1, "f": "files", "o": "u", "id": str(uuid.uuid4()), "u": str(user),
              "v": 1, "x": 1, "m": 1, "e": False, "new": "what a later release adds"}  # fmt: skip
    future = json.dumps(change)
    # On the feeds' own channel as the triggers send (NOTIFY), or signed where anyone writes.
    if SOURCE == "wal":
        future = hmac.new(key, future.encode(), hashlib.sha256).hexdigest() + future
    async with open_stream(service.session, service.url(EVENTS), token_for(user)) as stream:
        await send_raw(owner_db, future)
        await stream.end()
    dispatcher = service.app[keys.DISPATCHER]
    assert dispatcher.deaf is not None and "cannot read" in dispatcher.deaf
    async with service.session.get(service.url("/readyz")) as ready:
        assert ready.status == 503
    # Later changes, and the feeds read again, do not make it believe it can follow now.
    await insert_file(owner_db, user)
    await service.app[keys.FEEDS].refresh()
    async with service.session.get(service.url(EVENTS), headers=bearer(user)) as refused:
        assert (refused.status, (await refused.json())["code"]) == (503, "UNAVAILABLE")


# -- a rolling deploy: the previous release's node beside this one ----------------------


def release(commit: str) -> Iterator[Path]:
    """A release's code, from this repository's history."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("no git history to take the previous release from")
    where = Path(tempfile.mkdtemp(prefix="streamer-previous-"))
    archive = where / "release.tar"
    subprocess.run(
        ["git", "-C", str(ROOT), "archive", "-o", str(archive), commit, "streamer", "sql"],
        check=True, capture_output=True,
    )  # fmt: skip
    with tarfile.open(archive) as tar:
        tar.extractall(where, filter="data")
    yield where
    shutil.rmtree(where, ignore_errors=True)


@pytest.fixture(scope="module")
def previous_release() -> Iterator[Path]:
    yield from release(PREVIOUS)


@pytest.fixture(scope="module")
def release_0_2_0() -> Iterator[Path]:
    yield from release(RELEASE_0_2_0)


@pytest.fixture
async def previous_node(
    previous_release: Path, postgres: PostgresServer
) -> AsyncIterator[tuple[str, str, asyncio.subprocess.Process]]:
    """A node of the previous release serving a database it migrated: (its URL, the
    database's, its process)."""
    async with node_of(previous_release, postgres) as node:
        yield node


@pytest.fixture
async def node_0_2_0(
    release_0_2_0: Path, postgres: PostgresServer
) -> AsyncIterator[tuple[str, str, asyncio.subprocess.Process]]:
    async with node_of(release_0_2_0, postgres) as node:
        yield node


@contextlib.asynccontextmanager
async def node_of(
    previous_release: Path, postgres: PostgresServer
) -> AsyncIterator[tuple[str, str, asyncio.subprocess.Process]]:
    """A node of a release serving a database it migrated: (its URL, the database's, its
    process)."""
    with fresh_database(postgres, None) as url:
        port = _free_port()
        env = {
            **os.environ, "PYTHONPATH": str(previous_release), "DATABASE_URL": url,
            "STREAMER_JWT_SECRET": SECRET, "STREAMER_SOURCE": SOURCE,
            "STREAMER_PORT": str(port),
        }  # fmt: skip
        node = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streamer", "serve", cwd=previous_release, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as session:

                async def ready() -> bool:
                    assert node.returncode is None, "the previous release's node exited"
                    try:
                        async with session.get(base + "/readyz") as answer:
                            return answer.status == 200
                    except aiohttp.ClientConnectionError:
                        return False

                await wait_until(ready, 60)
            yield base, url, node
        finally:
            if node.returncode is None:
                node.terminate()
                await node.wait()


async def test_a_node_of_release_0_2_0_ends_its_streams_at_this_migration_and_they_resume(
    node_0_2_0: tuple[str, str, asyncio.subprocess.Process], user: uuid.UUID
) -> None:
    """It LISTENs on channel `streamer`, where the triggers no longer send: the migration
    (and every node of this release, at each ping) tells it there, with a change of a
    format it cannot read, so it ends its streams and is unready, never open and deaf. Its
    client resumes on this release from its cursor with nothing lost."""
    if SOURCE == "wal":
        pytest.skip("with wal, the migration waits for the previous release to stop (below)")
    base, url, _ = node_0_2_0
    db = await asyncpg.connect(url)
    try:
        async with (
            aiohttp.ClientSession() as session,
            open_stream(session, base + EVENTS, token_for(user)) as old,
        ):
            first = await insert_file(db, user, "before-the-deploy.pdf")
            assert (await old.next()).file["id"] == str(first)
            cursor = old.last_id
            assert migrate(url, SOURCE) == SINCE_0_2_0
            second = await insert_file(db, user, "during-the-deploy.pdf")
            rest = await old.end()  # the node ends the stream: it cannot read on
            assert str(second) not in "".join(e.data for e in rest)
            async with session.get(base + "/readyz") as ready:
                assert ready.status == 503
        new = await start_service(url)
        try:
            async with open_stream(
                new.session, new.url(EVENTS), token_for(user),
                headers={"Last-Event-ID": cursor or ""},
            ) as resumed:  # fmt: skip
                names = [e.name for e in resumed.events]
                ids = [e.file["id"] for e in resumed.events if e.name == "file-update"]
                assert str(second) in ids and "reset" not in names
                third = await insert_file(db, user, "after-the-deploy.pdf")
                assert (await resumed.next()).file["id"] == str(third)
        finally:
            await stop_service(new)
    finally:
        await db.close()


async def test_with_wal_this_migration_waits_for_the_previous_release_to_stop_reading(
    previous_node: tuple[str, str, asyncio.subprocess.Process], user: uuid.UUID
) -> None:
    """It reads only the messages its triggers wrote, which this release's feeds no longer
    write (the rows are decoded from the WAL), and cannot be told: it would stay open and
    hear nothing. So migrating refuses while it reads, naming its slot; once it is stopped
    the migration applies, and its client resumes on this release with nothing lost."""
    if SOURCE != "wal":
        pytest.skip("with notify, a node of the previous release goes on delivering (above)")
    base, url, node = previous_node
    db = await asyncpg.connect(url)
    try:
        async with (
            aiohttp.ClientSession() as session,
            open_stream(session, base + EVENTS, token_for(user)) as old,
        ):
            first = await insert_file(db, user, "before-the-deploy.pdf")
            assert (await old.next()).file["id"] == str(first)
            cursor = old.last_id
            with pytest.raises(MigrationError, match="earlier release read this database's WAL"):
                migrate(url, SOURCE)
        node.terminate()
        await node.wait()

        async def stopped_reading() -> bool:
            return not await db.fetchval("select count(*) from pg_replication_slots where active")

        await wait_until(stopped_reading, 10)
        assert migrate(url, SOURCE) == SINCE_PREVIOUS
        second = await insert_file(db, user, "after-the-deploy.pdf")
        new = await start_service(url)
        try:
            async with open_stream(
                new.session, new.url(EVENTS), token_for(user),
                headers={"Last-Event-ID": cursor or ""},
            ) as resumed:  # fmt: skip
                ids = [e.file["id"] for e in resumed.events if e.name == "file-update"]
                assert str(second) in ids and "reset" not in [e.name for e in resumed.events]
        finally:
            await stop_service(new)
    finally:
        await db.close()
