"""A fleet through a real broker: three `streamer serve` processes sharing one database and
one Redis (tests/broker.py), as an operator runs them (STREAMER_BROKER_URL).

- One change connection for the whole fleet (one LISTEN backend or one walsender: the
  reader's; the others wait on the election's advisory lock), and every stream of every node
  ends equal to the database after a random story of writes and streams, none ever seeing
  anything of another user's (the isolation property test, tests/test_isolation.py, told to
  a fleet).
- The reader SIGKILLed: another reads within 10 s, what was written meanwhile reaches every
  stream, and the killed node's clients resume on the others with their cursors.
- The broker SIGKILLed and restarted, or paused past the nodes' timeouts: streams stay
  open, /readyz is 503 while it is lost, and every stream ends equal to the database.
- A reader paused, replaced, then resumed: nothing it publishes late is delivered as new.
- STREAMER_BROKER_URL checked at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import psutil  # type: ignore[import-untyped]
import redis as sync_redis
import redis.asyncio as aioredis

from streamer import keys
from streamer.changes import Signed
from streamer.metrics import Metrics
from streamer.sources.broker import (
    TICK,
    BrokerSource,
    all_channel,
    fleet_prefix,
    message,
    owner_channel,
)
from streamer.sources.notify import LISTEN, PING
from tests import broker as brokers
from tests import test_postgres_versions as versions
from tests.broker import Broker
from tests.client import open_stream
from tests.conftest import (
    SECRET,
    SOURCE,
    insert_file,
    start_service,
    stop_service,
    token_for,
    wait_until,
)
from tests.scrape import scrape
from tests.test_cli import NOWHERE, Serving, serving, streamer
from tests.test_isolation import (
    USERS,
    Close,
    Delete,
    Insert,
    OpenFileStream,
    OpenUserStream,
    Step,
    Together,
    Transfer,
    Update,
    World,
    assert_converged,
    assert_isolated,
)
from tests.watcher import Watcher, describe, state

broker = brokers.broker  # the fixture: a Redis of each test's own
postgres15 = versions.postgres15  # the fixture: a PostgreSQL 15 cluster of this module's own

EVENTS = "/api/files/events"
NODES = 3
FAILOVER = 10.0  # the contract: another process reads within 10 s
TICK_TIMEOUT = 5.0  # a node's, by default (streamer/sources/broker.py)


# -- the fleet ----------------------------------------------------------------------------


@dataclass
class Node:
    """One `streamer serve` of the fleet."""

    serving: Serving
    paused: bool = False

    @property
    def base_url(self) -> str:
        return self.serving.base_url

    @property
    def pid(self) -> int:
        return self.serving.process.pid

    def url(self, path: str) -> str:
        return self.base_url + path

    def kill(self) -> None:
        os.killpg(self.pid, signal.SIGKILL)

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self.paused = False

    @property
    def alive(self) -> bool:
        return self.serving.process.returncode is None


@dataclass
class Fleet:
    nodes: list[Node]
    broker: Broker
    session: aiohttp.ClientSession  # for streams: no total timeout
    probe: aiohttp.ClientSession  # for /metrics and /readyz: a short one

    async def metrics(self, node: Node) -> dict[str, float]:
        return await scrape(self.probe, node.url("/metrics"))

    async def readers(self, nodes: list[Node] | None = None) -> list[Node]:
        """The nodes (of `nodes`, by default every live unpaused one) that say they read."""
        found = []
        for node in nodes if nodes is not None else self.answering():
            if (await self.metrics(node)).get("streamer_fleet_reader") == 1:
                found.append(node)
        return found

    def answering(self) -> list[Node]:
        return [node for node in self.nodes if node.alive and not node.paused]

    async def the_reader(self, nodes: list[Node] | None = None, timeout: float = 10) -> Node:
        """Wait until exactly one of `nodes` reads for the fleet; that one."""
        found: list[Node] = []

        async def one() -> bool:
            found[:] = await self.readers(nodes)
            return len(found) == 1

        await wait_until(one, timeout)
        return found[0]

    async def ready(self, node: Node) -> int:
        try:
            async with self.probe.get(node.url("/readyz")) as response:
                return response.status
        except (aiohttp.ClientError, TimeoutError):
            return 0

    async def all_ready(self, status: int, timeout: float = 15) -> None:
        async def every() -> bool:
            answers = [await self.ready(node) for node in self.answering()]
            return all(answer == status for answer in answers)

        await wait_until(every, timeout)

    async def stale(self, node: Node) -> float:
        return (await self.metrics(node)).get("streamer_broker_stale_total", 0.0)


@contextlib.asynccontextmanager
async def fleet(database_url: str, broker: Broker, nodes: int = NODES) -> AsyncIterator[Fleet]:
    """`nodes` processes of one fleet, started side by side (one of them is elected)."""
    async with contextlib.AsyncExitStack() as stack:
        servers = await asyncio.gather(
            *(
                stack.enter_async_context(
                    serving(database_url, STREAMER_PORT="0", STREAMER_BROKER_URL=broker.url)
                )
                for _ in range(nodes)
            )
        )
        session = await stack.enter_async_context(
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=60))
        )
        probe = await stack.enter_async_context(
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3))
        )
        the_fleet = Fleet([Node(server) for server in servers], broker, session, probe)
        try:
            yield the_fleet
        finally:
            for node in the_fleet.nodes:  # a paused process would never die of SIGKILL's
                if node.paused and node.alive:  # reaping otherwise: let it
                    with contextlib.suppress(ProcessLookupError):
                        node.resume()


async def election(db: asyncpg.Connection) -> tuple[int, int]:
    """The fleet's election lock in pg_locks: (holders, waiters)."""
    rows = await db.fetch(
        "select granted, count(*) from pg_locks where locktype = 'advisory'"
        " and database = (select oid from pg_database where datname = current_database())"
        " group by granted"
    )
    counts = {row["granted"]: row["count"] for row in rows}
    return counts.get(True, 0), counts.get(False, 0)


