"""Who is asking: token extraction, HS256 and JWKS verification, the JWKS cache."""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer, make_mocked_request
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from multidict import CIMultiDict

from streamer.auth import MAX_TOKEN_LENGTH, Authenticator, Principal, mint_token
from streamer.config import Settings
from streamer.errors import AuthRequired, TokenExpired, TokenInvalid

SECRET = "a-shared-secret-long-enough-for-every-hmac-algorithm-even-for-hs512"
USER = uuid.UUID("6f1c2a9e-3b7d-4c51-9a0e-2d8f4b6c1e73")
JWKS_PATH = "/auth/v1/.well-known/jwks.json"
REFETCH_INTERVAL = 60.0
MAX_AGE = 600.0


# --- helpers ---------------------------------------------------------------------------


def make_settings(
    *,
    secret: str | None = SECRET,
    jwks_url: str | None = None,
    audience: str | None = None,
    issuer: str | None = None,
    cookie: str = "access_token",
) -> Settings:
    return Settings(
        jwt_secret=secret,
        jwks_url=jwks_url,
        jwt_audience=audience,
        jwt_issuer=issuer,
        jwt_cookie=cookie,
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@asynccontextmanager
async def running(
    settings: Settings, clock: FakeClock | None = None
) -> AsyncIterator[Authenticator]:
    auth = Authenticator(
        settings,
        jwks_max_age=MAX_AGE,
        jwks_refetch_interval=REFETCH_INTERVAL,
        clock=clock or FakeClock(),
    )
    await auth.start()
    try:
        yield auth
    finally:
        await auth.close()


def claims(*, drop: tuple[str, ...] = (), **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values: dict[str, Any] = {"sub": str(USER), "iat": now, "exp": now + 300}
    values.update(overrides)
    return {name: value for name, value in values.items() if name not in drop}


def hs256(payload: dict[str, Any], *, secret: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(payload, secret, algorithm=algorithm)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(value: object) -> str:
    return b64(json.dumps(value).encode())


def raw_token(header: object, payload: object, signature: bytes = b"") -> str:
    return f"{segment(header)}.{segment(payload)}.{b64(signature)}"


def hmac_signed(header_segment: str, payload_segment: str, key: bytes) -> str:
    signing_input = f"{header_segment}.{payload_segment}".encode()
    signature = hmac.new(key, signing_input, hashlib.sha256).digest()
    return f"{header_segment}.{payload_segment}.{b64(signature)}"


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

    def sign(self, payload: dict[str, Any], *, kid: str | None = None) -> str:
        return jwt.encode(
            payload, self.private, algorithm=self.algorithm, headers={"kid": kid or self.kid}
        )


RSA_KEY = SigningKey("rsa-2024", "RS256")
RSA_NEXT = SigningKey("rsa-2025", "RS256")
EC_KEY = SigningKey("ec-2024", "ES256")


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


@pytest.fixture
async def jwks() -> AsyncIterator[JwksServer]:
    jwks = JwksServer()
    app = web.Application()
    app.router.add_get(JWKS_PATH, jwks.handle)
    jwks.server = TestServer(app, host="127.0.0.1")
    await jwks.server.start_server()
    jwks.url = str(jwks.server.make_url(JWKS_PATH))
    yield jwks
    await jwks.server.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def auth() -> AsyncIterator[Authenticator]:
    async with running(make_settings()) as auth:
        yield auth


@pytest.fixture
async def jwks_auth(jwks: JwksServer, clock: FakeClock) -> AsyncIterator[Authenticator]:
    jwks.publish(RSA_KEY, EC_KEY)
    async with running(make_settings(secret=None, jwks_url=jwks.url), clock) as auth:
        yield auth


def request_with(
    *, authorization: str | list[str] | None = None, query: str = "", cookie: str | None = None
) -> web.Request:
    headers: CIMultiDict[str] = CIMultiDict()
    for value in [authorization] if isinstance(authorization, str) else authorization or []:
        headers.add("Authorization", value)
    if cookie is not None:
        headers.add("Cookie", cookie)
    return make_mocked_request("GET", f"/api/files/events{query}", headers=headers)


# --- where the token comes from ----------------------------------------------------------


def test_bearer_token_is_taken_from_the_authorization_header(auth: Authenticator) -> None:
    assert auth.token_from(request_with(authorization="Bearer abc.def.ghi")) == "abc.def.ghi"


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "BeArEr"])
def test_bearer_scheme_is_case_insensitive(auth: Authenticator, scheme: str) -> None:
    assert auth.token_from(request_with(authorization=f"{scheme} abc.def.ghi")) == "abc.def.ghi"


def test_token_is_taken_from_the_access_token_query_parameter(auth: Authenticator) -> None:
    assert auth.token_from(request_with(query="?access_token=abc.def.ghi")) == "abc.def.ghi"


def test_token_is_taken_from_the_access_token_cookie(auth: Authenticator) -> None:
    assert auth.token_from(request_with(cookie="access_token=abc.def.ghi")) == "abc.def.ghi"


async def test_cookie_name_comes_from_the_settings() -> None:
    async with running(make_settings(cookie="sb-token")) as auth:
        assert auth.token_from(request_with(cookie="sb-token=abc.def.ghi")) == "abc.def.ghi"
        with pytest.raises(AuthRequired):
            auth.token_from(request_with(cookie="access_token=abc.def.ghi"))


def test_the_same_token_in_every_place_is_accepted(auth: Authenticator) -> None:
    request = request_with(
        authorization="Bearer abc.def.ghi",
        query="?access_token=abc.def.ghi",
        cookie="access_token=abc.def.ghi",
    )
    assert auth.token_from(request) == "abc.def.ghi"


@pytest.mark.parametrize(
    "request_kwargs",
    [
        {"authorization": "Bearer one.one.one", "query": "?access_token=two.two.two"},
        {"authorization": "Bearer one.one.one", "cookie": "access_token=two.two.two"},
        {"query": "?access_token=one.one.one", "cookie": "access_token=two.two.two"},
    ],
    ids=["header-query", "header-cookie", "query-cookie"],
)
def test_the_first_place_that_holds_a_token_decides(
    auth: Authenticator, request_kwargs: dict[str, Any]
) -> None:
    assert auth.token_from(request_with(**request_kwargs)) == "one.one.one"


@pytest.mark.parametrize(
    "request_kwargs",
    [
        {"query": "?access_token=one.one.one&access_token=two.two.two"},
        {"authorization": ["Bearer one.one.one", "Bearer two.two.two"]},
    ],
    ids=["two-queries", "two-headers"],
)
def test_two_different_tokens_in_one_place_are_refused_rather_than_guessed(
    auth: Authenticator, request_kwargs: dict[str, Any]
) -> None:
    with pytest.raises(TokenInvalid, match="two different tokens"):
        auth.token_from(request_with(**request_kwargs))


def test_a_request_without_any_token_raises_auth_required(auth: Authenticator) -> None:
    with pytest.raises(AuthRequired):
        auth.token_from(request_with(query="?other=1", cookie="session=xyz"))


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Token abc.def.ghi", "abc.def.ghi"])
def test_another_authorization_scheme_is_token_invalid(auth: Authenticator, header: str) -> None:
    with pytest.raises(TokenInvalid, match="Bearer scheme"):
        auth.token_from(request_with(authorization=header))


@pytest.mark.parametrize("header", ["Bearer", "Bearer ", "bearer    "])
def test_an_empty_bearer_token_is_token_invalid(auth: Authenticator, header: str) -> None:
    with pytest.raises(TokenInvalid, match="empty bearer"):
        auth.token_from(request_with(authorization=header, cookie="access_token=abc.def.ghi"))


def test_a_basic_auth_header_for_a_proxy_does_not_hide_the_cookie_token(
    auth: Authenticator,
) -> None:
    request = request_with(authorization="Basic dXNlcjpwYXNz", cookie="access_token=abc.def.ghi")
    assert auth.token_from(request) == "abc.def.ghi"


def test_an_empty_access_token_parameter_is_token_invalid(auth: Authenticator) -> None:
    with pytest.raises(TokenInvalid, match="empty"):
        auth.token_from(request_with(query="?access_token="))


def test_a_cleared_cookie_counts_as_no_token(auth: Authenticator) -> None:
    with pytest.raises(AuthRequired):
        auth.token_from(request_with(cookie="access_token="))


# --- HS256 with the shared secret ---------------------------------------------------------


async def test_a_valid_hs256_token_gives_the_user_and_expiry(auth: Authenticator) -> None:
    payload = claims()
    principal = await auth.verify(hs256(payload))
    assert principal == Principal(user_id=USER, expires_at=float(payload["exp"]))


async def test_authenticate_finds_and_verifies_the_request_token(auth: Authenticator) -> None:
    request = request_with(query=f"?access_token={hs256(claims())}")
    assert (await auth.authenticate(request)).user_id == USER


async def test_an_uppercase_uuid_sub_is_the_same_user(auth: Authenticator) -> None:
    principal = await auth.verify(hs256(claims(sub=str(USER).upper())))
    assert principal.user_id == USER


async def test_expired_token_is_rejected_with_token_expired(auth: Authenticator) -> None:
    with pytest.raises(TokenExpired):
        await auth.verify(hs256(claims(exp=int(time.time()) - 60)))


async def test_a_token_expired_within_the_leeway_is_still_accepted(auth: Authenticator) -> None:
    assert await auth.verify(hs256(claims(exp=int(time.time()) - 2)))


async def test_a_token_signed_with_another_secret_is_rejected(auth: Authenticator) -> None:
    token = hs256(claims(), secret="another-secret-also-long-enough-for-hs256")
    with pytest.raises(TokenInvalid, match="signature"):
        await auth.verify(token)


@pytest.mark.parametrize("alg", ["none", "None", "NONE", ""])
async def test_an_unsigned_alg_none_token_is_rejected(auth: Authenticator, alg: str) -> None:
    with pytest.raises(TokenInvalid):
        await auth.verify(raw_token({"alg": alg, "typ": "JWT"}, claims()))


async def test_a_token_without_alg_is_rejected(auth: Authenticator) -> None:
    with pytest.raises(TokenInvalid, match="algorithm"):
        await auth.verify(raw_token({"typ": "JWT"}, claims(), b"signature"))


@pytest.mark.parametrize("algorithm", ["HS384", "HS512"])
async def test_other_hmac_algorithms_are_rejected_even_with_the_right_secret(
    auth: Authenticator, algorithm: str
) -> None:
    with pytest.raises(TokenInvalid, match="algorithm"):
        await auth.verify(hs256(claims(), algorithm=algorithm))


async def test_rs256_tokens_are_rejected_when_no_jwks_is_configured(auth: Authenticator) -> None:
    with pytest.raises(TokenInvalid, match="RS256"):
        await auth.verify(RSA_KEY.sign(claims()))


async def test_a_missing_sub_is_rejected(auth: Authenticator) -> None:
    with pytest.raises(TokenInvalid, match="sub"):
        await auth.verify(hs256(claims(drop=("sub",))))


@pytest.mark.parametrize(
    "sub",
    [
        "not-a-uuid",
        "",
        "anon",
        12345,
        None,
        ["6f1c2a9e-3b7d-4c51-9a0e-2d8f4b6c1e73"],
        "6f1c2a9e3b7d4c519a0e2d8f4b6c1e73",
        "{6f1c2a9e-3b7d-4c51-9a0e-2d8f4b6c1e73}",
        "urn:uuid:6f1c2a9e-3b7d-4c51-9a0e-2d8f4b6c1e73",
        " 6f1c2a9e-3b7d-4c51-9a0e-2d8f4b6c1e73",
    ],
)
async def test_a_sub_that_is_not_a_uuid_is_rejected(auth: Authenticator, sub: object) -> None:
    with pytest.raises(TokenInvalid):
        await auth.verify(hs256(claims(sub=sub)))


async def test_a_missing_exp_is_rejected(auth: Authenticator) -> None:
    with pytest.raises(TokenInvalid, match="exp"):
        await auth.verify(hs256(claims(drop=("exp",))))


@pytest.mark.parametrize("exp", ["9999999999", "soon", True, None, [1], 1e400])
async def test_an_exp_that_is_not_a_number_is_rejected(auth: Authenticator, exp: object) -> None:
    with pytest.raises(TokenInvalid) as raised:
        await auth.verify(hs256(claims(exp=exp)))
    assert type(raised.value) is TokenInvalid


@pytest.mark.parametrize("claim", ["nbf", "iat"])
async def test_a_token_not_valid_until_later_is_rejected(auth: Authenticator, claim: str) -> None:
    with pytest.raises(TokenInvalid, match="not valid yet"):
        later: dict[str, Any] = {claim: int(time.time()) + 120}
        await auth.verify(hs256(claims(**later)))


async def test_an_nbf_within_the_leeway_is_accepted(auth: Authenticator) -> None:
    assert await auth.verify(hs256(claims(nbf=int(time.time()) + 2)))


async def test_a_token_longer_than_the_limit_is_rejected_before_decoding(
    auth: Authenticator,
) -> None:
    token = hs256(claims(padding="x" * MAX_TOKEN_LENGTH))
    with pytest.raises(TokenInvalid, match="longer"):
        await auth.verify(token)


def _malformed_tokens() -> dict[str, str]:
    good_header = segment({"alg": "HS256", "typ": "JWT"})
    good_payload = segment(claims())
    return {
        "empty": "",
        "one segment": "not-a-jwt",
        "two segments": "abc.def",
        "dots only": "..",
        "junk segments": "a.b.c",
        "not base64": "!!!.@@@.###",
        "bad padding": "eyJ===.eyJ===.abc===",
        "non-json header": f"{b64(b'not json')}.{good_payload}.{b64(b'sig')}",
        "array header": f"{segment([1, 2])}.{good_payload}.{b64(b'sig')}",
        "list alg": raw_token({"alg": ["HS256"]}, claims(), b"sig"),
        "numeric kid": raw_token({"alg": "HS256", "kid": 7}, claims(), b"sig"),
        "unknown crit": raw_token({"alg": "HS256", "crit": ["exp"], "exp": 1}, claims(), b"s"),
        "signed non-json payload": hmac_signed(good_header, b64(b"{not json"), SECRET.encode()),
        "signed array payload": hmac_signed(good_header, segment([1, 2]), SECRET.encode()),
        "non-ascii": "é.ü.ß",
        "whitespace inside": f"{good_header}. {good_payload}.abc",
        "one megabyte": "x" * 1_000_000,
        "one megabyte of dots": "." * 1_000_000,
    }


@pytest.mark.parametrize("token", _malformed_tokens().values(), ids=_malformed_tokens().keys())
async def test_malformed_tokens_are_token_invalid_and_nothing_else(
    auth: Authenticator, token: str
) -> None:
    with pytest.raises(TokenInvalid) as raised:
        await auth.verify(token)
    assert type(raised.value) is TokenInvalid


_b64_text = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=")
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=10,
)
_segments = st.binary().map(b64) | _b64_text | _json_values.map(segment)


