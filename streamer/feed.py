"""What a change is: a feed's configuration, the signed envelope we route on, cursors and
catch-up reads.

A feed is a table turned into one by `streamer.enable_feed(...)` in SQL (sql/003_feeds.sql).
Its rows pass through: the trigger, or `streamer.<feed>_row` for a read, renders a row as
Postgres renders JSON, and that text is spliced into the event. The service validates only
the envelope it routes on (owner, id, version, cursor fields), so a new column, a new
status value or a widened type never stops a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from uuid import UUID

import asyncpg
from pydantic import BaseModel, Field, model_validator

from streamer.errors import InvalidCursor, InvalidId
from streamer.sse import row_frame

log = logging.getLogger(__name__)

CHANNEL = "streamer"
# A version is never below its writer's transaction id times this (see sql/002_feed.sql).
VERSION_SCALE = 1024
MAX_CURSOR_DIGITS = 19
BIGINT_MAX = 2**63 - 1
# A horizon times VERSION_SCALE is still a bigint, and a cursor fits MAX_CURSOR_DIGITS.
MAX_HORIZON = BIGINT_MAX // VERSION_SCALE
# The envelope's format ("ev", 1 when absent): a later release that changes what a change
# carries raises it, and a process meeting a format it does not know stops serving.
FORMAT = 1
SIGNATURE_LENGTH = 64  # HMAC-SHA256 in hex, in front of every payload
BATCH = 1000  # rows a snapshot or catch-up reads (and writes) at a time


MAX_TEXT_ID = 1024  # characters of a text id in a URL


@dataclass(frozen=True)
class Feed:
    """A row of `streamer.feeds`: which table, whose rows, and how its events are named."""

    name: str  # the table, the `f` of its notifications, /api/<name>/events
    owner_column: str
    event: str  # <event>-update, <event>-deleted, data key <event>
    terminal: str | None = None  # an SQL expression over the row: ends a one-row stream
    id_type: Literal["uuid", "bigint", "text"] = "uuid"
    owner_type: Literal["uuid", "text"] = "uuid"
    relation: str = '"files"'  # the table, schema-qualified when it is outside search_path
    # Whether an index leads with the owner column (the table's business, not the feed's:
    # it changes how the service reads, not what it sends).
    owner_indexed: bool = field(default=False, compare=False)

    @classmethod
    def of(cls, record: asyncpg.Record) -> Feed:
        return cls(
            name=record["name"],
            owner_column=record["owner_column"],
            event=record["event"],
            terminal=record["terminal"],
            id_type=record["id_type"],
            owner_type=record["owner_type"],
            relation=record["relation"],
            owner_indexed=record["owner_indexed"],
        )

    def parse_id(self, raw: str) -> str:
        """A row id from a URL, as the row's `id::text` renders it; InvalidId otherwise."""
        if self.id_type == "uuid":
            try:
                return str(UUID(raw))
            except ValueError:
                raise InvalidId() from None
        if self.id_type == "bigint":
            # One optional minus sign: "--5" is no integer (and int() would raise).
            if raw.isascii() and raw.removeprefix("-").isdigit() and len(raw) <= 20:
                value = int(raw)
                if -BIGINT_MAX - 1 <= value <= BIGINT_MAX:
                    return str(value)
            raise InvalidId("The id is not an integer.")
        if not raw or len(raw) > MAX_TEXT_ID or "\x00" in raw:
            raise InvalidId(f"The id must be 1 to {MAX_TEXT_ID} characters.")
        return raw

    def update_frame(self, row: Row, cursor: str, timestamp: bytes | None = None) -> bytes:
        name = f"{self.event}-update".encode()
        return row_frame(name, self.event.encode(), row.json, cursor, timestamp)

    def deleted_frame(self, row_id: str, cursor: str, timestamp: bytes | None = None) -> bytes:
        """`{"id": ...}` with the id as Postgres renders it in JSON: a number for bigints."""
        value = row_id if self.id_type == "bigint" else json.dumps(row_id)
        name = f"{self.event}-deleted".encode()
        return row_frame(name, self.event.encode(), '{"id":' + value + "}", cursor, timestamp)

    def frame(self, item: Row | Gone, cursor: str, timestamp: bytes | None = None) -> bytes:
        if isinstance(item, Gone):
            return self.deleted_frame(item.id, cursor, timestamp)
        return self.update_frame(item, cursor, timestamp)

    @property
    def terminal_sql(self) -> str:
        return f"coalesce(({self.terminal})::boolean, false)" if self.terminal else "false"

    def select(self, where: str) -> str:
        """Rows as streams send them, with what the service routes on."""
        return (
            f'select streamer."{self.name}_row"(r) as row, r."{self.owner_column}"::text as owner,'
            f" r.id::text as id, r.streamer_version as version, {self.terminal_sql} as terminal"
            f" from {self.relation} r where {where}"
        )

    def since(self, tombstones: bool) -> str:
        """Rows of owners $1 at versions >= $2 in version order and, with `tombstones`, the
        deletes among them, except of a row that is back (then its row says it all)."""
        rows = self.select(f"{self.owner_in('$1')} and r.streamer_version >= $2")
        if not tombstones:
            return rows + " order by version"
        gone = (
            "select null, t.owner_id, t.row_id, t.version, false from streamer.tombstones t"
            " where t.feed = $3 and t.owner_id = any($1::text[]) and t.version >= $2"
            # Compared in the columns' own types, so that an index finds the row: compared
            # as text, a resume with any tombstone scans the whole table.
            f" and not exists (select from {self.relation} back"
            f" where back.id = t.row_id::{self.id_type}"
            f' and back."{self.owner_column}" = t.owner_id::{self.owner_type})'
        )
        return f"{rows} union all {gone} order by version"

    def counts(self, cap: int) -> str:
        """How many rows and deletes owners $1 have at versions >= $2, by owner (none: left
        out, or 0). With an index on the owner column each owner is counted up to `cap`
        only, enough to tell those with little to catch up from those with much, without
        reading the whole of a large one; without one, in one pass. Nothing is rendered."""
        if not self.owner_indexed:
            return (
                f'select owner, count(*)::int as n from (select r."{self.owner_column}"::text'
                f" as owner from {self.relation} r where {self.owner_in('$1')}"
                " and r.streamer_version >= $2 union all select t.owner_id"
                " from streamer.tombstones t"
                " where t.feed = $3 and t.owner_id = any($1::text[]) and t.version >= $2) c"
                " group by owner"
            )
        return (
            f"select o.owner, (select count(*) from (select from {self.relation} r"
            f' where r."{self.owner_column}" = o.owner::{self.owner_type}'
            " and r.streamer_version >= $2"
            f" limit {cap:d}) x) + (select count(*) from (select from streamer.tombstones t"
            " where t.feed = $3 and t.owner_id = o.owner and t.version >= $2"
            f" limit {cap:d}) y) as n from unnest($1::text[]) o(owner)"
        )

    def owner_in(self, param: str) -> str:
        """The owner column among `param` (a text[]), compared in the column's own type so
        that an index on it is used."""
        return f'r."{self.owner_column}" = any({param}::text[]::{self.owner_type}[])'


