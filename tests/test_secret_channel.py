"""The feeds' secret channel (sql/007_secret_channel.sql): the change connection hears the
triggers on a channel it never names (asyncpg's private notification hook, which these
tests pin), earlier releases hear only that they cannot read on, and a fleet's reader
still relays what it read signed."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from streamer.changes import (
    CHANNEL,
    Change,
    Forged,
    Hint,
    Marker,
    Payload,
    Signed,
    Unreadable,
    later_format_notice,
    marker_text,
    read,
    signed_text,
)
from streamer.sources.notify import LISTEN, PING, NotifySource
from tests.conftest import SOURCE, insert_file

KEY = b"unit-test-signing-key"
ENVELOPE = {"f": "files", "o": "u", "id": "f1", "u": "alice", "v": 2048, "x": 2, "m": 2}


def test_the_feeds_channel_is_read_as_the_triggers_write_it() -> None:
    body = json.dumps(ENVELOPE) + '\n{"id":"f1","version":2048}'
    change = read(body)
    assert isinstance(change, Change) and change.row == '{"id":"f1","version":2048}'
    assert (change.owner, change.version, change.text) == ("alice", 2048, "")
    assert read(marker_text("t1")) == Marker("t1")
    assert read("") == Hint()


def test_a_later_release_s_change_is_unreadable_and_anything_else_is_dropped() -> None:
    later = json.dumps({**ENVELOPE, "ev": 2, "new": "field"})
    assert isinstance(read(later), Unreadable)
    for junk in ("not a change", "[1, 2]", json.dumps({**ENVELOPE, "o": "x"}), '{"marker":1'):
        assert read(junk) == Forged(), junk


def test_earlier_releases_read_the_notice_as_a_signed_change_of_a_later_format() -> None:
    signed = Signed()
    signed.key = KEY
    assert isinstance(signed.read(later_format_notice(KEY)), Unreadable)
    assert signed.read(later_format_notice(b"another key")) == Forged()


def test_a_fleet_s_reader_relays_a_change_of_the_feeds_channel_signed() -> None:
    body = json.dumps(ENVELOPE) + '\n{"id":"f1","version":2048}'
    change = read(body)
    assert isinstance(change, Change)
    relayed = signed_text(KEY, change)
    assert relayed.endswith(body)  # the trigger's own text, signed
    signed = Signed()
    signed.key = KEY
    node = signed.read(relayed)
    assert isinstance(node, Change) and node.row == change.row and node.text == relayed


@pytest.fixture
async def notify_source(database_url: str) -> AsyncIterator[NotifySource]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)

    async def key() -> bytes:
        value: bytes = await pool.fetchval("select key from streamer.signing_key")
        return value

    source = NotifySource(database_url, pool, Signed(key), ping_interval=0.2)
    yield source
    await source.close()
    await pool.close()


async def test_the_change_connection_hears_the_triggers_without_naming_their_channel(
    notify_source: NotifySource, db: asyncpg.Connection, owner_db: asyncpg.Connection
) -> None:
    if SOURCE != "notify":
        pytest.skip("the notify source only")
    earlier: asyncio.Queue[str] = asyncio.Queue()  # a process of an earlier release
    await owner_db.add_listener(CHANNEL, lambda *args: earlier.put_nowait(args[-1]))
    received: asyncio.Queue[Payload] = asyncio.Queue()
    await notify_source.connect(received.put_nowait)
    user = uuid.uuid4()
    file_id = await insert_file(db, user, "heard.pdf")
    change = await asyncio.wait_for(received.get(), 10)
    assert isinstance(change, Change) and change.id == str(file_id)
    assert change.owner == str(user) and change.row is not None and "heard.pdf" in change.row
    await notify_source.mark("m1")
    assert await asyncio.wait_for(received.get(), 10) == Marker("m1")

    # The earlier release hears, at connect and at every ping, that it cannot read on.
    watching = asyncio.ensure_future(notify_source.watch())
    try:
        for _ in range(2):
            notice = await asyncio.wait_for(earlier.get(), 10)
            assert json.loads(notice[64:])["ev"] == 2
    finally:
        watching.cancel()
    channel = await owner_db.fetchval("select streamer.channel()")
    query = await owner_db.fetchval(
        "select query from pg_stat_activity where pid = $1", notify_source.pid
    )
    assert query in (LISTEN, PING) and channel not in query