@hypothesis_settings(max_examples=300, deadline=None, database=None)
@given(st.text() | st.tuples(_segments, _segments, _segments).map(".".join))
def test_any_garbage_is_token_invalid_and_never_another_exception(token: str) -> None:
    auth = Authenticator(make_settings())
    with pytest.raises(TokenInvalid) as raised:
        asyncio.run(auth.verify(token))
    assert type(raised.value) is TokenInvalid


async def test_error_messages_never_contain_the_token(auth: Authenticator) -> None:
    rejected = [
        hs256(claims(), secret="another-secret-also-long-enough-for-hs256"),
        hs256(claims(sub="user-42")),
        hs256(claims(nbf=int(time.time()) + 600)),
        hs256(claims(exp=int(time.time()) - 600)),
        RSA_KEY.sign(claims()),
    ]
    for token in rejected:
        with pytest.raises((TokenInvalid, TokenExpired)) as raised:
            await auth.verify(token)
        for part in token.split("."):
            assert part not in str(raised.value)


# --- aud and iss ------------------------------------------------------------------------


async def test_aud_is_ignored_when_no_audience_is_configured(auth: Authenticator) -> None:
    assert await auth.verify(hs256(claims(aud="authenticated")))


@pytest.mark.parametrize("aud", ["authenticated", ["streamer", "authenticated"]])
async def test_a_matching_audience_is_accepted(aud: object) -> None:
    async with running(make_settings(audience="authenticated")) as auth:
        assert await auth.verify(hs256(claims(aud=aud)))


