"""GET /api/files/events: a user's stream of their own files."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import asyncpg
import pytest

from streamer import hub as hub_module
from streamer import keys
from streamer import registry as registry_module
from streamer.feeds import FILES
from streamer.hub import Hub
from streamer.metrics import Metrics
from streamer.subscriber import Envelope, Subscriber
from streamer.tasks import CATCH_UP_STEPS, every
from tests.client import open_stream
from tests.conftest import SOURCE, Service, insert_file, start_service, stop_service, token_for

EVENTS = "/api/files/events"
BIG = 9000  # an error_message this long does not fit a notification: the row is read back
FILE_FIELDS = {
    "id", "filename", "file_type", "status", "progress", "processing_stage",
    "error_message", "created_at", "updated_at", "version",
}  # fmt: skip


async def test_stream_has_sse_headers_and_begins_with_retry(service: Service, user):
    async with open_stream(service.session, service.url(EVENTS), token_for(user)) as stream:
        headers = stream.response.headers
        assert headers["Content-Type"] == "text/event-stream"
        assert headers["Cache-Control"] == "no-cache"
        assert headers["X-Accel-Buffering"] == "no"
        assert "Content-Encoding" not in headers
        assert stream.retry is not None
        assert stream.events[0].name == "synced"
        assert stream.events[0].id


async def test_insert_update_delete_each_produce_the_right_event(service: Service, db, user):
    async with open_stream(service.session, service.url(EVENTS), token_for(user)) as stream:
        file_id = await insert_file(db, user, "a.pdf", file_type="pdf")
        created = await stream.next()
        assert created.name == "file-update"
        assert created.json["eventType"] == "file-update"
        assert set(created.file) == FILE_FIELDS
        assert created.file["id"] == str(file_id)
        assert created.file["status"] == "pending"
        assert created.file["file_type"] == "pdf"
        assert created.json["timestamp"].endswith("Z")
        assert created.id

        await db.execute(
            "update files set status = 'processing', progress = 50,"
            " processing_stage = 'compression' where id = $1",
            file_id,
        )
        updated = await stream.next()
        assert updated.name == "file-update"
        assert (updated.file["status"], updated.file["progress"]) == ("processing", 50)
        assert updated.file["processing_stage"] == "compression"
        assert updated.file["version"] > created.file["version"]
        assert updated.file["updated_at"] >= created.file["updated_at"]

        await db.execute("delete from files where id = $1", file_id)
        deleted = await stream.next()
        assert deleted.name == "file-deleted"
        assert deleted.json["file"] == {"id": str(file_id)}
        assert deleted.json["eventType"] == "file-deleted"
        assert deleted.id


async def test_another_users_changes_never_reach_the_stream(service: Service, db, user, other_user):
    async with open_stream(service.session, service.url(EVENTS), token_for(user)) as stream:
        theirs = await insert_file(db, other_user, "secret.pdf")
        await db.execute("update files set progress = 10 where id = $1", theirs)
        await db.execute("delete from files where id = $1", theirs)
        mine = await insert_file(db, user, "mine.pdf")
        event = await stream.next()
        assert event.file["id"] == str(mine)
        raw = "".join(e.data for e in stream.events)
        assert str(theirs) not in raw and "secret.pdf" not in raw


async def test_a_rolled_back_change_emits_nothing(service: Service, db, user):
    async with open_stream(service.session, service.url(EVENTS), token_for(user)) as stream:
        async with db.transaction():
            await insert_file(db, user, "kept.pdf")
        tx = db.transaction()
        await tx.start()
        await insert_file(db, user, "rolled-back.pdf")
        await tx.rollback()
        marker = await insert_file(db, user, "after.pdf")
        names = [(await stream.next()).file["filename"], (await stream.next()).file["filename"]]
        assert names == ["kept.pdf", "after.pdf"]
        assert all("rolled-back" not in e.data for e in stream.events)
        assert marker


async def test_a_one_megabyte_row_arrives_whole(service: Service, db, user):
    big = "x" * 1_000_000
    async with open_stream(service.session, service.url(EVENTS), token_for(user)) as stream:
        file_id = await insert_file(db, user, "huge.bin")
        await stream.next()
        await db.execute(
            "update files set status = 'failed', error_message = $2 where id = $1", file_id, big
        )
        event = await stream.next()
        assert event.file["error_message"] == big
        assert event.file["status"] == "failed"


async def test_a_row_too_big_to_travel_never_arrives_older_after_newer(
    service: Service, db: asyncpg.Connection, user: uuid.UUID
) -> None:
    """A row too big for a notification is read back when its notification is dispatched,
    by which time later changes may have committed. The row read then is newer than the
    notifications still queued behind it: it must not go out ahead of them."""
    file_id = await insert_file(db, user, "big.bin")
    url = service.url("/api/files/events")
    async with (
        open_stream(service.session, url, token_for(user)) as stream,
        open_stream(service.session, service.url(f"/api/files/{file_id}/events"),
                    token_for(user), synced=False) as one_file,
    ):  # fmt: skip
        assert (await one_file.next()).file["status"] == "pending"
        async with db.transaction():
            big = "e" * BIG
            await db.execute("update files set error_message = $2 where id = $1", file_id, big)
            await db.execute(
                "update files set error_message = null, status = 'ready' where id = $1", file_id
            )
            await db.execute("update files set status = 'processing' where id = $1", file_id)
        await db.execute("update files set progress = 99 where id = $1", file_id)
        final = await db.fetchval("select streamer_version from files where id = $1", file_id)
        versions: list[int] = []
        while not versions or versions[-1] != final:
            versions.append((await stream.next()).file["version"])
        assert versions == sorted(versions), versions
        # The one-file stream ends on the status it saw become terminal, not after a newer one.
        rest = await one_file.end()
        assert [e.file["status"] for e in rest if e.name == "file-update"][-1] == "ready"
        assert [e.file["version"] for e in rest] == sorted(e.file["version"] for e in rest)


async def test_notification_payloads_stay_under_8000_bytes(db, owner_db, user):
    payloads: asyncio.Queue[str] = asyncio.Queue()
    channel = await owner_db.fetchval("select streamer.channel()")  # the feeds' own
    await owner_db.add_listener(channel, lambda *args: payloads.put_nowait(args[3]))
    file_id = await insert_file(db, user, "n" * 20_000, error_message="e" * 1_000_000)
    await db.execute("update files set progress = 1 where id = $1", file_id)
    await db.execute("delete from files where id = $1", file_id)
    # Notifications arrive in commit order: every one the triggers sent is before this.
    await owner_db.execute("select pg_notify($1, 'end of test')", channel)
    sizes = []
    while (payload := await asyncio.wait_for(payloads.get(), 5)) != "end of test":
        sizes.append(len(payload.encode()))
    # With the WAL source the triggers notify nothing (rows travel whole in the WAL).
    assert len(sizes) == (3 if SOURCE == "notify" else 0)
    assert max(sizes, default=0) < 8000


async def test_ownership_transfer_is_a_delete_for_the_old_owner_and_an_update_for_the_new(
    service: Service, db, user, other_user
):
    url = service.url(EVENTS)
    async with (
        open_stream(service.session, url, token_for(user)) as old,
        open_stream(service.session, url, token_for(other_user)) as new,
    ):
        file_id = await insert_file(db, user, "moving.pdf")
        await old.next()
        await db.execute("update files set user_id = $2 where id = $1", file_id, other_user)
        gone = await old.next()
        assert gone.name == "file-deleted" and gone.json["file"] == {"id": str(file_id)}
        arrived = await new.next()
        assert arrived.name == "file-update" and arrived.file["id"] == str(file_id)
        assert arrived.file["filename"] == "moving.pdf"


async def test_heartbeats_arrive_at_the_configured_interval_without_an_id(database_url, user):
    service = await start_service(database_url, heartbeat_seconds=0.05)
    try:
        async with open_stream(service.session, service.url(EVENTS), token_for(user)) as stream:
            beats = [await stream.until("heartbeat"), await stream.until("heartbeat")]
            for seen in beats:
                beat = seen[-1]
                assert beat.id is None
                assert beat.json["eventType"] == "heartbeat"
                assert beat.json["timestamp"].endswith("Z")
    finally:
        await stop_service(service)


async def test_synced_comes_before_any_live_event(service: Service, db, user):
    writer_done = asyncio.Event()

    async def keep_writing() -> None:
        for i in range(30):
            await insert_file(db, user, f"f{i}.pdf")
        writer_done.set()

    task = asyncio.create_task(keep_writing())
    async with open_stream(
        service.session, service.url(EVENTS), token_for(user), synced=False
    ) as stream:
        first = await stream.next()
        assert first.name == "synced"
        await writer_done.wait()
    await task


async def test_every_file_event_carries_a_cursor_id(service: Service, db, user):
    async with open_stream(service.session, service.url(EVENTS), token_for(user)) as stream:
        file_id = await insert_file(db, user)
        await db.execute("delete from files where id = $1", file_id)
        for event in [await stream.next(), await stream.next()]:
            assert event.id is not None and event.id.isdigit()


async def test_two_tabs_of_one_user_both_receive_every_event(service: Service, db, user):
    url = service.url(EVENTS)
    async with (
        open_stream(service.session, url, token_for(user)) as tab1,
        open_stream(service.session, url, token_for(user)) as tab2,
    ):
        ids = [await insert_file(db, user, f"{i}.pdf") for i in range(5)]
        for tab in (tab1, tab2):
            got = [(await tab.next()).file["id"] for _ in ids]
            assert got == [str(i) for i in ids]


async def test_a_token_in_the_query_or_a_cookie_opens_the_stream(service: Service, db, user):
    token = token_for(user)
    url = service.url(EVENTS)
    async with open_stream(service.session, url, params={"access_token": token}) as stream:
        file_id = await insert_file(db, user)
        assert (await stream.next()).file["id"] == str(file_id)
    async with open_stream(service.session, url, headers={"Cookie": f"access_token={token}"}):
        pass


async def test_snapshot_sends_every_current_file_before_synced(service: Service, db, user):
    ids = {str(await insert_file(db, user, f"{i}.pdf")) for i in range(3)}
    await insert_file(db, uuid.uuid4(), "not-mine.pdf")
    async with open_stream(
        service.session, service.url(EVENTS), token_for(user), params={"snapshot": "1"}
    ) as stream:
        before = stream.events[:-1]
        assert stream.events[-1].name == "synced"
        assert {e.file["id"] for e in before} == ids
        assert all(e.name == "file-update" for e in before)


async def test_a_heartbeat_round_lets_the_loop_run_between_slices(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thousands of streams' heartbeats are written a slice at a time: an event that
    arrives during the round waits for one slice, not for the whole round."""
    monkeypatch.setattr(registry_module, "BEAT_GROUPS", 1)  # every stream in one group
    service = await start_service(database_url, heartbeat_seconds=3600)
    try:
        users = [uuid.uuid4() for _ in range(3)]
        async with contextlib.AsyncExitStack() as stack:
            for u in users:
                url = service.url(EVENTS)
                await stack.enter_async_context(open_stream(service.session, url, token_for(u)))
            monkeypatch.setattr(hub_module, "HEARTBEAT_SLICE", 1)
            order: list[str] = []
            plain = Subscriber.push

            def push(sub: Subscriber, envelope: Envelope) -> bool:
                if not order:  # something else becomes ready during the round
                    asyncio.get_running_loop().call_soon(order.append, "other")
                order.append("heartbeat")
                return plain(sub, envelope)

            monkeypatch.setattr(Subscriber, "push", push)
            await service.app[keys.HUB].heartbeat()
            assert order == ["heartbeat", "other", "heartbeat", "heartbeat"]
    finally:
        await stop_service(service)


