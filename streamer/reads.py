"""Everything the service reads from the database, behind one protocol: the dispatcher and
the stream handlers take a `Reads` from the app, and unit tests give them another.

Snapshots and catch-ups are read from a server-side cursor, one batch at a time, inside
their snapshot's REPEATABLE READ transaction: what a stream holds grows with one batch,
not with the owner's rows.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

import asyncpg

from streamer import queries
from streamer.changes import VERSION_SCALE, CatchUp, Gone, Row, Snapshot
from streamer.feeds import Feed
from streamer.retry import backoff
from streamer.shapes import EVERYTHING, Shape

BATCH = 1000  # rows a snapshot or catch-up reads (and writes) at a time
VISIBLE_WITHIN = 5.0  # seconds a commit may take to be visible after it arrived

Deliver = Callable[[Feed, CatchUp], Awaitable[None]]
CaughtUp = Callable[[Feed, list[str], Snapshot], None]
Owners = list[tuple[Feed, list[str]]]


class Reading:
    """A catch-up (or snapshot) being read, one batch at a time."""

    def __init__(
        self,
        snapshot: Snapshot,
        reset: bool,
        cursor: Any,
        batch: int,
        members: Callable[[], Awaitable[set[str]]] | None = None,
    ) -> None:
        self.snapshot = snapshot
        self.reset = reset  # the cursor could not be honoured: every row, from the start
        self._whole = reset  # every row the shape takes (a snapshot), not a catch-up
        self._cursor = cursor
        self._batch = batch
        self._members = members
        self._sent: set[str] = set()

    async def batches(self) -> AsyncIterator[CatchUp]:
        while records := await self._cursor.fetch(self._batch):
            items: list[Row | Gone] = [
                Gone(r["owner"], r["id"], r["version"]) if r["row"] is None else _row(r)
                for r in records
            ]
            if self._members is not None and self._whole:
                self._sent.update(item.id for item in items)
            yield CatchUp(self.snapshot, self.reset, items)

    async def held(self) -> set[str]:
        """For a filtered shape, once every batch was read: the ids of the rows its client
        holds now (a snapshot's, or after a catch-up every row the shape takes)."""
        if self._members is None or self._whole:
            return self._sent
        return await self._members()


class Reads(Protocol):
    async def signing_key(self) -> bytes:
        """What the feed triggers sign with."""

    async def source(self) -> str:
        """How the feeds' triggers send now (`streamer.use_source`): notify or wal."""

    async def feeds(self) -> dict[str, Feed]:
        """Every feed, by name."""

    async def changes(
        self,
        owners: list[tuple[Feed, list[str]]],
        since: int,
        deliver: Deliver,
        caught_up: CaughtUp,
    ) -> Snapshot:
        """What changed since the horizon `since` for these owners of these feeds, in one
        snapshot, handed to `deliver` a batch at a time (the next is read once it returns);
        `caught_up` is told of owners whose changes have all been delivered, those with
        fewest changes first."""

    async def row(self, feed: Feed, row_id: str) -> Row | None:
        """The row as it is now (read back: it was too big to travel)."""

    def since(
        self,
        feed: Feed,
        owners: Sequence[str],
        since: int | None,
        *,
        shape: Shape = EVERYTHING,
        visible: int | None = None,
    ) -> contextlib.AbstractAsyncContextManager[Reading]:
        """A stream's own read: what changed for `owners` since the horizon `since` (every
        row when None, or when `since` cannot be honoured: then `reset`) as `shape` takes
        it, in a snapshot of its own that sees the transaction `visible`."""

    async def one(
        self, feed: Feed, owners: Sequence[str], row_id: str
    ) -> tuple[Snapshot, Row | None]:
        """The row `row_id` if it is one of `owners`', and the snapshot it was read in."""

    async def prune(self, feed: Feed, keep_hours: float) -> int:
        """Forget tombstones older than `keep_hours`; how many."""

    async def ping(self) -> None:
        """Return when the database answers."""


class PoolReads:
    """`Reads` from the app's asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def signing_key(self) -> bytes:
        key: bytes = await self.pool.fetchval("select key from streamer.signing_key")
        return key

    async def source(self) -> str:
        source: str = await self.pool.fetchval("select source from streamer.config")
        return source

    async def feeds(self) -> dict[str, Feed]:
        return {record["name"]: Feed.of(record) for record in await self.pool.fetch(queries.FEEDS)}

    async def changes(
        self,
        owners: list[tuple[Feed, list[str]]],
        since: int,
        deliver: Deliver,
        caught_up: CaughtUp,
    ) -> Snapshot:
        """One owner with 200,000 changed rows keeps the others waiting for nothing but
        their own: owners are read in groups, fewest changes first."""
        async with (
            self.pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            snapshot = await current_snapshot(conn)
            for feed, feed_owners in owners:
                feed_since = await honoured(conn, feed, since, snapshot)
                groups = [feed_owners]
                if feed_since is not None:
                    query = queries.counts(feed, BATCH + 1)
                    found = await conn.fetch(
                        query, feed_owners, feed_since * VERSION_SCALE, feed.name
                    )
                    counts: dict[str, int] = {r["owner"]: r["n"] for r in found if r["n"]}
                    caught_up(feed, [o for o in feed_owners if o not in counts], snapshot)
                    groups = by_size(counts, BATCH)
                for group in groups:
                    read = await _reading(conn, feed, group, feed_since, snapshot)
                    async for part in read.batches():
                        await deliver(feed, part)
                    caught_up(feed, group, snapshot)
        return snapshot

    async def row(self, feed: Feed, row_id: str) -> Row | None:
        record = await self.pool.fetchrow(queries.by_id(feed), row_id)
        return None if record is None else _row(record)

    @contextlib.asynccontextmanager
    async def since(
        self,
        feed: Feed,
        owners: Sequence[str],
        since: int | None,
        *,
        shape: Shape = EVERYTHING,
        visible: int | None = None,
    ) -> AsyncIterator[Reading]:
        async with self.pool.acquire() as conn:
            if visible is not None:
                await visible_to_new_snapshots(conn, visible)
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                snapshot = await current_snapshot(conn)
                honoured_since = (
                    None if since is None else await honoured(conn, feed, since, snapshot)
                )
                read = await _reading(conn, feed, owners, honoured_since, snapshot, shape)
                read.reset = since is not None and honoured_since is None
                yield read

    async def one(
        self, feed: Feed, owners: Sequence[str], row_id: str
    ) -> tuple[Snapshot, Row | None]:
        async with (
            self.pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            snapshot = await current_snapshot(conn)
            record = await conn.fetchrow(queries.one(feed), row_id, list(owners))
        return snapshot, None if record is None else _row(record)

    async def prune(self, feed: Feed, keep_hours: float) -> int:
        gone: int = await self.pool.fetchval(
            "select streamer.prune($1, make_interval(secs => $2))", feed.name, keep_hours * 3600
        )
        return gone

    async def ping(self) -> None:
        await self.pool.fetchval("select 1")


def _row(record: asyncpg.Record) -> Row:
    return Row(record["owner"], record["id"], record["version"], record["row"], record["terminal"])


async def current_snapshot(conn: asyncpg.Connection) -> Snapshot:
    return Snapshot.parse(await conn.fetchval("select pg_current_snapshot()::text"))


def by_size(counts: dict[str, int], batch: int) -> list[list[str]]:
    """Owners in groups read one query each, fewest changes first: owners with few share a
    query (up to about `batch` rows), one with many has its own."""
    groups: list[list[str]] = []
    rows = batch
    for owner in sorted(counts, key=lambda o: (counts[o], o)):
        if rows + counts[owner] > batch:
            groups.append([])
            rows = 0
        groups[-1].append(owner)
        rows += counts[owner]
    return groups


async def honoured(
    conn: asyncpg.Connection, feed: Feed, since: int | None, snapshot: Snapshot
) -> int | None:
    """`since`, or None when it cannot be honoured: too old for the retained tombstones (or
    a TRUNCATE since), or from another database's future."""
    if since is None:
        return None
    pruned_below = await conn.fetchval(
        "select pruned_below from streamer.horizon where feed = $1", feed.name
    )
    if since * VERSION_SCALE < (pruned_below or 0) or since > snapshot.xmax:
        return None
    return since


async def _reading(
    conn: asyncpg.Connection,
    feed: Feed,
    owners: Sequence[str],
    since: int | None,
    snapshot: Snapshot,
    shape: Shape = EVERYTHING,
    batch: int = BATCH,
) -> Reading:
    """What changed for `owners` since the honoured horizon `since` (None: every row, and
    the streams reset) as `shape` takes it, inside the REPEATABLE READ transaction whose
    snapshot is `snapshot`."""
    args: list[object] = [list(owners), 0 if since is None else since * VERSION_SCALE]
    if since is not None:
        args.append(feed.name)
    where, params = shape.where(len(args) + 1, alias="r")
    if params:
        # Planned for its values: a plan kept for any value (after five runs of the same
        # prepared statement) cannot tell that status = 'failed' is 1% of a user's rows,
        # and reads all of them by the owner's index.
        await conn.execute("set local plan_cache_mode = force_custom_plan")
    query = queries.since(feed, tombstones=since is not None, where=where)
    cursor = await conn.cursor(query, *args, *params)
    members = None
    if shape.filters:
        ids_where, ids_params = shape.where(2, alias="r")

        async def members() -> set[str]:
            found = await conn.fetch(queries.members(feed, ids_where), list(owners), *ids_params)
            return {record[0] for record in found}

    return Reading(snapshot, since is None, cursor, batch, members)


async def visible_to_new_snapshots(conn: asyncpg.Connection, xid: int) -> None:
    """Wait until the committed transaction `xid` is visible to new snapshots. A commit can
    arrive from the WAL a moment before it is: its session leaves the proc array after the
    commit is flushed (after a synchronous standby's answer, when there is one). Postgres
    has no event for it: looked at again after 1 ms, 2, 4, ... up to 50 ms apart, for at
    most VISIBLE_WITHIN seconds, then read anyway."""
    deadline = asyncio.get_running_loop().time() + VISIBLE_WITHIN
    attempt = 0
    while not await conn.fetchval(queries.VISIBLE, str(xid)):
        attempt += 1
        if asyncio.get_running_loop().time() >= deadline:
            return
        await asyncio.sleep(backoff(attempt, 0.001, 0.05, jitter=False))
