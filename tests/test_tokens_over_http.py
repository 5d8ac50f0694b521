"""Tokens as a deployment uses them: Supabase-style RS256/ES256 keys from a JWKS URL, and
a stream that ends when its token does."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tests.conftest import Service, insert_file, start_service, stop_service, token_for
from tests.scrape import eventually, scrape
from tests.sse import open_stream

EVENTS = "/api/files/events"
JWKS_PATH = "/auth/v1/.well-known/jwks.json"
RSA_PRIVATE = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_PRIVATE = ec.generate_private_key(ec.SECP256R1())


def jwk(public: Any, kid: str, alg: str) -> dict[str, Any]:
    algorithm = RSAAlgorithm if alg == "RS256" else ECAlgorithm
    return {**algorithm.to_jwk(public, as_dict=True), "kid": kid, "alg": alg, "use": "sig"}


def claims(user: uuid.UUID) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": str(user), "iat": now, "exp": now + 300, "aud": "authenticated"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture
async def jwks_url() -> AsyncIterator[str]:
    """A stand-in for Supabase's JWKS endpoint, publishing one RSA and one EC key."""
    document = {
        "keys": [
            jwk(RSA_PRIVATE.public_key(), "rsa-1", "RS256"),
            jwk(EC_PRIVATE.public_key(), "ec-1", "ES256"),
        ]
    }

    async def serve_keys(request: web.Request) -> web.Response:
        return web.json_response(document)

    app = web.Application()
    app.router.add_get(JWKS_PATH, serve_keys)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url(JWKS_PATH))
    await server.close()


@pytest.fixture
async def jwks_service(database_url: str, jwks_url: str) -> AsyncIterator[Service]:
    service = await start_service(database_url, jwt_secret=None, jwks_url=jwks_url)
    yield service
    await stop_service(service)


@pytest.mark.parametrize(
    ("private", "kid", "alg"),
    [(RSA_PRIVATE, "rsa-1", "RS256"), (EC_PRIVATE, "ec-1", "ES256")],
    ids=["RS256", "ES256"],
)
async def test_a_token_signed_with_a_published_key_opens_the_users_stream(
    jwks_service: Service, db, user, private: Any, kid: str, alg: str
):
    token = jwt.encode(claims(user), private, algorithm=alg, headers={"kid": kid})
    async with open_stream(jwks_service.session, jwks_service.url(EVENTS), token) as stream:
        file_id = await insert_file(db, user)
        assert (await stream.next()).file["id"] == str(file_id)


async def test_an_hs256_token_signed_with_the_rsa_public_key_is_refused(
    jwks_service: Service, user
):
    public_pem = RSA_PRIVATE.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    payload = b64(json.dumps(claims(user)).encode())
    signature = hmac.new(public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    forged = f"{header}.{payload}.{b64(signature)}"
    headers = {"Authorization": f"Bearer {forged}"}
    async with jwks_service.session.get(jwks_service.url(EVENTS), headers=headers) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await response.json())["code"] == "TOKEN_INVALID"


@pytest.mark.parametrize("kind", ["every file", "one file"])
async def test_at_the_tokens_exp_the_stream_says_token_expired_and_ends(
    service: Service, db, user, kind: str
):
    path = EVENTS
    if kind == "one file":
        path = f"/api/files/{await insert_file(db, user)}/events"
    token = token_for(user, ttl=2)
    async with open_stream(service.session, service.url(path), token, synced=False) as stream:
        expired = (await stream.until("token-expired"))[-1]
        assert expired.id is None
        assert expired.json["eventType"] == "token-expired"
        assert expired.json["timestamp"].endswith("Z")
        assert await stream.end() == []

    async def released() -> bool:
        samples = await scrape(service.session, service.url("/metrics"))
        return samples["streamer_streams_open"] == 0

    await eventually(released)
