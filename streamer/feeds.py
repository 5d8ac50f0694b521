"""What a feed is: a row of `streamer.feeds`, and the registry of those this process serves.

A feed is a table turned into one by `streamer.enable_feed(...)` in SQL (sql/003_feeds.sql).
Its rows pass through: the trigger, or `streamer.<feed>_row` for a read, renders a row as
Postgres renders JSON, and that text is spliced into the event. The service validates only
the envelope it routes on (owner, id, version, cursor fields), so a new column, a new
status value or a widened type never stops a stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from uuid import UUID

from streamer.changes import BIGINT_MAX
from streamer.errors import CONNECTION_ERRORS, InvalidId
from streamer.tasks import set_within

log = logging.getLogger(__name__)

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
    # The columns its events carry, `id` first (None: every column but the owner's), and
    # the table's oid: what a row decoded from the WAL is rendered and matched with.
    columns: tuple[str, ...] | None = None
    oid: int = field(default=0, compare=False)
    # The JWT claim its owners are compared with (None: `sub`): streamer/claims.py.
    owner_claim: str | None = None
    # The type of each column its events carry, id included (Postgres's names): what a
    # shaped stream's filters are checked and compared with. A table may change under a
    # running feed: a column's type is the table's business, read again with the feed.
    column_types: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> Feed:
        return cls(
            name=record["name"],
            owner_column=record["owner_column"],
            event=record["event"],
            terminal=record["terminal"],
            id_type=record["id_type"],
            owner_type=record["owner_type"],
            relation=record["relation"],
            owner_indexed=record["owner_indexed"],
            columns=None if record["columns"] is None else tuple(record["columns"]),
            oid=record["oid"],
            owner_claim=record.get("owner_claim"),
            column_types=json.loads(record.get("column_types") or "{}"),
        )

    def parse_id(self, raw: str) -> str:
        """A row id from a URL, as the row's `id::text` renders it; InvalidId otherwise."""
        if self.id_type == "uuid":
            try:
                return str(UUID(raw))
            except ValueError:
                raise InvalidId("The id is not a UUID.") from None
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
        """Read the feeds again now."""
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
        """Read the feeds at each hint or interval; a database away is tried at the next."""
        while True:
            await set_within(self._wake, self.interval)
            self._wake.clear()
            try:
                await self.refresh()
            except CONNECTION_ERRORS as exc:
                log.warning("could not read the feeds: %s", exc.__class__.__name__)