def owners_of(ports: set[int]) -> dict[int, int]:
    """The process (of this machine) that holds each of these local TCP ports: a backend's
    client_port, to the node that opened it."""
    found = {}
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port in ports and conn.pid is not None:
            found[conn.laddr.port] = conn.pid
    return found


async def change_connections_by_node(db: asyncpg.Connection) -> tuple[dict[int, int], str]:
    """The change connections to the test database, counted by the node that holds them
    (a process id; 0: not found), and pg_stat_activity described for a failure's message.

    A change connection is a walsender, or a LISTEN backend: one whose last query was its
    LISTEN (`select streamer.listen()`) or the source's ping, idle, and not the election's
    (application name `reader`). A pool's idle connection shows asyncpg's reset query
    instead; conftest's change_connections counts any backend whose last query is one of
    the two, whatever its state."""
    rows = await db.fetch(
        "select pid, client_port, application_name, backend_type, state, wait_event_type,"
        " query from pg_stat_activity where datname = current_database()"
        " and pid <> pg_backend_pid()"
    )
    changes = [
        row
        for row in rows
        if row["backend_type"] == "walsender"
        or (
            row["application_name"] != "reader"
            and row["state"] == "idle"
            and row["query"] in (LISTEN, PING)
        )
    ]
    owners = owners_of({row["client_port"] for row in rows if row["client_port"]})
    counts: dict[int, int] = {}
    for row in changes:
        node = owners.get(row["client_port"], 0)
        counts[node] = counts.get(node, 0) + 1
    described = "\n".join(f"{dict(row)} (node {owners.get(row['client_port'])})" for row in rows)
    return counts, described


async def one_change_connection(db: asyncpg.Connection, nodes: int) -> None:
    """One LISTEN backend or walsender for the whole fleet, and the election held by one,
    waited on by the others."""

    async def settled() -> bool:
        counts, _ = await change_connections_by_node(db)
        return sum(counts.values()) == 1 and await election(db) == (1, nodes - 1)

    with contextlib.suppress(TimeoutError):
        await wait_until(settled, 10)
    counts, described = await change_connections_by_node(db)
    assert sum(counts.values()) == 1, f"change connections by node {counts}:\n{described}"
    assert await election(db) == (1, nodes - 1), described
    if SOURCE == "wal":
        senders = await db.fetchval(
            "select count(*) from pg_stat_replication r join pg_stat_activity a using (pid)"
            " where a.datname = current_database()"
        )
        assert senders == 1, described


# -- streams as their clients see them -----------------------------------------------------


async def watch(
    fleet: Fleet,
    node: Node,
    user: uuid.UUID,
    index: int,
    params: dict[str, str] | None = None,
    known: dict[uuid.UUID, dict[str, Any]] | None = None,
) -> Watcher:
    """A user stream of `user` on `node`, once synced; its client knew `known` before."""
    response = await fleet.session.get(
        node.url(EVENTS),
        headers={"Authorization": f"Bearer {token_for(user)}"},
        params=params or {},
    )
    assert response.status == 200, await response.text()
    watcher = Watcher(index, None, response, opened_at=0, known=dict(known or {}))
    watcher.reader = asyncio.create_task(watcher.read())
    await watcher.until(lambda: "synced" in watcher.names(), "no synced")
    return watcher


