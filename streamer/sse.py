"""What a client receives, and all of SSE framing: a pydantic model per event of the
stream itself, rows' events with the row's JSON spliced in as Postgres rendered it, the
sink that writes a live stream's bytes, and the parser that reads them back.

Each event is encoded once, as the bytes of a whole SSE message, and those bytes are
shared by every stream it goes to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, PlainSerializer

from streamer.changes import Gone, Row
from streamer.feeds import Feed


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


def _iso(value: datetime) -> str:
    return value.isoformat(timespec="microseconds").replace("+00:00", "Z")


# ISO 8601 in UTC on the wire, whatever time zone the writer's session had.
UtcDatetime = Annotated[datetime, AfterValidator(_utc), PlainSerializer(_iso, return_type=str)]


def now() -> UtcDatetime:
    return datetime.now(UTC)


class HeartbeatEvent(BaseModel):
    eventType: Literal["heartbeat"] = "heartbeat"
    timestamp: UtcDatetime


class SyncedEvent(BaseModel):
    eventType: Literal["synced"] = "synced"
    timestamp: UtcDatetime


class ResetEvent(BaseModel):
    eventType: Literal["reset"] = "reset"
    timestamp: UtcDatetime


class TokenExpiredEvent(BaseModel):
    eventType: Literal["token-expired"] = "token-expired"
    timestamp: UtcDatetime


Event = HeartbeatEvent | SyncedEvent | ResetEvent | TokenExpiredEvent


def frame(event: Event, cursor: str | None = None) -> bytes:
    """One SSE message. The JSON is a single line, so one `data:` line carries it."""
    head = f"event: {event.eventType}\n"
    if cursor is not None:
        head += f"id: {cursor}\n"
    return head.encode() + b"data: " + event.model_dump_json().encode() + b"\n\n"


def timestamp_now() -> bytes:
    return _iso(now()).encode()


def row_frame(
    name: bytes, key: bytes, value: str, cursor: str, timestamp: bytes | None = None
) -> bytes:
    """A row's event (`file-update`, `file-deleted`): `value` is JSON as Postgres rendered
    it, spliced in as it is. Postgres escapes newlines in JSON, so it stays one line."""
    timestamp = timestamp or timestamp_now()
    return b'event: %b\nid: %b\ndata: {"eventType":"%b","timestamp":"%b","%b":%b}\n\n' % (
        name,
        cursor.encode(),
        name,
        timestamp,
        key,
        value.encode(),
    )


def update_frame(
    feed: Feed, row: Row, cursor: str, timestamp: bytes | None = None, text: str | None = None
) -> bytes:
    """The row's update; `text`: its JSON as a shaped stream sends it (default: all of it)."""
    name = f"{feed.event}-update".encode()
    text = row.json if text is None else text
    return row_frame(name, feed.event.encode(), text, cursor, timestamp)


def deleted_frame(feed: Feed, row_id: str, cursor: str, timestamp: bytes | None = None) -> bytes:
    """`{"id": ...}` with the id as Postgres renders it in JSON: a number for bigints."""
    value = row_id if feed.id_type == "bigint" else json.dumps(row_id)
    name = f"{feed.event}-deleted".encode()
    return row_frame(name, feed.event.encode(), '{"id":' + value + "}", cursor, timestamp)


def item_frame(feed: Feed, item: Row | Gone, cursor: str, timestamp: bytes | None = None) -> bytes:
    if isinstance(item, Gone):
        return deleted_frame(feed, item.id, cursor, timestamp)
    return update_frame(feed, item, cursor, timestamp)


def retry_frame(milliseconds: int) -> bytes:
    return f"retry: {milliseconds}\n\n".encode()


class Sink:
    """Where a live stream's bytes go: straight into its connection, behind aiohttp's back,
    so that no task wakes up per event. A chunked response gets each message as one HTTP/1.1
    chunk, framed once per message and shared by every stream it goes to.

    The connection is told to count as backed up past `backlog` unsent bytes (asyncio's
    write buffer limits), so that `drained` waits on its own signal, never polls."""

    __slots__ = ("_chunked", "_drain", "_transport")

    def __init__(
        self,
        transport: asyncio.WriteTransport,
        chunked: bool,
        drain: Callable[[], Awaitable[None]],
        *,
        backlog: int,
    ) -> None:
        self._transport = transport
        self._chunked = chunked
        self._drain = drain
        transport.set_write_buffer_limits(high=backlog, low=backlog)

    def write(self, messages: list[Message]) -> None:
        if self._chunked:
            parts = [message.chunk for message in messages]
        else:
            parts = [message.data for message in messages]
        self._transport.write(parts[0] if len(parts) == 1 else b"".join(parts))

    @property
    def closing(self) -> bool:
        return self._transport.is_closing()

    def unsent(self) -> int:
        """Bytes written that the client has not taken yet."""
        return self._transport.get_write_buffer_size()

    def abort(self) -> None:
        self._transport.abort()

    async def drained(self) -> None:
        """Return once at most `backlog` bytes wait for the client, or the connection is
        gone (a stream cut for not reading ends this too)."""
        with contextlib.suppress(ConnectionError):
            await self._drain()


class Message:
    """One whole SSE message, encoded once for every stream it goes to."""

    __slots__ = ("_chunk", "data")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self._chunk: bytes | None = None

    @property
    def chunk(self) -> bytes:
        """`data` as one HTTP/1.1 chunk, made at most once."""
        if self._chunk is None:
            self._chunk = b"%x\r\n%b\r\n" % (len(self.data), self.data)
        return self._chunk


# -- reading -------------------------------------------------------------------------


class ParsedEvent:
    """One event as a client's EventSource dispatches it."""

    __slots__ = ("data", "id", "name")

    def __init__(self, name: str, data: str, id: str | None) -> None:
        self.name = name
        self.data = data
        self.id = id

    def __repr__(self) -> str:
        return f"ParsedEvent({self.name!r}, {self.data[:60]!r}, id={self.id!r})"


class Parser:
    """The inverse of the framing above, as the HTML standard's EventSource reads a stream:
    bytes in (any split, any line ending), whole events out. Used by the tests, the bench's
    clients and load generators, so that each reads a stream the way a browser does."""

    __slots__ = ("_cr", "_rest", "last_id", "retry")

    def __init__(self) -> None:
        self._rest = b""
        self._cr = False
        self.last_id: str | None = None  # what a browser would send as Last-Event-ID
        self.retry: int | None = None  # the last `retry:` in milliseconds

    def feed(self, data: bytes) -> list[ParsedEvent]:
        if self._cr and data.startswith(b"\n"):
            data = data[1:]  # the second half of a CRLF split across two reads
        self._cr = False
        if b"\r" in data:
            self._cr = data.endswith(b"\r")
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        text = self._rest + data if self._rest else data
        blocks = text.split(b"\n\n")
        self._rest = blocks.pop()
        return [event for block in blocks if (event := self._event(block)) is not None]

    def _event(self, block: bytes) -> ParsedEvent | None:
        name, data, event_id = "message", list[str](), None
        for line in block.decode().split("\n"):
            if not line or line.startswith(":"):
                continue
            key, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if key == "event":
                name = value
            elif key == "data":
                data.append(value)
            elif key == "id" and "\x00" not in value:
                event_id = self.last_id = value
            elif key == "retry" and value.isascii() and value.isdigit():
                self.retry = int(value)
        if not data:
            return None
        return ParsedEvent(name, "\n".join(data), event_id)
