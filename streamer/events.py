"""What a client receives: one pydantic model per event, and SSE framing.

Each event is encoded once, as the bytes of a whole SSE message, and those bytes are
shared by every stream it goes to.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, PlainSerializer


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


def _iso(value: datetime) -> str:
    return value.isoformat(timespec="microseconds").replace("+00:00", "Z")


# ISO 8601 in UTC on the wire, whatever time zone the writer's session had.
UtcDatetime = Annotated[datetime, AfterValidator(_utc), PlainSerializer(_iso, return_type=str)]


def now() -> UtcDatetime:
    return datetime.now(UTC)


class StreamedFile(BaseModel):
    """A row of `files` as its owner sees it (no owner column)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: UUID
    filename: str
    file_type: str | None
    status: Literal["pending", "processing", "ready", "failed"]
    progress: int
    processing_stage: str | None
    error_message: str | None
    created_at: UtcDatetime
    updated_at: UtcDatetime
    version: int


class FileRef(BaseModel):
    id: UUID


class FileUpdateEvent(BaseModel):
    eventType: Literal["file-update"] = "file-update"
    timestamp: UtcDatetime
    file: StreamedFile


class FileDeletedEvent(BaseModel):
    eventType: Literal["file-deleted"] = "file-deleted"
    timestamp: UtcDatetime
    file: FileRef


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


Event = (
    FileUpdateEvent
    | FileDeletedEvent
    | HeartbeatEvent
    | SyncedEvent
    | ResetEvent
    | TokenExpiredEvent
)


def frame(event: Event, cursor: str | None = None) -> bytes:
    """One SSE message. The JSON is a single line, so one `data:` line carries it."""
    head = f"event: {event.eventType}\n"
    if cursor is not None:
        head += f"id: {cursor}\n"
    return head.encode() + b"data: " + event.model_dump_json().encode() + b"\n\n"


def retry_frame(milliseconds: int) -> bytes:
    return f"retry: {milliseconds}\n\n".encode()