async def files_of(db: asyncpg.Connection, user: uuid.UUID) -> dict[uuid.UUID, tuple[Any, ...]]:
    rows = await db.fetch(
        "select id, filename, status, progress, streamer_version as version from files"
        " where user_id = $1",
        user,
    )
    return {row["id"]: state(row) for row in rows}


async def converged(watcher: Watcher, db: asyncpg.Connection, user: uuid.UUID, what: str) -> None:
    """The files its client knows are its user's files in the database, and it is open."""
    expected = await files_of(db, user)

    def equal() -> bool:
        return {k: state(v) for k, v in watcher.known.items()} == expected

    await watcher.until(lambda: equal() or watcher.ended, what)
    assert not watcher.ended, f"{what}: the stream ended; {describe(watcher)}"
    assert equal(), f"{what}: {describe(watcher)}"


def versions_never_go_back(watcher: Watcher) -> None:
    last: dict[str, int] = {}
    for name, _, payload in watcher.events:
        if name == "file-update":
            file = payload["file"]
            assert file["version"] >= last.get(file["id"], 0), describe(watcher)
            last[file["id"]] = file["version"]


@dataclass
class Writer:
    """Random writes by several users: inserts, updates, deletes, ownership changes."""

    db: asyncpg.Connection
    users: list[uuid.UUID]
    rng: random.Random
    files: dict[uuid.UUID, uuid.UUID] = field(default_factory=dict)  # id: owner

    async def insert(self, user: uuid.UUID) -> uuid.UUID:
        file_id: uuid.UUID = await self.db.fetchval(
            "insert into files (user_id, filename) values ($1, $2) returning id",
            user,
            f"file-{uuid.uuid4().hex[:8]}.pdf",
        )
        self.files[file_id] = user
        return file_id

    async def some(self, count: int) -> None:
        for _ in range(count):
            roll = self.rng.random()
            if roll < 0.3 or len(self.files) < 2:
                await self.insert(self.rng.choice(self.users))
                continue
            file_id = self.rng.choice(sorted(self.files))
            if roll < 0.75:
                await self.db.execute(
                    "update files set status = $2, progress = $3 where id = $1",
                    file_id,
                    self.rng.choice(["pending", "processing", "ready", "failed"]),
                    self.rng.randint(0, 100),
                )
            elif roll < 0.88:
                owner = self.rng.choice([u for u in self.users if u != self.files[file_id]])
                await self.db.execute("update files set user_id = $2 where id = $1", file_id, owner)
                self.files[file_id] = owner
            else:
                await self.db.execute("delete from files where id = $1", file_id)
                del self.files[file_id]


# -- 1. one reader, and every stream equal to the database ---------------------------------


class Spread:
    """What World needs of a service: a session, and URLs, here on each node in turn."""

    def __init__(self, fleet: Fleet) -> None:
        self.session = fleet.session
        self._nodes = fleet.nodes
        self._next = 0

    def url(self, path: str) -> str:
        node = self._nodes[self._next % len(self._nodes)]
        self._next += 1
        return node.url(path)


def a_story(rng: random.Random, length: int) -> list[Step]:
    """A random story of the isolation property test's steps: every user streams from the
    start (on every node in turn), then writes, transactions and streams coming and going."""
    told: list[Step] = [OpenUserStream(user, "plain") for user in range(USERS) for _ in range(2)]
    told += [Insert(user) for user in range(USERS)]

    def update() -> Update:
        return Update(
            rng.randrange(64),
            rng.choice(["pending", "processing", "ready", "failed"]),
            rng.randint(0, 100),
            rng.random() < 0.2,
        )

    def transfer() -> Transfer:
        return Transfer(rng.randrange(64), rng.randrange(USERS))

    change: list[Callable[[], Update | Transfer]] = [update, transfer]
    makers: list[Callable[[], Step]] = [
        lambda: Insert(rng.randrange(USERS)),
        lambda: Insert(rng.randrange(USERS)),
        update,
        update,
        update,
        lambda: Delete(rng.randrange(64)),
        transfer,
        transfer,
        lambda: Together(tuple(rng.choice(change)() for _ in range(3))),
        lambda: OpenUserStream(rng.randrange(USERS), rng.choice(["plain", "snapshot", "resume"])),
        lambda: OpenFileStream(rng.randrange(64)),
        lambda: Close(rng.randrange(64)),
    ]
    told += [rng.choice(makers)() for _ in range(length)]
    told.append(Transfer(0, 1))  # at least one ownership change
    return told


