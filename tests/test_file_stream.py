"""GET /api/files/{id}/events: one file's progress, from its current state to its end."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid

import aiohttp
import pytest

from streamer import keys
from tests.client import Event, Stream, open_stream
from tests.conftest import (
    Service,
    backend_count,
    change_connections,
    insert_file,
    start_service,
    stop_service,
    token_for,
    wait_until,
)


def file_url(service: Service, file_id: uuid.UUID | str) -> str:
    return service.url(f"/api/files/{file_id}/events")


def watch(
    service: Service, file_id: uuid.UUID | str, user: uuid.UUID
) -> contextlib.AbstractAsyncContextManager[Stream]:
    """One file's stream; it has no `synced`: its first event is the file's state."""
    return open_stream(service.session, file_url(service, file_id), token_for(user), synced=False)


async def test_a_file_goes_from_pending_through_progress_to_ready_and_the_stream_ends(
    service: Service, db, user
):
    file_id = await insert_file(db, user, "upload.mov")
    async with watch(service, file_id, user) as stream:
        first = await stream.next()
        assert first.name == "file-update"
        assert first.id is not None
        assert (first.file["id"], first.file["status"]) == (str(file_id), "pending")

        steps = [
            ("processing", 10, "upload"),
            ("processing", 40, "transcode"),
            ("processing", 75, "transcode"),
            ("processing", 99, "thumbnails"),
            ("ready", 100, None),
        ]
        for status, progress, stage in steps:
            await db.execute(
                "update files set status = $2, progress = $3, processing_stage = $4 where id = $1",
                file_id,
                status,
                progress,
                stage,
            )
        rest = await stream.end()

    assert [(e.file["status"], e.file["progress"], e.file["processing_stage"]) for e in rest] == (
        steps
    )
    assert all(e.name == "file-update" and e.id is not None for e in rest)
    versions = [first.file["version"], *(e.file["version"] for e in rest)]
    assert versions == sorted(set(versions))
    assert stream.ended


async def test_a_failed_file_ends_the_stream_with_its_error_message(service: Service, db, user):
    file_id = await insert_file(db, user, "broken.pdf", status="processing", progress=30)
    async with watch(service, file_id, user) as stream:
        assert (await stream.next()).file["status"] == "processing"
        await db.execute(
            "update files set status = 'failed', error_message = 'corrupt header' where id = $1",
            file_id,
        )
        rest = await stream.end()
    assert len(rest) == 1
    assert rest[0].file["status"] == "failed"
    assert rest[0].file["error_message"] == "corrupt header"


async def test_deleting_the_file_ends_the_stream_with_file_deleted(service: Service, db, user):
    file_id = await insert_file(db, user, status="processing")
    async with watch(service, file_id, user) as stream:
        await stream.next()
        await db.execute("delete from files where id = $1", file_id)
        rest = await stream.end()
    assert [e.name for e in rest] == ["file-deleted"]
    assert rest[0].json["file"] == {"id": str(file_id)}
    assert rest[0].id is not None


async def test_a_file_given_to_another_user_ends_the_watchers_stream_with_file_deleted(
    service: Service, db, user, other_user
):
    file_id = await insert_file(db, user, "shared.pdf", status="processing")
    async with watch(service, file_id, user) as stream:
        await stream.next()
        await db.execute("update files set user_id = $2 where id = $1", file_id, other_user)
        rest = await stream.end()
        # The new owner's later progress is none of the old owner's business.
        await db.execute("update files set progress = 60 where id = $1", file_id)
    assert [e.name for e in rest] == ["file-deleted"]
    assert rest[0].json["file"] == {"id": str(file_id)}


async def test_a_file_already_ready_gets_its_state_and_the_end(service: Service, db, user):
    file_id = await insert_file(db, user, status="ready", progress=100)
    async with watch(service, file_id, user) as stream:
        events = await stream.end()
    assert [(e.name, e.file["status"]) for e in events] == [("file-update", "ready")]


async def test_a_file_already_failed_gets_its_state_and_the_end(service: Service, db, user):
    file_id = await insert_file(db, user, status="failed", error_message="too large")
    async with watch(service, file_id, user) as stream:
        events = await stream.end()
    assert [e.file["error_message"] for e in events] == ["too large"]


async def test_the_stream_carries_only_that_files_updates(service: Service, db, user):
    watched = await insert_file(db, user, "watched.pdf")
    other = await insert_file(db, user, "other.pdf")
    async with watch(service, watched, user) as stream:
        await stream.next()
        await db.execute("update files set progress = 5 where id = $1", other)
        await db.execute("delete from files where id = $1", other)
        await insert_file(db, user, "new.pdf")
        await db.execute("update files set progress = 7 where id = $1", watched)
        event = await stream.next()
        assert (event.file["id"], event.file["progress"]) == (str(watched), 7)
        assert str(other) not in "".join(e.data for e in stream.events)


async def test_the_stream_has_sse_headers_retry_and_heartbeats(database_url, db, user):
    service = await start_service(database_url, heartbeat_seconds=0.05)
    try:
        file_id = await insert_file(db, user)
        async with watch(service, file_id, user) as stream:
            headers = stream.response.headers
            assert headers["Content-Type"] == "text/event-stream"
            assert headers["Cache-Control"] == "no-cache"
            assert headers["X-Accel-Buffering"] == "no"
            assert "Content-Encoding" not in headers
            await stream.next()
            beat = (await stream.until("heartbeat"))[-1]
            assert beat.id is None
            assert beat.json["eventType"] == "heartbeat"
            assert stream.retry is not None
    finally:
        await stop_service(service)


async def test_an_id_that_is_not_a_uuid_is_400_invalid_id(service: Service, user):
    for bad in ("42", "not-a-uuid", "0" * 40, "%00", "'; drop table files; --"):
        async with service.session.get(
            file_url(service, bad), headers={"Authorization": f"Bearer {token_for(user)}"}
        ) as response:
            assert response.status == 400, bad
            body = await response.json()
            assert body["code"] == "INVALID_ID"
            assert body["error"]


async def test_another_users_file_is_404_exactly_like_a_file_that_does_not_exist(
    service: Service, db, user, other_user
):
    theirs = await insert_file(db, other_user, "secret.pdf")
    answers = []
    for file_id in (theirs, uuid.uuid4()):
        async with service.session.get(
            file_url(service, file_id), headers={"Authorization": f"Bearer {token_for(user)}"}
        ) as response:
            answers.append((response.status, response.content_type, await response.read()))
    assert answers[0] == answers[1]
    status, content_type, body = answers[0]
    assert (status, content_type) == (404, "application/json")
    assert b'"code": "NOT_FOUND"' in body or b'"code":"NOT_FOUND"' in body
    assert str(theirs).encode() not in body


async def test_the_file_stream_needs_a_token(service: Service, db, user):
    file_id = await insert_file(db, user)
    async with service.session.get(file_url(service, file_id)) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"


async def test_an_update_committed_while_the_stream_is_set_up_is_neither_lost_nor_repeated(
    service: Service, db, user, monkeypatch: pytest.MonkeyPatch
):
    """The stream subscribes, then reads the file. Updates committed in between (already in
    the read) must not follow it as older events; one committed after it must follow."""
    file_id = await insert_file(db, user, status="processing", progress=1)
    reading = asyncio.Event()
    go_on = asyncio.Event()
    reads = service.app[keys.READS]
    real_one = reads.one

    async def held_read(*args, **kwargs):
        reading.set()
        await go_on.wait()
        return await real_one(*args, **kwargs)

    monkeypatch.setattr(reads, "one", held_read)
    first_event: asyncio.Future[Event] = asyncio.get_running_loop().create_future()

    async def follow() -> list[Event]:
        async with watch(service, file_id, user) as stream:
            first_event.set_result(await stream.next())
            return await stream.end()

    hub = service.app[keys.HUB]
    async with open_stream(
        service.session, service.url("/api/files/events"), token_for(user)
    ) as all_:
        following = asyncio.create_task(follow())
        await asyncio.wait_for(reading.wait(), 10)
        assert hub.count == 2  # the file stream is subscribed and holds at its read
        for progress in (2, 3):
            await db.execute("update files set progress = $2 where id = $1", file_id, progress)
        # The file stream's queue has both updates once the user's stream has them.
        while (await all_.next()).file["progress"] != 3:
            pass
        # And one that is still running while the file is read commits afterwards.
        late = db.transaction()
        await late.start()
        await db.execute("update files set progress = 4 where id = $1", file_id)
        go_on.set()
        first = await asyncio.wait_for(first_event, 10)
        await late.commit()
        await db.execute("update files set status = 'ready', progress = 100 where id = $1", file_id)
        rest = await asyncio.wait_for(following, 10)
    events = [first, *rest]
    assert [e.file["progress"] for e in events] == [3, 4, 100]
    versions = [e.file["version"] for e in events]
    assert versions == sorted(versions) and len(set(versions)) == 3


async def test_fifty_watchers_of_one_file_see_the_same_sequence_over_one_listener(
    service: Service, db, owner_db, user
):
    file_id = await insert_file(db, user, "popular.mov")
    async with contextlib.AsyncExitStack() as stack:
        watchers = [
            await stack.enter_async_context(watch(service, file_id, user)) for _ in range(50)
        ]
        for w in watchers:
            assert (await w.next()).file["status"] == "pending"
        assert service.app[keys.HUB].count == 50
        assert await backend_count(db) <= 1 + service.settings.pool_size
        assert await change_connections(owner_db) == 1

        for progress in range(5, 100, 5):
            await db.execute(
                "update files set status = 'processing', progress = $2 where id = $1",
                file_id,
                progress,
            )
        await db.execute("update files set status = 'ready', progress = 100 where id = $1", file_id)
        sequences = await asyncio.gather(*(w.end() for w in watchers))

    expected = [*range(5, 100, 5), 100]
    for seen in sequences:
        assert [e.file["progress"] for e in seen] == expected
    assert len({tuple(e.data for e in seen if e.name == "file-update") for seen in sequences}) == 1


async def test_a_watcher_leaving_changes_nothing_for_the_writer_the_file_or_other_watchers(
    service: Service, db, user
):
    file_id = await insert_file(db, user, status="processing")
    async with watch(service, file_id, user) as staying:
        await staying.next()
        async with watch(service, file_id, user) as leaving:
            await leaving.next()
            await db.execute("update files set progress = 10 where id = $1", file_id)
            await leaving.next()
        hub = service.app[keys.HUB]
        await wait_until(lambda: hub.count == 1)

        await db.execute("update files set progress = 20 where id = $1", file_id)
        row = await db.fetchrow("select status, progress from files where id = $1", file_id)
        assert (row["status"], row["progress"]) == ("processing", 20)
        assert [(await staying.next()).file["progress"] for _ in range(2)] == [10, 20]


async def test_a_writer_that_keeps_updating_while_watchers_come_and_go_never_errors(
    service: Service, db, user
):
    file_id = await insert_file(db, user, status="processing")
    writing = True
    updates = 0

    async def writer() -> None:
        nonlocal updates
        while writing:
            await db.execute("update files set progress = $2 where id = $1", file_id, updates % 100)
            updates += 1

    async def come_and_go(rounds: int) -> None:
        for _ in range(rounds):
            async with watch(service, file_id, user) as stream:
                first = await stream.next()
                assert first.file["id"] == str(file_id)
                # Leave at a random point: before, during or after further updates.
                for _ in range(random.randrange(3)):
                    event = await stream.next()
                    assert event.file["version"] > first.file["version"]

    task = asyncio.create_task(writer())
    try:
        await asyncio.gather(*(come_and_go(10) for _ in range(8)))
    finally:
        writing = False
        await task  # re-raises whatever the writer hit
    await wait_until(lambda: service.app[keys.HUB].count == 0)
    assert updates > 0
    assert await db.fetchval("select status from files where id = $1", file_id) == "processing"

    # The service still streams the file to a newcomer.
    async with watch(service, file_id, user) as stream:
        await stream.next()
        await db.execute("update files set status = 'ready', progress = 100 where id = $1", file_id)
        assert [e.file["status"] for e in await stream.end()] == ["ready"]


async def test_a_watcher_that_drops_mid_write_leaves_the_service_serving(
    service: Service, db, user
):
    """A client that vanishes without reading (a closed tab) is no error for anyone."""
    file_id = await insert_file(db, user, status="processing")
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as rude:
        response = await rude.get(
            file_url(service, file_id), headers={"Authorization": f"Bearer {token_for(user)}"}
        )
        assert response.status == 200
        response.close()
    await wait_until(lambda: service.app[keys.HUB].count == 0)
    for progress in range(10):
        await db.execute("update files set progress = $2 where id = $1", file_id, progress)
    async with watch(service, file_id, user) as stream:
        assert (await stream.next()).file["progress"] == 9


async def test_a_failure_with_a_one_megabyte_error_message_arrives_whole_and_ends_the_stream(
    service: Service, db, user
):
    message = "stack trace line\n" * 60_000
    file_id = await insert_file(db, user, status="processing")
    async with watch(service, file_id, user) as stream:
        await stream.next()
        await db.execute(
            "update files set status = 'failed', error_message = $2 where id = $1", file_id, message
        )
        rest = await stream.end()
    assert [(e.file["status"], e.file["error_message"]) for e in rest] == [("failed", message)]
