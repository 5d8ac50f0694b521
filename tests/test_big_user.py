"""A user with a great many rows: the snapshot and every catch-up are read and written a
batch at a time, so what the service holds does not grow with the user's rows.

`make test` uses a few thousand rows; `make soak` the 200,000 of a bulk import."""

from __future__ import annotations

import dataclasses
import json
import tracemalloc
import uuid
from typing import Any

import asyncpg
import pytest

from streamer import keys
from streamer.changes import CatchUp, Snapshot
from streamer.feeds import Feed
from streamer.metrics import Metrics
from streamer.reads import PoolReads
from tests.client import open_stream
from tests.conftest import (
    Service,
    insert_file,
    start_service,
    stop_service,
    token_for,
    wait_until,
)

ROWS = 6_000
BULK_IMPORT = 200_000
EVENTS = "/api/files/events"


async def import_rows(owner_db: asyncpg.Connection, user: uuid.UUID, count: int) -> None:
    await owner_db.execute(
        "insert into files (user_id, filename, status, error_message)"
        " select $1, 'import-' || n, 'failed', repeat('e', 200) from generate_series(1, $2) n",
        user,
        count,
    )


async def read_stream(
    service: Service, user: uuid.UUID, keep: bool = True, **params: str
) -> tuple[list[tuple[str, int | None]], int]:
    """Every event's name and row version up to `synced` (only the last one unless `keep`),
    and the bytes received, read as fast as the client can and kept no longer than it takes
    to parse them."""
    url = service.url(EVENTS)
    headers = {"Authorization": f"Bearer {token_for(user)}"}
    events: list[tuple[str, int | None]] = []
    received = 0
    async with service.session.get(url, headers=headers, params=params) as response:
        assert response.status == 200
        pending = b""
        while not events or events[-1][0] != "synced":
            chunk = await response.content.read(1 << 16)
            assert chunk, "the stream ended before synced"
            received += len(chunk)
            *messages, pending = (pending + chunk).split(b"\n\n")
            for message in messages:
                fields = dict(line.split(": ", 1) for line in message.decode().splitlines())
                if "event" in fields:
                    data: dict[str, Any] = json.loads(fields["data"])
                    if not keep:
                        events.clear()
                    events.append((fields["event"], data.get("file", {}).get("version")))
    return events, received


async def snapshot_arrives_whole_in_version_order(
    service: Service, owner_db: asyncpg.Connection, user: uuid.UUID, rows: int
) -> None:
    await import_rows(owner_db, user, rows)
    events, _ = await read_stream(service, user, snapshot="1")
    assert events[-1] == ("synced", None)
    updates = events[:-1]
    assert len(updates) == rows and {name for name, _ in updates} == {"file-update"}
    versions = [version for _, version in updates]
    assert versions == sorted(versions)  # type: ignore[type-var]


async def test_a_snapshot_of_many_rows_arrives_whole_in_version_order_then_synced(
    service: Service, owner_db: asyncpg.Connection, user: uuid.UUID
) -> None:
    await snapshot_arrives_whole_in_version_order(service, owner_db, user, ROWS)


@pytest.mark.soak
async def test_a_snapshot_of_a_bulk_import_arrives_whole_in_version_order_then_synced(
    service: Service, owner_db: asyncpg.Connection, user: uuid.UUID
) -> None:
    await snapshot_arrives_whole_in_version_order(service, owner_db, user, BULK_IMPORT)


