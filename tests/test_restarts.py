"""Restarts and crashes under open streams: the service killed outright and started again,
the database restarted or crashed, a database that lost commits it had acknowledged.
Clients (as a browser's EventSource: resuming from their last cursor) lose nothing, see
nothing of anyone else's, and where the database went back in time get a reset, never a
silent gap.

`make test` runs one kill; `make soak` (pytest -m soak) five in a row."""

from __future__ import annotations

import asyncio
import contextlib
import random
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from streamer import keys
from streamer.embedded import EmbeddedPostgres
from tests.client import Stream, open_stream
from tests.conftest import (
    SOURCE,
    Service,
    insert_file,
    migrate_for_tests,
    start_service,
    stop_service,
    token_for,
    wait_until,
)
from tests.process import client_session, streamer_serve
from tests.watcher import Watcher, state

EVENTS = "/api/files/events"
TIMEOUT = 20.0


# -- a browser's EventSource: reconnects with its last cursor, keeps what it knew ---------


@dataclass
class Client:
    """Follows one user's files across any number of connections, as EventSource does."""

    base_url: str
    user: uuid.UUID
    session: aiohttp.ClientSession
    known: dict[uuid.UUID, dict[str, Any]] = field(default_factory=dict)
    connections: list[Watcher] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def cursor(self) -> str | None:
        cursors = [w.cursor for w in self.connections if w.cursor is not None]
        return cursors[-1] if cursors else None

    @property
    def synced(self) -> int:
        return sum(w.names().count("synced") for w in self.connections)

    async def follow(self) -> None:
        retry = 0.05  # the server's retry: is 2 s; a test need not wait that long
        while True:
            cursor = self.cursor
            params = {"last_event_id": cursor} if cursor else {"snapshot": "1"}
            try:
                response = await self.session.get(
                    self.base_url + EVENTS,
                    headers={"Authorization": f"Bearer {token_for(self.user)}"},
                    params=params,
                )
            except (aiohttp.ClientError, OSError):
                await asyncio.sleep(retry)
                continue
            if response.status != 200:
                response.close()
                await asyncio.sleep(retry)
                continue
            watcher = Watcher(0, None, response, 0, known=self.known, changed=self.changed)
            self.connections.append(watcher)
            try:
                await watcher.read()
            finally:
                response.close()
            await asyncio.sleep(retry)

    async def until(self, condition: Any, what: str, timeout: float = TIMEOUT) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not condition():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            names = [w.names() for w in self.connections]
            raise AssertionError(f"{what}; connections: {names}") from None

    def versions_never_go_back_within_a_connection(self) -> None:
        for watcher in self.connections:
            last: dict[str, int] = {}
            for name, _, payload in watcher.events:
                if name == "file-update":
                    file = payload["file"]
                    assert file["version"] >= last.get(file["id"], 0), watcher.names()
                    last[file["id"]] = file["version"]


@contextlib.asynccontextmanager
async def following(
    base_url: str, users: list[uuid.UUID], session: aiohttp.ClientSession
) -> AsyncIterator[list[Client]]:
    clients = [Client(base_url, user, session) for user in users for _ in range(2)]
    for client in clients:
        client.task = asyncio.create_task(client.follow())
    try:
        for client in clients:
            await client.until(lambda c=client: c.synced >= 1, "never synced")
        yield clients
    finally:
        for client in clients:
            assert client.task is not None
            client.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await client.task


# -- a writer that never stops: every user's files change all the time -------------------