async def test_a_fleet_reads_the_database_once_and_every_stream_equals_the_database(
    database_url: str, broker: Broker
) -> None:
    db = await asyncpg.connect(database_url)
    try:
        async with fleet(database_url, broker) as the_fleet:
            await the_fleet.the_reader()
            await one_change_connection(db, NODES)
            world = World(Spread(the_fleet), db, [uuid.uuid4() for _ in range(USERS)])  # type: ignore[arg-type]
            try:
                for step in a_story(random.Random(21), 120):
                    await world.run(step)
                for watcher in world.watchers:
                    assert_isolated(world, watcher)
                for watcher in world.open:
                    await assert_converged(world, watcher)
                for watcher in world.watchers:
                    assert_isolated(world, watcher)
                assert len(world.open) >= NODES
                await one_change_connection(db, NODES)
                # Every node received through the broker; only the reader published.
                samples = [await the_fleet.metrics(node) for node in the_fleet.nodes]
                published = [s.get("streamer_broker_published_total", 0) for s in samples]
                assert sum(1 for p in published if p > 0) == 1, published
                assert all(s.get("streamer_broker_stale_total", 0) == 0 for s in samples)
            finally:
                for watcher in world.open:
                    await watcher.close()
            for node in the_fleet.nodes:
                assert node.serving.process.returncode is None
                errors = [r for r in node.serving.records() if r["level"] in ("error", "critical")]
                assert errors == [], errors
    finally:
        await db.close()


# -- 2. the reader SIGKILLed -----------------------------------------------------------------


async def test_the_reader_killed_another_reads_within_10_s_and_its_clients_resume_elsewhere(
    database_url: str, broker: Broker
) -> None:
    await reader_killed(database_url, broker)


async def test_on_postgres_15_over_a_unix_socket_a_fleet_reads_once_and_survives_its_reader(
    postgres15: tuple[str, str], broker: Broker
) -> None:
    """The same on the oldest PostgreSQL supported (users bring their own server), every
    process connected through its Unix socket."""
    await reader_killed(postgres15[1], broker)


async def reader_killed(database_url: str, broker: Broker) -> None:
    db = await asyncpg.connect(database_url)
    users = [uuid.uuid4() for _ in range(3)]
    writer = Writer(db, users, random.Random(2))
    watchers: list[tuple[Node, uuid.UUID, Watcher]] = []
    try:
        async with fleet(database_url, broker) as the_fleet:
            reader = await the_fleet.the_reader()
            await one_change_connection(db, NODES)
            for node in the_fleet.nodes:
                for index, user in enumerate(users):
                    watchers.append((node, user, await watch(the_fleet, node, user, index)))
            await writer.some(15)
            for _, user, watcher in watchers:
                await converged(watcher, db, user, "before the kill")

            reader.kill()
            killed = time.monotonic()
            survivors = [node for node in the_fleet.nodes if node is not reader]
            await writer.some(15)  # while no process reads, or a new one is being elected
            new_reader = await the_fleet.the_reader(survivors, timeout=FAILOVER)
            took = time.monotonic() - killed
            assert took <= FAILOVER, f"another process read only after {took:.1f} s"
            await writer.some(10)
            await one_change_connection(db, NODES - 1)

            for node, user, watcher in watchers:
                if node is not reader:
                    await converged(
                        watcher, db, user, f"a survivor's stream (reader now {new_reader.pid})"
                    )
            # The killed node's clients: cut, then resumed on the others with their cursors.
            for i, (node, user, watcher) in enumerate(list(watchers)):
                if node is not reader:
                    continue
                await watcher.until(lambda w=watcher: w.ended, "a dead node's stream is still open")  # type: ignore[misc]
                assert watcher.cursor is not None
                elsewhere = survivors[i % len(survivors)]
                cursor = {"last_event_id": watcher.cursor}
                resumed = await watch(
                    the_fleet, elsewhere, user, watcher.user, cursor, watcher.known
                )
                watchers.append((elsewhere, user, resumed))
                await converged(resumed, db, user, "a resumed stream")
            await writer.some(10)
            for node, user, watcher in watchers:
                if node is not reader:
                    await converged(watcher, db, user, "after the failover")
                    versions_never_go_back(watcher)
    finally:
        for _, _, watcher in watchers:
            await watcher.close()
        await db.close()


# -- 3. the broker lost ----------------------------------------------------------------------


