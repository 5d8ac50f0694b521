"""Browsers on another origin: configured origins only, with credentials, never a wildcard."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from streamer.config import ConfigError, load_settings
from tests.client import open_stream
from tests.conftest import Service, insert_file, start_service, stop_service, token_for

APP = "https://app.example.com"
ADMIN = "http://localhost:3000"
EVENTS = "/api/files/events"
PREFLIGHT = {
    "Access-Control-Request-Method": "GET",
    "Access-Control-Request-Headers": "authorization,last-event-id",
}


@pytest.fixture
async def cors_service(database_url: str) -> AsyncIterator[Service]:
    service = await start_service(database_url, cors_origins=f"{APP}, {ADMIN}")
    yield service
    await stop_service(service)


def assert_allows(headers, origin: str) -> None:
    assert headers["Access-Control-Allow-Origin"] == origin
    assert headers["Access-Control-Allow-Credentials"] == "true"
    assert "Origin" in headers.getall("Vary")


def assert_no_cors(headers) -> None:
    assert not [name for name in headers if name.lower().startswith("access-control-")]


@pytest.mark.parametrize("path", [EVENTS, f"/api/files/{uuid.uuid4()}/events"])
async def test_a_preflight_from_a_configured_origin_allows_the_stream_headers(
    cors_service: Service, path: str
):
    headers = {"Origin": APP, **PREFLIGHT}
    async with cors_service.session.options(cors_service.url(path), headers=headers) as response:
        assert response.status == 200
        assert_allows(response.headers, APP)
        assert "GET" in response.headers["Access-Control-Allow-Methods"]
        allowed = response.headers["Access-Control-Allow-Headers"].lower().split(",")
        assert {"authorization", "last-event-id"} <= {h.strip() for h in allowed}


async def test_a_preflight_from_an_unlisted_origin_gets_no_cors_headers(cors_service: Service):
    headers = {"Origin": "https://evil.example.com", **PREFLIGHT}
    url = cors_service.url(EVENTS)
    async with cors_service.session.options(url, headers=headers) as response:
        assert response.status == 403
        assert_no_cors(response.headers)
        assert (await response.json())["code"] == "FORBIDDEN"


async def test_a_cookie_authenticated_stream_from_a_configured_origin_is_readable(
    cors_service: Service, db, user
):
    # What EventSource(url, {withCredentials: true}) sends: the cookie and Origin, no preflight.
    headers = {"Origin": ADMIN, "Cookie": f"access_token={token_for(user)}"}
    async with open_stream(
        cors_service.session, cors_service.url(EVENTS), headers=headers
    ) as stream:
        assert_allows(stream.response.headers, ADMIN)
        assert stream.response.headers["Content-Type"] == "text/event-stream"
        file_id = await insert_file(db, user)
        assert (await stream.next()).file["id"] == str(file_id)


async def test_a_stream_from_an_unlisted_origin_carries_no_cors_headers(
    cors_service: Service, user
):
    headers = {"Origin": "https://evil.example.com"}
    async with open_stream(
        cors_service.session, cors_service.url(EVENTS), token_for(user), headers=headers
    ) as stream:
        assert_no_cors(stream.response.headers)


@pytest.mark.parametrize(
    ("path", "with_token", "status", "code"),
    [
        (EVENTS, False, 401, "AUTH_REQUIRED"),
        (f"{EVENTS}?access_token=garbage", False, 401, "TOKEN_INVALID"),
        ("/api/files/not-a-uuid/events", True, 400, "INVALID_ID"),
        (f"/api/files/{uuid.uuid4()}/events", True, 404, "NOT_FOUND"),
    ],
)
async def test_an_error_for_a_configured_origin_is_readable_by_the_page(
    cors_service: Service, user, path: str, with_token: bool, status: int, code: str
):
    headers = {"Origin": APP}
    if with_token:
        headers["Authorization"] = f"Bearer {token_for(user)}"
    async with cors_service.session.get(cors_service.url(path), headers=headers) as response:
        assert response.status == status
        assert_allows(response.headers, APP)
        assert (await response.json())["code"] == code


async def test_a_refused_stream_is_readable_by_the_page_too(database_url, user):
    service = await start_service(database_url, cors_origins=APP, max_streams_per_user=1)
    url, headers = service.url(EVENTS), {"Origin": APP}
    try:
        async with open_stream(service.session, url, token_for(user), headers=headers):
            auth = {**headers, "Authorization": f"Bearer {token_for(user)}"}
            async with service.session.get(url, headers=auth) as response:
                assert response.status == 429
                assert_allows(response.headers, APP)
    finally:
        await stop_service(service)


async def test_without_configured_origins_no_cross_origin_request_is_allowed(
    service: Service, user
):
    url = service.url(EVENTS)
    async with service.session.options(url, headers={"Origin": APP, **PREFLIGHT}) as response:
        assert response.status >= 400
        assert_no_cors(response.headers)
    async with open_stream(
        service.session, url, token_for(user), headers={"Origin": APP}
    ) as stream:
        assert_no_cors(stream.response.headers)


@pytest.mark.parametrize("origins", ["*", f"{APP},*", "https://*.example.com"])
def test_a_wildcard_origin_is_refused_at_start_up(origins: str):
    with pytest.raises(ConfigError, match="STREAMER_CORS_ORIGINS"):
        load_settings(cors_origins=origins)


@pytest.mark.parametrize("origin", ["app.example.com", f"{APP}/app", f"{APP}?x=1", "null"])
def test_a_configured_origin_must_be_scheme_host_and_port_only(origin: str):
    with pytest.raises(ConfigError, match="STREAMER_CORS_ORIGINS"):
        load_settings(cors_origins=origin)


def test_a_trailing_slash_or_capitals_in_an_origin_still_match_the_browser():
    settings = load_settings(cors_origins="https://App.Example.com/ , http://localhost:3000")
    assert settings.cors_origin_list == [APP, ADMIN]
