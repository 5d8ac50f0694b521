"""The pure parts of nothing-lost, nothing-repeated: snapshot visibility, catch-up order,
a stream going live, the watermark following the database, ids and cursors. No database."""

from __future__ import annotations

import asyncio

import pytest

from streamer.changes import Snapshot, parse_cursor
from streamer.errors import InvalidCursor, InvalidId
from streamer.feeds import FILES, Feed
from streamer.hub import Hub
from streamer.metrics import Metrics
from streamer.sse import deleted_frame
from streamer.subscriber import envelope
from tests.memory import Transport, sink

ALICE = "a0000000-0000-0000-0000-00000000000a"


def hub() -> Hub:
    return Hub(Metrics(), max_streams_per_owner=5, max_streams=10, queue_limit=10, write_timeout=1)


# -- snapshot visibility -----------------------------------------------------------------


def test_a_snapshot_sees_what_finished_before_it_and_not_what_was_running_or_later() -> None:
    snapshot = Snapshot.parse("100:105:101,103")
    assert [x for x in range(98, 108) if snapshot.sees(x)] == [98, 99, 100, 102, 104]


def test_a_later_snapshot_covers_an_earlier_one_but_not_the_other_way_round() -> None:
    earlier, later = Snapshot.parse("100:105:101,103"), Snapshot.parse("101:107:101")
    assert later.covers(earlier)
    assert not earlier.covers(later)
    assert not Snapshot.parse("100:107:101,102,103").covers(earlier)  # earlier saw 102


# -- going live ---------------------------------------------------------------------------


async def test_going_live_skips_the_queued_changes_the_streams_own_read_saw() -> None:
    h = hub()
    sub = h.subscribe(FILES, ALICE, ALICE)
    for xid in (100, 101, 104):  # queued while the stream read the database
        sub.push(envelope(b"xid %d\n\n" % xid, xid=xid))
    transport = Transport()
    sub.go_live(sink(transport), Snapshot.parse("100:105:101"))
    await asyncio.sleep(0)  # written at the end of the loop iteration
    assert transport.written == [b"xid 101\n\n"]


async def test_a_catch_up_older_than_the_streams_own_read_is_skipped() -> None:
    h = hub()
    sub = h.subscribe(FILES, ALICE, ALICE)
    sub.push(envelope(b"old\n\n", read_in=Snapshot.parse("100:100:")))
    sub.push(envelope(b"newer\n\n", read_in=Snapshot.parse("110:110:")))
    transport = Transport()
    sub.go_live(sink(transport, chunked=True), Snapshot.parse("105:105:"))
    await asyncio.sleep(0)
    assert transport.written == [b"7\r\nnewer\n\n\r\n"]  # one HTTP/1.1 chunk


async def test_a_one_row_stream_ends_after_its_rows_last_event() -> None:
    h = hub()
    sub = h.subscribe(FILES, ALICE, ALICE, "r1")
    transport = Transport()
    sub.go_live(sink(transport), Snapshot(0, 0, frozenset()))
    sub.push(envelope(b"other\n\n", row_id="r2"))
    sub.push(envelope(b"ready\n\n", row_id="r1", ends_row=True))
    sub.push(envelope(b"after\n\n", row_id="r1"))
    assert await asyncio.wait_for(sub.ended, 1) == "end"
    assert transport.written == [b"ready\n\n"]


async def test_one_users_streams_count_against_one_limit_across_feeds() -> None:
    h = hub()
    jobs = Feed("jobs", "owner", "job", owner_type="text")
    for n in range(5):
        h.subscribe(FILES if n % 2 else jobs, ALICE, ALICE)
    with pytest.raises(Exception, match="Too many"):
        h.subscribe(jobs, ALICE, ALICE)


# -- the watermark ---------------------------------------------------------------------------


async def test_the_watermark_only_rises_until_the_database_is_behind_it() -> None:
    h = hub()
    h.advance(500)
    h.advance(400)
    assert h.watermark == 500
    h.rebase(Snapshot.parse("450:520:"))  # behind the watermark, but ahead of nothing lost
    assert h.watermark == 500
    h.rebase(Snapshot.parse("300:320:"))  # a database restored to an older state
    assert h.watermark == 300


# -- ids and cursors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("id_type", "raw", "expected"),
    [
        ("uuid", "A0000000-0000-0000-0000-00000000000A", ALICE),
        ("bigint", "42", "42"),
        ("bigint", "-9223372036854775808", "-9223372036854775808"),
        ("text", "report 2026/Q4", "report 2026/Q4"),
    ],
)
def test_an_id_in_a_url_becomes_the_rows_id_as_text(id_type: str, raw: str, expected: str) -> None:
    feed = Feed("t", "owner", "t", id_type=id_type)  # type: ignore[arg-type]
    assert feed.parse_id(raw) == expected


@pytest.mark.parametrize(
    ("id_type", "raw"),
    [
        ("uuid", "42"),
        ("bigint", "9223372036854775808"),
        ("bigint", "4.2"),
        ("bigint", "٤٢"),
        ("text", "x" * 1025),
        ("text", "nul\x00"),
    ],
)
def test_an_id_that_cannot_be_the_feeds_is_invalid(id_type: str, raw: str) -> None:
    feed = Feed("t", "owner", "t", id_type=id_type)  # type: ignore[arg-type]
    with pytest.raises(InvalidId):
        feed.parse_id(raw)


@pytest.mark.parametrize("raw", ["", "-1", "1.5", "1e3", "٣", "9" * 20, " 12x"])
def test_a_cursor_is_a_bounded_decimal_or_invalid(raw: str) -> None:
    with pytest.raises(InvalidCursor):
        parse_cursor(raw)


def test_a_deleted_rows_id_is_rendered_as_postgres_renders_it() -> None:
    numbers = Feed("jobs", "owner", "job", id_type="bigint")
    assert b'"job":{"id":42}' in deleted_frame(numbers, "42", "7")
    assert b'"file":{"id":"%b"}' % ALICE.encode() in deleted_frame(FILES, ALICE, "7")
