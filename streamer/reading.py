"""One read inside its REPEATABLE READ transaction, in pieces: its snapshot, whether a
cursor can be honoured, a catch-up or snapshot read from a server-side cursor a batch at a
time (what a stream holds grows with one batch, not with the owner's rows), and rows as
streams send them. streamer/reads.py puts them together.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import asyncpg

from streamer import queries
from streamer.changes import VERSION_SCALE, CatchUp, Gone, Row, Snapshot
from streamer.feeds import Feed
from streamer.retry import backoff
from streamer.shapes import EVERYTHING, Shape

BATCH = 1000  # rows a snapshot or catch-up reads (and writes) at a time
VISIBLE_WITHIN = 5.0  # seconds a commit may take to be visible after it arrived


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
            items = [item_of(r) for r in records]
            if self._members is not None and self._whole:
                self._sent.update(item.id for item in items)
            yield CatchUp(self.snapshot, self.reset, items)

    async def held(self) -> set[str]:
        """For a filtered shape, once every batch was read: the ids of the rows its client
        holds now (a snapshot's, or after a catch-up every row the shape takes)."""
        if self._members is None or self._whole:
            return self._sent
        return await self._members()


def row_of(record: asyncpg.Record) -> Row:
    return Row(record["owner"], record["id"], record["version"], record["row"], record["terminal"])


def item_of(record: asyncpg.Record) -> Row | Gone:
    """A row of a catch-up, or a delete (a tombstone: no row)."""
    if record["row"] is None:
        return Gone(record["owner"], record["id"], record["version"])
    return row_of(record)


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
    if since is None or not honours(since, await pruned_below(conn, feed), snapshot):
        return None
    return since


async def pruned_below(conn: asyncpg.Connection, feed: Feed) -> int:
    """The version below which the feed's tombstones were forgotten."""
    found = await conn.fetchval(
        "select pruned_below from streamer.horizon where feed = $1", feed.name
    )
    return found or 0


def honours(since: int, oldest: int, snapshot: Snapshot) -> bool:
    """Whether a read in `snapshot` can honour the horizon `since`, tombstones below the
    version `oldest` being forgotten."""
    return since * VERSION_SCALE >= oldest and since <= snapshot.xmax


async def reading(
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