async def broker_lost_and_back(database_url: str, broker: Broker, how: str) -> None:
    db = await asyncpg.connect(database_url)
    users = [uuid.uuid4() for _ in range(3)]
    writer = Writer(db, users, random.Random(3))
    watchers: list[tuple[uuid.UUID, Watcher]] = []
    try:
        async with fleet(database_url, broker) as the_fleet:
            await the_fleet.the_reader()
            for node in the_fleet.nodes:
                for index, user in enumerate(users):
                    watchers.append((user, await watch(the_fleet, node, user, index)))
            await writer.some(10)
            for user, watcher in watchers:
                await converged(watcher, db, user, "before the broker was lost")

            if how == "killed":
                broker.kill()
            else:
                broker.pause()
            # Lost: at once when killed, within the tick timeout (and a half) when paused.
            await writer.some(10)
            await the_fleet.all_ready(503, timeout=2 * TICK_TIMEOUT + 5)
            await writer.some(10)
            assert not any(watcher.ended for _, watcher in watchers)
            if how == "killed":
                broker.start()  # on the same port
            else:
                # Past every timeout: the nodes gave up on it, the reader's publishes wait.
                broker.resume()
            await the_fleet.all_ready(200, timeout=20)
            await writer.some(10)
            for user, watcher in watchers:
                await converged(watcher, db, user, f"after the broker was {how} and came back")
                versions_never_go_back(watcher)
            await one_change_connection(db, NODES)
    finally:
        for _, watcher in watchers:
            await watcher.close()
        await db.close()


async def test_the_broker_killed_and_restarted_streams_stay_open_and_catch_up(
    database_url: str, broker: Broker
) -> None:
    await broker_lost_and_back(database_url, broker, "killed")


async def test_the_broker_paused_past_the_timeouts_streams_stay_open_and_catch_up(
    database_url: str, broker: Broker
) -> None:
    await broker_lost_and_back(database_url, broker, "paused")


# -- 4. a stale reader ----------------------------------------------------------------------


@dataclass
class Heard:
    """Every message of the fleet's channels, as another client of the broker sees them."""

    messages: list[tuple[float, bytes, bytes, int, str]] = field(default_factory=list)

    def add(self, channel: bytes, data: bytes) -> None:
        _mac, _, body = data.partition(b" ")
        head = body.split(b"\n", 1)[0].decode()
        epoch, kind = head.split(" ")
        self.messages.append((time.monotonic(), channel, data, int(epoch), kind))

    def epochs(self) -> list[int]:
        return sorted({m[3] for m in self.messages})

    def late(self, old: int) -> list[tuple[float, bytes, bytes, int, str]]:
        """Messages of epoch `old` published after the first of a later epoch."""
        later = [m[0] for m in self.messages if m[3] > old]
        if not later:
            return []
        return [m for m in self.messages if m[3] == old and m[0] > min(later)]


@contextlib.asynccontextmanager
async def listening_to(broker: Broker) -> AsyncIterator[tuple[Heard, aioredis.Redis]]:
    client = aioredis.Redis.from_url(broker.url)
    pubsub = client.pubsub()
    await pubsub.psubscribe("streamer:*")
    heard = Heard()

    async def read() -> None:
        async for item in pubsub.listen():
            if item["type"] == "pmessage":
                heard.add(item["channel"], item["data"])

    task = asyncio.create_task(read())
    try:
        yield heard, client
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await pubsub.aclose()
        await client.aclose()


