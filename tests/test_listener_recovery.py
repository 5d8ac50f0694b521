"""The change connection (LISTEN, or the walsender of the WAL source) drops (killed backend,
Postgres restart): open streams stay open and receive every change made meanwhile, and
/readyz says 503 until it is back."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from streamer import keys
from streamer.changes import Change
from streamer.dispatch import Dispatcher
from streamer.embedded import EmbeddedPostgres
from tests.client import open_stream
from tests.conftest import (
    Service,
    change_source,
    insert_file,
    kill_change_connection,
    migrate_for_tests,
    start_service,
    stop_service,
    token_for,
    wait_until,
)

EVENTS = "/api/files/events"


def holds(dispatcher: Dispatcher, row_id: uuid.UUID) -> bool:
    """Whether a change of this row waits in the dispatcher's inbox."""
    return any(
        isinstance(held.payload, Change) and held.payload.row_id == str(row_id)
        for held in dispatcher._inbox
    )


class Blackhole:
    """A TCP port that accepts connections and never answers: a Postgres that is down in the
    most awkward way. Closing it lets every waiting connection attempt fail."""

    def __init__(self) -> None:
        self.attempted = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Blackhole:
        self._server = await asyncio.start_server(self._hold, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def dsn(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"postgresql://postgres@127.0.0.1:{port}/postgres"

    async def _hold(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        self.attempted.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self._writers:
                writer.close()
            await self._server.wait_closed()
            self._server = None


def listener_of(service: Service) -> Dispatcher:
    dispatcher: Dispatcher = service.app[keys.DISPATCHER]
    return dispatcher


async def kill_listener(service: Service) -> None:
    """Terminate the listener's backend, as the database's owner (a writer may not)."""
    owner = await asyncpg.connect(service.settings.database_url)
    try:
        await kill_change_connection(service, owner)
    finally:
        await owner.close()


@contextlib.asynccontextmanager
async def listener_held_down(service: Service) -> AsyncIterator[None]:
    """Kill the listener's backend and keep it from reconnecting until the block ends."""
    listener = listener_of(service)
    real_dsn = change_source(service).dsn
    async with Blackhole() as hole:
        change_source(service).dsn = hole.dsn
        try:
            await kill_listener(service)
            await asyncio.wait_for(hole.attempted.wait(), 10)
            assert not listener.ready.is_set()
            yield
        finally:
            change_source(service).dsn = real_dsn
    # The attempt in the hole fails; the next one reaches the real database.


async def back_up(service: Service, sessions_before: int) -> None:
    listener = listener_of(service)
    await wait_until(lambda: listener.ready.is_set() and listener.sessions > sessions_before, 20)


async def readyz(service: Service) -> tuple[int, dict[str, str]]:
    async with service.session.get(service.url("/readyz")) as response:
        return response.status, await response.json()


async def test_a_stream_stays_open_and_gets_every_change_made_while_the_listener_was_down(
    service: Service, db, user, other_user
):
    updated, deleted, given = [await insert_file(db, user, f"{n}.pdf") for n in "udg"]
    sessions = listener_of(service).sessions
    async with open_stream(service.session, service.url(EVENTS), token_for(user)) as stream:
        async with listener_held_down(service):
            status, body = await readyz(service)
            assert (status, body["code"]) == (503, "UNAVAILABLE")
            assert "listener" in body["error"]

            added = await insert_file(db, user, "added.pdf")
            await db.execute("update files set progress = 40 where id = $1", updated)
            await db.execute("update files set progress = 41 where id = $1", updated)
            await db.execute("delete from files where id = $1", deleted)
            await db.execute("update files set user_id = $2 where id = $1", given, other_user)
            theirs = await insert_file(db, other_user, "theirs.pdf")
        await back_up(service, sessions)
        assert (await readyz(service))[0] == 200

        latest: dict[str, tuple[str, int | None]] = {}
        async with asyncio.timeout(10):
            while latest != {
                str(added): ("file-update", 0),
                str(updated): ("file-update", 41),
                str(deleted): ("file-deleted", None),
                str(given): ("file-deleted", None),
            }:
                event = await stream.next()
                assert event.name in ("file-update", "file-deleted"), event.name
                file = event.json["file"]
                latest[file["id"]] = (event.name, file.get("progress"))

        # Still the same stream, live: no reconnect, no second `synced`.
        later = await insert_file(db, user, "later.pdf")
        assert (await stream.next()).file["id"] == str(later)
        assert [e.name for e in stream.events].count("synced") == 1
        assert not stream.ended
        assert str(theirs) not in "".join(e.data for e in stream.events)

    reconnects = service.app[keys.METRICS].listener_reconnects._value.get()
    assert reconnects >= 1


async def test_writes_racing_the_listeners_reconnect_are_not_lost(service: Service, db, user):
    async with open_stream(service.session, service.url(EVENTS), token_for(user)) as stream:
        for round_ in range(3):
            sessions = listener_of(service).sessions
            await kill_listener(service)
            ids = [await insert_file(db, user, f"{round_}-{i}.pdf") for i in range(5)]
            await back_up(service, sessions)
            got: set[str] = set()
            async with asyncio.timeout(10):
                while not {str(i) for i in ids} <= got:
                    got.add((await stream.next()).file["id"])
        assert [e.name for e in stream.events].count("synced") == 1


async def test_a_one_file_stream_survives_the_listener_and_ends_when_the_file_became_ready(
    service: Service, db, user
):
    file_id = await insert_file(db, user, status="processing", progress=10)
    sessions = listener_of(service).sessions
    async with open_stream(
        service.session, service.url(f"/api/files/{file_id}/events"), token_for(user), synced=False
    ) as stream:
        assert (await stream.next()).file["progress"] == 10
        async with listener_held_down(service):
            await db.execute("update files set progress = 60 where id = $1", file_id)
            await db.execute(
                "update files set status = 'ready', progress = 100 where id=$1", file_id
            )
        await back_up(service, sessions)
        rest = await stream.end()
    assert rest[-1].file["status"] == "ready"
    assert [e.file["progress"] for e in rest] in ([100], [60, 100])


async def test_readyz_is_503_while_the_listener_cannot_connect_and_200_after(service: Service, db):
    assert (await readyz(service))[0] == 200
    sessions = listener_of(service).sessions
    async with listener_held_down(service):
        assert (await readyz(service))[0] == 503
        metrics = await (await service.session.get(service.url("/metrics"))).text()
        assert "streamer_listener_up 0.0" in metrics
    await back_up(service, sessions)
    assert (await readyz(service))[0] == 200


async def test_a_stream_opened_while_the_listener_recovers_misses_nothing(
    service: Service, db, user, monkeypatch: pytest.MonkeyPatch
):
    """The listener LISTENs again, then reads the database to catch open streams up. A stream
    opened in between, for a user it did not know of, still gets what commits meanwhile."""
    listener = listener_of(service)
    recovering, go_on = asyncio.Event(), asyncio.Event()
    real_changes = listener.reads.changes

    async def held_changes(*args, **kwargs):
        recovering.set()
        await go_on.wait()
        return await real_changes(*args, **kwargs)

    monkeypatch.setattr(listener.reads, "changes", held_changes)
    sessions = listener.sessions
    await kill_listener(service)
    await asyncio.wait_for(recovering.wait(), 10)
    async with open_stream(service.session, service.url(EVENTS), token_for(user)) as stream:
        file_id = await insert_file(db, user, "committed-during-recovery.pdf")
        # The notification waits in the listener's inbox.
        await wait_until(lambda: holds(listener, file_id))
        go_on.set()
        await back_up(service, sessions)
        event = await stream.next()
        assert (event.name, event.file["id"]) == ("file-update", str(file_id))


async def test_a_stream_opened_while_the_listener_recovers_never_gets_older_state_after_newer(
    service: Service, db, user, monkeypatch: pytest.MonkeyPatch
):
    """The listener's catch-up read may be older than the read of a stream opening at the
    same time; that stream must not be sent the older state after its own."""
    doomed = await insert_file(db, user, "doomed.pdf", status="processing")
    listener = listener_of(service)
    caught_up, go_on = asyncio.Event(), asyncio.Event()
    real_changes = listener.reads.changes

    async def held_catch_up(*args, **kwargs):
        result = await real_changes(*args, **kwargs)
        caught_up.set()
        await go_on.wait()
        return result

    monkeypatch.setattr(listener.reads, "changes", held_catch_up)
    sessions = listener.sessions
    url = service.url(EVENTS)
    async with open_stream(service.session, url, token_for(user)) as first_tab:
        async with listener_held_down(service):
            await db.execute("update files set progress = 50 where id = $1", doomed)
        await asyncio.wait_for(caught_up.wait(), 10)
        # The listener has read progress 50 and not yet told anyone. Now the file goes...
        await db.execute("delete from files where id = $1", doomed)
        await wait_until(lambda: holds(listener, doomed))
        # ...and a second tab opens with a snapshot that already lacks it.
        async with open_stream(
            service.session, url, token_for(user), params={"snapshot": "1"}
        ) as second_tab:
            assert [e.name for e in second_tab.events] == ["synced"]
            go_on.set()
            await back_up(service, sessions)
            marker = await insert_file(db, user, "marker.pdf")
            seen = await second_tab.until("file-update")
            assert [e.json["file"]["id"] for e in seen] == [str(marker)]

        # The first tab, older than both reads, gets the catch-up and then the delete.
        first_seen = {}
        async with asyncio.timeout(10):
            while str(marker) not in first_seen:
                event = await first_tab.next()
                first_seen[event.json["file"]["id"]] = event.name
        assert first_seen[str(doomed)] == "file-deleted"


async def test_a_postgres_restart_loses_nothing_and_the_stream_stays_open(user):
    # An own server: stopping the shared one would cut every other test's connections.
    server = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="streamer-restart-")), fast=True)
    await asyncio.to_thread(server.start)
    try:
        url = server.url()
        await asyncio.to_thread(migrate_for_tests, url)
        service = await start_service(url)
        try:
            await _restart_while_streaming(service, server, url, user)
        finally:
            await stop_service(service)
    finally:
        await asyncio.to_thread(server.destroy)


