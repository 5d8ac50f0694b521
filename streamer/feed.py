"""What a change is: the feed's configuration, notification decoding, cursors and catch-up.

A feed is a table with a uuid `id` and an owner column, turned into one by
`streamer.enable_feed(table, owner_column)` in SQL. Everything the service knows about
`files` is the `FILES` value below; another table streams the same way with another Feed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from uuid import UUID

import asyncpg
from pydantic import BaseModel, Field

from streamer.errors import InvalidCursor
from streamer.events import (
    Event,
    FileDeletedEvent,
    FileRef,
    FileUpdateEvent,
    StreamedFile,
    now,
)

CHANNEL = "streamer"
# A version is never below its writer's transaction id times this (see sql/002_feed.sql).
VERSION_SCALE = 1024
MAX_CURSOR_DIGITS = 19
BIGINT_MAX = 2**63 - 1
# A horizon times VERSION_SCALE is still a bigint, and a cursor fits MAX_CURSOR_DIGITS. Any
# role connected to the database can NOTIFY the channel: a horizon beyond this is forged,
# and would have every later event carry a cursor that this server itself rejects.
MAX_HORIZON = BIGINT_MAX // VERSION_SCALE


@dataclass(frozen=True)
class Feed:
    name: str  # the table, and the `f` of its notifications
    owner_column: str
    row_model: type[StreamedFile]
    update_event: Callable[[StreamedFile], Event]
    delete_event: Callable[[UUID], Event]
    is_terminal: Callable[[StreamedFile], bool]
    columns: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "columns", tuple(self.row_model.model_fields))

    @property
    def select_list(self) -> str:
        return ", ".join(f'"{c}"' for c in self.columns)


FILES = Feed(
    name="files",
    owner_column="user_id",
    row_model=StreamedFile,
    update_event=lambda row: FileUpdateEvent(timestamp=now(), file=row),
    delete_event=lambda row_id: FileDeletedEvent(timestamp=now(), file=FileRef(id=row_id)),
    is_terminal=lambda row: row.status in ("ready", "failed"),
)


class Notification(BaseModel):
    """The payload a feed trigger sends; always under 8000 bytes."""

    feed: str = Field(alias="f")
    op: Literal["u", "d"] = Field(alias="o")
    id: UUID
    owner: UUID = Field(alias="u")
    old_owner: UUID | None = Field(default=None, alias="ou")
    version: int = Field(alias="v", ge=0, le=BIGINT_MAX)
    xid: int = Field(alias="x", ge=0, le=BIGINT_MAX)
    horizon: int = Field(alias="m", ge=0, le=MAX_HORIZON)
    at: float | None = Field(default=None, alias="t")  # the writer's clock, epoch seconds
    row: dict[str, Any] | None = Field(default=None, alias="r")


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
    owner: UUID
    id: UUID
    version: int


@dataclass(frozen=True, slots=True)
class CatchUp:
    """Where owners' rows stand in one snapshot: rows changed (and gone) since a cursor."""

    snapshot: Snapshot
    reset: bool  # the cursor could not be honoured: `rows` is everything, `gone` is empty
    rows: list[tuple[UUID, StreamedFile]]  # (owner, row)
    gone: list[Gone]

    def in_order(self) -> list[tuple[UUID, StreamedFile | Gone]]:
        """Deletes and updates merged by version, skipping a tombstone of a row now back."""
        present = {(owner, row.id) for owner, row in self.rows}
        items: list[tuple[UUID, StreamedFile | Gone]] = [
            (g.owner, g) for g in self.gone if (g.owner, g.id) not in present
        ]
        items.extend(self.rows)
        items.sort(key=lambda item: item[1].version)
        return items


async def current_snapshot(conn: asyncpg.Connection) -> Snapshot:
    return Snapshot.parse(await conn.fetchval("select pg_current_snapshot()::text"))


async def catch_up(
    conn: asyncpg.Connection, feed: Feed, owners: Sequence[UUID], since: int | None
) -> CatchUp:
    """Rows of `owners` changed by transactions with id >= `since` (all rows when None)."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        snapshot = await current_snapshot(conn)
        reset = False
        if since is not None:
            pruned_below = await conn.fetchval(
                "select pruned_below from streamer.horizon where feed = $1", feed.name
            )
            # Too old for the retained tombstones, or from another database's future.
            if since * VERSION_SCALE < (pruned_below or 0) or since > snapshot.xmax:
                reset, since = True, None
        floor = 0 if since is None else since * VERSION_SCALE
        records = await conn.fetch(
            f"select {feed.select_list}, {feed.owner_column} as __owner from {feed.name} "
            f"where {feed.owner_column} = any($1::uuid[]) and version >= $2",
            list(owners),
            floor,
        )
        gone: list[Gone] = []
        if since is not None:
            tombstones = await conn.fetch(
                "select owner_id, row_id, version from streamer.tombstones "
                "where feed = $1 and owner_id = any($2::uuid[]) and version >= $3",
                feed.name,
                list(owners),
                floor,
            )
            gone = [Gone(t["owner_id"], t["row_id"], t["version"]) for t in tombstones]
    rows = [(r["__owner"], feed.row_model.model_validate(dict(r))) for r in records]
    return CatchUp(snapshot, reset, rows, gone)


async def fetch_row(
    conn: asyncpg.Connection | asyncpg.Pool, feed: Feed, row_id: UUID
) -> tuple[UUID, StreamedFile] | None:
    record = await conn.fetchrow(
        f"select {feed.select_list}, {feed.owner_column} as __owner from {feed.name} where id = $1",
        row_id,
    )
    if record is None:
        return None
    return record["__owner"], feed.row_model.model_validate(dict(record))


async def prune(conn: asyncpg.Connection | asyncpg.Pool, feed: Feed, keep_hours: float) -> int:
    gone: int = await conn.fetchval(
        "select streamer.prune($1, make_interval(secs => $2))", feed.name, keep_hours * 3600
    )
    return gone
