"""Nothing lost: cursors, resuming with Last-Event-ID, snapshots, and the reset when history
is gone."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest

from streamer import keys
from streamer.changes import CatchUp
from streamer.reading import Reading
from streamer.views import KEY_LENGTH
from tests.client import Event, open_stream
from tests.conftest import Service, insert_file, start_service, stop_service, token_for, wait_until

EVENTS = "/api/files/events"


def resume(service: Service, user: uuid.UUID, cursor: str, **kwargs):
    headers = {"Last-Event-ID": cursor}
    return open_stream(service.session, service.url(EVENTS), token_for(user), headers=headers)


def before_synced(events: list[Event]) -> list[Event]:
    names = [e.name for e in events]
    return events[: names.index("synced")]


def by_file(events: list[Event]) -> dict[str, list[Event]]:
    found: dict[str, list[Event]] = {}
    for event in events:
        if event.name in ("file-update", "file-deleted"):
            found.setdefault(event.json["file"]["id"], []).append(event)
    return found


async def cursor_after(service: Service, db: asyncpg.Connection, user: uuid.UUID) -> str:
    """A cursor as a client holds it: the id of the last event it received."""
    async with open_stream(service.session, service.url(EVENTS), token_for(user)) as stream:
        marker = await insert_file(db, user, "marker.txt")
        # Changes committed just before the stream opened may still arrive first.
        while (event := await stream.next()).json["file"]["id"] != str(marker):
            pass
        assert event.id is not None
        return event.id


async def test_file_update_file_deleted_and_synced_all_carry_a_cursor(service: Service, db, user):
    await insert_file(db, user, "before.pdf")
    async with open_stream(
        service.session, service.url(EVENTS), token_for(user), params={"snapshot": "1"}
    ) as stream:
        file_id = await insert_file(db, user)
        await db.execute("update files set progress = 3 where id = $1", file_id)
        await db.execute("delete from files where id = $1", file_id)
        for _ in range(3):
            await stream.next()
    names = [e.name for e in stream.events]
    assert names == ["file-update", "synced", "file-update", "file-update", "file-deleted"]
    assert all(e.id is not None and e.id.isdigit() for e in stream.events)


async def test_a_resumed_stream_gets_the_latest_state_of_what_changed_and_what_was_deleted(
    service: Service, db, user, other_user
):
    kept, changed, deleted, given_away = [
        await insert_file(db, user, f"{name}.pdf")
        for name in ("kept", "changed", "deleted", "gone")
    ]
    cursor = await cursor_after(service, db, user)
    held = await db.fetchval("select streamer_version from files where id=$1", kept)
    versions_held = {str(kept): held}

    for progress in (10, 20, 30):
        await db.execute("update files set progress = $2 where id = $1", changed, progress)
    await db.execute("delete from files where id = $1", deleted)
    await db.execute("update files set user_id = $2 where id = $1", given_away, other_user)
    added = await insert_file(db, user, "added.pdf")
    theirs = await insert_file(db, other_user, "theirs.pdf")

    async with resume(service, user, cursor) as stream:
        caught_up = before_synced(stream.events)
    files = by_file(caught_up)

    assert [e.file["progress"] for e in files.pop(str(changed))] == [30]
    assert [e.name for e in files.pop(str(deleted))] == ["file-deleted"]
    assert [e.name for e in files.pop(str(given_away))] == ["file-deleted"]
    assert [e.file["filename"] for e in files.pop(str(added))] == ["added.pdf"]
    assert str(theirs) not in "".join(e.data for e in stream.events)
    # Anything else is a repeat of a version the client already has.
    for file_id, repeats in files.items():
        for event in repeats:
            assert event.name == "file-update"
            if file_id in versions_held:
                assert event.file["version"] == versions_held[file_id]
    assert all(e.id is not None for e in stream.events)


async def test_a_file_given_to_a_user_while_they_were_away_arrives_on_resume(
    service: Service, db, user, other_user
):
    cursor = await cursor_after(service, db, other_user)
    file_id = await insert_file(db, user, "gift.pdf")
    await db.execute("update files set user_id = $2 where id = $1", file_id, other_user)
    async with resume(service, other_user, cursor) as stream:
        events = by_file(before_synced(stream.events))[str(file_id)]
    assert [(e.name, e.file["filename"]) for e in events] == [("file-update", "gift.pdf")]


async def test_the_cursor_can_also_be_given_as_the_last_event_id_parameter(
    service: Service, db, user
):
    cursor = await cursor_after(service, db, user)
    file_id = await insert_file(db, user, "while-away.pdf")
    async with open_stream(
        service.session,
        service.url(EVENTS),
        token_for(user),
        params={"last_event_id": cursor},
    ) as stream:
        assert str(file_id) in by_file(before_synced(stream.events))


async def test_events_of_a_catch_up_carry_the_cursor_it_started_from(service: Service, db, user):
    """A stream cut half-way through its catch-up resumes from where it began: no gap."""
    cursor = await cursor_after(service, db, user)
    for i in range(3):
        await insert_file(db, user, f"{i}.pdf")
    async with resume(service, user, cursor) as stream:
        caught_up = before_synced(stream.events)
    assert len(caught_up) >= 3
    assert {e.id for e in caught_up} == {cursor}


async def test_a_cursor_older_than_the_kept_tombstones_gets_a_reset_and_a_full_snapshot(
    service: Service, db, owner_db, user
):
    survivor = await insert_file(db, user, "survivor.pdf")
    doomed = await insert_file(db, user, "doomed.pdf")
    cursor = await cursor_after(service, db, user)
    await db.execute("delete from files where id = $1", doomed)
    assert await owner_db.fetchval("select streamer.prune('files', interval '0 seconds')") >= 1

    async with resume(service, user, cursor) as stream:
        events = stream.events
    names = [e.name for e in events]
    assert names[0] == "reset" and names[-1] == "synced"
    snapshot = events[1:-1]
    current = {str(r["id"]) for r in await db.fetch("select id from files where user_id=$1", user)}
    assert {e.file["id"] for e in snapshot} == current
    assert str(survivor) in current
    assert all(e.name == "file-update" for e in snapshot)

    # A cursor issued after the prune is honoured again.
    later = stream.last_id
    assert later is not None
    await db.execute("update files set progress = 9 where id = $1", survivor)
    async with resume(service, user, later) as again:
        assert "reset" not in [e.name for e in again.events]
        assert str(survivor) in by_file(before_synced(again.events))


async def test_the_services_own_pruning_turns_an_old_cursor_into_a_reset(
    database_url, db, owner_db, user
):
    first = await start_service(database_url)
    try:
        doomed = await insert_file(db, user, "doomed.pdf")
        cursor = await cursor_after(first, db, user)
        await db.execute("delete from files where id = $1", doomed)
    finally:
        await stop_service(first)

    # A service that keeps tombstones for almost no time prunes them as it starts.
    service = await start_service(database_url, tombstone_retention_hours=1e-9)
    try:

        async def pruned() -> bool:
            return bool(
                await owner_db.fetchval(
                    "select pruned_below > 0 from streamer.horizon where feed = 'files'"
                )
            )

        await wait_until(pruned)
        async with resume(service, user, cursor) as stream:
            assert stream.events[0].name == "reset"
            assert str(doomed) not in "".join(e.data for e in stream.events)
    finally:
        await stop_service(service)


@pytest.mark.parametrize("cursor", ["abc", "-5", "1" * 30, "12a", "1.5", "0x10", "٣"])
async def test_a_malformed_cursor_is_400_invalid_cursor(service: Service, user, cursor: str):
    auth = {"Authorization": f"Bearer {token_for(user)}"}
    url = service.url(EVENTS)
    if cursor.isascii():  # a header value is Latin-1 at best
        async with service.session.get(url, headers={**auth, "Last-Event-ID": cursor}) as by_header:
            assert by_header.status == 400
            assert (await by_header.json())["code"] == "INVALID_CURSOR"
    async with service.session.get(url, headers=auth, params={"last_event_id": cursor}) as by_query:
        assert by_query.status == 400
        body = await by_query.json()
        assert body["code"] == "INVALID_CURSOR" and body["error"]


async def test_an_empty_cursor_means_no_cursor(service: Service, db, user):
    await insert_file(db, user, "existing.pdf")
    url = service.url(EVENTS)
    async with open_stream(
        service.session, url, token_for(user), params={"last_event_id": ""}
    ) as s:
        assert before_synced(s.events) == []
    async with open_stream(
        service.session, url, token_for(user), headers={"Last-Event-ID": ""}
    ) as s:
        assert before_synced(s.events) == []


async def test_a_cursor_from_the_future_gets_a_reset_not_an_error(service: Service, db, user):
    file_id = await insert_file(db, user, "present.pdf")
    async with resume(service, user, "9" * 19) as stream:
        names = [e.name for e in stream.events]
    assert names == ["reset", "file-update", "synced"]
    assert stream.events[1].file["id"] == str(file_id)


@pytest.mark.usefixtures("nothing_logged_at_error")
async def test_a_cursor_from_the_far_future_gets_a_reset_and_a_full_snapshot(
    service: Service, db: asyncpg.Connection, user: uuid.UUID
) -> None:
    mine = await insert_file(db, user, "mine.pdf")
    headers = {"Last-Event-ID": "9" * 19}
    async with open_stream(
        service.session, service.url(EVENTS), token_for(user), headers=headers
    ) as stream:
        names = [e.name for e in stream.events]
        assert names == ["reset", "file-update", "synced"]
        assert stream.events[1].file["id"] == str(mine)


async def test_a_transaction_that_started_first_and_committed_last_is_not_missed_on_resume(
    service: Service, database_url, user
):
    writer_a = await asyncpg.connect(database_url)
    writer_b = await asyncpg.connect(database_url)
    try:
        first = await insert_file(writer_a, user, "first.pdf")
        second = await insert_file(writer_a, user, "second.pdf")
        async with open_stream(service.session, service.url(EVENTS), token_for(user)) as stream:
            tx_a = writer_a.transaction()
            await tx_a.start()
            await writer_a.execute("update files set progress = 11 where id = $1", first)
            async with writer_b.transaction():
                await writer_b.execute("update files set progress = 22 where id = $1", second)
            # (The inserts, committed just before the stream opened, may come first.)
            while (seen := await stream.next()).file["progress"] != 22:
                assert seen.file["progress"] == 0
            assert seen.file["id"] == str(second)
            cursor = seen.id
        assert cursor is not None
        await tx_a.commit()

        async with resume(service, user, cursor) as resumed:
            caught_up = by_file(before_synced(resumed.events))
        assert [e.file["progress"] for e in caught_up[str(first)]] == [11]
        assert [e.file["version"] for e in caught_up.get(str(second), [])] in (
            [],
            [seen.file["version"]],
        )
    finally:
        await writer_a.close()
        await writer_b.close()


async def test_a_snapshot_is_every_current_file_then_synced(service: Service, db, user):
    ids = {str(await insert_file(db, user, f"{i}.pdf")) for i in range(4)}
    gone = await insert_file(db, user, "gone.pdf")
    await db.execute("delete from files where id = $1", gone)
    await insert_file(db, uuid.uuid4(), "someone-elses.pdf")
    async with open_stream(
        service.session, service.url(EVENTS), token_for(user), params={"snapshot": "1"}
    ) as stream:
        snapshot = before_synced(stream.events)
    assert [e.name for e in snapshot] == ["file-update"] * 4
    assert {e.file["id"] for e in snapshot} == ids
    assert stream.events[-1].name == "synced" and stream.events[-1].id


async def test_a_snapshot_has_no_gap_or_reordering_against_updates_committed_meanwhile(
    service: Service, db, user, monkeypatch: pytest.MonkeyPatch
):
    """Updates committed between the subscription and the read are in the snapshot and are
    not repeated after it as older events; one still running at the read follows it."""
    file_id = await insert_file(db, user, status="processing", progress=1)
    reading = asyncio.Event()
    go_on = asyncio.Event()
    reads = service.app[keys.READS]
    real_since = reads.since

    @contextlib.asynccontextmanager
    async def held_since(*args, **kwargs):
        reading.set()
        await go_on.wait()
        async with real_since(*args, **kwargs) as read:
            yield read

    monkeypatch.setattr(reads, "since", held_since)
    # A snapshot asked with others' is read by the gatherer (streamer/gather.py): held too.
    gatherer = service.app[keys.GATHERER]
    real_many = gatherer._read

    async def held_many(*args, **kwargs):
        reading.set()
        await go_on.wait()
        return await real_many(*args, **kwargs)

    monkeypatch.setattr(gatherer, "_read", held_many)
    synced: asyncio.Future[list[Event]] = asyncio.get_running_loop().create_future()

    async def follow() -> list[Event]:
        async with open_stream(
            service.session, service.url(EVENTS), token_for(user), params={"snapshot": "1"}
        ) as stream:
            synced.set_result(list(stream.events))
            return [await stream.next() for _ in range(2)]

    async with open_stream(service.session, service.url(EVENTS), token_for(user)) as witness:
        following = asyncio.create_task(follow())
        await asyncio.wait_for(reading.wait(), 10)
        for progress in (2, 3):
            await db.execute("update files set progress = $2 where id = $1", file_id, progress)
        added = await insert_file(db, user, "added-meanwhile.pdf")
        while (await witness.next()).file["id"] != str(added):
            pass  # now dispatched to the hub, and queued for the stream being set up
        late = db.transaction()
        await late.start()
        await db.execute("update files set progress = 4 where id = $1", file_id)
        go_on.set()
        snapshot = await asyncio.wait_for(synced, 10)
        await late.commit()
        await db.execute("update files set status = 'ready', progress = 100 where id = $1", file_id)
        live = await asyncio.wait_for(following, 10)

    state = {e.file["id"]: e.file["progress"] for e in snapshot if e.name == "file-update"}
    assert state == {str(file_id): 3, str(added): 0}
    assert [e.name for e in snapshot][-1] == "synced"
    assert [(e.file["id"], e.file["progress"]) for e in live] == [
        (str(file_id), 4),
        (str(file_id), 100),
    ]


async def test_a_catch_up_the_database_breaks_off_in_the_middle_cuts_the_connection(
    service: Service, db, user, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database lost while a stream's catch-up is read (after its response began): the
    connection is cut, which an EventSource answers by coming back with its cursor; never a
    complete, empty 200 response, which would end it for good."""
    for name in ("a.pdf", "b.pdf"):
        await insert_file(db, user, name)
    plain = Reading.batches

    async def broken(self: Reading) -> AsyncIterator[CatchUp]:
        async for part in plain(self):
            yield part
            break
        raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle")

    monkeypatch.setattr(Reading, "batches", broken)
    # A cursor of another view: this stream starts over, reading alone (reading.py).
    headers = {
        "Last-Event-ID": "1." + "0" * KEY_LENGTH,
        "Authorization": f"Bearer {token_for(user)}",
    }
    with pytest.raises(aiohttp.ClientError):
        async with service.session.get(service.url(EVENTS), headers=headers) as response:
            await response.read()
    monkeypatch.setattr(Reading, "batches", plain)
    async with resume(service, user, "1." + "0" * KEY_LENGTH) as stream:  # and it comes back
        assert stream.response.status == 200