async def _restart_while_streaming(
    service: Service, server: EmbeddedPostgres, url: str, user: uuid.UUID
) -> None:
    listener = listener_of(service)
    real_dsn = change_source(service).dsn
    db = await asyncpg.connect(url)
    async with open_stream(service.session, service.url(EVENTS), token_for(user)) as stream:
        before = await insert_file(db, user, "before.pdf")
        assert (await stream.next()).file["id"] == str(before)
        in_flight = db.transaction()
        await in_flight.start()
        await insert_file(db, user, "never-committed.pdf")

        sessions = listener.sessions
        async with Blackhole() as hole:
            # Keep the listener away until writes were made on the restarted server.
            change_source(service).dsn = hole.dsn
            await asyncio.to_thread(server.stop)
            await asyncio.wait_for(hole.attempted.wait(), 20)
            await asyncio.to_thread(server.start)
            assert (await readyz(service))[0] == 503
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                await db.close(timeout=1)
            db = await asyncpg.connect(url)
            added = await insert_file(db, user, "after-restart.pdf")
            await db.execute("update files set progress = 70 where id = $1", before)
            change_source(service).dsn = real_dsn
        await back_up(service, sessions)

        latest: dict[str, int] = {}
        async with asyncio.timeout(10):
            while latest != {str(added): 0, str(before): 70}:
                event = await stream.next()
                latest[event.file["id"]] = event.file["progress"]
        later = await insert_file(db, user, "later.pdf")
        assert (await stream.next()).file["id"] == str(later)
        assert [e.name for e in stream.events].count("synced") == 1
        assert all("never-committed" not in e.data for e in stream.events)
    await db.close()

    async def ready() -> bool:
        return (await readyz(service))[0] == 200

    await wait_until(ready, 20)


async def test_history_pruned_while_the_listener_was_down_ends_streams_into_a_reset(
    service: Service, db, owner_db, user
):
    """The listener cannot catch streams up past pruned tombstones: it ends them, and each
    resumes into `reset` and a full snapshot rather than a silent gap."""
    kept = await insert_file(db, user, "kept.pdf")
    doomed = await insert_file(db, user, "doomed.pdf")
    sessions = listener_of(service).sessions
    async with open_stream(service.session, service.url(EVENTS), token_for(user)) as stream:
        async with listener_held_down(service):
            await db.execute("delete from files where id = $1", doomed)
            assert await owner_db.fetchval("select streamer.prune('files', interval '0 seconds')")
        await back_up(service, sessions)
        await stream.end()
    cursor = stream.last_id
    assert cursor is not None

    async with open_stream(
        service.session, service.url(EVENTS), token_for(user), headers={"Last-Event-ID": cursor}
    ) as resumed:
        names = [e.name for e in resumed.events]
        assert names[0] == "reset"
        snapshot = resumed.events[1 : names.index("synced")]
    assert [e.file["id"] for e in snapshot] == [str(kept)]