async def test_heartbeats_are_spread_over_the_period_each_stream_once_a_period(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The streams are in BEAT_GROUPS groups of (nearly) one size, kept so as streams
    come and go; each turn beats one group, and the groups take turns: every stream gets
    one heartbeat a period, a tenth of them at a time."""
    hub = Hub(Metrics(), max_streams_per_owner=5, max_streams=1000, queue_limit=10,
              write_timeout=1)  # fmt: skip
    subs = [hub.subscribe(FILES, str(uuid.uuid4()), f"user {i}") for i in range(95)]
    for sub in subs[::3]:
        hub.release(sub)  # a third leave...
    subs = [sub for i, sub in enumerate(subs) if i % 3]
    subs += [hub.subscribe(FILES, str(uuid.uuid4()), f"new {i}") for i in range(17)]
    sizes = sorted(len(group) for group in hub.beats)
    assert sum(sizes) == len(subs) == hub.count
    assert sizes[-1] - sizes[0] <= 4, sizes  # ...and newcomers fill the smallest groups
    beats: dict[Subscriber, int] = {}

    def push(sub: Subscriber, envelope: Envelope) -> bool:
        beats[sub] = beats.get(sub, 0) + 1
        return True

    monkeypatch.setattr(Subscriber, "push", push)
    turns = []
    for _ in range(registry_module.BEAT_GROUPS):
        before = sum(beats.values())
        await hub.heartbeat()
        turns.append(sum(beats.values()) - before)
    assert sorted(beats.values()) == [1] * len(subs)  # each stream once in the period
    assert max(turns) <= len(subs) // registry_module.BEAT_GROUPS + 4, turns


async def test_a_cadence_held_up_runs_the_steps_it_missed_and_keeps_its_beat() -> None:
    """`every` (heartbeat turns, sweeps): a loop held up for a few steps (a garbage
    collection) runs those steps at once and keeps to its grid, rather than sliding every
    later step later (a heartbeat each half second slid by each hold-up: 2,664 of 300,000
    heartbeats came more than 1 s late at 100,000 streams); held up for more than
    CATCH_UP_STEPS, it starts again from then."""
    clock = [0.0]
    ran: list[float] = []
    assert CATCH_UP_STEPS < 20.0  # the second hold-up, in steps of 1 s

    async def sleep(seconds: float) -> None:
        clock[0] += seconds

    def step() -> None:
        ran.append(clock[0])
        if len(ran) == 3:
            clock[0] += 3.5  # held up 3.5 steps: due steps 4, 5 and 6 have passed
        if len(ran) == 9:
            clock[0] += 20.0  # held up far longer than CATCH_UP_STEPS
        if len(ran) == 12:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await every(1.0, step, clock=lambda: clock[0], sleep=sleep)
    assert ran[:9] == [1.0, 2.0, 3.0, 6.5, 6.5, 6.5, 7.0, 8.0, 9.0]
    assert ran[9:] == [29.0, 30.0, 31.0]  # from the end of that hold-up on
