"""Every way a request to a stream can fail authentication, over real HTTP."""

from __future__ import annotations

import time
import uuid
from typing import Any

import jwt
import pytest

from tests.conftest import SECRET, Service, token_for

EVENTS = "/api/files/events"


def forged(claims: dict[str, object], secret: str = SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


async def expect_401(service: Service, code: str, **request: object) -> None:
    async with service.session.get(service.url(EVENTS), **request) as response:  # type: ignore[arg-type]
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        body = await response.json()
        assert body["code"] == code
        assert body["error"]


async def test_no_token_is_auth_required(service: Service):
    await expect_401(service, "AUTH_REQUIRED")


@pytest.mark.parametrize(
    "token",
    [
        "not-a-jwt",
        forged(
            {"sub": str(uuid.uuid4()), "exp": time.time() + 60}, "another-secret-32-bytes-long!!!!"
        ),
        forged({"sub": "not-a-uuid", "exp": time.time() + 60}),
        forged({"sub": str(uuid.uuid4())}),
        forged({"exp": time.time() + 60}),
    ],
    ids=["garbage", "wrong-secret", "non-uuid-sub", "no-exp", "no-sub"],
)
async def test_an_invalid_token_is_token_invalid(service: Service, token: str):
    await expect_401(service, "TOKEN_INVALID", headers={"Authorization": f"Bearer {token}"})


async def test_an_expired_token_is_token_expired(service: Service, user):
    token = forged({"sub": str(user), "exp": time.time() - 60})
    await expect_401(service, "TOKEN_EXPIRED", headers={"Authorization": f"Bearer {token}"})
    await expect_401(service, "TOKEN_EXPIRED", params={"access_token": token})


async def test_a_one_file_stream_needs_a_token_too(service: Service):
    async with service.session.get(service.url(f"/api/files/{uuid.uuid4()}/events")) as response:
        assert response.status == 401
        assert (await response.json())["code"] == "AUTH_REQUIRED"


async def test_a_valid_token_in_the_header_opens_the_stream(service: Service, user):
    headers = {"Authorization": f"Bearer {token_for(user)}"}
    async with service.session.get(service.url(EVENTS), headers=headers) as response:
        assert response.status == 200


def _places(first: str, second: str, first_token: str, second_token: str) -> dict[str, Any]:
    request: dict[str, Any] = {"headers": {}, "params": {}}
    for place, token in ((first, first_token), (second, second_token)):
        if place == "header":
            request["headers"]["Authorization"] = f"Bearer {token}"
        elif place == "query":
            request["params"]["access_token"] = token
        else:
            request["headers"]["Cookie"] = f"access_token={token}"
    return request


@pytest.mark.parametrize(
    ("first", "second"), [("header", "cookie"), ("query", "cookie"), ("header", "query")]
)
async def test_the_first_place_holding_a_token_decides(
    service: Service, user, first: str, second: str
):
    stale = forged({"sub": str(user), "exp": time.time() - 60})
    fresh = token_for(user)
    # A stale cookie beside a fresh token does not refuse the stream (a browser would loop).
    request = _places(first, second, fresh, stale)
    async with service.session.get(service.url(EVENTS), **request) as response:
        assert response.status == 200
    # Nor is a stale first token rescued by a fresh one further down the order.
    await expect_401(service, "TOKEN_EXPIRED", **_places(first, second, stale, fresh))
