"""Streams that come and go leave nothing behind: no task, no subscription, no connection."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

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

EVENTS = "/api/files/events"


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