@pytest.mark.parametrize(
    "overrides",
    [{"aud": "anon"}, {"aud": ["anon"]}, {"drop": ("aud",)}],
    ids=["wrong", "wrong-list", "missing"],
)
async def test_a_wrong_or_missing_audience_is_rejected_when_configured(
    overrides: dict[str, Any],
) -> None:
    async with running(make_settings(audience="authenticated")) as auth:
        with pytest.raises(TokenInvalid, match="aud"):
            await auth.verify(hs256(claims(**{"aud": "authenticated", **overrides})))


async def test_a_matching_issuer_is_accepted() -> None:
    issuer = "https://project.supabase.co/auth/v1"
    async with running(make_settings(issuer=issuer)) as auth:
        assert await auth.verify(hs256(claims(iss=issuer)))


@pytest.mark.parametrize(
    "overrides", [{"iss": "https://evil.example/auth/v1"}, {}], ids=["wrong", "missing"]
)
async def test_a_wrong_or_missing_issuer_is_rejected_when_configured(
    overrides: dict[str, Any],
) -> None:
    async with running(make_settings(issuer="https://project.supabase.co/auth/v1")) as auth:
        with pytest.raises(TokenInvalid, match="iss"):
            await auth.verify(hs256(claims(**overrides)))


# --- RS256 and ES256 from the JWKS ---------------------------------------------------------