@dataclass
class Writer:
    db: asyncpg.Connection
    users: list[uuid.UUID]
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    files: dict[uuid.UUID, uuid.UUID] = field(default_factory=dict)  # id -> owner
    owned_by: dict[uuid.UUID, set[uuid.UUID]] = field(default_factory=dict)
    filename: dict[uuid.UUID, str] = field(default_factory=dict)
    followed: set[uuid.UUID] = field(default_factory=set)  # one-file streams: left alone
    count: int = 0
    wrote: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one statement at a time

    def pick(self) -> uuid.UUID:
        return self.rng.choice([f for f in self.files if f not in self.followed])

    async def insert(self, user: uuid.UUID, name: str | None = None) -> uuid.UUID:
        async with self.lock:
            return await self._insert(user, name)

    async def _insert(self, user: uuid.UUID, name: str | None = None) -> uuid.UUID:
        name = name or f"file-{uuid.uuid4().hex}.pdf"
        file_id = await insert_file(self.db, user, name)
        self.files[file_id] = user
        self.owned_by.setdefault(file_id, set()).add(user)
        self.filename[file_id] = name
        return file_id

    async def one(self) -> None:
        async with self.lock:
            await self._one()
        self.count += 1
        self.wrote.set()

    async def _one(self) -> None:
        choice = self.rng.random()
        if len(self.files) <= len(self.followed) or choice < 0.3:
            await self._insert(self.rng.choice(self.users))
        elif choice < 0.8:
            file_id = self.pick()
            status = self.rng.choice(["pending", "processing", "ready", "failed"])
            await self.db.execute(
                "update files set status = $2, progress = $3 where id = $1",
                file_id,
                status,
                self.rng.randint(0, 100),
            )
        elif choice < 0.9:
            file_id = self.pick()
            await self.db.execute("delete from files where id = $1", file_id)
            del self.files[file_id]
        else:
            file_id = self.pick()
            user = self.rng.choice(self.users)
            await self.db.execute("update files set user_id = $2 where id = $1", file_id, user)
            self.files[file_id] = user
            self.owned_by[file_id].add(user)

    async def run(self) -> None:
        while True:
            await self.one()
            await asyncio.sleep(0)  # let the clients breathe between writes

    async def writes(self, count: int) -> None:
        """Wait until `count` more writes were made."""
        target = self.count + count
        async with asyncio.timeout(TIMEOUT):
            while self.count < target:
                self.wrote.clear()
                await self.wrote.wait()


async def writer_of_files(db: asyncpg.Connection, users: list[uuid.UUID]) -> Writer:
    """A writer, with three files for each user to begin with."""
    writer = Writer(db, users)
    for user in users:
        for _ in range(3):
            await writer.insert(user)
    return writer


async def assert_everyone_caught_up(
    clients: list[Client], db: asyncpg.Connection, writer: Writer
) -> None:
    for client in clients:
        rows = await db.fetch(
            "select id, filename, status, progress, streamer_version as version from files"
            " where user_id = $1",
            client.user,
        )
        expected = {row["id"]: state(row) for row in rows}
        await client.until(
            lambda c=client, e=expected: {k: state(v) for k, v in c.known.items()} == e,
            f"a client of {client.user} did not catch up",
        )
        client.versions_never_go_back_within_a_connection()
        raw = b"".join(bytes(w.raw) for w in client.connections)
        for file_id, owners in writer.owned_by.items():
            if client.user not in owners:
                assert str(file_id).encode() not in raw
                assert writer.filename[file_id].encode() not in raw
        for other in writer.users:
            assert str(other).encode() not in raw


# -- the service killed and started again ----------------------------------------------


async def test_clients_of_a_service_killed_and_restarted_resume_and_lose_nothing(
    database_url: str, tmp_path: Path
) -> None:
    await kill_and_restart(database_url, tmp_path, kills=1)


@pytest.mark.soak
async def test_clients_of_a_service_killed_five_times_in_a_row_lose_nothing(
    database_url: str, tmp_path: Path
) -> None:
    await kill_and_restart(database_url, tmp_path, kills=5)