async def test_a_paused_reader_replaced_then_resumed_is_not_believed(
    database_url: str, broker: Broker
) -> None:
    db = await asyncpg.connect(database_url)
    user = uuid.uuid4()
    watchers: list[tuple[Node, Watcher]] = []
    try:
        async with (
            fleet(database_url, broker) as the_fleet,
            listening_to(broker) as (heard, client),
        ):
            old = await the_fleet.the_reader()
            for node in the_fleet.nodes:
                watchers.append((node, await watch(the_fleet, node, user, 0)))
            others = [node for node in the_fleet.nodes if node is not old]
            file_id = await Writer(db, [user], random.Random(4)).insert(user)
            for _, watcher in watchers:
                await converged(watcher, db, user, "before the pause")
            [old_epoch] = heard.epochs()
            # What the old reader published of this user's file (version 1): genuine, signed.
            first = [m for m in heard.messages if m[4] == "c" and str(user).encode() in m[1]]
            assert first, heard.messages

            old.pause()
            paused = time.monotonic()
            # Committed while it is paused: in its change connection's socket, read and
            # relayed with its old epoch as soon as it runs again.
            update = "update files set progress = $2 where id = $1"
            await db.execute(update, file_id, 10)
            new = await the_fleet.the_reader(others, timeout=FAILOVER + 2)
            took = time.monotonic() - paused
            assert took <= FAILOVER, f"another process read only after {took:.1f} s"
            await db.execute(update, file_id, 20)
            await db.execute(update, file_id, 30)
            for node, watcher in watchers:
                if node is not old:
                    await converged(watcher, db, user, "after the new reader came")
            stale_before = {node.pid: await the_fleet.stale(node) for node in others}

            old.resume()
            await the_fleet.the_reader(timeout=10)  # the new one, the old one says it is not
            assert await the_fleet.the_reader() is new
            # Whatever the old reader relays late, and a replay of what it published before
            # (what a reader that lost its election and publishes late sends: its epoch).
            for _, channel, data, _, _ in first:
                await client.publish(channel, data)

            async def dropped() -> bool:
                counts = [await the_fleet.stale(node) for node in others]
                return all(c > stale_before[n.pid] for c, n in zip(counts, others, strict=True))

            await wait_until(dropped, 10)
            late = heard.late(old_epoch)
            # A barrier: the next change is the first event any stream gets after the stale ones.
            marks = {id(w): len(w.events) for _, w in watchers}
            await db.execute(update, file_id, 40)
            for node, watcher in watchers:
                await converged(watcher, db, user, "after the old reader resumed")
                versions_never_go_back(watcher)
                if node is not old:
                    since = [e for e in watcher.events[marks[id(watcher)] :] if e[0] != "heartbeat"]
                    assert [(n, p["file"]["progress"]) for n, _, p in since] == [
                        ("file-update", 40)
                    ], describe(watcher)
                # No old state after a newer one, anywhere in the stream.
                progress = [
                    p["file"]["progress"] for n, _, p in watcher.events if n == "file-update"
                ]
                assert progress == sorted(progress), describe(watcher)
            stale = {node.pid: await the_fleet.stale(node) for node in the_fleet.nodes}
            print(
                f"old reader {old.pid}: {len(late)} message(s) late {[m[4] for m in late]};"
                f" stale before {stale_before}, after {stale}"
            )
            # The old reader stood down: its change connection closed, and it waits on the
            # election again, as a standby.
            await one_change_connection(db, NODES)
    finally:
        for _, watcher in watchers:
            await watcher.close()
        await db.close()


# -- 5. STREAMER_BROKER_URL at start-up ------------------------------------------------------


def test_a_broker_url_of_another_scheme_stops_start_up_with_one_line_naming_it() -> None:
    for url in ("nats://127.0.0.1:4222", "http://127.0.0.1:6379"):
        result = streamer(
            "serve", DATABASE_URL=NOWHERE, STREAMER_JWT_SECRET=SECRET, STREAMER_BROKER_URL=url
        )
        assert result.returncode != 0
        assert result.stdout == ""
        [line] = result.stderr.splitlines()
        assert "STREAMER_BROKER_URL" in line, line


def test_a_broker_that_cannot_be_reached_stops_start_up_with_one_line(database_url: str) -> None:
    result = streamer(
        "serve",
        "--no-migrate",
        DATABASE_URL=database_url,
        STREAMER_JWT_SECRET=SECRET,
        STREAMER_SOURCE=SOURCE,
        STREAMER_PORT="0",
        STREAMER_BROKER_URL="redis://127.0.0.1:1/0",  # nothing listens on port 1
    )
    assert result.returncode != 0
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert "STREAMER_BROKER_URL" in line, line


def test_a_paused_broker_stops_start_up_with_one_line(database_url: str, broker: Broker) -> None:
    broker.pause()  # accepts the connection, never answers
    try:
        result = streamer(
            "serve",
            "--no-migrate",
            DATABASE_URL=database_url,
            STREAMER_JWT_SECRET=SECRET,
            STREAMER_SOURCE=SOURCE,
            STREAMER_PORT="0",
            STREAMER_BROKER_URL=broker.url,
        )
    finally:
        broker.resume()
    assert result.returncode != 0
    [line] = result.stderr.splitlines()
    assert "STREAMER_BROKER_URL" in line, line