# How sql/003_feeds.sql enables `files`.
FILES = Feed(
    name="files",
    owner_column="user_id",
    event="file",
    terminal="status in ('ready', 'failed')",
    owner_indexed=True,  # files_user_id_idx, sql/001_files.sql
)


class Feeds:
    """The feeds this process serves: `streamer.feeds`, read again every few seconds and
    as soon as `enable_feed`/`disable_feed` signal a change, so that a feed is picked up
    (or dropped) while the service runs."""

    def __init__(
        self,
        load: Callable[[], Awaitable[dict[str, Feed]]],
        on_disabled: Callable[[str], None],
        *,
        interval: float = 2.0,
    ) -> None:
        self.load = load
        self.on_disabled = on_disabled
        # Run after each read (the dispatcher checks the database's source then).
        self.after: Callable[[], Awaitable[None]] | None = None
        self.interval = interval
        self.by_name: dict[str, Feed] = {}
        self._wake = asyncio.Event()

    def get(self, name: str) -> Feed | None:
        return self.by_name.get(name)

    def changed(self) -> None:
        """Read the feeds again now (a hint: anyone can send it, it only costs a query)."""
        self._wake.set()

    async def refresh(self) -> None:
        found = await self.load()
        before, self.by_name = self.by_name, found
        for name, feed in before.items():
            if found.get(name) != feed:
                if name not in found:
                    log.info("feed %r disabled", name)
                self.on_disabled(name)  # gone, or its configuration changed: streams restart
        for name in found.keys() - before.keys():
            log.info("feed %r enabled", name)
        if self.after is not None:
            await self.after()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.interval)
            self._wake.clear()
            try:
                await self.refresh()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("could not read the feeds: %s", exc.__class__.__name__)


