"""What the Authenticator gives and keeps: the principal of a verified token and its owner in a
feed, the JWKS keys it uses and caches, garbage by the hundred, dev tokens.

Which requests it opens and refuses (every token, every place it can be sent) is the table in
test_auth_over_http.py."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import jwt
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from jwt.algorithms import HMACAlgorithm

from streamer.auth import Authenticator, Principal, mint_token
from streamer.config import Settings
from streamer.errors import TokenInvalid
from tests.conftest import SECRET
from tests.tokens import (
    EC_KEY,
    RSA_KEY,
    RSA_NEXT,
    USER,
    JwksServer,
    SigningKey,
    b64,
    claims,
    hs256,
    segment,
    serving_jwks,
)

REFETCH_INTERVAL = 60.0
MAX_AGE = 600.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_settings(
    *,
    secret: str | None = SECRET,
    jwks_url: str | None = None,
    audience: str | None = None,
    issuer: str | None = None,
) -> Settings:
    return Settings(jwt_secret=secret, jwks_url=jwks_url, jwt_audience=audience, jwt_issuer=issuer)


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


@pytest.fixture
async def jwks() -> AsyncIterator[JwksServer]:
    async with serving_jwks() as jwks:
        yield jwks


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


# --- what a verified token gives ------------------------------------------------------------


async def test_a_valid_hs256_token_gives_the_user_and_expiry(auth: Authenticator) -> None:
    payload = claims()
    principal = await auth.verify(hs256(payload))
    assert principal == Principal(subject=str(USER), expires_at=float(payload["exp"]))


@pytest.mark.parametrize("key", [RSA_KEY, EC_KEY], ids=["RS256", "ES256"])
async def test_a_token_signed_with_a_jwks_key_gives_the_user_and_expiry(
    jwks_auth: Authenticator, key: SigningKey
) -> None:
    payload = claims()
    principal = await jwks_auth.verify(key.sign(payload))
    assert principal == Principal(subject=str(USER), expires_at=float(payload["exp"]))


async def test_a_token_expired_within_the_leeway_is_still_accepted(auth: Authenticator) -> None:
    assert await auth.verify(hs256(claims(exp=int(time.time()) - 2)))


async def test_an_nbf_within_the_leeway_is_accepted(auth: Authenticator) -> None:
    assert await auth.verify(hs256(claims(nbf=int(time.time()) + 2)))


# --- the sub: any string to verify, an owner of a feed's type to a stream ------------------------

NOT_UUIDS = [
    "not-a-uuid",
    "anon",
    "admin",
    "user-42",
    "' or 1=1 --",
    "6f1c2a9e3b7d4c519a0e2d8f4b6c1e73",
    "{6f1c2a9e-3b7d-4c51-9a0e-2d8f4b6c1e73}",
    "urn:uuid:6f1c2a9e-3b7d-4c51-9a0e-2d8f4b6c1e73",
    " 6f1c2a9e-3b7d-4c51-9a0e-2d8f4b6c1e73",
    "6f1c2a9e-3b7d-4c51-9a0e-2d8f4b6c1e73\n",
]


async def test_a_missing_sub_is_rejected(auth: Authenticator) -> None:
    with pytest.raises(TokenInvalid, match="sub"):
        await auth.verify(hs256(claims(drop=("sub",))))


@pytest.mark.parametrize("sub", ["", 12345, None, [str(USER)], {"id": str(USER)}], ids=repr)
async def test_a_sub_that_is_empty_or_not_a_string_is_rejected(
    auth: Authenticator, sub: object
) -> None:
    with pytest.raises(TokenInvalid):
        await auth.verify(hs256(claims(sub=sub)))


@pytest.mark.parametrize("sub", [*NOT_UUIDS, str(USER).upper()], ids=repr)
async def test_any_other_sub_is_kept_as_it_is(auth: Authenticator, sub: str) -> None:
    assert (await auth.verify(hs256(claims(sub=sub)))).subject == sub


async def test_an_uppercase_uuid_sub_is_the_same_owner_in_a_uuid_feed(auth: Authenticator) -> None:
    principal = await auth.verify(hs256(claims(sub=str(USER).upper())))
    assert principal.owner("uuid") == str(USER)


@pytest.mark.parametrize("sub", NOT_UUIDS, ids=repr)
def test_a_sub_that_is_not_a_uuid_owns_nothing_in_a_uuid_feed(sub: str) -> None:
    with pytest.raises(TokenInvalid, match="not a UUID"):
        Principal(subject=sub, expires_at=0.0).owner("uuid")


@pytest.mark.parametrize("sub", ["user-42", str(USER).upper(), " padded "], ids=repr)
def test_in_a_text_feed_the_owner_is_the_sub_as_it_is(sub: str) -> None:
    assert Principal(subject=sub, expires_at=0.0).owner("text") == sub


# --- the keys of the JWKS -------------------------------------------------------------------


async def test_disallowed_algorithms_are_rejected_without_fetching_the_jwks(
    jwks: JwksServer, jwks_auth: Authenticator
) -> None:
    token = RSA_KEY.sign(claims(), algorithm="RS512")
    with pytest.raises(TokenInvalid, match="algorithm"):
        await jwks_auth.verify(token)
    assert jwks.requests == 0


async def test_symmetric_keys_published_in_the_jwks_are_never_used(jwks: JwksServer) -> None:
    shared = b"a-symmetric-key-published-by-mistake!!"
    jwks.keys = [{"kty": "oct", "k": b64(shared), "kid": "oct-1", "alg": "HS256"}]
    token = jwt.encode(claims(), shared, algorithm="HS256", headers={"kid": "oct-1"})
    async with running(make_settings(secret=None, jwks_url=jwks.url)) as auth:
        with pytest.raises(TokenInvalid, match="HS256"):
            await auth.verify(token)


async def test_jwks_keys_not_meant_for_signatures_are_ignored(jwks: JwksServer) -> None:
    jwks.keys = [{**RSA_KEY.jwk(), "use": "enc"}]
    async with running(make_settings(secret=None, jwks_url=jwks.url)) as auth:
        with pytest.raises(TokenInvalid, match="unknown key"):
            await auth.verify(RSA_KEY.sign(claims()))


async def test_a_token_without_kid_uses_the_only_key_of_its_algorithm(
    jwks_auth: Authenticator,
) -> None:
    token = jwt.encode(claims(), EC_KEY.private, algorithm="ES256")
    assert (await jwks_auth.verify(token)).subject == str(USER)


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
        assert (await auth.verify(EC_KEY.sign(claims()))).subject == str(USER)


# --- the JWKS cache -------------------------------------------------------------------------


async def test_concurrent_verifications_share_one_jwks_fetch(
    jwks: JwksServer, jwks_auth: Authenticator
) -> None:
    tokens = [RSA_KEY.sign(claims()) for _ in range(10)] + [EC_KEY.sign(claims())] * 10
    principals = await asyncio.gather(*(jwks_auth.verify(token) for token in tokens))
    assert {principal.subject for principal in principals} == {str(USER)}
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
    assert (await jwks_auth.verify(RSA_NEXT.sign(claims()))).subject == str(USER)
    assert (await jwks_auth.verify(RSA_NEXT.sign(claims()))).subject == str(USER)
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
    assert (await jwks_auth.verify(EC_KEY.sign(claims()))).subject == str(USER)


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
        assert (await jwks_auth.verify(token)).subject == str(USER)

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
    assert (await jwks_auth.verify(RSA_KEY.sign(claims()))).subject == str(USER)
    assert jwks.requests == 2


async def test_an_empty_jwks_is_cached_like_any_other(
    jwks: JwksServer, jwks_auth: Authenticator
) -> None:
    jwks.keys = []
    for _ in range(5):
        with pytest.raises(TokenInvalid, match="unknown key"):
            await jwks_auth.verify(RSA_KEY.sign(claims()))
    assert jwks.requests == 1


# --- garbage by the hundred ---------------------------------------------------------------

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


# --- dev tokens ---------------------------------------------------------------------------


async def test_a_minted_token_verifies_and_expires_after_its_ttl(auth: Authenticator) -> None:
    before = time.time()
    principal = await auth.verify(mint_token(SECRET, USER, 3600))
    assert principal.subject == str(USER)
    assert before + 3600 - 1 <= principal.expires_at <= time.time() + 3600


async def test_a_minted_token_carries_the_configured_audience_and_issuer() -> None:
    settings = make_settings(audience="authenticated", issuer="https://issuer.example")
    async with running(settings) as auth:
        token = mint_token(
            SECRET, USER, 60, audience="authenticated", issuer="https://issuer.example"
        )
        assert (await auth.verify(token)).subject == str(USER)


def test_minting_a_token_without_a_positive_ttl_is_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        mint_token(SECRET, USER, 0)


def test_the_shared_secret_is_checked_once_not_at_every_token(monkeypatch) -> None:
    tokens = [mint_token(SECRET, USER, 60 + i) for i in range(3)]
    forged = mint_token("another secret of thirty-two bytes", USER, 60)
    checks = []
    plain = HMACAlgorithm.prepare_key

    def counted(self, key):
        checks.append(key)
        return plain(self, key)

    monkeypatch.setattr(HMACAlgorithm, "prepare_key", counted)
    auth = Authenticator(Settings(jwt_secret=SECRET))
    for token in tokens:
        assert asyncio.run(auth.verify(token)).subject == str(USER)
    assert len(checks) == 1
    # And a token signed with another secret is still refused.
    with pytest.raises(TokenInvalid):
        asyncio.run(auth.verify(forged))
