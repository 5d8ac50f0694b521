"""Whatever the interleaving of writes, disconnects and listener kills, every client ends up
seeing exactly its user's rows.

A client is what a browser's EventSource and a small store do: open with `?snapshot=1`,
apply each event (a file-update with a higher version replaces, file-deleted removes,
reset clears), remember the last `id:`, and after a disconnect resume with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from streamer import keys
from streamer.sources.notify import NotifySource
from streamer.sources.wal import WalSource
from tests.client import Stream
from tests.conftest import (
    SOURCE,
    PostgresServer,
    Service,
    as_writer,
    change_source,
    fresh_database,
    insert_file,
    start_service,
    stop_service,
    token_for,
    wait_until,
)

USERS = 3
EVENTS = "/api/files/events"

user_index = st.integers(0, USERS - 1)
file_index = st.integers(0, 1000)
Op = tuple[Any, ...]
operations = st.one_of(
    st.tuples(st.just("insert"), user_index),
    st.tuples(st.just("update"), file_index, st.integers(0, 100)),
    st.tuples(st.just("delete"), file_index),
    st.tuples(st.just("transfer"), file_index, user_index),
    # Two transactions that take their versions in one order and commit in the other; with
    # `away`, the client that saw the second leaves before the first commits.
    st.tuples(st.just("crossed"), file_index, file_index, st.booleans()),
    st.tuples(st.just("leave"), user_index),  # the client is away until it comes back
    st.tuples(st.just("come_back"), user_index),
    st.tuples(st.just("resume"), user_index),  # away for an instant: events in flight
    st.tuples(st.just("kill_listener")),
)


@dataclass
class Client:
    service: Service
    user: uuid.UUID
    view: dict[str, dict[str, Any]] = field(default_factory=dict)
    cursor: str | None = None
    ended: bool = True
    _stream: Stream | None = None
    _consumer: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        headers = {"Authorization": f"Bearer {token_for(self.user)}"}
        params = {}
        if self.cursor is None:
            params["snapshot"] = "1"
        else:
            headers["Last-Event-ID"] = self.cursor
        response = await self.service.session.get(
            self.service.url(EVENTS), headers=headers, params=params
        )
        assert response.status == 200, await response.text()
        self._stream = Stream(response)
        self._stream._reader = asyncio.create_task(self._stream._read())
        self.ended = False
        self._consumer = asyncio.create_task(self._consume(self._stream))

    async def _consume(self, stream: Stream) -> None:
        # Every event the reader parses, until it ends (a None): the stream closed, by the
        # server or by `disconnect`.
        while (event := await stream._queue.get()) is not None:
            if event.name == "reset":
                self.view.clear()
            elif event.name == "file-update":
                file = event.file
                held = self.view.get(file["id"])
                if held is None or file["version"] > held["version"]:
                    self.view[file["id"]] = file
            elif event.name == "file-deleted":
                self.view.pop(event.json["file"]["id"], None)
            if event.id is not None:
                self.cursor = event.id
        self.ended = True

    async def has(self, file_id: str, version: int) -> None:
        await wait_until(lambda: self.view.get(file_id, {}).get("version") == version)

    async def disconnect(self) -> None:
        """Leave as a closed tab does: what was received is applied, the rest is lost."""
        if self._stream is not None and self._stream._reader is not None:
            self._stream._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stream._reader
            self._stream._queue.put_nowait(None)  # a reader cancelled before it ran says nothing
        if self._consumer is not None:
            await self._consumer
        if self._stream is not None:
            self._stream.response.close()
        self._stream, self._consumer, self.ended = None, None, True


async def rows_of(db: asyncpg.Connection, user: uuid.UUID) -> dict[str, tuple[int, int, str]]:
    rows = await db.fetch(
        "select id, streamer_version as version, progress, status from files where user_id=$1", user
    )
    return {str(r["id"]): (r["version"], r["progress"], r["status"]) for r in rows}


async def wait_live(service: Service, source: NotifySource | WalSource, killed: set[int]) -> None:
    """Until the change connection is one that was not killed and the dispatcher is live."""
    dispatcher = service.app[keys.DISPATCHER]
    await wait_until(
        lambda: dispatcher.ready.is_set() and source.pid is not None and source.pid not in killed,
        20,
    )


def seen_by(client: Client) -> dict[str, tuple[int, int, str]]:
    return {i: (f["version"], f["progress"], f["status"]) for i, f in client.view.items()}


@dataclass
class Story:
    """The service, two writers and an admin, the clients, and the files written so far."""

    service: Service
    db: asyncpg.Connection
    other: asyncpg.Connection  # the second writer of crossed transactions
    admin: asyncpg.Connection
    users: list[uuid.UUID]
    clients: list[Client]
    files: list[uuid.UUID]
    source: NotifySource | WalSource
    killed: set[int] = field(default_factory=set)

    async def run(self, op: Op) -> None:
        kind, args = op[0], op[1:]
        db, files, clients = self.db, self.files, self.clients
        if kind == "insert":
            files.append(await insert_file(db, self.users[args[0]], f"f{len(files)}.bin"))
        elif kind == "leave":
            await clients[args[0]].disconnect()
        elif kind == "come_back":
            if clients[args[0]].ended:
                await clients[args[0]].connect()
        elif kind == "resume":
            await clients[args[0]].disconnect()
            await clients[args[0]].connect()
        elif kind == "kill_listener":
            if self.source.pid is not None:
                self.killed.add(self.source.pid)
                await self.admin.execute("select pg_terminate_backend($1)", self.source.pid)
        elif not files:
            return
        elif kind == "update":
            file_id, progress = files[args[0] % len(files)], args[1]
            await db.execute("update files set progress = $2 where id = $1", file_id, progress)
        elif kind == "delete":
            await db.execute("delete from files where id = $1", files.pop(args[0] % len(files)))
        elif kind == "transfer":
            file_id, to = files[args[0] % len(files)], self.users[args[1]]
            await db.execute("update files set user_id = $2 where id = $1", file_id, to)
        elif kind == "crossed":
            await self.crossed(files[args[0] % len(files)], files[args[1] % len(files)], args[2])
        else:
            raise AssertionError(kind)

    async def crossed(self, first: uuid.UUID, second: uuid.UUID, away: bool) -> None:
        if first == second:
            return  # the second would wait for the first's row lock
        if SOURCE == "wal":
            # A WAL source reconnects once the transactions open as it creates its
            # slot have ended: this one must not wait on it. Until the service
            # notices a kill, it is still ready on the connection that is gone.
            await wait_live(self.service, self.source, self.killed)
        async with self.db.transaction():
            await self.db.execute("update files set progress = 1 where id = $1", first)
            owner, version = await self.other.fetchrow(
                "update files set progress = 2 where id = $1 returning user_id, streamer_version",
                second,
            )
            client = self.clients[self.users.index(owner)]
            if away and not client.ended:
                await client.has(str(second), version)
                await client.disconnect()

    async def converge(self, client: Client) -> None:
        """Until the client sees exactly its user's rows, reconnecting as a browser does."""
        if client.ended:  # the server may end a stream (a reset); a browser reconnects
            await client.connect()
        expected = await rows_of(self.db, client.user)

        async def caught_up() -> bool:
            if seen_by(client) == expected:
                return True
            if client.ended:
                await client.connect()
            return False

        try:
            await wait_until(caught_up)
        except TimeoutError:
            raise AssertionError(
                f"client of user {self.users.index(client.user)} sees {seen_by(client)}, "
                f"the database has {expected}"
            ) from None


