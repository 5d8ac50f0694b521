"""Hostile tokens over real HTTP: each gets its 401 (or a clean 4xx) with a JSON code, never
a 500 and never a stream, and no token ever reaches a log line."""

from __future__ import annotations

import base64
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from streamer.auth import MAX_TOKEN_LENGTH
from tests.conftest import SECRET, Service, start_service, stop_service, token_for

EVENTS = "/api/files/events"
JWKS_PATH = "/auth/v1/.well-known/jwks.json"
AUDIENCE = "authenticated"
ISSUER = "https://project.supabase.co/auth/v1"


# -- crafting tokens by hand -------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(value: object) -> str:
    return b64(value if isinstance(value, bytes) else json.dumps(value).encode())


def hmac_token(
    header: object, payload: object, key: bytes | str = SECRET, digest: str = "sha256"
) -> str:
    """An HMAC-signed token over any header and payload bytes, with any key."""
    signing_input = f"{segment(header)}.{segment(payload)}"
    key_bytes = key.encode() if isinstance(key, str) else key
    signature = hmac.new(key_bytes, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64(signature)}"


def unsigned(header: object, payload: object) -> str:
    return f"{segment(header)}.{segment(payload)}."


def with_header(token: str, header: object) -> str:
    """The token with its header swapped, its signature kept."""
    return segment(header) + token[token.index(".") :]