@dataclass(frozen=True, slots=True)
class Row:
    """A row as its owner's streams send it: the JSON Postgres rendered, untouched."""

    owner: str
    id: str
    version: int
    json: str
    terminal: bool

    @classmethod
    def of(cls, record: asyncpg.Record) -> Row:
        return cls(
            record["owner"], record["id"], record["version"], record["row"], record["terminal"]
        )


class Notification(BaseModel):
    """The envelope a feed trigger signs and sends; the row, when it fits, follows it."""

    format: int = Field(default=1, alias="ev", ge=1, le=FORMAT)
    feed: str = Field(alias="f")
    op: Literal["u", "d", "t"] = Field(alias="o")  # update (or insert), delete, truncate
    id: str | int | None = None
    owner: str | None = Field(default=None, alias="u")
    old_owner: str | None = Field(default=None, alias="ou")
    version: int = Field(default=0, alias="v", ge=0, le=BIGINT_MAX)
    xid: int = Field(alias="x", ge=0, le=BIGINT_MAX)
    horizon: int = Field(alias="m", ge=0, le=MAX_HORIZON)
    at: float | None = Field(default=None, alias="t")  # the writer's clock, epoch seconds
    terminal: bool = Field(default=False, alias="e")
    row: str | None = None  # not in the envelope: the JSON after it

    @model_validator(mode="after")
    def _routable(self) -> Notification:
        if self.op != "t" and (self.id is None or self.owner is None):
            raise ValueError("a row's change names its id and owner")
        return self

    @property
    def row_id(self) -> str:
        return str(self.id)

    def current(self) -> Row | None:
        """The row this update carries; None when it was too big to travel."""
        if self.row is None or self.owner is None:
            return None
        return Row(self.owner, self.row_id, self.version, self.row, self.terminal)


class Forged(Exception):
    """A payload on the channel that no feed trigger signed."""