@pytest.mark.parametrize("key", [RSA_KEY, EC_KEY], ids=["RS256", "ES256"])
async def test_a_token_signed_with_a_jwks_key_is_accepted(
    jwks_auth: Authenticator, key: SigningKey
) -> None:
    payload = claims()
    principal = await jwks_auth.verify(key.sign(payload))
    assert principal == Principal(user_id=USER, expires_at=float(payload["exp"]))


async def test_an_expired_jwks_token_is_rejected_with_token_expired(
    jwks_auth: Authenticator,
) -> None:
    with pytest.raises(TokenExpired):
        await jwks_auth.verify(EC_KEY.sign(claims(exp=int(time.time()) - 60)))


async def test_a_token_signed_by_another_key_under_a_known_kid_is_rejected(
    jwks_auth: Authenticator,
) -> None:
    forged = SigningKey("attacker", "RS256").sign(claims(), kid=RSA_KEY.kid)
    with pytest.raises(TokenInvalid, match="signature"):
        await jwks_auth.verify(forged)


async def test_a_token_whose_alg_does_not_match_its_kid_is_rejected(
    jwks_auth: Authenticator,
) -> None:
    token = jwt.encode(
        claims(), rsa_private_key(RSA_KEY.kid), algorithm="RS256", headers={"kid": EC_KEY.kid}
    )
    with pytest.raises(TokenInvalid, match="unknown key"):
        await jwks_auth.verify(token)


