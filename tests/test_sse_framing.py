"""The stream's bytes read back as a browser's EventSource reads them: whatever framing
writes, the one parser (streamer.sse.Parser, used by tests and the bench alike) reads; and
no text in a row, however much it looks like SSE, frames an event of its own."""

from __future__ import annotations

import json
import uuid

import asyncpg

from streamer.sse import HeartbeatEvent, Parser, frame, now, retry_frame, row_frame
from tests.client import open_stream
from tests.conftest import Service, insert_file, token_for


def test_every_frame_reads_back_as_one_event_however_the_bytes_are_split() -> None:
    row = '{"id":"a","name":"line one\\nline two","n":1}'
    stream = (
        retry_frame(2000)
        + frame(HeartbeatEvent(timestamp=now()))
        + row_frame(b"file-update", b"file", row, "42")
        + b": a comment\n\n"
    )
    for size in (1, 2, 7, len(stream)):
        parser = Parser()
        events = []
        for start in range(0, len(stream), size):
            events += parser.feed(stream[start : start + size])
        assert [e.name for e in events] == ["heartbeat", "file-update"]
        assert json.loads(events[1].data)["file"] == json.loads(row)
        assert (events[1].id, parser.last_id, parser.retry) == ("42", "42", 2000)


def test_crlf_and_lone_cr_line_endings_and_multi_line_data_are_read_as_the_standard_says() -> None:
    parser = Parser()
    events = parser.feed(b"event: a\r\ndata: one\r\ndata: two\r\n\r")
    events += parser.feed(b"\nid: 7\rdata: x\r\r")
    assert [(e.name, e.data, e.id) for e in events] == [
        ("a", "one\ntwo", None),
        ("message", "x", "7"),
    ]


def test_an_event_without_data_is_not_dispatched_but_its_id_is_remembered() -> None:
    parser = Parser()
    assert parser.feed(b"id: 9\n\nretry: soon\n\n") == []
    assert (parser.last_id, parser.retry) == ("9", None)


async def test_a_row_whose_text_looks_like_sse_frames_cannot_forge_an_event(
    service: Service, db: asyncpg.Connection, user: uuid.UUID, other_user: uuid.UUID
) -> None:
    theirs = await insert_file(db, other_user, "theirs.pdf")
    forgery = f'x\n\nevent: file-deleted\nid: 1\ndata: {{"file": {{"id": "{theirs}"}}}}\n\n'
    texts = {
        "filename": forgery,
        "processing_stage": "a\rb\r\nc\u2028d\u2029e\x85f",
        "error_message": "data: retry: 1\n\nid: 0\n: comment\nevent: reset\n" + "é😀" * 100,
    }
    async with open_stream(service.session, service.url("/api/files/events"), token_for(user)) as s:
        file_id = await insert_file(db, user, **texts)
        event = await s.next()
        marker = await insert_file(db, user, "marker.pdf")
        assert (await s.next()).file["id"] == str(marker)
        assert [e.name for e in s.events] == ["synced", "file-update", "file-update"]
        assert event.file["id"] == str(file_id)
        # Each data: line is JSON, where a raw CR or LF could not be: the text came through
        # whole, escaped, and framed nothing.
        assert {name: event.file[name] for name in texts} == texts
