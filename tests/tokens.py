"""Tokens for tests: claims, HS256 and hand-made tokens, the JWKS signing keys, and a local
stand-in for Supabase's JWKS endpoint."""

from __future__ import annotations

import base64
import functools
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import jwt
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tests.conftest import SECRET

USER = uuid.UUID("6f1c2a9e-3b7d-4c51-9a0e-2d8f4b6c1e73")
JWKS_PATH = "/auth/v1/.well-known/jwks.json"


def claims(*, drop: tuple[str, ...] = (), **overrides: Any) -> dict[str, Any]:
    """USER's claims, valid for an hour (long enough for a table built when tests are
    collected), with `overrides` and without the claims in `drop`."""
    now = int(time.time())
    values: dict[str, Any] = {"sub": str(USER), "iat": now, "exp": now + 3600}
    values.update(overrides)
    return {name: value for name, value in values.items() if name not in drop}


def hs256(payload: dict[str, Any], *, secret: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(payload, secret, algorithm=algorithm)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- tokens made by hand, for what a JWT library refuses to write --------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(value: object) -> str:
    """A token segment: bytes as they are, anything else as JSON."""
    return b64(value if isinstance(value, bytes) else json.dumps(value).encode())


def raw_token(header: object, payload: object, signature: bytes = b"") -> str:
    """A token with any header and payload and the given signature (none by default)."""
    return f"{segment(header)}.{segment(payload)}.{b64(signature)}"


def hmac_token(
    header: object, payload: object, key: bytes | str = SECRET, digest: str = "sha256"
) -> str:
    """A token over any header and payload, HMAC-signed with any key."""
    signing_input = f"{segment(header)}.{segment(payload)}"
    key_bytes = key.encode() if isinstance(key, str) else key
    signature = hmac.new(key_bytes, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64(signature)}"


def with_header(token: str, header: object) -> str:
    """The token with its header swapped, its signature kept."""
    return segment(header) + token[token.index(".") :]


# --- RS256 and ES256 keys, published in a JWKS ----------------------------------------------


@functools.cache
def rsa_private_key(name: str) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.cache
def ec_private_key(name: str) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@dataclass(frozen=True)
class SigningKey:
    kid: str
    algorithm: str  # RS256 or ES256

    @property
    def private(self) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
        if self.algorithm == "RS256":
            return rsa_private_key(self.kid)
        return ec_private_key(self.kid)

    def jwk(self) -> dict[str, Any]:
        """The public key as Supabase publishes it."""
        public = self.private.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            fields = RSAAlgorithm.to_jwk(public, as_dict=True)
        else:
            fields = ECAlgorithm.to_jwk(public, as_dict=True)
        return {**fields, "kid": self.kid, "alg": self.algorithm, "use": "sig"}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(
        self, payload: dict[str, Any], *, kid: str | None = None, algorithm: str | None = None
    ) -> str:
        """Signed with this key, by default under its own kid and algorithm."""
        return jwt.encode(
            payload,
            self.private,
            algorithm=algorithm or self.algorithm,
            headers={"kid": kid or self.kid},
        )


RSA_KEY = SigningKey("rsa-2024", "RS256")
RSA_NEXT = SigningKey("rsa-2025", "RS256")
EC_KEY = SigningKey("ec-2024", "ES256")
ATTACKER = SigningKey("attacker", "RS256")  # never published


class JwksServer:
    """A local stand-in for Supabase's /.well-known/jwks.json that counts its requests."""

    def __init__(self) -> None:
        self.keys: list[Any] = []
        self.requests = 0
        self.status = 200
        self.body: bytes | None = None  # served instead of the keys when set
        self.url = ""
        self.server: TestServer | None = None

    def publish(self, *keys: SigningKey) -> None:
        self.keys = [key.jwk() for key in keys]

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.status != 200:
            return web.Response(status=self.status, text="unavailable")
        if self.body is not None:
            return web.Response(body=self.body, content_type="application/json")
        return web.json_response({"keys": self.keys})

    async def stop(self) -> None:
        assert self.server is not None
        await self.server.close()


@asynccontextmanager
async def serving_jwks(*keys: SigningKey) -> AsyncIterator[JwksServer]:
    """A JWKS server on a free local port, publishing `keys`."""
    jwks = JwksServer()
    jwks.publish(*keys)
    app = web.Application()
    app.router.add_get(JWKS_PATH, jwks.handle)
    jwks.server = TestServer(app, host="127.0.0.1")
    await jwks.server.start_server()
    jwks.url = str(jwks.server.make_url(JWKS_PATH))
    try:
        yield jwks
    finally:
        await jwks.server.close()