def claims(user: uuid.UUID, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {"sub": str(user), "exp": int(time.time()) + 600}
    values.update(overrides)
    return {k: v for k, v in values.items() if v is not None}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(autouse=True)
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


def assert_quiet(logs: pytest.LogCaptureFixture, *secrets: str) -> None:
    """Nothing at error level for a client's mistake, and no token in any log line."""
    errors = [r.getMessage() for r in logs.records if r.levelno >= logging.ERROR]
    assert errors == []
    text = "\n".join(logs.text.splitlines() + [r.getMessage() for r in logs.records])
    for secret in secrets:
        # Any 32 characters of the token would do to find it; its signature is the most secret.
        assert secret[-32:] not in text


async def rejected(service: Service, code: str, case: str = "", **request: Any) -> dict[str, Any]:
    async with service.session.get(service.url(EVENTS), **request) as response:
        body = await response.read()
        assert response.status == 401, (case, body[:300])
        assert response.headers["WWW-Authenticate"].startswith("Bearer"), case
        assert response.content_type == "application/json", case
        data: dict[str, Any] = json.loads(body)
        assert data["code"] == code, (case, data)
        assert data["error"], case
        return data


async def accepted(service: Service, **request: Any) -> None:
    async with service.session.get(service.url(EVENTS), **request) as response:
        assert response.status == 200, await response.text()
        assert response.content_type == "text/event-stream"


# -- the shared secret (HS256) ------------------------------------------------------------

USER = uuid.UUID("0b6f3c7e-9d2a-4e8b-a1c5-7f3e2d9b4a60")
NOW = int(time.time())


OUTSIDE_THE_ALLOW_LIST = {
    "alg-none": unsigned({"alg": "none"}, claims(USER)),
    "alg-none-typ-jwt": unsigned({"alg": "none", "typ": "JWT"}, claims(USER)),
    "alg-None": hmac_token({"alg": "None"}, claims(USER)),
    "alg-NONE-unsigned": unsigned({"alg": "NONE"}, claims(USER)),
    "alg-lowercase-hs256": hmac_token({"alg": "hs256"}, claims(USER)),
    "alg-list": hmac_token({"alg": ["HS256"]}, claims(USER)),
    "alg-object": hmac_token({"alg": {"HS256": True}}, claims(USER)),
    "no-alg": hmac_token({}, claims(USER)),
    "hs512-with-the-right-secret": hmac_token({"alg": "HS512"}, claims(USER), digest="sha512"),
    "hs384-with-the-right-secret": hmac_token({"alg": "HS384"}, claims(USER), digest="sha384"),
}


async def test_a_token_with_an_algorithm_outside_the_allow_list_is_token_invalid(
    service: Service, logs: pytest.LogCaptureFixture
) -> None:
    for case, token in OUTSIDE_THE_ALLOW_LIST.items():
        await rejected(service, "TOKEN_INVALID", case, headers=bearer(token))
        assert_quiet(logs, token)


MALFORMED = {
    "punctuation": "!!!.@@@.###",
    "two-segments": "a.b",
    "four-segments": "a.b.c.d",
    "dots-only": "....",
    "empty-objects-two-segments": "e30.e30",
    "empty-objects-four-segments": "e30.e30.e30.e30",
    "payload-not-base64": segment({"alg": "HS256"}) + ".%%%." + b64(b"x"),
    "signature-not-base64": segment({"alg": "HS256"}) + "." + segment(claims(USER)) + ".not*base64",
    "header-not-json": b64(b"not json") + "." + segment(claims(USER)) + ".c2ln",
    "header-binary": b64(b"\xff\xfe\x00binary") + "." + segment(claims(USER)) + ".c2ln",
    "header-a-list": hmac_token(["alg", "HS256"], claims(USER)),
    "payload-not-json-but-signed": hmac_token({"alg": "HS256"}, b"not json"),
    "payload-a-list-but-signed": hmac_token({"alg": "HS256"}, b"[1, 2, 3]"),
    "payload-a-string-but-signed": hmac_token({"alg": "HS256"}, b'"a string"'),
    "payload-binary-but-signed": hmac_token({"alg": "HS256"}, b"\xff\xfe"),
    "non-ascii": "é.é.é",
}


async def test_a_malformed_token_is_token_invalid(
    service: Service, logs: pytest.LogCaptureFixture
) -> None:
    for case, token in MALFORMED.items():
        await rejected(service, "TOKEN_INVALID", case, params={"access_token": token})
        if token.isascii():
            await rejected(service, "TOKEN_INVALID", case, headers=bearer(token))
        assert_quiet(logs, token)


BAD_CLAIMS = {
    "no-sub": claims(USER, sub=None),
    "empty-sub": claims(USER, sub=""),
    "word-sub": claims(USER, sub="admin"),
    "injection-sub": claims(USER, sub="' or 1=1 --"),
    "uuid-without-dashes": claims(USER, sub=str(USER).replace("-", "")),
    "uuid-in-braces": claims(USER, sub="{" + str(USER) + "}"),
    "uuid-urn": claims(USER, sub=f"urn:uuid:{USER}"),
    "uuid-with-newline": claims(USER, sub=str(USER) + "\n"),
    "number-sub": claims(USER, sub=12345),
    "list-sub": claims(USER, sub=[str(USER)]),
    "object-sub": claims(USER, sub={"id": str(USER)}),
    "no-exp": claims(USER, exp=None),
    "string-exp": claims(USER, exp="tomorrow"),
    "boolean-exp": claims(USER, exp=True),
    "list-exp": claims(USER, exp=[NOW + 600]),
    "huge-exp": claims(USER, exp=10**400),
    "hugely-negative-exp": claims(USER, exp=-(10**400)),
    "future-nbf": claims(USER, nbf=NOW + 3600),
    "future-iat": claims(USER, iat=NOW + 3600),
    "string-nbf": claims(USER, nbf="soon"),
    "string-iat": claims(USER, iat="now"),
    "huge-nbf": claims(USER, nbf=10**400),
}


async def test_a_correctly_signed_token_with_bad_claims_is_token_invalid(
    service: Service, logs: pytest.LogCaptureFixture
) -> None:
    for case, payload in BAD_CLAIMS.items():
        token = hmac_token({"alg": "HS256", "typ": "JWT"}, payload)
        await rejected(service, "TOKEN_INVALID", case, headers=bearer(token))
        assert_quiet(logs, token)


async def test_a_non_finite_exp_is_token_invalid(
    service: Service, logs: pytest.LogCaptureFixture
) -> None:
    for exp in ["NaN", "Infinity", "-Infinity", "1e999"]:
        # JSON has no NaN or Infinity, but Python's parser reads them: written by hand.
        payload = f'{{"sub": "{USER}", "exp": {exp}}}'.encode()
        token = hmac_token({"alg": "HS256"}, payload)
        await rejected(service, "TOKEN_INVALID", exp, headers=bearer(token))
        assert_quiet(logs, token)


async def test_an_expired_token_is_token_expired_wherever_it_is_sent(
    service: Service, logs: pytest.LogCaptureFixture
) -> None:
    token = hmac_token({"alg": "HS256"}, claims(USER, exp=NOW - 60))
    await rejected(service, "TOKEN_EXPIRED", headers=bearer(token))
    await rejected(service, "TOKEN_EXPIRED", params={"access_token": token})
    await rejected(service, "TOKEN_EXPIRED", headers={"Cookie": f"access_token={token}"})
    assert_quiet(logs, token)


async def test_a_token_signed_with_another_secret_is_token_invalid(
    service: Service, logs: pytest.LogCaptureFixture
) -> None:
    for key in ("another-secret-entirely-32-bytes!", "", SECRET + " ", SECRET.upper()):
        token = hmac_token({"alg": "HS256"}, claims(USER), key)
        await rejected(service, "TOKEN_INVALID", headers=bearer(token))
        assert_quiet(logs, token)


async def test_two_authorization_headers_with_different_tokens_open_nothing(
    service: Service, logs: pytest.LogCaptureFixture
) -> None:
    mine, theirs = token_for(uuid.uuid4()), token_for(uuid.uuid4())
    headers = [("Authorization", f"Bearer {mine}"), ("Authorization", f"Bearer {theirs}")]
    async with service.session.get(service.url(EVENTS), headers=headers) as response:
        assert response.status == 401
        assert (await response.json())["code"] == "TOKEN_INVALID"
    assert_quiet(logs, mine, theirs)


async def test_a_token_longer_than_any_real_one_reaches_authentication_and_is_token_invalid(
    service: Service, logs: pytest.LogCaptureFixture
) -> None:
    # Over aiohttp's default 8 KiB line limit, but not absurd: the answer is ours, in JSON.
    token = "a" * (MAX_TOKEN_LENGTH + 8 * 1024)
    data = await rejected(service, "TOKEN_INVALID", headers=bearer(token))
    assert "longer" in data["error"]
    data = await rejected(service, "TOKEN_INVALID", params={"access_token": token})
    assert "longer" in data["error"]
    assert_quiet(logs, token)


@pytest.mark.parametrize("where", ["header", "query"])
async def test_a_one_megabyte_token_gets_a_clean_4xx(
    service: Service, logs: pytest.LogCaptureFixture, where: str
) -> None:
    token = hmac_token({"alg": "HS256"}, {"sub": str(USER), "pad": "p" * 1_000_000})
    request: dict[str, Any] = (
        {"headers": bearer(token)} if where == "header" else {"params": {"access_token": token}}
    )
    async with service.session.get(service.url(EVENTS), **request) as response:
        body = await response.read()
        assert 400 <= response.status < 500
        assert response.status != 401 or json.loads(body)["code"] == "TOKEN_INVALID"
        assert b"Traceback" not in body
        assert token[-32:].encode() not in body
    assert_quiet(logs, token)
    # And the service carries on.
    await accepted(service, headers=bearer(token_for(USER)))


# -- audience and issuer, when configured ------------------------------------------------


async def test_a_token_for_another_audience_or_issuer_is_token_invalid(
    database_url: str, logs: pytest.LogCaptureFixture
) -> None:
    service = await start_service(database_url, jwt_audience=AUDIENCE, jwt_issuer=ISSUER)
    try:
        right = {"aud": AUDIENCE, "iss": ISSUER}
        await accepted(service, headers=bearer(jwt.encode(claims(USER, **right), SECRET)))
        await accepted(
            service,
            headers=bearer(jwt.encode(claims(USER, aud=["other", AUDIENCE], iss=ISSUER), SECRET)),
        )
        wrong = [
            claims(USER, iss=ISSUER),
            claims(USER, aud=AUDIENCE),
            claims(USER, aud="anon", iss=ISSUER),
            claims(USER, aud=["anon", "service_role"], iss=ISSUER),
            claims(USER, aud="", iss=ISSUER),
            claims(USER, aud=AUDIENCE.upper(), iss=ISSUER),
            claims(USER, aud=AUDIENCE, iss="https://attacker.example/auth/v1"),
            claims(USER, aud=AUDIENCE, iss=ISSUER + "/"),
            claims(USER, aud=AUDIENCE, iss=""),
            claims(USER, aud=AUDIENCE, iss=12),
            claims(USER, aud=42, iss=ISSUER),
        ]
        for payload in wrong:
            token = hmac_token({"alg": "HS256"}, payload)
            await rejected(service, "TOKEN_INVALID", headers=bearer(token))
            assert_quiet(logs, token)
    finally:
        await stop_service(service)


# -- JWKS (RS256 and ES256): algorithm confusion and forged keys -------------------------


@dataclass
class Keys:
    rsa_key: rsa.RSAPrivateKey
    ec_key: ec.EllipticCurvePrivateKey
    attacker: rsa.RSAPrivateKey

    def jwks(self) -> dict[str, Any]:
        rsa_jwk = RSAAlgorithm.to_jwk(self.rsa_key.public_key(), as_dict=True)
        ec_jwk = ECAlgorithm.to_jwk(self.ec_key.public_key(), as_dict=True)
        return {
            "keys": [
                {**rsa_jwk, "kid": "rsa-1", "alg": "RS256", "use": "sig"},
                {**ec_jwk, "kid": "ec-1", "alg": "ES256", "use": "sig"},
            ]
        }

    def rsa_public_pem(self) -> bytes:
        return self.rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa_key=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec_key=ec.generate_private_key(ec.SECP256R1()),
        attacker=rsa.generate_private_key(public_exponent=65537, key_size=2048),
    )


