"""The dispatcher and the hub with an in-memory source and database: ordering, read-back,
recovery, markers and failures, with no Postgres at all."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from streamer.changes import CatchUp, Gone, Payload, Row, Signed, Snapshot, marker_text
from streamer.dispatch import Dispatcher
from streamer.feeds import FILES, Feed, Feeds
from streamer.hub import Hub
from streamer.metrics import Metrics
from streamer.subscriber import Subscriber
from tests.conftest import wait_until
from tests.memory import Transport, sink

KEY = b"unit-test-signing-key"
ALICE, BOB = "a0000000-0000-0000-0000-00000000000a", "b0000000-0000-0000-0000-00000000000b"


def signed(body: str, key: bytes = KEY) -> str:
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest() + body


def change(
    row_id: str,
    owner: str,
    version: int,
    xid: int,
    *,
    horizon: int | None = None,
    row: dict[str, Any] | None = None,
    op: str = "u",
    old_owner: str | None = None,
) -> str:
    envelope: dict[str, Any] = {
        "f": "files",
        "o": op,
        "id": row_id,
        "u": owner,
        "v": version,
        "x": xid,
        "m": xid if horizon is None else horizon,
        "e": False,
    }
    if old_owner is not None:
        envelope["ou"] = old_owner
    body = json.dumps(envelope, separators=(",", ":"))
    if row is not None:
        body += "\n" + json.dumps({"id": row_id, **row, "version": version})
    return signed(body)


class MemorySource:
    """A change connection in memory: payloads arrive when the test says so, in order,
    read as the real sources read the triggers' signed text."""

    name = "memory"
    description = "in memory"

    def __init__(self) -> None:
        self.receive: Callable[[Payload], None] | None = None
        self.lost = asyncio.Event()
        self.connects = 0
        self.signed = Signed()
        self.signed.key = KEY

    async def connect(self, receive: Callable[[Payload], None]) -> None:
        self.lost.clear()
        self.receive = receive
        self.connects += 1

    def commit(self, payload: str) -> None:
        assert self.receive is not None
        self.receive(self.signed.read(payload))

    async def mark(self, token: str) -> None:
        # Committed now: it arrives after everything committed before it.
        asyncio.get_running_loop().call_soon(self.commit, marker_text(token))

    async def watch(self) -> None:
        await self.lost.wait()

    async def close(self) -> None:
        self.receive = None


class MemoryReads:
    """The database as the dispatcher reads it."""

    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}
        self.snapshot = Snapshot(100, 100, frozenset())
        self.caught_up: list[Row] = []
        self.reading_row = asyncio.Event()
        self.row_may_return = asyncio.Event()
        self.row_may_return.set()
        self.between: asyncio.Event | None = None  # set: the recovery's read goes on
        self.holding = asyncio.Event()  # the recovery's read waits for `between`

    async def signing_key(self) -> bytes:
        return KEY

    async def feeds(self) -> dict[str, Feed]:
        return {"files": FILES}

    async def changes(
        self,
        owners: list[tuple[Feed, list[str]]],
        since: int,
        deliver: Callable[[Feed, CatchUp], Awaitable[None]],
        caught_up: Callable[[Feed, list[str], Snapshot], None],
    ) -> Snapshot:
        """Owner by owner, fewest rows first, as the database's reads do; a test may hold
        the read after each owner (`between`)."""
        for feed, feed_owners in owners:
            counts = Counter(r.owner for r in self.caught_up if r.owner in feed_owners)
            caught_up(feed, [o for o in feed_owners if o not in counts], self.snapshot)
            for owner in sorted(counts, key=lambda o: counts[o]):
                rows: list[Row | Gone] = [r for r in self.caught_up if r.owner == owner]
                await deliver(feed, CatchUp(self.snapshot, False, rows))
                caught_up(feed, [owner], self.snapshot)
                if self.between is not None:
                    self.holding.set()
                    await self.between.wait()
                    self.holding.clear()
        return self.snapshot

    async def row(self, feed: Feed, row_id: str) -> Row | None:
        self.reading_row.set()
        await self.row_may_return.wait()
        return self.rows.get(row_id)


def events_of(transport: Transport) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for message in transport.text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in message.splitlines() if ": " in line)
        if "event" in lines:
            found.append((lines["event"], json.loads(lines["data"])))
    return found