def decode(payload: str, key: bytes) -> Notification:
    """Verify a payload's signature and read its envelope; the row stays text.

    Raises Forged for anything not signed with `key`, ValidationError for a signed
    envelope this version cannot read."""
    signature, body = payload[:SIGNATURE_LENGTH], payload[SIGNATURE_LENGTH:]
    expected = hmac.new(key, body.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(signature, expected):
        raise Forged()
    envelope, newline, row = body.partition("\n")
    change = Notification.model_validate_json(envelope)
    if newline:
        change.row = row
    return change


class Reads:
    """Everything the dispatcher reads from the database (unit tests give it another)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def signing_key(self) -> bytes:
        key: bytes = await self.pool.fetchval("select key from streamer.signing_key")
        return key

    async def source(self) -> str:
        """How the feeds' triggers send now (`streamer.use_source`)."""
        source: str = await self.pool.fetchval("select source from streamer.config")
        return source

    async def feeds(self) -> dict[str, Feed]:
        records = await self.pool.fetch(
            "select name, owner_column, event, terminal, id_type, owner_type,"
            " tbl::text as relation, exists (select from pg_index i join pg_attribute a"
            " on a.attrelid = i.indrelid and a.attnum = i.indkey[0] where i.indrelid = f.tbl"
            " and a.attname = f.owner_column and i.indisvalid and i.indpred is null)"
            " as owner_indexed from streamer.feeds f"
        )
        return {record["name"]: Feed.of(record) for record in records}

    async def changes(
        self,
        owners: list[tuple[Feed, list[str]]],
        since: int,
        deliver: Callable[[Feed, CatchUp], Awaitable[None]],
        caught_up: Callable[[Feed, list[str], Snapshot], None],
    ) -> Snapshot:
        """What changed since `since` for these owners of these feeds, in one snapshot,
        handed to `deliver` a batch at a time (the next is read once it returns);
        `caught_up` is told of owners whose changes
        have all been delivered, the owners with fewest changes first: one owner with
        200,000 changed rows keeps the others waiting for nothing but their own."""
        async with (
            self.pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            snapshot = await current_snapshot(conn)
            for feed, feed_owners in owners:
                feed_since = await honoured(conn, feed, since, snapshot)
                groups = [feed_owners]
                if feed_since is not None:
                    found = await conn.fetch(
                        feed.counts(BATCH + 1), feed_owners, feed_since * VERSION_SCALE, feed.name
                    )
                    counts: dict[str, int] = {r["owner"]: r["n"] for r in found if r["n"]}
                    caught_up(feed, [o for o in feed_owners if o not in counts], snapshot)
                    groups = by_size(counts, BATCH)
                for group in groups:
                    reset = feed_since is None  # too old: every row, and the streams reset
                    read = await _reading(conn, feed, group, feed_since, reset, snapshot, BATCH)
                    async for part in read.batches():
                        await deliver(feed, part)
                    caught_up(feed, group, snapshot)
        return snapshot

    async def row(self, feed: Feed, row_id: str) -> Row | None:
        return await fetch_row(self.pool, feed, row_id)


# -- cursors -------------------------------------------------------------------------
# A cursor is an xid horizon H: every change not yet delivered when it was issued was made
# by a transaction with id >= H, so resuming means "rows with version >= H * 1024".


def parse_cursor(raw: str) -> int:
    raw = raw.strip()
    if not raw.isascii() or not raw.isdigit() or len(raw) > MAX_CURSOR_DIGITS:
        raise InvalidCursor()
    return int(raw)


def format_cursor(horizon: int) -> str:
    return str(horizon)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A Postgres snapshot (pg_current_snapshot()): which transactions it sees."""

    xmin: int
    xmax: int
    running: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        xmin, xmax, running = text.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in running.split(",") if x))

    def sees(self, xid: int) -> bool:
        return xid < self.xmin or (xid < self.xmax and xid not in self.running)

    def covers(self, other: Snapshot) -> bool:
        """Whether this snapshot sees every transaction `other` sees (it was taken later)."""
        return other.xmax <= self.xmax and all(
            x in other.running for x in self.running if x < other.xmax
        )

    @property
    def cursor(self) -> str:
        return format_cursor(self.xmin)


@dataclass(frozen=True, slots=True)
class Gone:
    owner: str
    id: str
    version: int


@dataclass(frozen=True, slots=True)
class CatchUp:
    """Where owners' rows stand in one snapshot: rows changed (and gone) since a cursor, in
    version order; one batch of them."""

    snapshot: Snapshot
    reset: bool  # the cursor could not be honoured: `items` are rows, from the start
    items: list[Row | Gone]


async def current_snapshot(conn: asyncpg.Connection) -> Snapshot:
    return Snapshot.parse(await conn.fetchval("select pg_current_snapshot()::text"))


class Reading:
    """A catch-up (or snapshot) being read from a server-side cursor, one batch at a time,
    inside its snapshot's transaction: what a stream holds grows with one batch, not with
    the owner's rows."""

    def __init__(self, snapshot: Snapshot, reset: bool, cursor: Any, batch: int) -> None:
        self.snapshot = snapshot
        self.reset = reset
        self._cursor = cursor
        self._batch = batch

    async def batches(self) -> AsyncIterator[CatchUp]:
        while records := await self._cursor.fetch(self._batch):
            items: list[Row | Gone] = [
                Gone(r["owner"], r["id"], r["version"]) if r["row"] is None else Row.of(r)
                for r in records
            ]
            yield CatchUp(self.snapshot, self.reset, items)


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


async def reading(
    conn: asyncpg.Connection,
    feed: Feed,
    owners: Sequence[str],
    since: int | None,
    snapshot: Snapshot,
    batch: int = BATCH,
) -> Reading:
    """What changed for `owners` since the horizon `since` (everything when None, or when
    `since` cannot be honoured: then `reset`). Inside a REPEATABLE READ transaction whose
    snapshot is `snapshot`."""
    if since is None:
        return await _reading(conn, feed, owners, None, False, snapshot, batch)
    since = await honoured(conn, feed, since, snapshot)
    return await _reading(conn, feed, owners, since, since is None, snapshot, batch)


async def _reading(
    conn: asyncpg.Connection,
    feed: Feed,
    owners: Sequence[str],
    since: int | None,
    reset: bool,
    snapshot: Snapshot,
    batch: int,
) -> Reading:
    """`reading` of a `since` already honoured (None: every row)."""
    floor = 0 if since is None else since * VERSION_SCALE
    args: list[object] = [list(owners), floor]
    if since is not None:
        args.append(feed.name)
    cursor = await conn.cursor(feed.since(tombstones=since is not None), *args)
    return Reading(snapshot, reset, cursor, batch)


@contextlib.asynccontextmanager
async def read_since(
    conn: asyncpg.Connection,
    feed: Feed,
    owners: Sequence[str],
    since: int | None,
    batch: int = BATCH,
) -> AsyncIterator[Reading]:
    """`reading` in a snapshot of its own."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        snapshot = await current_snapshot(conn)
        yield await reading(conn, feed, owners, since, snapshot, batch)


async def catch_up(
    conn: asyncpg.Connection, feed: Feed, owners: Sequence[str], since: int | None
) -> CatchUp:
    """All of `read_since` at once (for small reads and tests)."""
    async with read_since(conn, feed, owners, since) as read:
        items = [item async for part in read.batches() for item in part.items]
        return CatchUp(read.snapshot, read.reset, items)


async def visible(conn: asyncpg.Connection, xid: int) -> None:
    """Wait until the committed transaction `xid` is visible to new snapshots. A commit can
    arrive from the WAL a moment before it is: its session leaves the proc array after the
    commit is flushed (after a synchronous standby's answer, when there is one)."""
    query = "select pg_visible_in_snapshot($1::text::xid8, pg_current_snapshot())"
    for _ in range(5000):  # at least 5 s, then read anyway
        if await conn.fetchval(query, str(xid)):
            return
        await asyncio.sleep(0.001)


async def fetch_row(conn: asyncpg.Connection | asyncpg.Pool, feed: Feed, row_id: str) -> Row | None:
    record = await conn.fetchrow(feed.select(f"r.id = $1::text::{feed.id_type}"), row_id)
    return None if record is None else Row.of(record)


async def prune(conn: asyncpg.Connection | asyncpg.Pool, feed: Feed, keep_hours: float) -> int:
    gone: int = await conn.fetchval(
        "select streamer.prune($1, make_interval(secs => $2))", feed.name, keep_hours * 3600
    )
    return gone
