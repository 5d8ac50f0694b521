"""The service works over TCP and a Unix socket, on the embedded PostgreSQL 18 and on a
system PostgreSQL 15 when one is installed (users bring their own server), with the change
source under test: its connection killed, a change made meanwhile still arrives."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import asyncpg
import pytest

from streamer import keys
from tests.client import open_stream
from tests.conftest import (
    PostgresServer,
    insert_file,
    kill_change_connection,
    migrate_for_tests,
    start_service,
    stop_service,
    system_postgres15,
    token_for,
    wait_until,
)


async def stream_one_change(url: str) -> None:
    service = await start_service(url)
    user = uuid.uuid4()
    conn = await asyncpg.connect(url)
    try:
        async with open_stream(
            service.session, service.url("/api/files/events"), token_for(user)
        ) as stream:
            file_id = await insert_file(conn, user, "over-the-socket.pdf")
            event = await stream.next()
            assert event.file["id"] == str(file_id)

            dispatcher = service.app[keys.DISPATCHER]
            sessions = dispatcher.sessions
            await kill_change_connection(service, conn)
            await conn.execute("update files set progress = 50 where id = $1", file_id)
            await wait_until(lambda: dispatcher.sessions != sessions, 20)
            async with asyncio.timeout(20):
                while (event := await stream.next()).file["progress"] != 50:
                    pass
    finally:
        await conn.close()
        await stop_service(service)


async def test_the_service_works_over_a_unix_socket(postgres: PostgresServer, database_url):
    if postgres.embedded is None:
        pytest.skip("DATABASE_URL given: its socket, if any, is not ours to know")
    name = database_url.rsplit("/", 1)[1]
    await stream_one_change(postgres.embedded.socket_url(name))


@pytest.fixture(scope="module")
def postgres15() -> Iterator[tuple[str, str]]:
    """A throwaway PostgreSQL 15 cluster, migrated: (TCP URL, Unix socket URL)."""
    with system_postgres15("-c", "wal_level=logical") as urls:
        migrate_for_tests(urls[0])
        yield urls


async def test_the_service_works_on_postgres_15_over_tcp(postgres15):
    await stream_one_change(postgres15[0])


async def test_the_service_works_on_postgres_15_over_a_unix_socket(postgres15):
    await stream_one_change(postgres15[1])