class Rig:
    def __init__(self) -> None:
        self.metrics = Metrics()
        self.hub = Hub(
            self.metrics, max_streams_per_owner=10, max_streams=100, queue_limit=100,
            write_timeout=10,
        )  # fmt: skip
        self.source = MemorySource()
        self.reads = MemoryReads()
        self.feeds = Feeds(self.reads.feeds, lambda name: None)
        self.dispatcher = Dispatcher(self.source, self.reads, self.hub, self.feeds, self.metrics)  # type: ignore[arg-type]

    def live(self, owner: str, row_id: str | None = None) -> tuple[Subscriber, Transport]:
        sub = self.hub.subscribe(FILES, owner, owner, row_id)
        transport = Transport()
        sub.go_live(
            sink(transport, backlog=self.hub.buffer_limit // 2), Snapshot(0, 0, frozenset())
        )
        return sub, transport


@pytest.fixture
async def rig() -> Any:
    rig = Rig()
    task = asyncio.create_task(rig.dispatcher.run())
    await asyncio.wait_for(rig.dispatcher.ready.wait(), 5)
    yield rig
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def settled() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_changes_reach_their_owner_in_commit_order_and_nobody_else(rig: Rig) -> None:
    _, alice = rig.live(ALICE)
    _, bob = rig.live(BOB)
    for version in (1, 2, 3):
        rig.source.commit(change("f1", ALICE, version, 200 + version, row={"progress": version}))
    await settled()
    assert [data["file"]["progress"] for _, data in events_of(alice)] == [1, 2, 3]
    assert events_of(bob) == []


async def test_a_payload_signed_with_another_key_reaches_nobody_and_is_counted(rig: Rig) -> None:
    _, alice = rig.live(ALICE)
    body = change("f1", ALICE, 1, 201, row={"filename": "PHISHING.pdf"})[64:]
    rig.source.commit(signed(body, b"guessed"))
    rig.source.commit(body)
    await settled()
    assert events_of(alice) == []
    assert rig.metrics.registry.get_sample_value("streamer_notifications_rejected_total") == 2


async def test_a_row_too_big_to_travel_is_read_back_and_what_follows_waits_for_it(
    rig: Rig,
) -> None:
    _, alice = rig.live(ALICE)
    rig.reads.row_may_return.clear()
    rig.reads.rows["big"] = Row(ALICE, "big", 1, '{"id":"big","version":1}', False)
    rig.source.commit(change("big", ALICE, 1, 201))  # the envelope alone
    rig.source.commit(change("small", ALICE, 1, 202, row={}))
    await rig.reads.reading_row.wait()
    await settled()
    assert events_of(alice) == []  # the small one waits behind the read-back
    rig.reads.row_may_return.set()
    await settled()
    assert [data["file"]["id"] for _, data in events_of(alice)] == ["big", "small"]


async def test_a_row_read_back_at_a_later_version_is_not_sent_ahead_of_older_ones(
    rig: Rig,
) -> None:
    _, alice = rig.live(ALICE)
    rig.reads.rows["big"] = Row(ALICE, "big", 2, '{"id":"big","version":2}', False)
    rig.source.commit(change("big", ALICE, 1, 201))
    rig.source.commit(change("big", ALICE, 2, 202, row={"x": 1}))
    await settled()
    assert [data["file"]["version"] for _, data in events_of(alice)] == [2]


async def test_an_ownership_change_is_a_delete_for_the_old_owner_and_an_update_for_the_new(
    rig: Rig,
) -> None:
    _, alice = rig.live(ALICE)
    _, bob = rig.live(BOB)
    rig.source.commit(change("f1", BOB, 5, 205, row={}, old_owner=ALICE))
    await settled()
    assert [name for name, _ in events_of(alice)] == ["file-deleted"]
    assert [name for name, _ in events_of(bob)] == ["file-update"]


async def test_the_cursor_follows_the_horizon_and_a_marker_raises_it_to_the_snapshot(
    rig: Rig,
) -> None:
    assert rig.hub.watermark == 100  # the first session's marker: its recovery snapshot
    rig.source.commit(change("f1", ALICE, 1, 300, horizon=250, row={}))
    await settled()
    assert rig.hub.watermark == 250
    rig.source.commit(marker_text("someone-else"))  # another process's marker: no effect
    await settled()
    assert rig.hub.watermark == 250


async def test_recovery_catches_open_streams_up_and_does_not_repeat_what_it_read(
    rig: Rig,
) -> None:
    _, alice = rig.live(ALICE)
    rig.reads.snapshot = Snapshot(400, 402, frozenset({401}))
    rig.reads.caught_up = [Row(ALICE, "f1", 399 * 1024, '{"id":"f1","version":1}', False)]
    sessions = rig.dispatcher.sessions
    rig.source.lost.set()  # the connection drops; the dispatcher reconnects and recovers
    await wait_until(lambda: rig.dispatcher.sessions != sessions)
    # Arriving after the reconnect: one the recovery's snapshot saw, one it did not.
    rig.source.commit(change("f1", ALICE, 399 * 1024, 399, row={}))
    rig.source.commit(change("f2", ALICE, 401 * 1024, 401, row={}))
    await settled()
    assert [data["file"]["id"] for _, data in events_of(alice)] == ["f1", "f2"]
    assert rig.source.connects == 2


async def test_a_bug_in_dispatch_ends_the_session_and_is_raised_for_the_supervisor() -> None:
    rig = Rig()
    task = asyncio.create_task(rig.dispatcher.run())
    await asyncio.wait_for(rig.dispatcher.ready.wait(), 5)
    rig.live(ALICE)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    rig.hub.dispatch = broken  # type: ignore[method-assign]
    rig.source.commit(change("f1", ALICE, 1, 201, row={}))
    with pytest.raises(RuntimeError, match="a bug"):
        await asyncio.wait_for(task, 5)
    assert not rig.dispatcher.ready.is_set()


def row(owner: str, row_id: str, xid: int) -> Row:
    return Row(owner, row_id, xid * 1024, json.dumps({"id": row_id, "version": xid * 1024}), False)


async def recovering(rig: Rig, caught_up: list[Row]) -> None:
    """Drop the connection; return while the recovery's read waits after its first owner."""
    rig.reads.snapshot = Snapshot(400, 400, frozenset())
    rig.reads.caught_up = caught_up
    rig.reads.between = asyncio.Event()
    rig.source.lost.set()
    await asyncio.wait_for(rig.reads.holding.wait(), 5)


def seen(transport: Transport) -> list[tuple[str, int]]:
    return [(data["file"]["id"], data["file"]["version"]) for _, data in events_of(transport)]


async def test_while_recovery_reads_an_owner_it_has_caught_up_gets_its_changes_at_once(
    rig: Rig,
) -> None:
    _, alice = rig.live(ALICE)
    _, bob = rig.live(BOB)
    watermark = rig.hub.watermark
    # Bob has more to catch up: Alice's read comes first, then the read waits.
    await recovering(rig, [row(BOB, "b1", 390), row(BOB, "b2", 391), row(ALICE, "a1", 392)])
    rig.source.commit(change("a1", ALICE, 392 * 1024, 392, row={}))  # the snapshot saw it
    rig.source.commit(change("b3", BOB, 401 * 1024, 401, row={}))
    rig.source.commit(change("a2", ALICE, 402 * 1024, 402, row={}))
    await settled()
    assert seen(alice) == [("a1", 392 * 1024), ("a2", 402 * 1024)]  # a1 once: caught up
    assert seen(bob) == []  # not caught up yet: his change waits behind his catch-up
    assert rig.hub.watermark == watermark  # what went out early carries the old cursor

    assert rig.reads.between is not None
    rig.reads.between.set()
    await asyncio.wait_for(rig.dispatcher.ready.wait(), 5)
    await settled()
    assert seen(bob) == [("b1", 390 * 1024), ("b2", 391 * 1024), ("b3", 401 * 1024)]
    assert seen(alice) == [("a1", 392 * 1024), ("a2", 402 * 1024)]  # nothing twice


async def test_a_held_change_for_a_stream_not_yet_caught_up_holds_what_follows_for_its_others(
    rig: Rig,
) -> None:
    _, alice = rig.live(ALICE)
    _, bob = rig.live(BOB)
    await recovering(rig, [row(BOB, "b1", 390), row(BOB, "b2", 391), row(ALICE, "a1", 392)])
    # A row of Bob's given to Alice: for both streams, and Bob's is not caught up yet. What
    # follows for Alice waits for it, so that she gets her changes in commit order.
    rig.source.commit(change("b2", ALICE, 401 * 1024, 401, row={}, old_owner=BOB))
    rig.source.commit(change("a1", ALICE, 402 * 1024, 402, row={}))
    await settled()
    assert seen(alice) == [("a1", 392 * 1024)]

    assert rig.reads.between is not None
    rig.reads.between.set()
    await asyncio.wait_for(rig.dispatcher.ready.wait(), 5)
    await settled()
    assert seen(alice) == [("a1", 392 * 1024), ("b2", 401 * 1024), ("a1", 402 * 1024)]
    assert [name for name, _ in events_of(bob)] == ["file-update", "file-update", "file-deleted"]


async def test_a_held_truncate_holds_every_later_change_of_its_feed(rig: Rig) -> None:
    _, alice = rig.live(ALICE)
    rig.live(BOB)
    await recovering(rig, [row(BOB, "b1", 390), row(BOB, "b2", 391), row(ALICE, "a1", 392)])
    truncate = {"f": "files", "o": "t", "x": 401, "m": 401}
    rig.source.commit(signed(json.dumps(truncate, separators=(",", ":"))))
    rig.source.commit(change("a2", ALICE, 402 * 1024, 402, row={}))
    await settled()
    assert seen(alice) == [("a1", 392 * 1024)]  # a2 waits: the truncate comes first
    assert rig.reads.between is not None
    rig.reads.between.set()
    await asyncio.wait_for(rig.dispatcher.ready.wait(), 5)
    await settled()
    assert not [e for e in events_of(alice) if e[1].get("file", {}).get("id") == "a2"]


async def test_a_recovery_batch_waits_until_its_clients_took_most_of_the_last(rig: Rig) -> None:
    sub, transport = rig.live(ALICE)
    rig.live(BOB)
    transport.buffered = rig.hub.buffer_limit  # Alice's client reads nothing for a while
    waiting = asyncio.create_task(rig.hub.drained("files", {ALICE, BOB}))
    await settled()
    assert not waiting.done()
    transport.buffered = rig.hub.buffer_limit // 2  # it took half
    await asyncio.wait_for(waiting, 1)

    transport.buffered = rig.hub.buffer_limit
    waiting = asyncio.create_task(rig.hub.drained("files", {ALICE}))
    await settled()
    assert not waiting.done()
    rig.hub.cut(sub)  # as the sweep does after the write timeout: it holds nothing then
    await asyncio.wait_for(waiting, 1)
