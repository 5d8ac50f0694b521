"""A live stream's connection is handed over from aiohttp to a Live (streamer/live.py):
aiohttp keeps nothing of it (no request, no handler, no connection of its own), and the
stream still does all a stream does: changes, the client leaving, token expiry, a
TRUNCATE's start-over, a shutdown. These fail if the aiohttp this project pins changes
what `Live.take` relies on."""

from __future__ import annotations

import asyncio
import gc
import uuid
from typing import Any

import asyncpg
from aiohttp import web, web_protocol

from streamer import keys
from streamer.live import Live
from streamer.subscriber import Ended
from tests.client import open_stream
from tests.conftest import Service, insert_file, token_for, wait_until

EVENTS = "/api/files/events"


def alive(kind: type) -> int:
    gc.collect()
    return sum(1 for thing in gc.get_objects() if isinstance(thing, kind))


async def test_a_live_stream_keeps_nothing_of_aiohttps_request(
    service: Service, db: asyncpg.Connection, user: uuid.UUID, other_user: uuid.UUID
) -> None:
    hub = service.app[keys.HUB]
    async with (
        open_stream(service.session, service.url(EVENTS), token_for(user)) as mine,
        open_stream(service.session, service.url(EVENTS), token_for(other_user)),
    ):
        assert service.server.runner is not None and service.server.runner.server is not None
        server = service.server.runner.server
        await wait_until(lambda: not server.connections)
        # No request of the server's is left (the test's client requests are another kind),
        # nor its protocol, parser or handler task: only the Lives of the two streams.
        assert alive(web.BaseRequest) == 0
        assert alive(web_protocol.RequestHandler) == 0
        assert alive(Live) == 2
        assert hub.count == 2
        file_id = await insert_file(db, user, "after.pdf")
        update = (await mine.until("file-update"))[-1]
        assert update.json["file"]["id"] == str(file_id)
        assert update.id is not None and int(update.id) > 0
    # The clients left: their places in the hub are given up at once.
    await wait_until(lambda: hub.count == 0)
    await wait_until(lambda: alive(Live) == 0)


async def raw_stream(service: Service, user: uuid.UUID) -> tuple[asyncio.StreamReader, Any]:
    reader, writer = await asyncio.open_connection(service.server.host, service.server.port)
    writer.write(
        f"GET {EVENTS} HTTP/1.1\r\nHost: streamer\r\n"
        f"Authorization: Bearer {token_for(user)}\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"event: synced"), 10)
    assert head.startswith(b"HTTP/1.1 200")
    return reader, writer


async def test_a_request_after_a_live_stream_on_the_same_connection_is_never_answered(
    service: Service, db: asyncpg.Connection, user: uuid.UUID
) -> None:
    """What the client sends once its stream is live is ignored (an EventSource sends
    nothing); the stream goes on."""
    reader, writer = await raw_stream(service, user)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: streamer\r\n\r\n")
        await writer.drain()
        await insert_file(db, user, "next.pdf")
        rest = await asyncio.wait_for(reader.readuntil(b"next.pdf"), 10)
        assert b"HTTP/1.1" not in rest
        assert service.app[keys.HUB].count == 1
    finally:
        writer.close()


async def test_a_live_stream_that_ends_ends_its_response_then_its_connection(
    service: Service, user: uuid.UUID
) -> None:
    reader, writer = await raw_stream(service, user)
    try:
        service.app[keys.HUB].close_all(Ended.SHUTDOWN)
        rest = await asyncio.wait_for(reader.read(), 10)
        assert rest.endswith(b"\r\n0\r\n\r\n")  # its last chunk, then the end
    finally:
        writer.close()
    await wait_until(lambda: service.app[keys.HUB].count == 0)


async def test_token_expiry_ends_a_live_stream_and_its_response(
    service: Service, user: uuid.UUID
) -> None:
    async with open_stream(service.session, service.url(EVENTS), token_for(user, ttl=2)) as s:
        events = await s.end(timeout=10)
    assert [e.name for e in events][-1] == "token-expired"
    await wait_until(lambda: service.app[keys.HUB].count == 0)


async def test_a_stream_truncated_twice_starts_over_each_time_on_its_connection(
    service: Service, db: asyncpg.Connection, owner_db: asyncpg.Connection, user: uuid.UUID
) -> None:
    await insert_file(db, user, "before.pdf")
    async with open_stream(service.session, service.url(EVENTS), token_for(user)) as stream:
        for round_ in range(2):
            await owner_db.execute("truncate files")
            await stream.until("reset")
            name = f"after-{round_}.pdf"
            await insert_file(db, user, name)
            events = await stream.until("file-update")
            assert events[-1].json["file"]["filename"] == name
        assert service.app[keys.HUB].count == 1
