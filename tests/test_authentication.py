"""Every way a request to a stream can fail authentication, over real HTTP."""

from __future__ import annotations

import time
import uuid

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


@pytest.mark.parametrize("fresh_in", ["header", "query"])
async def test_a_stale_cookie_beside_a_fresh_token_does_not_refuse_the_stream(
    service: Service, user, fresh_in: str
):
    stale = forged({"sub": str(user), "exp": time.time() - 60})
    request: dict[str, object] = {"headers": {"Cookie": f"access_token={stale}"}}
    if fresh_in == "header":
        request["headers"] = {"Cookie": f"access_token={stale}"} | {
            "Authorization": f"Bearer {token_for(user)}"
        }
    else:
        request["params"] = {"access_token": token_for(user)}
    async with service.session.get(service.url(EVENTS), **request) as response:  # type: ignore[arg-type]
        assert response.status == 200
