"""What a client receives, and SSE framing: a pydantic model per event of the stream
itself, and rows' events with the row's JSON spliced in as Postgres rendered it.

Each event is encoded once, as the bytes of a whole SSE message, and those bytes are
shared by every stream it goes to.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, PlainSerializer


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


def retry_frame(milliseconds: int) -> bytes:
    return f"retry: {milliseconds}\n\n".encode()


class Sink:
    """Where a live stream's bytes go: straight into its connection, behind aiohttp's back,
    so that no task wakes up per event. A chunked response gets each message as one HTTP/1.1
    chunk, framed once per message and shared by every stream it goes to."""

    __slots__ = ("_chunked", "_transport")

    def __init__(self, transport: asyncio.WriteTransport, chunked: bool) -> None:
        self._transport = transport
        self._chunked = chunked

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
