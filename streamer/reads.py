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
from typing import Protocol

import asyncpg

from streamer import queries
from streamer.changes import VERSION_SCALE, CatchUp, Row, Snapshot
from streamer.feeds import Feed
from streamer.gather import Caught, Wanted, distribute
from streamer.metrics import Metrics
from streamer.reading import (
    BATCH,
    Reading,
    by_size,
    current_snapshot,
    honoured,
    honours,
    item_of,
    pruned_below,
    reading,
    row_of,
    visible_to_new_snapshots,
)
from streamer.shapes import EVERYTHING, Shape

MANY_ROWS = 20 * BATCH  # rows a read of many streams' catch-ups holds at most

Deliver = Callable[[Feed, CatchUp], Awaitable[None]]
CaughtUp = Callable[[Feed, list[str], Snapshot], None]
Owners = list[tuple[Feed, list[str]]]


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

    async def many(self, feed: Feed, wanted: Sequence[Wanted]) -> list[Caught | None]:
        """Catch-ups of several streams of `feed` (their owners, their horizons) read in one
        snapshot: each one's, or None for a stream to read alone (much to catch up, or a
        horizon that cannot be honoured)."""

    async def one(
        self, feed: Feed, owners: Sequence[str], row_id: str
    ) -> tuple[Snapshot, Row | None]:
        """The row `row_id` if it is one of `owners`', and the snapshot it was read in."""

    async def prune(self, feed: Feed, keep_hours: float) -> int:
        """Forget tombstones older than `keep_hours`; how many."""

    async def ping(self) -> None:
        """Return when the database answers."""


class PoolReads:
    """`Reads` from the app's asyncpg pool; how long each read waited for a connection
    goes to the metrics."""

    def __init__(self, pool: asyncpg.Pool, metrics: Metrics) -> None:
        self.pool = pool
        self._metrics = metrics

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        metrics, loop = self._metrics, asyncio.get_running_loop()
        asked = loop.time()
        metrics.pool_waiting.inc()
        try:
            conn = await self.pool.acquire()
        finally:
            metrics.pool_waiting.dec()
            metrics.pool_wait.observe(loop.time() - asked)
        try:
            yield conn
        finally:
            await self.pool.release(conn)

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
            self._connection() as conn,
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
                    read = await reading(conn, feed, group, feed_since, snapshot)
                    async for part in read.batches():
                        await deliver(feed, part)
                    caught_up(feed, group, snapshot)
        return snapshot

    async def row(self, feed: Feed, row_id: str) -> Row | None:
        record = await self.pool.fetchrow(queries.by_id(feed), row_id)
        return None if record is None else row_of(record)

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
        async with self._connection() as conn:
            if visible is not None:
                await visible_to_new_snapshots(conn, visible)
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                snapshot = await current_snapshot(conn)
                honoured_since = (
                    None if since is None else await honoured(conn, feed, since, snapshot)
                )
                read = await reading(conn, feed, owners, honoured_since, snapshot, shape)
                read.reset = since is not None and honoured_since is None
                yield read

    async def many(self, feed: Feed, wanted: Sequence[Wanted]) -> list[Caught | None]:
        """The catch-ups (or the snapshots) of several streams of `feed` in one snapshot
        (streamer/gather.py): one count of what each owner has since the lowest horizon
        among them, one query of the rows of those with little, at most MANY_ROWS in all."""
        async with (
            self._connection() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            snapshot = await current_snapshot(conn)
            oldest = await pruned_below(conn, feed)

            def honoured(since: int) -> bool:
                return honours(since, oldest, snapshot)

            # Either all snapshots (every row, no deletes) or all catch-ups (gather.py).
            horizons = [since for _, since in wanted if since is None or honoured(since)]
            owners = sorted({o for os, h in wanted if h is None or honoured(h) for o in os})
            if not owners:
                return distribute(snapshot, wanted, [], set(), honoured)
            rows_only = horizons[0] is None
            low = 0 if rows_only else min(h for h in horizons if h is not None) * VERSION_SCALE
            count = queries.counts(feed, BATCH + 1, tombstones=not rows_only)
            found = await conn.fetch(count, owners, low, *([] if rows_only else [feed.name]))
            counts = {r["owner"]: r["n"] for r in found if r["n"]}
            alone = {owner for owner, n in counts.items() if n > BATCH}
            total = sum(counts.values()) - sum(counts[owner] for owner in alone)
            for owner in sorted(counts, key=counts.__getitem__, reverse=True):
                if total <= MANY_ROWS:
                    break
                if owner not in alone:
                    alone.add(owner)
                    total -= counts[owner]
            few = [owner for owner in counts if owner not in alone]
            rest = [] if rows_only else [feed.name]
            records = (
                await conn.fetch(queries.since(feed, not rows_only), few, low, *rest) if few else []
            )
        return distribute(snapshot, wanted, [item_of(r) for r in records], alone, honoured)

    async def one(
        self, feed: Feed, owners: Sequence[str], row_id: str
    ) -> tuple[Snapshot, Row | None]:
        async with (
            self._connection() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            snapshot = await current_snapshot(conn)
            record = await conn.fetchrow(queries.one(feed), row_id, list(owners))
        return snapshot, None if record is None else row_of(record)

    async def prune(self, feed: Feed, keep_hours: float) -> int:
        gone: int = await self.pool.fetchval(
            "select streamer.prune($1, make_interval(secs => $2))", feed.name, keep_hours * 3600
        )
        return gone

    async def ping(self) -> None:
        await self.pool.fetchval("select 1")
