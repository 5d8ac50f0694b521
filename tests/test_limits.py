"""Limits and backpressure: too many streams are refused, a client that stops reading is cut
and never holds back anyone else, nor does one that trickles its request or never finishes
its headers (let go after the head timeout)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestServer

from streamer import keys
from streamer.app import create_app
from streamer.config import Settings
from streamer.server import server_options
from tests.client import open_stream
from tests.conftest import (
    SECRET,
    Service,
    insert_file,
    start_service,
    stop_service,
    token_for,
    wait_until,
)
from tests.raw_http import raw_connection
from tests.scrape import scrape

EVENTS = "/api/files/events"
TIMEOUT = 10.0
BIG = "e" * 500_000  # a large error_message: a few of these fill any socket buffer


def bearer(user: uuid.UUID) -> dict[str, str]:
    return {"Authorization": f"Bearer {token_for(user)}"}


async def metric(service: Service, name: str) -> float:
    return (await scrape(service.session, service.url("/metrics"))).get(name, 0.0)


@contextlib.asynccontextmanager
async def silent_client(service: Service, user: uuid.UUID) -> AsyncIterator[socket.socket]:
    """A browser tab that froze: it reads up to `synced`, then never reads again. Its
    receive buffer is tiny, so the server's writes soon block."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (service.server.host, service.server.port))
        request = (
            f"GET {EVENTS} HTTP/1.1\r\nHost: streamer\r\nAccept: text/event-stream\r\n"
            f"Authorization: Bearer {token_for(user)}\r\n\r\n"
        )
        await loop.sock_sendall(sock, request.encode())
        received = b""
        async with asyncio.timeout(10):
            while b"event: synced" not in received:
                chunk = await loop.sock_recv(sock, 1024)
                assert chunk, "the server closed the stream before synced"
                received += chunk
        assert received.startswith(b"HTTP/1.1 200")
        yield sock
    finally:
        sock.close()


def more_than_socket_buffers() -> int:
    """Bytes a client that does not read cannot absorb: the largest send buffer the kernel
    grows a connection to, and a margin."""
    try:
        largest = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        largest = 16_000_000
    return largest + 2_000_000