async def test_what_the_service_holds_for_a_snapshot_does_not_grow_with_the_rows(
    service: Service, owner_db: asyncpg.Connection, user: uuid.UUID, other_user: uuid.UUID
) -> None:
    peaks, received = [], []
    for owner, rows in ((user, ROWS // 3), (other_user, ROWS)):
        await import_rows(owner_db, owner, rows)
        tracemalloc.start()
        try:
            events, size = await read_stream(service, owner, keep=False, snapshot="1")
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert events == [("synced", None)]
        received.append(size)
    # Three times the rows and bytes: what it holds grows by far less than what it sent
    # (holding the rows and their events would grow by twice that).
    assert received[1] > 2.9 * received[0]
    assert peaks[1] - peaks[0] < (received[1] - received[0]) / 2, (peaks, received)


async def test_a_resume_over_many_changed_rows_is_whole_with_deletes_in_version_order(
    service: Service, db: asyncpg.Connection, owner_db: asyncpg.Connection, user: uuid.UUID
) -> None:
    await import_rows(owner_db, user, ROWS // 2)
    async with open_stream(service.session, service.url(EVENTS), token_for(user)) as stream:
        cursor = stream.last_id
    assert cursor is not None
    async with db.transaction():
        await db.execute("update files set progress = 50 where user_id = $1", user)
    doomed = await db.fetchval("select id from files where user_id = $1 limit 1", user)
    await db.execute("delete from files where id = $1", doomed)
    events, _ = await read_stream(service, user, last_event_id=cursor)
    assert events[-1] == ("synced", None)
    assert [name for name, _ in events].count("file-update") == ROWS // 2 - 1
    assert events[-2][0] == "file-deleted"  # the delete came last: it is last in order


async def test_a_snapshot_whose_client_stops_reading_is_cut_and_frees_its_connection(
    database_url: str, owner_db: asyncpg.Connection, user: uuid.UUID, other_user: uuid.UUID
) -> None:
    service = await start_service(database_url, write_timeout_seconds=0.5, pool_size=1)
    try:
        # Far more than the socket buffers between the two hold: the server has to wait.
        await owner_db.execute(
            "insert into files (user_id, filename, error_message)"
            " select $1, 'import-' || n, repeat('e', 4000) from generate_series(1, 3000) n",
            user,
        )
        url = service.url(EVENTS)
        headers = {"Authorization": f"Bearer {token_for(user)}"}
        async with service.session.get(url, headers=headers, params={"snapshot": "1"}) as stalled:
            assert stalled.status == 200
            # The client reads nothing more; within the write timeout the server gives up...
            metrics = service.app[keys.METRICS]
            await wait_until(
                lambda: (
                    metrics.registry.get_sample_value("streamer_slow_client_disconnects_total") == 1
                )
            )
            # ...and its one pooled connection serves the next snapshot.
            events, _ = await read_stream(service, other_user, snapshot="1")
            assert events == [("synced", None)]
    finally:
        await stop_service(service)


@pytest.mark.parametrize("owner_indexed", [True, False], ids=["owner index", "no owner index"])
async def test_a_recovery_catches_up_the_owners_with_fewest_changes_first(
    database_url: str, db: asyncpg.Connection, owner_db: asyncpg.Connection, user: uuid.UUID,
    other_user: uuid.UUID, owner_indexed: bool,
) -> None:  # fmt: skip
    """After an outage, an owner with thousands of changed rows is read last: the others'
    streams are caught up (and get their live changes again) without waiting for it. With
    an index on the owner column, owners are counted only so far; without one, in one
    pass over the table."""
    quiet = uuid.uuid4()  # nothing changed: caught up before anything is read
    await import_rows(owner_db, user, 2_500)
    await insert_file(db, other_user, "kept.pdf")
    gone = await insert_file(db, other_user, "gone.pdf")
    await db.execute("delete from files where id = $1", gone)  # a tombstone counts too
    told: list[tuple[str, Any]] = []

    async def deliver(feed: Feed, part: CatchUp) -> None:
        told.append(("rows", (sorted({item.owner for item in part.items}), len(part.items))))

    def caught_up(feed: Feed, owners: list[str], snapshot: Snapshot) -> None:
        told.append(("caught up", sorted(owners)))

    async with asyncpg.create_pool(database_url, min_size=1, max_size=1) as pool:
        reads = PoolReads(pool, Metrics())
        files = (await reads.feeds())["files"]
        assert files.owner_indexed  # files_user_id_idx
        files = dataclasses.replace(files, owner_indexed=owner_indexed)
        owners = [str(user), str(other_user), str(quiet)]
        await reads.changes([(files, owners)], 1, deliver, caught_up)
    assert told == [
        ("caught up", [str(quiet)]),
        ("rows", ([str(other_user)], 2)),
        ("caught up", [str(other_user)]),
        ("rows", ([str(user)], 1_000)),
        ("rows", ([str(user)], 1_000)),
        ("rows", ([str(user)], 500)),
        ("caught up", [str(user)]),
    ]