async def test_a_stream_that_opens_as_the_broker_session_ends_waits_for_the_next(
    database_url: str, broker: Broker
) -> None:
    """A first stream of an owner subscribes its channel a moment after it asks to: the
    session may be gone by then (a broker restart, a new reader). That is no error (it was
    an AttributeError, a 500 to the browser): the next session subscribes every owner
    followed, and its recovery catches the stream up."""
    service = await start_service(database_url, broker_url=broker.url)
    try:
        source = service.app[keys.DISPATCHER].source
        assert isinstance(source, BrokerSource)
        following = source.follow(("files", str(uuid.uuid4())))
        assert following is not None
        await source.close()  # the session ends before the subscription runs
        async with asyncio.timeout(5):
            await following
    finally:
        await stop_service(service)
    # The service was the fleet's reader: stopped, it reads no more (with wal, its slot and
    # walsender are gone: they were left running, with the horizon sampled for ever).
    db = await asyncpg.connect(database_url)
    try:
        query = (
            "select count(*) = 0 from pg_replication_slots where active"
            " and database = current_database()"
        )

        async def none_active() -> bool:
            return bool(await db.fetchval(query))

        await wait_until(none_active, 5)  # a walsender ends a moment after its socket
    finally:
        await db.close()


async def test_a_crowd_of_new_owners_is_subscribed_at_the_broker_in_a_few_commands(
    database_url: str, broker: Broker, db: asyncpg.Connection
) -> None:
    """Streams of new owners arriving at once (a restart's crowd) are subscribed in one
    SUBSCRIBE each turn of the loop, not one command each, and each receives its changes."""
    service = await start_service(database_url, broker_url=broker.url)
    redis = sync_redis.Redis.from_url(broker.url)
    try:

        def subscribes() -> int:
            stats = redis.info("commandstats").get("cmdstat_subscribe", {})
            return int(stats.get("calls", 0))

        before = subscribes()
        users = [uuid.uuid4() for _ in range(40)]
        async with contextlib.AsyncExitStack() as stack:
            url = service.url("/api/files/events")
            opening = [open_stream(service.session, url, token_for(u)) for u in users]
            streams = await asyncio.gather(*map(stack.enter_async_context, opening))
            assert subscribes() - before < len(users) // 4
            ids = [await insert_file(db, user) for user in users]
            for stream, file_id in zip(streams, ids, strict=True):
                assert (await stream.next()).file["id"] == str(file_id)
    finally:
        redis.close()
        await stop_service(service)


def numsub(broker: Broker, channel: str) -> int:
    client = sync_redis.Redis.from_url(broker.url)
    try:
        [(_, count)] = client.pubsub_numsub(channel)
        return int(count)
    finally:
        client.close()


async def test_an_owner_left_and_followed_again_at_once_stays_subscribed_and_gets_its_changes(
    database_url: str, broker: Broker, db: asyncpg.Connection
) -> None:
    """An owner's last stream leaves and a new one of it comes in the same turn of the loop
    (a herd: one tab cut in its set-up, the user's other tab arriving), while other owners'
    subscriptions wait for the next command; and an owner followed and left at once. The
    broker is told in the order asked: the first stays subscribed (its new stream confirmed
    by its second SUBSCRIBE, not by the first) and gets its changes; the second is not left
    subscribed (an UNSUBSCRIBE sent ahead of the SUBSCRIBE it undoes left it so)."""
    service = await start_service(database_url, broker_url=broker.url)
    try:
        app = service.app
        hub, feed = app[keys.HUB], app[keys.FEEDS].get("files")
        source = app[keys.DISPATCHER].source
        assert isinstance(source, BrokerSource) and feed is not None
        owner, other, passer = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        expires = time.time() + 60
        # All in one turn of the loop, as the hub's callers do it.
        hub.subscribe(feed, str(other), "someone else")  # a SUBSCRIBE is on its way
        first = hub.subscribe(feed, str(owner), str(owner))
        hub.release(first)  # gone at once: its owner is left
        again = hub.subscribe(feed, str(owner), str(owner))  # and followed again
        passing = hub.subscribe(feed, str(passer), str(passer))
        hub.release(passing)  # this one left for good
        # Another stream of the owner: given once the owner's subscription is confirmed.
        tab = await asyncio.wait_for(
            hub.open(feed, str(owner), str(owner), None, expires_at=expires), 5
        )
        # The broker has done whatever came before a later SUBSCRIBE once that is confirmed.
        await asyncio.wait_for(
            hub.open(feed, str(uuid.uuid4()), "a third", None, expires_at=expires), 5
        )
        prefix = fleet_prefix(source.signed.key)
        channel = owner_channel(prefix, "files", str(owner))
        assert numsub(broker, channel) == 1, "the owner's channel was unsubscribed last"
        assert numsub(broker, owner_channel(prefix, "files", str(passer))) == 0
        async with open_stream(service.session, service.url(EVENTS), token_for(owner)) as stream:
            file_id = await insert_file(db, owner)
            assert (await stream.next()).file["id"] == str(file_id)
        hub.release(tab)
        hub.release(again)
    finally:
        await stop_service(service)


