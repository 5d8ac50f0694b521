"""The stream's bytes read back as a browser's EventSource reads them: whatever framing
writes, the one parser (streamer.sse.Parser, used by tests and the bench alike) reads."""

from __future__ import annotations

import json

from streamer.sse import HeartbeatEvent, Parser, frame, now, retry_frame, row_frame


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
