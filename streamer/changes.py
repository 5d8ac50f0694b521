"""What a change is: what a source hands on (a change, a marker, a hint), the rows and
deletes streams send, cursors and the snapshots they are read in.

A source passes payloads of these kinds, in commit order, and nothing else: the
dispatcher never looks at a payload's text. Under notify the feed triggers send plain text
on a channel only they and the service can name (sql/007_secret_channel.sql): `read`
turns it into kinds. What travels where others can write (a fleet's broker, logical
messages in the WAL) is signed text: `Signed` turns that into kinds, so a forged one is a
kind too, never a string to sniff.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field, PrivateAttr, ValidationError, model_validator

from streamer.errors import InvalidCursor

log = logging.getLogger(__name__)

CHANNEL = "streamer"  # the WAL messages' prefix, and earlier releases' NOTIFY channel
# A version is never below its writer's transaction id times this (see sql/002_feed.sql).
VERSION_SCALE = 1024
MAX_CURSOR_DIGITS = 19
BIGINT_MAX = 2**63 - 1
# A horizon times VERSION_SCALE is still a bigint, and a cursor fits MAX_CURSOR_DIGITS.
MAX_HORIZON = BIGINT_MAX // VERSION_SCALE
# The envelope's format ("ev", 1 when absent): a later release that changes what a change
# carries raises it, and a process meeting a format it does not know stops serving.
FORMAT = 1
SIGNATURE_LENGTH = 64  # HMAC-SHA256 in hex, in front of every signed payload
MARKER_PREFIX = '{"marker":"'


class Change(BaseModel):
    """One committed row change (or a TRUNCATE) of a feed: the envelope a feed trigger
    sends; the row, when it was small enough to travel, follows it."""

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
    # The signed text it was read from, as it came: what a fleet's reader relays.
    _text: str = PrivateAttr(default="")
    # The trigger's text it was read from (envelope and row), not signed.
    _body: str = PrivateAttr(default="")

    @property
    def text(self) -> str:
        return self._text

    @model_validator(mode="after")
    def _routable(self) -> Change:
        if self.op != "t" and (self.id is None or self.owner is None):
            raise ValueError("a row's change names its id and owner")
        return self

    @property
    def row_id(self) -> str:
        return str(self.id)

    @property
    def needs_read_back(self) -> bool:
        """An update whose row was too big to travel: it is read from the table."""
        return self.op == "u" and self.row is None

    def owners(self) -> tuple[str, ...]:
        """Whose streams this change is for: its owner, and the one it moved from."""
        if self.owner is None:
            return ()
        if self.old_owner is None or self.old_owner == self.owner:
            return (self.owner,)
        return (self.owner, self.old_owner)

    def current(self) -> Row | None:
        """The row this update carries; None when it was too big to travel."""
        if self.row is None or self.owner is None:
            return None
        return Row(self.owner, self.row_id, self.version, self.row, self.terminal)


@dataclass(frozen=True, slots=True)
class Marker:
    """A dispatcher's marker (see Dispatcher.mark): everything committed before it arrived."""

    token: str


@dataclass(frozen=True, slots=True)
class Hint:
    """enable_feed or disable_feed ran: read the feeds again. Anyone can send one; it only
    costs a query."""


@dataclass(frozen=True, slots=True)
class Progress:
    """Every change before it with a horizon up to `horizon` has been handed on (a fleet's
    reader says so now and then, for a node that receives only some of the changes)."""

    horizon: int


@dataclass(frozen=True, slots=True)
class Forged:
    """A payload that no feed trigger sent: one not signed where anyone may write (a
    broker, a logical message), or on the feeds' channel one that is no change at all."""


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A signed change this release cannot read (a later release's, met in a rolling
    deploy): streams would miss it, so this process stops serving."""

    why: str


Payload = Change | Marker | Hint | Progress | Forged | Unreadable


def marker_text(token: str) -> str:
    return MARKER_PREFIX + token + '"}'


def signed_text(key: bytes, change: Change) -> str:
    """The text of a change, signed: what a fleet's reader relays (a change decoded from
    the WAL, or read from the triggers' channel, has none until then)."""
    if change.text:
        return change.text
    body = change._body
    if not body:
        body = change.model_dump_json(by_alias=True, exclude={"row"})
        if change.row is not None:
            body += "\n" + change.row
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest() + body


def later_format_notice(key: bytes) -> str:
    """What earlier releases, LISTENing on channel `streamer`, meet now that the triggers
    send elsewhere: a signed change of a format they cannot read, so that they end their
    streams and report unready instead of staying open and deaf (sql/007_secret_channel.sql
    sends the same at migration)."""
    notice = json.dumps({"ev": FORMAT + 1, "why": "the feeds notify on a channel of their own"})
    return hmac.new(key, notice.encode(), hashlib.sha256).hexdigest() + notice


def read(text: str) -> Payload:
    """A payload of the feeds' own channel, which only the triggers and the service can
    name: trusted as it is, never verified."""
    if text.startswith(MARKER_PREFIX):
        try:
            return Marker(json.loads(text)["marker"])
        except (ValueError, KeyError, TypeError):
            return Forged()
    if not text:
        return Hint()  # sent by enable_feed and disable_feed
    envelope, newline, row = text.partition("\n")
    try:
        change = Change.model_validate_json(envelope)
    except ValidationError as exc:
        if _later_format(envelope):
            return Unreadable(f"{exc.error_count()} problem(s) in a change")
        return Forged()  # not what any trigger sends: counted and dropped
    if newline:
        change.row = row
    change._body = text
    return change


class Signed:
    """The feed triggers' payloads, read: each verified with the signing key (read again at
    each connect) and turned into its kind."""

    def __init__(self, load_key: Callable[[], Awaitable[bytes]] | None = None) -> None:
        self._load_key = load_key
        self.key = b""

    async def load(self) -> None:
        if self._load_key is not None:
            self.key = await self._load_key()

    def read(self, text: str) -> Payload:
        if text.startswith(MARKER_PREFIX):
            try:
                return Marker(json.loads(text)["marker"])
            except (ValueError, KeyError, TypeError):
                return Forged()
        if not text:
            return Hint()  # sent by enable_feed and disable_feed
        signature, body = text[:SIGNATURE_LENGTH], text[SIGNATURE_LENGTH:]
        expected = hmac.new(self.key, body.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(signature, expected):
            return Forged()
        payload = read(body)
        if isinstance(payload, Change):
            payload._text = text
        return payload


def _later_format(envelope: str) -> bool:
    """Whether an envelope this release cannot read names a later format (`"ev"`)."""
    try:
        fields = json.loads(envelope)
    except ValueError:
        return False
    version = fields.get("ev") if isinstance(fields, dict) else None
    return isinstance(version, int) and version > FORMAT


@dataclass(frozen=True, slots=True)
class Row:
    """A row as its owner's streams send it: the JSON Postgres rendered, untouched."""

    owner: str
    id: str
    version: int
    json: str
    terminal: bool


@dataclass(frozen=True, slots=True)
class Gone:
    """A row deleted (a tombstone), as a catch-up finds it."""

    owner: str
    id: str
    version: int


# -- cursors and snapshots -----------------------------------------------------------
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


NOTHING = Snapshot(0, 0, frozenset())  # no read at all: sees no transaction


@dataclass(frozen=True, slots=True)
class CatchUp:
    """Where owners' rows stand in one snapshot: rows changed (and gone) since a cursor, in
    version order; one batch of them."""

    snapshot: Snapshot
    reset: bool  # the cursor could not be honoured: `items` are rows, from the start
    items: list[Row | Gone]