async def kill_and_restart(database_url: str, tmp_path: Path, kills: int) -> None:
    users = [uuid.uuid4() for _ in range(3)]
    db = await asyncpg.connect(database_url)
    writer = await writer_of_files(db, users)
    async with (
        streamer_serve(database_url, tmp_path) as service,
        client_session() as session,
        following(service.base_url, users, session) as clients,
    ):
        writing = asyncio.create_task(writer.run())
        try:
            for _ in range(kills):
                await writer.writes(30)
                await service.kill()
                # Written while nothing serves: every user's files change, one goes, one comes.
                await writer.writes(30)
                for user in users:
                    name = f"written-while-down-{uuid.uuid4().hex}.pdf"
                    writer.followed.add(await writer.insert(user, name))
                connections = [len(c.connections) for c in clients]
                await service.start(session)
                for client, before in zip(clients, connections, strict=True):
                    await client.until(
                        lambda c=client, n=before: len(c.connections) > n and c.synced > n,
                        "did not reconnect",
                    )
                await writer.writes(30)
        finally:
            writing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writing
        await assert_everyone_caught_up(clients, db, writer)
        for client in clients:
            assert any(
                f["filename"].startswith("written-while-down-") for f in client.known.values()
            )
            # Every reconnect resumed from a cursor: only the first connection had a snapshot.
            assert all("snapshot=1" not in str(w.response.url) for w in client.connections[1:])
            assert all("reset" not in w.names() for w in client.connections)
        assert service.errors() == []
    await db.close()


# -- the database restarted, or crashed, under open streams -------------------------------


@contextlib.asynccontextmanager
async def own_postgres(*, durable: bool, options: str = "") -> AsyncIterator[EmbeddedPostgres]:
    """A server of the test's own: stopping the shared one would cut every other test.
    Durable: a commit is on disk when acknowledged, so even a crash loses none."""
    root = Path(tempfile.mkdtemp(prefix="streamer-faults-"))
    server = EmbeddedPostgres(root, fast=not durable, options=options)
    await asyncio.to_thread(server.start)
    await asyncio.to_thread(migrate_for_tests, server.url())
    try:
        yield server
    finally:
        await asyncio.to_thread(server.destroy)


async def test_streams_stay_open_and_lose_nothing_while_the_database_restarts_and_crashes() -> None:
    async with own_postgres(durable=True) as server:
        await restart_and_crash_under_open_streams(server)


async def restart_and_crash_under_open_streams(own_postgres: EmbeddedPostgres) -> None:
    url = own_postgres.url()
    users = [uuid.uuid4() for _ in range(3)]
    writer = await writer_of_files(await asyncpg.connect(url), users)
    followed = {
        user: await writer.insert(user, f"followed-{uuid.uuid4().hex}.bin") for user in users
    }
    writer.followed = set(followed.values())
    service = await start_service(url)
    try:
        async with (
            following(service.url("/").rstrip("/"), users, service.session) as clients,
            one_file_streams(service, followed) as single,
        ):
            for mode in ("fast", "immediate"):
                await restart_under_writes(own_postgres, writer, followed.values(), mode)
            db = writer.db
            for file_id in followed.values():
                await db.execute("update files set status = 'ready' where id = $1", file_id)
            await assert_everyone_caught_up(clients, db, writer)
            for client in clients:
                # The very same connection all along: one synced, never a reconnect.
                assert len(client.connections) == 1, [w.names() for w in client.connections]
                assert client.synced == 1
                assert not client.connections[0].ended
            for stream, file_id in zip(single, followed.values(), strict=True):
                rest = await stream.end()
                events = stream.events
                assert all(e.file["id"] == str(file_id) for e in events if e.name != "heartbeat")
                last = [e for e in rest if e.name == "file-update"][-1]
                assert last.file["status"] == "ready"
                final = await db.fetchval(
                    "select streamer_version from files where id = $1", file_id
                )
                assert last.file["version"] == final
    finally:
        await stop_service(service)
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            await writer.db.close(timeout=1)


@contextlib.asynccontextmanager
async def one_file_streams(
    service: Service, followed: dict[uuid.UUID, uuid.UUID]
) -> AsyncIterator[list[Stream]]:
    """A one-file stream of each user's followed file, opened by that user."""
    async with contextlib.AsyncExitStack() as streams:
        yield [
            await streams.enter_async_context(
                open_stream(
                    service.session,
                    service.url(f"/api/files/{file_id}/events"),
                    token_for(user),
                    synced=False,
                )
            )
            for user, file_id in followed.items()
        ]