async def scenario(url: str, ops: list[Op]) -> None:
    service = await start_service(url)
    db = await asyncpg.connect(as_writer(url))
    other = await asyncpg.connect(as_writer(url))
    admin = await asyncpg.connect(url)
    users = [uuid.uuid4() for _ in range(USERS)]
    clients = [Client(service, u) for u in users]
    files = [await insert_file(db, u, f"{n}.bin") for u in users for n in range(2)]
    story = Story(service, db, other, admin, users, clients, files, change_source(service))
    try:
        for client in clients:
            await client.connect()
        for op in ops:
            await story.run(op)
        await asyncio.wait_for(service.app[keys.DISPATCHER].ready.wait(), 20)
        for client in clients:
            await story.converge(client)
    finally:
        for client in clients:
            await client.disconnect()
        await db.close()
        await other.close()
        await admin.close()
        await stop_service(service)


@settings(
    max_examples=20,
    deadline=None,
    database=None,
    derandomize=True,  # the same examples on every run
    # No shrinking: each failing try waits out the timeout above. The falsifying example
    # is printed as generated, and replays as it is.
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)
@given(ops=st.lists(operations, min_size=5, max_size=40))
def test_every_client_ends_up_with_exactly_its_users_rows(
    postgres: PostgresServer, template: str, ops: list[Op]
):
    with fresh_database(postgres, template) as url:
        asyncio.run(scenario(url, ops))
