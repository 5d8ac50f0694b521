"""The gate (streamer/gate.py): at most `most` connections of a process are being set up at
once; the others are accepted but not read until one of those is answered, live, gone or
past its time; nobody is turned away and nothing a client sent is lost."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from streamer import keys
from streamer.gate import Gate
from streamer.runner import _all_ready
from tests.client import open_stream
from tests.conftest import insert_file, start_service, stop_service, token_for, wait_until
from tests.raw_http import raw_connection

EVENTS = "/api/files/events"


class Recorder(asyncio.Protocol):
    """A server's protocol that records what each connection sent."""

    made: list[Recorder] = []

    def __init__(self) -> None:
        self.data = b""
        self.lost = False
        self.transport: asyncio.Transport | None = None
        Recorder.made.append(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


@contextlib.asynccontextmanager
async def gated(gate: Gate) -> AsyncIterator[int]:
    Recorder.made = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(gate.doors(Recorder), "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        gate.close()
        server.close()


async def client(port: int, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    return reader, writer


async def test_only_most_are_read_and_the_others_in_turn_with_all_they_sent() -> None:
    gate = Gate(2)
    async with gated(gate) as port:
        clients = [await client(port, f"hello {i}".encode()) for i in range(5)]
        await wait_until(lambda: gate.inside == 2 and gate.waiting == 3)
        await wait_until(lambda: [r.data for r in Recorder.made] == [b"hello 0", b"hello 1"])
        assert len(Recorder.made) == 2  # the others are not even handed to a protocol
        # One set up: the next in line is read, everything it sent meanwhile.
        first = Recorder.made[0]
        assert first.transport is not None
        gate.leave(first.transport)
        gate.leave(first.transport)  # twice is once
        await wait_until(lambda: len(Recorder.made) == 3 and Recorder.made[2].data == b"hello 2")
        assert (gate.inside, gate.waiting, gate.let_in) == (2, 2, 1)
        # One that is let in and then leaves (its client closed) gives its place up too.
        clients[1][1].close()
        await wait_until(lambda: len(Recorder.made) == 4 and Recorder.made[1].lost)
        assert Recorder.made[3].data == b"hello 3"
        # And what is read still flows both ways.
        assert Recorder.made[3].transport is not None
        Recorder.made[3].transport.write(b"welcome")
        assert await clients[3][0].readexactly(7) == b"welcome"
        for _, writer in clients:
            writer.close()


async def test_one_that_left_while_waiting_costs_its_turn_only() -> None:
    gate = Gate(1)
    async with gated(gate) as port:
        holder = await client(port, b"first")
        await wait_until(lambda: gate.inside == 1)
        quitter = await client(port, b"gone")
        third = await client(port, b"third")
        await wait_until(lambda: gate.waiting == 2)
        quitter[1].close()
        assert Recorder.made[0].transport is not None
        gate.leave(Recorder.made[0].transport)
        # The one that left is read (its bytes and its end) and gone; the next comes in.
        await wait_until(lambda: len(Recorder.made) == 3 and Recorder.made[2].data == b"third")
        assert Recorder.made[1].data == b"gone" and Recorder.made[1].lost
        for _, writer in (holder, third):
            writer.close()


async def test_a_set_up_that_takes_too_long_gives_its_place_up_without_being_cut() -> None:
    gate = Gate(1, slot_seconds=0.05)
    async with gated(gate) as port:
        slow = await client(port, b"GET /api/fi")  # and never more
        quick = await client(port, b"GET /")
        await wait_until(lambda: len(Recorder.made) == 2 and Recorder.made[1].data == b"GET /")
        assert not Recorder.made[0].lost  # the slow one is still there, still read
        slow[1].write(b"les")
        await wait_until(lambda: Recorder.made[0].data == b"GET /api/files")
        await wait_until(lambda: gate.inside == 0)  # and every place is given up in time
        for _, writer in (slow, quick):
            writer.close()


async def test_on_shutdown_those_still_waiting_are_closed_unread() -> None:
    gate = Gate(1)
    async with gated(gate) as port:
        holder = await client(port, b"first")
        waiting = await client(port, b"second")
        await wait_until(lambda: gate.waiting == 1)
        gate.close()
        # Closed with its request unread: the kernel may answer with a reset.
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(waiting[0].read(), 5) == b""
        assert len(Recorder.made) == 1 and gate.waiting == 0
        holder[1].close()


@pytest.mark.usefixtures("nothing_logged_at_error")
async def test_a_crowd_at_a_gate_of_two_all_come_live_and_miss_nothing(
    database_url: str, db: asyncpg.Connection
) -> None:
    service = await start_service(database_url, max_opening=2)
    try:
        users = [uuid.uuid4() for _ in range(12)]
        before = {user: await insert_file(db, user, "before.pdf") for user in users}
        gate = service.app[keys.GATE]
        # A client that sent half a request and went quiet holds one place, for a while.
        async with raw_connection(service) as (_, slow):
            slow.write(b"GET /api/fi")
            await slow.drain()
            async with contextlib.AsyncExitStack() as stack:
                url = service.url(EVENTS)
                params = {"snapshot": "1"}
                streams = await asyncio.gather(
                    *(
                        stack.enter_async_context(
                            open_stream(service.session, url, token_for(u), params=params)
                        )
                        for u in users
                    )
                )
                assert gate.let_in > 0  # they did wait
                for user, stream in zip(users, streams, strict=True):
                    assert stream.events[0].file["id"] == str(before[user])
                    assert stream.events[-1].name == "synced"
                # Live, past the gate: what changes now reaches each.
                after = {user: await insert_file(db, user, "after.pdf") for user in users}
                for user, stream in zip(users, streams, strict=True):
                    assert (await stream.next()).file["id"] == str(after[user])
        assert gate.waiting == 0
        metrics = service.app[keys.METRICS]
        assert metrics.connections_waited._value.get() == gate.let_in
    finally:
        await stop_service(service)


async def test_workers_open_the_port_once_all_are_ready_or_stopping() -> None:
    together = multiprocessing.get_context("spawn").Barrier(2)
    stop = asyncio.Event()
    first = asyncio.ensure_future(_all_ready(together, stop))
    await wait_until(lambda: together.n_waiting == 1)
    assert not first.done()  # the other worker is not ready yet
    await asyncio.to_thread(together.wait, 5)  # now it is
    assert await first is True
    # A worker told to stop while it waits stops waiting, and so does every other.
    together.reset()
    waiting = asyncio.ensure_future(_all_ready(together, stop))
    await wait_until(lambda: together.n_waiting == 1)
    stop.set()
    assert await asyncio.wait_for(waiting, 5) is False
    assert together.broken