async def restart_under_writes(
    server: EmbeddedPostgres, writer: Writer, followed: Iterable[uuid.UUID], mode: str
) -> None:
    """Writes, the server stopped (`fast`, or `immediate`: a crash) and started again, and
    more writes; the writer's connection is a new one afterwards."""
    for _ in range(20):
        await writer.one()
    await asyncio.to_thread(server.stop, mode)
    await asyncio.to_thread(server.start)
    with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
        await writer.db.close(timeout=1)
    # Written at once, racing the listener's reconnect.
    db = writer.db = await asyncpg.connect(server.url())
    for file_id in followed:
        await db.execute("update files set progress = progress % 100 + 1 where id = $1", file_id)
    for _ in range(20):
        await writer.one()


@pytest.mark.parametrize("streams_open", [True, False], ids=["streams-open", "no-stream-open"])
async def test_a_database_that_lost_acknowledged_commits_resets_streams_and_issues_valid_cursors(
    user: uuid.UUID, streams_open: bool
) -> None:
    """With synchronous_commit off, a crash loses the last commits: the database goes back in
    time, below cursors already given out. Streams get a reset and a full snapshot (never a
    silent gap), and the cursors issued afterwards are the database's again."""
    if SOURCE == "wal":
        pytest.skip("the WAL source sends only flushed commits, which a crash cannot take back")
    # Commits stay unflushed for seconds.
    async with own_postgres(durable=False, options="-c wal_writer_delay=10s") as server:
        url = server.url()
        db = await asyncpg.connect(url)
        kept = await insert_file(db, user, "kept.pdf")
        await db.execute("checkpoint")
        service = await start_service(url)
        base_url = service.url("/").rstrip("/")
        try:
            async with contextlib.AsyncExitStack() as stack:
                if streams_open:
                    clients = await stack.enter_async_context(
                        following(base_url, [user], service.session)
                    )
                lost = [await insert_file(db, user, f"lost-{i}.pdf") for i in range(5)]
                if streams_open:
                    for client in clients:
                        await client.until(lambda c=client: set(lost) <= set(c.known), "lost-*")
                else:
                    await watermark_passes_the_last_commit(service, db)
                db = await crash_and_reconnect(server, db)
                assert await db.fetchval("select count(*) from files") == 1, "nothing was lost"
                if streams_open:
                    for client in clients:
                        await client.until(lambda c=client: set(c.known) == {kept}, "no reset")
                        assert any("reset" in w.names() for w in client.connections)
                else:
                    async with asyncio.timeout(TIMEOUT):
                        await service.app[keys.DISPATCHER].ready.wait()
                    clients = await stack.enter_async_context(
                        following(base_url, [user], service.session)
                    )
                # A change made now arrives live, with a cursor of the database as it is now:
                # a reconnect from it resumes, with no second reset.
                later = await insert_file(db, user, "later.pdf")
                for client in clients:
                    await client.until(lambda c=client: later in c.known, "later did not arrive")
                    await reconnect_resumes_without_a_reset(client)
                    assert set(client.known) == {kept, later}
        finally:
            await stop_service(service)
            await db.close(timeout=1)


async def watermark_passes_the_last_commit(service: Service, db: asyncpg.Connection) -> None:
    """The service saw the commits go by, with no stream open: its watermark, the cursor it
    gives out, reached the last one's transaction (the one before the next)."""
    next_xid = await db.fetchval("select pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
    await wait_until(lambda: service.app[keys.HUB].watermark >= next_xid - 1, TIMEOUT)


async def crash_and_reconnect(
    server: EmbeddedPostgres, db: asyncpg.Connection
) -> asyncpg.Connection:
    """The server crashed and started again: what it had not flushed is gone."""
    await asyncio.to_thread(server.stop, "immediate")
    await asyncio.to_thread(server.start)
    await db.close(timeout=1)
    return await asyncpg.connect(server.url())


async def reconnect_resumes_without_a_reset(client: Client) -> None:
    """The client's connection cut: it reconnects from its cursor, and gets no reset."""
    before = len(client.connections)
    client.connections[-1].response.close()
    await client.until(
        lambda: len(client.connections) > before and "synced" in client.connections[-1].names(),
        "did not reconnect",
    )
    assert "reset" not in client.connections[-1].names()