@pytest.mark.parametrize("secret", [None, SECRET], ids=["jwks-only", "jwks-and-secret"])
async def test_algorithm_confusion_with_the_rsa_public_key_as_hmac_secret_is_rejected(
    jwks: JwksServer, secret: str | None
) -> None:
    jwks.publish(RSA_KEY)
    public_pem = (
        rsa_private_key(RSA_KEY.kid)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    header = segment({"alg": "HS256", "typ": "JWT", "kid": RSA_KEY.kid})
    token = hmac_signed(header, segment(claims()), public_pem)
    async with running(make_settings(secret=secret, jwks_url=jwks.url)) as auth:
        with pytest.raises(TokenInvalid):
            await auth.verify(token)


async def test_symmetric_keys_published_in_the_jwks_are_never_used(jwks: JwksServer) -> None:
    shared = b"a-symmetric-key-published-by-mistake!!"
    jwks.keys = [{"kty": "oct", "k": b64(shared), "kid": "oct-1", "alg": "HS256"}]
    token = jwt.encode(claims(), shared, algorithm="HS256", headers={"kid": "oct-1"})
    async with running(make_settings(secret=None, jwks_url=jwks.url)) as auth:
        with pytest.raises(TokenInvalid, match="HS256"):
            await auth.verify(token)


async def test_disallowed_algorithms_are_rejected_without_fetching_the_jwks(
    jwks: JwksServer, jwks_auth: Authenticator
) -> None:
    token = jwt.encode(
        claims(), rsa_private_key(RSA_KEY.kid), algorithm="RS512", headers={"kid": RSA_KEY.kid}
    )
    with pytest.raises(TokenInvalid, match="algorithm"):
        await jwks_auth.verify(token)
    assert jwks.requests == 0


async def test_jwks_keys_not_meant_for_signatures_are_ignored(jwks: JwksServer) -> None:
    jwks.keys = [{**RSA_KEY.jwk(), "use": "enc"}]
    async with running(make_settings(secret=None, jwks_url=jwks.url)) as auth:
        with pytest.raises(TokenInvalid, match="unknown key"):
            await auth.verify(RSA_KEY.sign(claims()))


async def test_a_token_without_kid_uses_the_only_key_of_its_algorithm(
    jwks: JwksServer, jwks_auth: Authenticator
) -> None:
    token = jwt.encode(claims(), ec_private_key(EC_KEY.kid), algorithm="ES256")
    assert (await jwks_auth.verify(token)).user_id == USER


async def test_hs256_tokens_are_rejected_when_only_jwks_is_configured(
    jwks_auth: Authenticator,
) -> None:
    with pytest.raises(TokenInvalid, match="HS256"):
        await jwks_auth.verify(hs256(claims()))


async def test_both_secret_and_jwks_tokens_are_accepted_when_both_are_configured(
    jwks: JwksServer,
) -> None:
    jwks.publish(RSA_KEY)
    async with running(make_settings(jwks_url=jwks.url)) as auth:
        assert await auth.verify(hs256(claims()))
        assert await auth.verify(RSA_KEY.sign(claims()))


# --- the JWKS cache ---------------------------------------------------------------------


async def test_concurrent_verifications_share_one_jwks_fetch(
    jwks: JwksServer, jwks_auth: Authenticator
) -> None:
    tokens = [RSA_KEY.sign(claims()) for _ in range(10)] + [EC_KEY.sign(claims())] * 10
    principals = await asyncio.gather(*(jwks_auth.verify(token) for token in tokens))
    assert {principal.user_id for principal in principals} == {USER}
    assert jwks.requests == 1


async def test_concurrent_verifications_share_one_failed_jwks_fetch(
    jwks: JwksServer, jwks_auth: Authenticator
) -> None:
    jwks.status = 503
    tokens = [RSA_KEY.sign(claims()) for _ in range(10)]
    results = await asyncio.gather(
        *(jwks_auth.verify(token) for token in tokens), return_exceptions=True
    )
    assert all(isinstance(result, TokenInvalid) for result in results)
    assert jwks.requests == 1


async def test_the_jwks_is_cached_for_ten_minutes_then_refetched(
    jwks: JwksServer, jwks_auth: Authenticator, clock: FakeClock
) -> None:
    token = RSA_KEY.sign(claims())
    await jwks_auth.verify(token)
    clock.advance(MAX_AGE - 1)
    await jwks_auth.verify(token)
    assert jwks.requests == 1
    clock.advance(2)
    await jwks_auth.verify(token)
    assert jwks.requests == 2


async def test_a_rotated_key_is_accepted_after_one_refetch(
    jwks: JwksServer, jwks_auth: Authenticator, clock: FakeClock
) -> None:
    await jwks_auth.verify(RSA_KEY.sign(claims()))
    jwks.publish(RSA_NEXT)
    clock.advance(REFETCH_INTERVAL + 1)
    assert (await jwks_auth.verify(RSA_NEXT.sign(claims()))).user_id == USER
    assert (await jwks_auth.verify(RSA_NEXT.sign(claims()))).user_id == USER
    assert jwks.requests == 2


async def test_unknown_kids_refetch_the_jwks_at_most_once_per_interval(
    jwks: JwksServer, jwks_auth: Authenticator, clock: FakeClock
) -> None:
    await jwks_auth.verify(RSA_KEY.sign(claims()))
    forged = [RSA_KEY.sign(claims(), kid=f"forged-{n}") for n in range(20)]

    for token in forged:
        with pytest.raises(TokenInvalid, match="unknown key"):
            await jwks_auth.verify(token)
    assert jwks.requests == 1

    clock.advance(REFETCH_INTERVAL)
    results = await asyncio.gather(
        *(jwks_auth.verify(token) for token in forged), return_exceptions=True
    )
    assert all(isinstance(result, TokenInvalid) for result in results)
    assert jwks.requests == 2

    clock.advance(REFETCH_INTERVAL / 2)
    with pytest.raises(TokenInvalid):
        await jwks_auth.verify(forged[0])
    assert jwks.requests == 2
    assert (await jwks_auth.verify(EC_KEY.sign(claims()))).user_id == USER


async def test_a_warm_cache_keeps_verifying_while_the_jwks_server_is_down(
    jwks: JwksServer,
    jwks_auth: Authenticator,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    token = RSA_KEY.sign(claims())
    await jwks_auth.verify(token)
    await jwks.stop()
    caplog.set_level(logging.DEBUG, logger="streamer.auth")

    for _ in range(3):
        clock.advance(MAX_AGE + 1)
        assert (await jwks_auth.verify(token)).user_id == USER

    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert "keeping the cached keys" in warnings[0].getMessage()
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert token not in caplog.text


async def test_a_failing_jwks_server_is_not_asked_again_before_the_interval(
    jwks: JwksServer, jwks_auth: Authenticator, clock: FakeClock
) -> None:
    token = RSA_KEY.sign(claims())
    await jwks_auth.verify(token)
    jwks.status = 503
    clock.advance(MAX_AGE + 1)
    for _ in range(5):
        assert await jwks_auth.verify(token)
    assert jwks.requests == 2


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (500, None),
        (200, b"<html>not json</html>"),
        (200, b'{"keys": "none"}'),
        (200, b"[]"),
        (200, b"\xff\xfe\x00garbage"),
    ],
    ids=["http-500", "not-json", "keys-not-a-list", "not-an-object", "not-utf8"],
)
async def test_without_cached_keys_an_unavailable_jwks_is_token_invalid_and_a_warning(
    jwks: JwksServer,
    jwks_auth: Authenticator,
    caplog: pytest.LogCaptureFixture,
    status: int,
    body: bytes | None,
) -> None:
    jwks.status, jwks.body = status, body
    caplog.set_level(logging.DEBUG, logger="streamer.auth")
    token = RSA_KEY.sign(claims())
    with pytest.raises(TokenInvalid, match="signing keys are unavailable"):
        await jwks_auth.verify(token)
    assert [record.levelno for record in caplog.records] == [logging.WARNING]
    assert token not in caplog.text


