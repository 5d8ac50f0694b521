"""Faults: the service killed outright and restarted, the database restarted or crashed under
open streams, and thousands of streams coming and going. Clients lose nothing, see nothing of
anyone else's, and the service keeps no trace of streams that are gone.

`make test` runs them at a scale that keeps it fast; `make soak` (pytest -m soak) runs the
long forms: five kills in a row, 5,000 connect/disconnect cycles."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from streamer import keys
from streamer.auth import MAX_TOKEN_LENGTH
from streamer.embedded import EmbeddedPostgres
from tests.client import open_stream
from tests.conftest import (
    SECRET,
    SOURCE,
    Service,
    insert_file,
    migrate_for_tests,
    start_service,
    stop_service,
    token_for,
)
from tests.test_adversarial_isolation import Watcher, state

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


# -- `streamer serve` in a subprocess -----------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Process:
    """One `streamer serve`, on a fixed port so that clients find it again after a restart."""

    database_url: str
    port: int
    log: Path
    process: asyncio.subprocess.Process | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, session: aiohttp.ClientSession) -> None:
        environment = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("STREAMER_") and k != "DATABASE_URL"
        }
        environment.update(
            DATABASE_URL=self.database_url,
            STREAMER_PORT=str(self.port),
            STREAMER_JWT_SECRET=SECRET,
            STREAMER_LOG_FORMAT="json",
            STREAMER_SOURCE=SOURCE,
        )
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                *("-m", "streamer", "serve", "--no-migrate"),
                env=environment,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )
        # No event to wait on across processes: ask until it answers.
        try:
            async with asyncio.timeout(TIMEOUT):
                while not await self.ready(session):
                    assert self.process.returncode is None, self.log.read_text()[-3000:]
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise AssertionError(self.log.read_text()[-3000:]) from None

    async def ready(self, session: aiohttp.ClientSession) -> bool:
        try:
            async with session.get(self.base_url + "/readyz") as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    async def kill(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        await self.process.wait()

    def errors(self) -> list[str]:
        """Log lines at error level, or with a traceback."""
        lines = self.log.read_text().splitlines()
        return [
            line
            for line in lines
            if '"level": "error"' in line or '"level": "critical"' in line or "Traceback" in line
        ]


@contextlib.asynccontextmanager
async def streamer_serve(database_url: str, tmp_path: Path) -> AsyncIterator[Process]:
    process = Process(database_url, free_port(), tmp_path / "streamer.log")
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
    try:
        await process.start(session)
        yield process
    finally:
        if process.process is not None and process.process.returncode is None:
            await process.kill()
        await session.close()


def client_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=30))


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
    writer = Writer(db, users)
    for user in users:
        for _ in range(3):
            await writer.insert(user)
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


async def test_streamer_serve_answers_hostile_tokens_as_the_tests_server_does(
    database_url: str, tmp_path: Path
) -> None:
    async with streamer_serve(database_url, tmp_path) as service, client_session() as session:
        url = service.base_url + EVENTS
        too_long = "a" * (MAX_TOKEN_LENGTH + 8 * 1024)
        for request in ({"headers": {"Authorization": f"Bearer {too_long}"}},
                        {"params": {"access_token": too_long}}):  # fmt: skip
            async with session.get(url, **request) as response:  # type: ignore[arg-type]
                assert response.status == 401
                assert (await response.json())["code"] == "TOKEN_INVALID"
        absurd = "b" * 1_000_000
        for request in ({"headers": {"Authorization": f"Bearer {absurd}"}},
                        {"params": {"access_token": absurd}}):  # fmt: skip
            async with session.get(url, **request) as response:  # type: ignore[arg-type]
                assert response.status == 400
                assert b"Traceback" not in await response.read()
        async with session.get(
            url, headers={"Authorization": f"Bearer {token_for(uuid.uuid4())}"}
        ) as response:
            assert response.status == 200
        assert service.errors() == []
    log = (tmp_path / "streamer.log").read_text()
    assert "aaaaaaaaaaaaaaaa" not in log and "bbbbbbbbbbbbbbbb" not in log


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
    db = await asyncpg.connect(url)
    writer = Writer(db, users)
    for user in users:
        for _ in range(3):
            await writer.insert(user)
    followed = {
        user: await writer.insert(user, f"followed-{uuid.uuid4().hex}.bin") for user in users
    }
    writer.followed = set(followed.values())
    service = await start_service(url)
    try:
        async with (
            following(service.url("/").rstrip("/"), users, service.session) as clients,
            contextlib.AsyncExitStack() as one_file_streams,
        ):
            single = [
                await one_file_streams.enter_async_context(
                    open_stream(
                        service.session,
                        service.url(f"/api/files/{file_id}/events"),
                        token_for(user),
                        synced=False,
                    )
                )
                for user, file_id in followed.items()
            ]
            for mode in ("fast", "immediate"):
                for _ in range(20):
                    await writer.one()
                await asyncio.to_thread(own_postgres.stop, mode)
                await asyncio.to_thread(own_postgres.start)
                with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                    await db.close(timeout=1)
                # Written at once, racing the listener's reconnect.
                db = writer.db = await asyncpg.connect(url)
                for file_id in followed.values():
                    await db.execute(
                        "update files set progress = progress % 100 + 1 where id = $1", file_id
                    )
                for _ in range(20):
                    await writer.one()
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
            await db.close(timeout=1)


# -- thousands of streams come and go ------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


async def cycle(service: Service, db: asyncpg.Connection, user: uuid.UUID, i: int) -> None:
    """One stream of one kind, opened and closed: each kind leaves through another door."""
    kind = i % 5
    url = service.url(EVENTS)
    token = token_for(user)
    if kind == 0:
        async with open_stream(service.session, url, token):
            pass
    elif kind == 1:
        async with open_stream(service.session, url, token, params={"snapshot": "1"}):
            pass
    elif kind == 2:
        async with open_stream(service.session, url, token, headers={"Last-Event-ID": "1"}):
            pass
    elif kind == 3:
        file_id = await insert_file(db, user, "cycle.pdf")
        async with open_stream(
            service.session, service.url(f"/api/files/{file_id}/events"), token, synced=False
        ) as stream:
            await stream.next()
        await db.execute("delete from files where id = $1", file_id)
    else:
        # Gone before the answer: a raw connection that sends a request and closes.
        _, writer = await asyncio.open_connection(service.server.host, service.server.port)
        writer.write(
            f"GET {EVENTS} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
        )
        await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def settled(service: Service) -> None:
    """No stream, subscription or connection left in the service."""
    hub = service.app[keys.HUB]
    assert service.server.runner is not None
    server = service.server.runner.server
    assert server is not None
    async with asyncio.timeout(TIMEOUT):
        while hub.count or hub.owners() or server.connections:
            await asyncio.sleep(0.01)
    gc.collect()


async def connect_and_disconnect(service: Service, db: asyncpg.Connection, cycles: int) -> None:
    """Memory is compared between the two halves of the cycles: what the first half grew
    (caches, free lists) is paid once; what grows again in the second half is a leak."""
    users = [uuid.uuid4() for _ in range(10)]
    for i in range(300):  # warm up: the pool's connections, caches, aiohttp's free lists
        await cycle(service, db, users[i % len(users)], i)
    await settled(service)
    pool = service.app[keys.POOL]
    # The pool may open a connection meanwhile (feeds are re-read every few seconds beside
    # the streams' reads): a socket of its own, not a leak.
    tasks, fds = len(asyncio.all_tasks()), open_fds() - pool.get_size()
    tracemalloc.start()
    try:
        traced, rss = [], []
        for _ in range(2):
            for i in range(cycles // 2):
                await cycle(service, db, users[i % len(users)], i)
            await settled(service)
            traced.append(tracemalloc.get_traced_memory()[0])
            rss.append(rss_bytes())
    finally:
        tracemalloc.stop()
    async with asyncio.timeout(TIMEOUT):
        while len(asyncio.all_tasks()) > tasks:
            await asyncio.sleep(0.01)
    assert open_fds() - pool.get_size() <= fds
    # A leaked stream (its subscriber, task, transport) is kilobytes: 256 KiB over 250
    # cycles or more is under one kilobyte a cycle. Bounded caches (yarl's, PyJWT's) fill
    # within the first few hundred cycles and stay put.
    assert traced[1] - traced[0] < 256 * 1024, f"{traced[1] - traced[0]} bytes more"
    assert rss[1] - rss[0] < 16 * 1024 * 1024
    # And the service streams as before.
    async with open_stream(service.session, service.url(EVENTS), token_for(users[0])) as stream:
        file_id = await insert_file(db, users[0])
        assert (await stream.next()).file["id"] == str(file_id)


async def test_five_hundred_streams_opened_and_closed_leave_no_task_fd_or_memory_behind(
    service: Service, db: asyncpg.Connection
) -> None:
    await connect_and_disconnect(service, db, 500)


@pytest.mark.soak
async def test_five_thousand_streams_opened_and_closed_leave_no_task_fd_or_memory_behind(
    service: Service, db: asyncpg.Connection
) -> None:
    await connect_and_disconnect(service, db, 5000)


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
                    # The service saw them go by all the same: its watermark, the cursor it
                    # gives out, reached the last one's transaction (the one before the next).
                    next_xid = await db.fetchval(
                        "select pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
                    )
                    async with asyncio.timeout(TIMEOUT):
                        while service.app[keys.HUB].watermark < next_xid - 1:
                            await asyncio.sleep(0.01)
                await asyncio.to_thread(server.stop, "immediate")
                await asyncio.to_thread(server.start)
                await db.close(timeout=1)
                db = await asyncpg.connect(url)
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
                    before = len(client.connections)
                    client.connections[-1].response.close()
                    await client.until(
                        lambda c=client, n=before: (
                            len(c.connections) > n and "synced" in c.connections[-1].names()
                        ),
                        "did not reconnect",
                    )
                    assert "reset" not in client.connections[-1].names()
                    assert set(client.known) == {kept, later}
        finally:
            await stop_service(service)
            await db.close(timeout=1)
