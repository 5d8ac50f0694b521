"""Streams that come and go leave nothing behind: no task, no subscription, no connection, no
file descriptor, no memory, whichever way they leave (closed, cut before the answer, reset).

`make test` runs 500 connect/disconnect cycles; `make soak` (pytest -m soak) 5,000."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import resource
import socket
import struct
import tracemalloc
import uuid

import asyncpg
import pytest

from streamer import keys
from tests.client import open_stream
from tests.conftest import (
    Service,
    backend_count,
    change_connections,
    insert_file,
    token_for,
    wait_until,
)
from tests.raw_http import raw_connection

EVENTS = "/api/files/events"
TIMEOUT = 20.0


async def test_two_hundred_streams_opened_and_closed_leave_nothing_behind(
    service: Service, db, owner_db, user
):
    hub = service.app[keys.HUB]
    # Let the service settle first: its pool may open connections on first use.
    async with open_stream(service.session, service.url(EVENTS), token_for(user)):
        pass
    await wait_until(lambda: hub.count == 0)
    tasks_before = len(asyncio.all_tasks())

    users = [uuid.uuid4() for _ in range(20)]
    for _ in range(10):
        async with asyncio.TaskGroup() as group:
            for u in users:
                group.create_task(_open_and_close(service, u))

    await wait_until(lambda: hub.count == 0)
    assert hub.owners() == {}
    await wait_until(lambda: len(asyncio.all_tasks()) <= tasks_before)
    assert await backend_count(db) <= 1 + service.settings.pool_size
    assert await change_connections(owner_db) == 1

    # And the service still streams.
    async with open_stream(service.session, service.url(EVENTS), token_for(user)) as stream:
        file_id = await insert_file(db, user)
        assert (await stream.next()).file["id"] == str(file_id)


async def _open_and_close(service: Service, user) -> None:
    async with open_stream(service.session, service.url(EVENTS), token_for(user)):
        pass


@pytest.mark.usefixtures("nothing_logged_at_error")
async def test_clients_that_connect_and_leave_at_once_leave_nothing_behind(
    service: Service, db: asyncpg.Connection, user: uuid.UUID
) -> None:
    hub = service.app[keys.HUB]
    request = (
        f"GET {EVENTS} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token_for(user)}\r\n\r\n"
    ).encode()
    for _ in range(20):
        async with raw_connection(service):
            pass  # connect, then close
        async with raw_connection(service) as (_, writer):
            writer.write(request[:25])  # half a request line
        async with raw_connection(service) as (_, writer):
            writer.write(request)  # a whole request, gone before the answer
        async with raw_connection(service) as (reader, writer):
            writer.write(request)
            await reader.readuntil(b"synced")  # live, then gone
        async with raw_connection(service) as (reader, writer):
            writer.write(request)
            await reader.readuntil(b"synced")
            sock = writer.get_extra_info("socket")
            # Gone with a reset rather than a goodbye.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    await wait_until(lambda: hub.count == 0)
    async with open_stream(service.session, service.url(EVENTS), token_for(user)) as stream:
        file_id = await insert_file(db, user)
        assert (await stream.next()).file["id"] == str(file_id)


async def test_the_service_holds_one_listen_connection_and_a_small_pool_however_many_streams(
    service: Service, db
):
    users = [uuid.uuid4() for _ in range(50)]
    async with contextlib.AsyncExitStack() as stack:
        for u in users * 2:
            await stack.enter_async_context(
                open_stream(service.session, service.url(EVENTS), token_for(u))
            )
        assert service.app[keys.HUB].count == 100
        assert await backend_count(db) <= 1 + service.settings.pool_size


# -- thousands of streams come and go ------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


async def cycle(service: Service, db: asyncpg.Connection, user: uuid.UUID, i: int) -> None:
    """One stream of one kind, opened and closed: each kind leaves through another door."""
    kind = i % 5
    url = service.url(EVENTS)
    token = token_for(user)
    if kind == 0:
        async with open_stream(service.session, url, token):
            pass
    elif kind == 1:
        async with open_stream(service.session, url, token, params={"snapshot": "1"}):
            pass
    elif kind == 2:
        async with open_stream(service.session, url, token, headers={"Last-Event-ID": "1"}):
            pass
    elif kind == 3:
        file_id = await insert_file(db, user, "cycle.pdf")
        async with open_stream(
            service.session, service.url(f"/api/files/{file_id}/events"), token, synced=False
        ) as stream:
            await stream.next()
        await db.execute("delete from files where id = $1", file_id)
    else:
        # Gone before the answer: a raw connection that sends a request and closes.
        _, writer = await asyncio.open_connection(service.server.host, service.server.port)
        writer.write(
            f"GET {EVENTS} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
        )
        await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def settled(service: Service) -> None:
    """No stream, subscription or connection left in the service."""
    hub = service.app[keys.HUB]
    assert service.server.runner is not None
    server = service.server.runner.server
    assert server is not None
    await wait_until(lambda: not (hub.count or hub.owners() or server.connections), TIMEOUT)
    gc.collect()


async def connect_and_disconnect(service: Service, db: asyncpg.Connection, cycles: int) -> None:
    """Memory is compared between the two halves of the cycles: what the first half grew
    (caches, free lists) is paid once; what grows again in the second half is a leak."""
    users = [uuid.uuid4() for _ in range(10)]
    for i in range(300):  # warm up: the pool's connections, caches, aiohttp's free lists
        await cycle(service, db, users[i % len(users)], i)
    await settled(service)
    pool = service.app[keys.POOL]
    # The pool may open a connection meanwhile (feeds are re-read every few seconds beside
    # the streams' reads): a socket of its own, not a leak.
    tasks, fds = len(asyncio.all_tasks()), open_fds() - pool.get_size()
    tracemalloc.start()
    try:
        traced, rss = [], []
        for _ in range(2):
            for i in range(cycles // 2):
                await cycle(service, db, users[i % len(users)], i)
            await settled(service)
            traced.append(tracemalloc.get_traced_memory()[0])
            rss.append(rss_bytes())
    finally:
        tracemalloc.stop()
    await wait_until(lambda: len(asyncio.all_tasks()) <= tasks, TIMEOUT)
    assert open_fds() - pool.get_size() <= fds
    # A leaked stream (its subscriber, task, transport) is kilobytes: 256 KiB over 250
    # cycles or more is under one kilobyte a cycle. Bounded caches (yarl's, PyJWT's) fill
    # within the first few hundred cycles and stay put.
    assert traced[1] - traced[0] < 256 * 1024, f"{traced[1] - traced[0]} bytes more"
    assert rss[1] - rss[0] < 16 * 1024 * 1024
    # And the service streams as before.
    async with open_stream(service.session, service.url(EVENTS), token_for(users[0])) as stream:
        file_id = await insert_file(db, users[0])
        assert (await stream.next()).file["id"] == str(file_id)


async def test_five_hundred_streams_opened_and_closed_leave_no_task_fd_or_memory_behind(
    service: Service, db: asyncpg.Connection
) -> None:
    await connect_and_disconnect(service, db, 500)


@pytest.mark.soak
async def test_five_thousand_streams_opened_and_closed_leave_no_task_fd_or_memory_behind(
    service: Service, db: asyncpg.Connection
) -> None:
    await connect_and_disconnect(service, db, 5000)