@pytest.fixture
async def jwks_url(keys: Keys) -> AsyncIterator[str]:
    """A local stand-in for Supabase's /.well-known/jwks.json."""

    async def publish(request: web.Request) -> web.Response:
        return web.json_response(keys.jwks())

    app = web.Application()
    app.router.add_get(JWKS_PATH, publish)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url(JWKS_PATH))
    await server.close()


@pytest.mark.parametrize("with_secret", [False, True], ids=["jwks-only", "jwks-and-secret"])
async def test_algorithm_confusion_and_forged_keys_are_token_invalid(
    database_url: str,
    keys: Keys,
    jwks_url: str,
    logs: pytest.LogCaptureFixture,
    with_secret: bool,
) -> None:
    service = await start_service(
        database_url, jwks_url=jwks_url, jwt_secret=SECRET if with_secret else None
    )
    try:
        payload = claims(USER)
        # The real keys work, so every rejection below is about the token, not the set-up.
        await accepted(
            service, headers=bearer(jwt.encode(payload, keys.rsa_key, "RS256", {"kid": "rsa-1"}))
        )
        await accepted(
            service, headers=bearer(jwt.encode(payload, keys.ec_key, "ES256", {"kid": "ec-1"}))
        )

        public_jwk = json.dumps(keys.jwks()["keys"][0])
        attacker_jwk = RSAAlgorithm.to_jwk(keys.attacker.public_key(), as_dict=True)
        forged = [
            # HS256 "signed" with the public key, as text, as the JWK, as the modulus.
            hmac_token({"alg": "HS256", "kid": "rsa-1"}, payload, keys.rsa_public_pem()),
            hmac_token({"alg": "HS256"}, payload, keys.rsa_public_pem()),
            hmac_token({"alg": "HS256", "kid": "rsa-1"}, payload, public_jwk),
            hmac_token({"alg": "HS256"}, payload, keys.jwks()["keys"][0]["n"]),
            # The right kid, the wrong key.
            jwt.encode(payload, keys.attacker, "RS256", {"kid": "rsa-1"}),
            # The attacker's key carried in the token itself, or fetched from its own URL.
            jwt.encode(payload, keys.attacker, "RS256", {"kid": "attacker", "jwk": attacker_jwk}),
            jwt.encode(
                payload,
                keys.attacker,
                "RS256",
                {"kid": "rsa-1", "jku": "http://127.0.0.1:9/jwks.json", "x5u": "http://x"},
            ),
            # An EC signature presented as RSA, and an RSA one as EC.
            with_header(
                jwt.encode(payload, keys.ec_key, "ES256"), {"alg": "RS256", "kid": "rsa-1"}
            ),
            jwt.encode(payload, keys.rsa_key, "RS256", {"kid": "ec-1"}),
            # Algorithms the server never accepts, even with a real key.
            jwt.encode(payload, keys.rsa_key, "PS256", {"kid": "rsa-1"}),
            jwt.encode(payload, keys.rsa_key, "RS512", {"kid": "rsa-1"}),
            with_header(jwt.encode(payload, keys.ec_key, "ES256"), {"alg": "ES384", "kid": "ec-1"}),
            # An unknown kid, and a kid that is not a string.
            jwt.encode(payload, keys.rsa_key, "RS256", {"kid": "rotated-away"}),
            hmac_token({"alg": "RS256", "kid": {"$ne": None}}, payload),
            hmac_token({"alg": "RS256", "kid": ["rsa-1"]}, payload),
        ]
        for token in forged:
            await rejected(service, "TOKEN_INVALID", headers=bearer(token))
            assert_quiet(logs, token)
    finally:
        await stop_service(service)