async def test_an_owner_followed_during_the_first_subscribe_of_a_session_is_confirmed_on_it(
    broker: Broker,
) -> None:
    """A key followed while a session's first SUBSCRIBE is on its way (streams arriving as
    the node reconnects) is subscribed after it, on the session's one connection: two
    commands at once made redis-py's pub/sub open a second connection, one of the two
    never read (its confirmation never came, or the session's ticks never did)."""
    key = b"k" * 32

    async def signing_key() -> bytes:
        return key

    async def no_mark(_token: str) -> None:
        return None

    source = BrokerSource(
        broker.url,
        Signed(signing_key),
        no_mark,
        name=SOURCE,
        metrics=Metrics(),
        tick_timeout=5,
    )
    publisher = aioredis.Redis.from_url(broker.url)
    prefix = fleet_prefix(key)
    connecting = asyncio.ensure_future(source.connect(lambda _payload: None))
    try:
        following = None
        async with asyncio.timeout(5):
            while following is None:  # until the first SUBSCRIBE is being sent
                await asyncio.sleep(0)
                following = source.follow(("files", "late"))
        while not connecting.done():  # the session's reader, ticking
            await publisher.publish(all_channel(prefix), message(key, 7, TICK, "1"))
            await asyncio.sleep(0.01)
        await connecting
        await asyncio.wait_for(following, 5)
        assert numsub(broker, owner_channel(prefix, "files", "late")) == 1
        clients = await publisher.client_list(_type="pubsub")
        assert len(clients) == 1, clients
    finally:
        connecting.cancel()
        await source.close()
        await publisher.aclose()


async def test_streams_opening_while_the_broker_session_is_cut_again_and_again_end_equal(
    database_url: str, broker: Broker, db: asyncpg.Connection
) -> None:
    """A herd's streams arrive while the node's sessions at the broker come and go (each
    cut the moment it is ready, its reconnect racing the streams' subscriptions), users
    writing all along: every stream ends equal to the database, nothing lost."""
    service = await start_service(database_url, broker_url=broker.url)
    admin = aioredis.Redis.from_url(broker.url)
    rng = random.Random(11)
    users = [uuid.uuid4() for _ in range(10)]
    writer = Writer(db, users, rng)
    dispatcher = service.app[keys.DISPATCHER]
    stop = asyncio.Event()
    cuts = 0

    async def cut_each_session() -> None:
        nonlocal cuts
        while not stop.is_set():
            await dispatcher.ready.wait()
            if stop.is_set():
                return
            cuts += await admin.client_kill_filter(_type="pubsub")
            await wait_until(lambda: not dispatcher.ready.is_set() or stop.is_set())

    async def write() -> None:
        while not stop.is_set():
            await writer.some(1)

    async def opened(user: uuid.UUID) -> tuple[uuid.UUID, Watcher]:
        response = await service.session.get(
            service.url(EVENTS),
            headers={"Authorization": f"Bearer {token_for(user)}"},
            params={"snapshot": "1"},  # the page's rows first, then what changes
        )
        assert response.status == 200, await response.text()
        watcher = Watcher(0, None, response, opened_at=0)
        watcher.reader = asyncio.create_task(watcher.read())
        await watcher.until(lambda: "synced" in watcher.names(), "no synced")
        return user, watcher

    def more_cuts_than(count: int) -> Callable[[], bool]:
        return lambda: cuts > count

    watchers: list[tuple[uuid.UUID, Watcher]] = []
    await writer.some(10)
    background = [asyncio.ensure_future(cut_each_session()), asyncio.ensure_future(write())]
    try:
        for wave in range(4):  # waves of tabs (some of users streaming here), each in a gap
            await wait_until(more_cuts_than(wave), 20)
            watchers += await asyncio.gather(*map(opened, rng.sample(users, 4)))
        stop.set()
        await asyncio.gather(*background)
        await asyncio.wait_for(dispatcher.ready.wait(), 20)
        await writer.some(5)
        for user, watcher in watchers:
            await converged(watcher, db, user, f"after {cuts} sessions cut")
            versions_never_go_back(watcher)
    finally:
        stop.set()
        for task in background:
            task.cancel()
        for _, watcher in watchers:
            await watcher.close()
        await admin.aclose()
        await stop_service(service)