async def test_without_cached_keys_the_next_verification_tries_again(
    jwks: JwksServer, jwks_auth: Authenticator
) -> None:
    jwks.status = 503
    with pytest.raises(TokenInvalid, match="unavailable"):
        await jwks_auth.verify(RSA_KEY.sign(claims()))
    jwks.status = 200
    assert (await jwks_auth.verify(RSA_KEY.sign(claims()))).user_id == USER
    assert jwks.requests == 2


async def test_an_empty_jwks_is_cached_like_any_other(
    jwks: JwksServer, jwks_auth: Authenticator
) -> None:
    jwks.keys = []
    for _ in range(5):
        with pytest.raises(TokenInvalid, match="unknown key"):
            await jwks_auth.verify(RSA_KEY.sign(claims()))
    assert jwks.requests == 1


async def test_unusable_jwks_entries_are_skipped(jwks: JwksServer, clock: FakeClock) -> None:
    jwks.keys = [
        "not an object",
        {"kty": "RSA", "kid": "broken", "n": 5, "e": "AQAB"},
        {"kty": "EC", "crv": "P-999", "kid": "odd-curve", "x": "AA", "y": "AA"},
        {**RSA_KEY.jwk(), "alg": ["RS256"]},
        {**RSA_KEY.jwk(), "kid": 42},
        {"kty": "nope"},
        EC_KEY.jwk(),
    ]
    async with running(make_settings(secret=None, jwks_url=jwks.url), clock) as auth:
        assert (await auth.verify(EC_KEY.sign(claims()))).user_id == USER


# --- dev tokens -------------------------------------------------------------------------


async def test_a_minted_token_verifies_and_expires_after_its_ttl(auth: Authenticator) -> None:
    before = time.time()
    principal = await auth.verify(mint_token(SECRET, USER, 3600))
    assert principal.user_id == USER
    assert before + 3600 - 1 <= principal.expires_at <= time.time() + 3600


async def test_a_minted_token_carries_the_configured_audience_and_issuer() -> None:
    settings = make_settings(audience="authenticated", issuer="https://issuer.example")
    async with running(settings) as auth:
        token = mint_token(
            SECRET, USER, 60, audience="authenticated", issuer="https://issuer.example"
        )
        assert (await auth.verify(token)).user_id == USER


def test_minting_a_token_without_a_positive_ttl_is_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        mint_token(SECRET, USER, 0)
