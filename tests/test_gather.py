"""Catch-ups asked at once are read at once (streamer/gather.py): a crowd that comes back
after a restart costs Postgres a few transactions, not one per stream, and each stream
still gets exactly what changed since its own cursor, a big one read alone."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import asyncpg
import pytest

from streamer import keys
from streamer.changes import VERSION_SCALE, Gone, Row, Snapshot
from streamer.feeds import Feed
from streamer.gather import Caught, Gatherer, Wanted, distribute
from tests.client import open_stream
from tests.conftest import Service, insert_file, token_for, wait_until
from tests.test_resume import cursor_after

EVENTS = "/api/files/events"
SNAPSHOT = Snapshot.parse("100:100:")
FEED = Feed(name="files", owner_column="user_id", event="file", terminal=None, id_type="uuid")


def row(owner: str, version: int) -> Row:
    return Row(owner, f"{owner}-{version}", version, "{}", False)


def test_each_stream_gets_its_owners_rows_at_or_above_its_own_horizon() -> None:
    items: list[Row | Gone] = [row("a", 10 * VERSION_SCALE), Gone("b", "b-1", 11 * VERSION_SCALE),
             row("a", 12 * VERSION_SCALE), row("c", 13 * VERSION_SCALE)]  # fmt: skip
    wanted: list[Wanted] = [(("a",), 11), (("a", "b"), 10), (("b",), 12), (("c",), 13)]
    answers = distribute(SNAPSHOT, wanted, items, alone={"c"}, honoured=lambda s: True)
    assert [a.items if a else None for a in answers] == [
        [items[2]],
        [items[0], items[1], items[2]],  # two owners' rows, in version order
        [],
        None,  # an owner with much to catch up: read alone
    ]
    answers = distribute(SNAPSHOT, wanted, items, alone=set(), honoured=lambda s: s != 12)
    assert answers[2] is None  # a horizon that cannot be honoured: read alone (a reset)


class Reads:
    """A read of many catch-ups that the test lets finish."""

    def __init__(self) -> None:
        self.asked: list[list[Wanted]] = []
        self.go = asyncio.Event()
        self.fail: BaseException | None = None

    async def __call__(self, feed: Feed, wanted: Sequence[Wanted]) -> list[Caught | None]:
        self.asked.append(list(wanted))
        await self.go.wait()
        if self.fail is not None:
            raise self.fail
        return [Caught(SNAPSHOT, [row(owners[0], since or 0)]) for owners, since in wanted]


async def test_a_catch_up_alone_is_read_at_once_and_those_asked_meanwhile_together() -> None:
    reads = Reads()
    gatherer = Gatherer(reads, lanes=1, most=3)
    first = asyncio.ensure_future(gatherer.since(FEED, ("u0",), 1))
    await wait_until(lambda: bool(reads.asked))
    assert reads.asked == [[(("u0",), 1)]]  # nobody waits for company
    rest = [asyncio.ensure_future(gatherer.since(FEED, (f"u{i}",), i)) for i in range(1, 6)]
    await asyncio.sleep(0)
    rest[1].cancel()  # a client that left while it waited
    assert gatherer.waiting == 5
    reads.go.set()
    answers = await asyncio.gather(first, *(r for i, r in enumerate(rest) if i != 1))
    assert [a.items[0].owner if a else None for a in answers] == ["u0", "u1", "u3", "u4", "u5"]
    # At most `most` a read; the one that left was not read for.
    assert [[owners[0] for owners, _ in w] for w in reads.asked] == [
        ["u0"],
        ["u1", "u3"],
        ["u4", "u5"],
    ]
    assert (gatherer.reads, gatherer.caught, gatherer.waiting) == (3, 5, 0)


async def test_a_read_that_fails_fails_each_of_its_streams() -> None:
    reads = Reads()
    reads.fail = ConnectionResetError("the database went away")
    reads.go.set()
    gatherer = Gatherer(reads, lanes=2, most=10)
    asks = [gatherer.since(FEED, (f"u{i}",), i) for i in range(3)]
    results = await asyncio.gather(*asks, return_exceptions=True)
    assert all(isinstance(r, ConnectionResetError) for r in results)


async def test_streams_resuming_at_once_each_get_exactly_what_changed_since_their_cursor(
    service: Service, db: asyncpg.Connection, owner_db: asyncpg.Connection
) -> None:
    users = [uuid.uuid4() for _ in range(12)]
    cursors = {}
    for user in users:
        await insert_file(db, user, "old.pdf")
        cursors[user] = await cursor_after(service, db, user)
    expected: dict[uuid.UUID, set[tuple[str, str]]] = {}
    for i, user in enumerate(users):
        new = await insert_file(db, user, f"new-{i}.pdf")
        gone = await insert_file(db, user, "gone.pdf")
        await db.execute("delete from files where id = $1", gone)
        expected[user] = {("file-update", str(new)), ("file-deleted", str(gone))}
    # One user with more than a batch to catch up: read alone, whole.
    big = users[0]
    await owner_db.execute(
        "insert into files (user_id, filename) select $1, 'bulk-' || n"
        " from generate_series(1, 1100) n",
        big,
    )
    bulk = await db.fetch("select id from files where user_id = $1 and filename like 'bulk-%'", big)
    expected[big] |= {("file-update", str(r["id"])) for r in bulk}
    gatherer = service.app[keys.GATHERER]
    reads_before, caught_before = gatherer.reads, gatherer.caught

    async def resume(user: uuid.UUID) -> set[tuple[str, str]]:
        headers = {"Last-Event-ID": cursors[user]}
        url = service.url(EVENTS)
        async with open_stream(service.session, url, token_for(user), headers=headers) as s:
            got = [(e.name, e.json["file"]["id"]) for e in s.events if e.name != "synced"]
        assert len(got) == len(set(got)), "sent twice"
        assert "reset" not in {name for name, _ in got}
        return set(got)

    got = await asyncio.gather(*(resume(user) for user in users))
    # A row that was there when the cursor was issued may come again at its own version (the
    # same state): a cursor's horizon lags behind transactions still running then.
    before = {
        str(r["id"])
        for r in await db.fetch(
            "select id from files"
            " where user_id = any($1) and filename in ('old.pdf', 'marker.txt')",
            users,
        )
    }
    got = [{(name, i) for name, i in mine if i not in before} for mine in got]
    assert dict(zip(users, got, strict=True)) == expected
    # Read together: fewer reads than streams (the first alone at once, the rest after).
    assert gatherer.caught - caught_before == len(users)
    assert gatherer.reads - reads_before < len(users)


@pytest.mark.parametrize("ahead", [True, False])
async def test_a_cursor_a_read_together_cannot_honour_resets_that_stream_alone(
    service: Service,
    db: asyncpg.Connection,
    owner_db: asyncpg.Connection,
    user: uuid.UUID,
    ahead: bool,
) -> None:
    await insert_file(db, user, "kept.pdf")
    cursor = await cursor_after(service, db, user)
    if ahead:  # a cursor of this database's future (a restored backup)
        cursor = str(int(cursor) + 10_000_000)
    else:  # one older than the tombstones kept
        await owner_db.execute(
            "update streamer.horizon set pruned_below = $1 where feed = 'files'",
            (int(cursor) + 1) * VERSION_SCALE,
        )
    headers = {"Last-Event-ID": cursor}
    async with open_stream(
        service.session, service.url(EVENTS), token_for(user), headers=headers
    ) as stream:
        names = [e.name for e in stream.events]
    assert names[0] == "reset"
    assert names.count("file-update") == 2  # the whole snapshot: kept.pdf and the marker


def test_a_snapshot_gets_its_owners_rows_whatever_their_version() -> None:
    items: list[Row | Gone] = [row("a", 10 * VERSION_SCALE), row("b", 11 * VERSION_SCALE),
             row("a", 12 * VERSION_SCALE)]  # fmt: skip
    wanted: list[Wanted] = [(("a",), None), (("b", "a"), None)]
    answers = distribute(SNAPSHOT, wanted, items, alone=set(), honoured=lambda s: False)
    assert [a.items if a else None for a in answers] == [[items[0], items[2]], items]


async def test_snapshots_asked_at_once_are_read_together_each_its_own_rows(
    service: Service, db: asyncpg.Connection, owner_db: asyncpg.Connection
) -> None:
    users = [uuid.uuid4() for _ in range(12)]
    expected: dict[uuid.UUID, set[str]] = {}
    for i, user in enumerate(users):
        kept = await insert_file(db, user, f"kept-{i}.pdf")
        gone = await insert_file(db, user, "gone.pdf")
        await db.execute("delete from files where id = $1", gone)
        expected[user] = {str(kept)}
    big = users[0]  # more rows than a batch: read alone, whole
    await owner_db.execute(
        "insert into files (user_id, filename) select $1, 'bulk-' || n"
        " from generate_series(1, 1100) n",
        big,
    )
    bulk = await db.fetch("select id::text from files where user_id = $1", big)
    expected[big] = {r["id"] for r in bulk}
    gatherer = service.app[keys.GATHERER]
    reads_before, caught_before = gatherer.reads, gatherer.caught

    async def snapshot(user: uuid.UUID) -> list[tuple[str, str | None]]:
        url, params = service.url(EVENTS), {"snapshot": "1"}
        async with open_stream(service.session, url, token_for(user), params=params) as s:
            return [(e.name, e.json["file"]["id"] if e.name != "synced" else e.id)
                    for e in s.events]  # fmt: skip

    got = await asyncio.gather(*(snapshot(user) for user in users))
    for user, events in zip(users, got, strict=True):
        names = {name for name, _ in events[:-1]}
        assert names == {"file-update"}, "a snapshot sends rows, no deletes, no reset"
        assert {i for _, i in events[:-1]} == expected[user]
        assert len(events) - 1 == len(expected[user]), "sent twice"
        assert events[-1][0] == "synced"
    assert gatherer.caught - caught_before == len(users)
    assert gatherer.reads - reads_before < len(users)