async def closed_by_server(sock: socket.socket) -> bool:
    """Read what is left until the server's close arrives; True when it did."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(10):
            while await loop.sock_recv(sock, 1 << 20):
                pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


async def test_a_user_at_the_stream_limit_gets_429_until_one_of_their_streams_closes(
    database_url, user, other_user
):
    service = await start_service(database_url, max_streams_per_user=2)
    url = service.url(EVENTS)
    try:
        async with open_stream(service.session, url, token_for(user)):
            async with open_stream(service.session, url, token_for(user)):
                async with service.session.get(url, headers=bearer(user)) as refused:
                    assert refused.status == 429
                    body = await refused.json()
                    assert body["code"] == "TOO_MANY_STREAMS"
                    assert body["error"]
                # Another user is not affected by this one's limit.
                async with open_stream(service.session, url, token_for(other_user)):
                    pass

            # The closed stream's place is freed as soon as the server sees it go.
            async def one_stream_open() -> bool:
                return await metric(service, "streamer_streams_open") == 1

            await wait_until(one_stream_open)
            async with open_stream(service.session, url, token_for(user)):
                pass
        rejected = await metric(service, 'streamer_streams_rejected_total{reason="per_user"}')
        assert rejected == 1
    finally:
        await stop_service(service)


async def test_a_process_at_its_stream_limit_refuses_every_user_with_429(database_url):
    service = await start_service(database_url, max_streams=2)
    url = service.url(EVENTS)
    try:
        async with (
            open_stream(service.session, url, token_for(uuid.uuid4())),
            open_stream(service.session, url, token_for(uuid.uuid4())),
            service.session.get(url, headers=bearer(uuid.uuid4())) as refused,
        ):
            assert refused.status == 429
            assert (await refused.json())["code"] == "TOO_MANY_STREAMS"
        rejected = await metric(service, 'streamer_streams_rejected_total{reason="per_process"}')
        assert rejected == 1
    finally:
        await stop_service(service)


async def test_a_client_that_stops_reading_is_cut_while_other_streams_keep_receiving(
    database_url, db, user
):
    # Only the queue can cut it here: the stuck-write timeout is far away.
    service = await start_service(database_url, queue_limit=4, write_timeout_seconds=3600)
    try:
        file_id = await insert_file(db, user, "build.log")
        async with (
            open_stream(service.session, service.url(EVENTS), token_for(user)) as reader,
            silent_client(service, user) as silent,
        ):
            versions = []
            for progress in range(1, 101):
                await db.execute(
                    "update files set progress = $2, error_message = $3 where id = $1",
                    file_id,
                    progress,
                    BIG,
                )
                event = await reader.next()
                while event.file["progress"] == 0:  # the insert's, if it was still on its way
                    event = await reader.next()
                assert (event.file["progress"], event.file["error_message"]) == (progress, BIG)
                versions.append(event.file["version"])
                if await metric(service, "streamer_slow_client_disconnects_total") == 1:
                    break
            else:
                raise AssertionError("a client that never reads was never cut")
            assert versions == sorted(set(versions))

            assert await closed_by_server(silent)
            await db.execute("update files set status = 'ready' where id = $1", file_id)
            assert (await reader.next()).file["status"] == "ready"

        samples = await scrape(service.session, service.url("/metrics"))
        assert samples["streamer_slow_client_disconnects_total"] == 1
        # What it was sent no more of counts as dropped.
        assert samples["streamer_events_dropped_total"] >= 1
    finally:
        await stop_service(service)


async def test_a_client_stuck_mid_write_is_cut_after_the_write_timeout_between_heartbeats(
    database_url, db, user
):
    service = await start_service(database_url, write_timeout_seconds=0.5, heartbeat_seconds=3600)
    try:
        file_id = await insert_file(db, user, "build.log")
        async with silent_client(service, user) as silent:
            # More than the kernel buffers for it, in a few events: far from the queue limit.
            for progress in range(1, 1 + -(-more_than_socket_buffers() // len(BIG))):
                await db.execute(
                    "update files set progress = $2, error_message = $3 where id = $1",
                    file_id,
                    progress,
                    BIG,
                )

            # No event follows and no heartbeat is due for an hour: its stuck write alone
            # gets it cut.
            async def cut() -> bool:
                return await metric(service, "streamer_slow_client_disconnects_total") == 1

            await wait_until(cut)
            assert await closed_by_server(silent)
            assert await metric(service, "streamer_streams_open") == 0
    finally:
        await stop_service(service)


@pytest.mark.usefixtures("nothing_logged_at_error")
async def test_a_client_trickling_its_headers_byte_by_byte_does_not_hold_up_anyone(
    service: Service, db: asyncpg.Connection, user: uuid.UUID, other_user: uuid.UUID
) -> None:
    slow_request = (
        f"GET {EVENTS} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token_for(other_user)}\r\n\r\n"
    ).encode()
    async with contextlib.AsyncExitStack() as stack:
        # Fifty clients that sent half a request line and went quiet.
        for _ in range(50):
            _, writer = await stack.enter_async_context(raw_connection(service))
            writer.write(b"GET /api/fi")
            await writer.drain()
        reader, slow = await stack.enter_async_context(raw_connection(service))
        url = service.url(EVENTS)
        async with open_stream(service.session, url, token_for(user)) as stream:
            # One byte of the slow request per event the normal stream receives.
            for i in range(40):
                slow.write(slow_request[i : i + 1])
                await slow.drain()
                file_id = await insert_file(db, user, f"{i}.pdf")
                assert (await stream.next()).file["id"] == str(file_id)
        # A new stream opens and closes meanwhile, too.
        async with open_stream(service.session, url, token_for(user)):
            pass
        slow.write(slow_request[40:])
        await slow.drain()
        head = await asyncio.wait_for(reader.readuntil(b"synced"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 200")


@pytest.mark.usefixtures("nothing_logged_at_error")
async def test_a_client_that_never_finishes_its_headers_is_let_go_while_streams_live_on(
    database_url: str, db: asyncpg.Connection, user: uuid.UUID
) -> None:
    # The service as `streamer serve` runs it, with a head timeout short enough to watch.
    settings = Settings(jwt_secret=SECRET, database_url=database_url, heartbeat_seconds=0.1)
    app = create_app(settings, database_url)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(**{**server_options(), "keepalive_timeout": 0.5})
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=30))
    try:
        await app[keys.DISPATCHER].ready.wait()
        async with open_stream(session, str(server.make_url(EVENTS)), token_for(user)) as stream:
            reader, slow = await asyncio.open_connection(server.host, server.port)
            head = b"GET /api/files/events HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 200
            let_go = asyncio.create_task(reader.read())
            # One byte of the head per heartbeat of the live stream, ten a second.
            sent = 0
            async with asyncio.timeout(TIMEOUT):
                while not let_go.done():
                    await stream.until("heartbeat")
                    with contextlib.suppress(ConnectionError):
                        slow.write(head[sent : sent + 1])
                    sent += 1
            assert await let_go == b""  # closed, without an answer
            assert sent < len(head)
            slow.close()
            # The stream, older than the head timeout already, lives on and still streams.
            for _ in range(3):
                await stream.until("heartbeat")
            file_id = await insert_file(db, user)
            assert (await stream.next()).file["id"] == str(file_id)
    finally:
        await session.close()
        await server.close()
