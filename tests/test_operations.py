"""What an operator sees: /healthz, /readyz, /metrics in Prometheus format, access logs."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator

import aiohttp
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
    kill_change_connection,
    send_raw,
    token_for,
    wait_until,
)
from tests.scrape import scrape

EVENTS = "/api/files/events"


async def test_healthz_and_readyz_are_200_while_database_and_listener_are_up(service: Service):
    for path, status in (("/healthz", "ok"), ("/readyz", "ready")):
        async with service.session.get(service.url(path)) as response:
            assert response.status == 200
            assert (await response.json())["status"] == status


async def test_a_stream_asked_for_while_the_server_shuts_down_gets_503(service: Service, user):
    service.app[keys.HUB].shutdown()  # what SIGTERM does once the port is closed
    headers = {"Authorization": f"Bearer {token_for(user)}"}
    async with service.session.get(service.url(EVENTS), headers=headers) as response:
        assert response.status == 503
        assert (await response.json())["code"] == "UNAVAILABLE"


@pytest.fixture
async def unlistening(database_url: str) -> AsyncIterator[tuple[TestServer, str]]:
    """A service whose LISTEN database refuses connections (its pool's database is fine)."""
    with socket.socket() as reserved:  # bound, never listening: connections are refused
        reserved.bind(("127.0.0.1", 0))
        nowhere = f"postgresql://postgres@127.0.0.1:{reserved.getsockname()[1]}/nowhere"
        settings = Settings(jwt_secret=SECRET, database_url=database_url)
        server = TestServer(create_app(settings, database_url, nowhere), host="127.0.0.1")
        await server.start_server(**server_options())
        yield server, database_url
        await server.close()


async def test_readyz_is_503_while_the_listen_connection_is_down_and_healthz_stays_200(
    unlistening: tuple[TestServer, str],
):
    server, _ = unlistening
    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url("/healthz")) as response:
            assert response.status == 200
        async with session.get(server.make_url("/readyz")) as response:
            assert response.status == 503
            body = await response.json()
            assert body["code"] == "UNAVAILABLE"
            assert "listener" in body["error"]
        samples = await scrape(session, str(server.make_url("/metrics")))
        assert samples["streamer_listener_up"] == 0


async def test_metrics_count_streams_events_drops_reconnects_and_lag(
    service: Service, db, owner_db, user
):
    metrics_url = service.url("/metrics")

    async def sample(name: str) -> float:
        return (await scrape(service.session, metrics_url))[name]

    async with open_stream(service.session, service.url(EVENTS), token_for(user)) as stream:
        before = await scrape(service.session, metrics_url)
        assert before["streamer_streams_open"] == 1
        assert before["streamer_listener_up"] == 1

        for i in range(3):
            await insert_file(db, user, f"{i}.pdf")
        for _ in range(3):
            await stream.next()
        # A notification that is no change (the feeds' channel needs the owner's rights) is
        # rejected, and counted.
        await send_raw(owner_db, "not a change")

        async def rejected() -> bool:
            return await sample("streamer_notifications_rejected_total") == 1

        await wait_until(rejected)
        after = await scrape(service.session, metrics_url)
        assert after["streamer_events_sent_total"] - before["streamer_events_sent_total"] == 3
        assert after["streamer_notifications_total"] - before["streamer_notifications_total"] == 3
        lag_count = "streamer_notification_lag_seconds_count"
        assert after[lag_count] - before[lag_count] == 3
        assert after["streamer_notification_lag_seconds_sum"] >= 0
        assert after["streamer_slow_client_disconnects_total"] == 0
        assert after["streamer_listener_reconnects_total"] == 0

        # The change connection is killed: it comes back on its own, and the count says so.
        await kill_change_connection(service, owner_db)

        async def reconnected() -> bool:
            samples = await scrape(service.session, metrics_url)
            return (
                samples["streamer_listener_reconnects_total"] == 1
                and samples["streamer_listener_up"] == 1
            )

        await wait_until(reconnected)
        file_id = await insert_file(db, user, "after.pdf")
        while (await stream.next()).file["id"] != str(file_id):
            pass  # a repeat of what it already has is allowed after a reconnect

    async def closed() -> bool:
        return await sample("streamer_streams_open") == 0

    await wait_until(closed)


async def test_access_log_lines_never_contain_a_token(
    service: Service, user, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    token = token_for(user)
    url = service.url(EVENTS)
    async with service.session as session:
        async with open_stream(session, url, token):
            pass
        async with open_stream(session, url, params={"access_token": token}):
            pass
        async with open_stream(session, url, headers={"Cookie": f"access_token={token}"}):
            pass
        # Tokens where they do not belong still never reach the log.
        for path in (
            f"{EVENTS}?token={token}",
            f"{EVENTS}?snapshot=1&ACCESS_TOKEN={token}",
            f"/api/files/{token}/events",
        ):
            async with session.get(service.url(path)) as response:
                assert response.status in (400, 401)

    def access_lines() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "aiohttp.access"]

    async def all_logged() -> bool:
        return len(access_lines()) == 6

    await wait_until(all_logged)  # a stream's line is written when it ends
    messages = [record.getMessage() for record in access_lines()]
    assert all(token not in message for message in messages)
    assert all(token.split(".")[1] not in message for message in messages)
    assert sum("[redacted]" in message for message in messages) == 4
    first = access_lines()[0]
    assert first.access["method"] == "GET"  # type: ignore[attr-defined]
    assert first.access["status"] == 200  # type: ignore[attr-defined]
    assert first.access["path"] == EVENTS  # type: ignore[attr-defined]
