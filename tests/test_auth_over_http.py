"""Which requests a stream opens and which it refuses, over real HTTP: every token, every place
it can be sent, every way of configuring the server. A refusal is a 401 with
`WWW-Authenticate: Bearer` and a JSON code, never a 500, and no token reaches a log line or
the answer.

The servers start once for this module; each row of the table is one request. `streamer
serve` itself, in a process of its own, answers hostile tokens as these servers do."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import jwt
import pytest
import pytest_asyncio

from streamer.auth import MAX_TOKEN_LENGTH
from tests.client import open_stream
from tests.conftest import (
    SECRET,
    PostgresServer,
    Service,
    as_writer,
    fresh_database,
    insert_file,
    start_service,
    stop_service,
    token_for,
    wait_until,
)
from tests.process import client_session, streamer_serve
from tests.scrape import scrape
from tests.tokens import (
    ATTACKER,
    EC_KEY,
    RSA_KEY,
    USER,
    JwksServer,
    SigningKey,
    b64,
    bearer,
    claims,
    hmac_token,
    hs256,
    raw_token,
    segment,
    serving_jwks,
    with_header,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

EVENTS = "/api/files/events"
AUDIENCE = "authenticated"
ISSUER = "https://project.supabase.co/auth/v1"
NOW = int(time.time())
LATER = NOW + 1800  # still ahead when the rows run, minutes after they are made


# --- requests and answers -----------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """A request to a stream: its headers, its query, and the secrets it carries."""

    headers: tuple[tuple[str, str], ...] = ()
    params: tuple[tuple[str, str], ...] = ()
    secrets: tuple[str, ...] = ()
    path: str = EVENTS

    def __add__(self, other: Sent) -> Sent:
        return Sent(
            self.headers + other.headers,
            self.params + other.params,
            self.secrets + other.secrets,
            self.path,
        )


def authorization(value: str, secret: str = "") -> Sent:
    return Sent(headers=(("Authorization", value),), secrets=(secret,) if secret else ())


def header(token: str) -> Sent:
    return authorization(f"Bearer {token}", token)


def query(token: str) -> Sent:
    return Sent(params=(("access_token", token),), secrets=(token,) if token else ())


def cookie(token: str, name: str = "access_token") -> Sent:
    return Sent(headers=(("Cookie", f"{name}={token}"),), secrets=(token,) if token else ())


@dataclass(frozen=True)
class Answer:
    status: int
    code: str = ""
    says: str = ""  # a part of the error sentence


OPENS = Answer(200)
REQUIRED = Answer(401, "AUTH_REQUIRED")
EXPIRED = Answer(401, "TOKEN_EXPIRED")


def invalid(says: str = "") -> Answer:
    return Answer(401, "TOKEN_INVALID", says)


Cases = dict[str, tuple[Sent, Answer]]


def in_header(tokens: dict[str, tuple[str, Answer]]) -> Cases:
    return {case: (header(token), answer) for case, (token, answer) in tokens.items()}


def signed(payload: dict[str, Any]) -> str:
    """Signed with the secret, whatever the claims: a JWT library refuses to write some."""
    return hmac_token({"alg": "HS256", "typ": "JWT"}, payload)


def on(server: str, cases: Cases) -> list[Any]:
    return [
        pytest.param(server, sent, answer, id=f"{server}: {case}")
        for case, (sent, answer) in cases.items()
    ]


# --- where the token is looked for ----------------------------------------------------------

FRESH = hs256(claims())
STALE = hs256(claims(exp=NOW - 60))
SOMEONE_ELSES = hs256(claims(sub=str(uuid.uuid4())))
BASIC = "Basic dXNlcjpwYXNz"

PLACES: Cases = {
    "a token in the header opens": (header(FRESH), OPENS),
    "a token in the query opens": (query(FRESH), OPENS),
    "a token in the cookie opens": (cookie(FRESH), OPENS),
    **{
        f"the {scheme} scheme opens": (authorization(f"{scheme} {FRESH}", FRESH), OPENS)
        for scheme in ("bearer", "BEARER", "BeArEr")
    },
    "the same token in every place opens": (header(FRESH) + query(FRESH) + cookie(FRESH), OPENS),
    "no token is auth required": (
        Sent(headers=(("Cookie", "session=xyz"),), params=(("other", "1"),)),
        REQUIRED,
    ),
    "no token for one file is auth required": (
        Sent(path=f"/api/files/{uuid.uuid4()}/events"),
        REQUIRED,
    ),
    "a cleared cookie is no token": (cookie(""), REQUIRED),
    "an expired token in the header is expired": (header(STALE), EXPIRED),
    "an expired token in the query is expired": (query(STALE), EXPIRED),
    "an expired token in the cookie is expired": (cookie(STALE), EXPIRED),
    # The first place that holds a token decides: a stale cookie beside a fresh token does
    # not refuse the stream (a browser would loop on it), and a fresh token further down the
    # order does not rescue a stale one.
    "a fresh header beside a stale cookie opens": (header(FRESH) + cookie(STALE), OPENS),
    "a stale header beside a fresh cookie is expired": (header(STALE) + cookie(FRESH), EXPIRED),
    "a fresh query beside a stale cookie opens": (query(FRESH) + cookie(STALE), OPENS),
    "a stale query beside a fresh cookie is expired": (query(STALE) + cookie(FRESH), EXPIRED),
    "a fresh header beside a stale query opens": (header(FRESH) + query(STALE), OPENS),
    "a stale header beside a fresh query is expired": (header(STALE) + query(FRESH), EXPIRED),
    "two tokens in two headers are refused": (
        header(FRESH) + header(SOMEONE_ELSES),
        invalid("two different tokens"),
    ),
    "two tokens in two parameters are refused": (
        query(FRESH) + query(SOMEONE_ELSES),
        invalid("two different tokens"),
    ),
    "a Basic header is refused": (authorization(BASIC, BASIC), invalid("Bearer scheme")),
    "a Token header is refused": (authorization(f"Token {FRESH}", FRESH), invalid("Bearer scheme")),
    "a header without scheme is refused": (authorization(FRESH, FRESH), invalid("Bearer scheme")),
    "a Basic header for a proxy does not hide the cookie": (
        authorization(BASIC, BASIC) + cookie(FRESH),
        OPENS,
    ),
    "an empty bearer beside a cookie is refused": (
        authorization("Bearer") + cookie(FRESH),
        invalid("empty bearer"),
    ),
    "an empty lower-case bearer beside a cookie is refused": (
        authorization("bearer    ") + cookie(FRESH),
        invalid("empty bearer"),
    ),
    "an empty parameter is refused": (query(""), invalid("parameter is empty")),
}

ANOTHER_COOKIE: Cases = {
    "a token in the configured cookie opens": (cookie(FRESH, "sb-token"), OPENS),
    "a token in the access_token cookie is no token": (cookie(FRESH), REQUIRED),
}


# --- HS256 with the shared secret -------------------------------------------------------------

HS256_TOKENS: dict[str, tuple[str, Answer]] = {
    "an aud claim is ignored when no audience is configured": (hs256(claims(aud=AUDIENCE)), OPENS),
    "an upper-case UUID sub opens": (hs256(claims(sub=str(USER).upper())), OPENS),
    # Outside the allow-list of algorithms.
    "unsigned alg none": (raw_token({"alg": "none"}, claims()), invalid()),
    "unsigned alg None": (raw_token({"alg": "None"}, claims()), invalid()),
    "unsigned alg NONE": (raw_token({"alg": "NONE"}, claims()), invalid()),
    "unsigned empty alg": (raw_token({"alg": ""}, claims()), invalid()),
    "unsigned alg none typ JWT": (raw_token({"alg": "none", "typ": "JWT"}, claims()), invalid()),
    "alg None signed": (hmac_token({"alg": "None"}, claims()), invalid()),
    "alg lower-case hs256": (hmac_token({"alg": "hs256"}, claims()), invalid()),
    "alg a list": (hmac_token({"alg": ["HS256"]}, claims()), invalid()),
    "alg an object": (hmac_token({"alg": {"HS256": True}}, claims()), invalid()),
    "no alg": (hmac_token({"typ": "JWT"}, claims()), invalid("algorithm")),
    **{
        f"{alg} with the right secret": (
            hmac_token({"alg": alg}, claims(), digest=f"sha{alg[2:]}"),
            invalid("algorithm"),
        )
        for alg in ("HS384", "HS512")
    },
    "RS256 without a JWKS": (RSA_KEY.sign(claims()), invalid("RS256")),
    # Signed with another key.
    **{
        f"signed with {name}": (hmac_token({"alg": "HS256"}, claims(), key), invalid("signature"))
        for name, key in {
            "another secret": "another-secret-entirely-32-bytes!",
            "an empty secret": "",
            "the secret and a space": SECRET + " ",
            "the secret in upper case": SECRET.upper(),
        }.items()
    },
    # Correctly signed, with claims that are wrong. (What the sub must be depends on the
    # feed: test_auth.py. The files feed's owner is a uuid.)
    "a sub that is not a UUID": (signed(claims(sub="admin")), invalid()),
    "no exp": (signed(claims(drop=("exp",))), invalid("exp")),
    "exp null": (signed(claims(exp=None)), invalid()),
    "exp a string of digits": (signed(claims(exp="9999999999")), invalid()),
    "exp a word": (signed(claims(exp="tomorrow")), invalid()),
    "exp a boolean": (signed(claims(exp=True)), invalid()),
    "exp a list": (signed(claims(exp=[NOW + 600])), invalid()),
    "exp huge": (signed(claims(exp=10**400)), invalid()),
    "exp hugely negative": (signed(claims(exp=-(10**400))), invalid()),
    # JSON has no NaN or Infinity, but Python's parser reads them: written by hand.
    **{
        f"exp {exp}": (
            hmac_token({"alg": "HS256"}, f'{{"sub": "{USER}", "exp": {exp}}}'.encode()),
            invalid(),
        )
        for exp in ("NaN", "Infinity", "-Infinity", "1e999")
    },
    "nbf in the future": (signed(claims(nbf=LATER)), invalid("not valid yet")),
    "iat in the future": (signed(claims(iat=LATER)), invalid("not valid yet")),
    "nbf a string": (signed(claims(nbf="soon")), invalid()),
    "iat a string": (signed(claims(iat="now")), invalid()),
    "nbf huge": (signed(claims(nbf=10**400)), invalid()),
    # Longer than any real token (and than aiohttp's 8 KiB line): our answer, before decoding.
    "a signed token over the length limit": (
        hs256(claims(padding="x" * MAX_TOKEN_LENGTH)),
        invalid("longer"),
    ),
}

MALFORMED = {
    "one segment": "not-a-jwt",
    "two segments": "a.b",
    "four segments": "a.b.c.d",
    "dots only": "..",
    "more dots": "....",
    "junk segments": "a.b.c",
    "punctuation": "!!!.@@@.###",
    "bad padding": "eyJ===.eyJ===.abc===",
    "empty objects in two segments": "e30.e30",
    "empty objects in four segments": "e30.e30.e30.e30",
    "payload not base64": segment({"alg": "HS256"}) + ".%%%." + b64(b"x"),
    "signature not base64": segment({"alg": "HS256"}) + "." + segment(claims()) + ".not*base64",
    "header not json": b64(b"not json") + "." + segment(claims()) + ".c2ln",
    "header binary": b64(b"\xff\xfe\x00binary") + "." + segment(claims()) + ".c2ln",
    "header a list": hmac_token(["alg", "HS256"], claims()),
    "kid a number": raw_token({"alg": "HS256", "kid": 7}, claims(), b"sig"),
    "unknown crit": raw_token({"alg": "HS256", "crit": ["exp"], "exp": 1}, claims(), b"sig"),
    "whitespace inside": segment({"alg": "HS256"}) + ". " + segment(claims()) + ".abc",
    "payload not json but signed": hmac_token({"alg": "HS256"}, b"not json"),
    "payload a list but signed": hmac_token({"alg": "HS256"}, b"[1, 2, 3]"),
    "payload a string but signed": hmac_token({"alg": "HS256"}, b'"a string"'),
    "payload binary but signed": hmac_token({"alg": "HS256"}, b"\xff\xfe"),
    "non-ascii": "é.é.é",
}

MALFORMED_SENT: Cases = {
    **{f"{case} in the query": (query(token), invalid()) for case, token in MALFORMED.items()},
    **{
        f"{case} in the header": (header(token), invalid())
        for case, token in MALFORMED.items()
        if token.isascii()
    },
    "a signed token over the length limit in the query": (
        query(HS256_TOKENS["a signed token over the length limit"][0]),
        invalid("longer"),
    ),
}


# --- audience and issuer, when configured -----------------------------------------------------

AUDIENCE_AND_ISSUER: dict[str, tuple[str, Answer]] = {
    "the right aud and iss open": (signed(claims(aud=AUDIENCE, iss=ISSUER)), OPENS),
    "an aud list holding the audience opens": (
        signed(claims(aud=["other", AUDIENCE], iss=ISSUER)),
        OPENS,
    ),
    "no aud": (signed(claims(iss=ISSUER)), invalid("aud")),
    "no iss": (signed(claims(aud=AUDIENCE)), invalid("iss")),
    "another aud": (signed(claims(aud="anon", iss=ISSUER)), invalid("aud")),
    "an aud list without the audience": (
        signed(claims(aud=["anon", "service_role"], iss=ISSUER)),
        invalid("aud"),
    ),
    "an empty aud": (signed(claims(aud="", iss=ISSUER)), invalid()),
    "the aud in upper case": (signed(claims(aud=AUDIENCE.upper(), iss=ISSUER)), invalid("aud")),
    "an aud that is a number": (signed(claims(aud=42, iss=ISSUER)), invalid()),
    "another iss": (
        signed(claims(aud=AUDIENCE, iss="https://attacker.example/auth/v1")),
        invalid("iss"),
    ),
    "the iss and a slash": (signed(claims(aud=AUDIENCE, iss=ISSUER + "/")), invalid("iss")),
    "an empty iss": (signed(claims(aud=AUDIENCE, iss="")), invalid()),
    "an iss that is a number": (signed(claims(aud=AUDIENCE, iss=12)), invalid()),
}


# --- RS256 and ES256 from the JWKS: algorithm confusion and forged keys ------------------------

PAYLOAD = claims()
FORGED: dict[str, tuple[str, Answer]] = {
    # HS256 "signed" with the public key: as PEM, as the JWK, as the modulus.
    "HS256 with the RSA public key as secret, under its kid": (
        hmac_token({"alg": "HS256", "kid": RSA_KEY.kid}, PAYLOAD, RSA_KEY.public_pem()),
        invalid(),
    ),
    "HS256 with the RSA public key as secret": (
        hmac_token({"alg": "HS256"}, PAYLOAD, RSA_KEY.public_pem()),
        invalid(),
    ),
    "HS256 with the RSA JWK as secret": (
        hmac_token({"alg": "HS256", "kid": RSA_KEY.kid}, PAYLOAD, json.dumps(RSA_KEY.jwk())),
        invalid(),
    ),
    "HS256 with the RSA modulus as secret": (
        hmac_token({"alg": "HS256"}, PAYLOAD, RSA_KEY.jwk()["n"]),
        invalid(),
    ),
    "the right kid, the wrong key": (ATTACKER.sign(PAYLOAD, kid=RSA_KEY.kid), invalid("signature")),
    # The attacker's key carried in the token itself, or fetched from its own URL.
    "the key in the token": (
        jwt.encode(PAYLOAD, ATTACKER.private, "RS256", {"kid": "attacker", "jwk": ATTACKER.jwk()}),
        invalid(),
    ),
    "the key at the token's URLs": (
        jwt.encode(
            PAYLOAD,
            ATTACKER.private,
            "RS256",
            {"kid": RSA_KEY.kid, "jku": "http://127.0.0.1:9/jwks.json", "x5u": "http://x"},
        ),
        invalid(),
    ),
    "an EC signature presented as RSA": (
        with_header(EC_KEY.sign(PAYLOAD), {"alg": "RS256", "kid": RSA_KEY.kid}),
        invalid(),
    ),
    "an RSA signature under the EC kid": (
        RSA_KEY.sign(PAYLOAD, kid=EC_KEY.kid),
        invalid("unknown key"),
    ),
    # Algorithms the server never accepts, even with a real key (RS512: test_auth.py).
    "PS256 with the RSA key": (RSA_KEY.sign(PAYLOAD, algorithm="PS256"), invalid()),
    "ES384 over an ES256 signature": (
        with_header(EC_KEY.sign(PAYLOAD), {"alg": "ES384", "kid": EC_KEY.kid}),
        invalid(),
    ),
    "an unknown kid": (RSA_KEY.sign(PAYLOAD, kid="rotated-away"), invalid("unknown key")),
    "a kid that is an object": (
        hmac_token({"alg": "RS256", "kid": {"$ne": None}}, PAYLOAD),
        invalid(),
    ),
    "a kid that is a list": (
        hmac_token({"alg": "RS256", "kid": [RSA_KEY.kid]}, PAYLOAD),
        invalid(),
    ),
    "an expired ES256 token": (EC_KEY.sign(claims(exp=NOW - 60)), EXPIRED),
}

JWKS_ONLY: dict[str, tuple[str, Answer]] = {
    "HS256 with the right secret": (hs256(claims()), invalid("HS256")),
}
JWKS_AND_SECRET: dict[str, tuple[str, Answer]] = {
    # (RS256 and ES256 with only a JWKS: test_a_token_signed_with_a_published_key_...)
    "RS256 opens": (RSA_KEY.sign(claims()), OPENS),
    "ES256 opens": (EC_KEY.sign(claims()), OPENS),
    "HS256 with the right secret opens": (hs256(claims()), OPENS),
}

TABLE = [
    *on("secret", PLACES),
    *on("secret", in_header(HS256_TOKENS)),
    *on("secret", MALFORMED_SENT),
    *on("sb-token cookie", ANOTHER_COOKIE),
    *on("aud and iss", in_header(AUDIENCE_AND_ISSUER)),
    *on("jwks", in_header(FORGED | JWKS_ONLY)),
    *on("jwks and secret", in_header(FORGED | JWKS_AND_SECRET)),
]


# --- the servers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def database(postgres: PostgresServer, template: str) -> Iterator[str]:
    with fresh_database(postgres, template) as url:
        yield url


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def jwks() -> AsyncIterator[JwksServer]:
    async with serving_jwks(RSA_KEY, EC_KEY) as jwks:
        yield jwks


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def servers(database: str, jwks: JwksServer) -> AsyncIterator[dict[str, Service]]:
    """One service per configuration, all on one database."""
    configurations: dict[str, dict[str, Any]] = {
        "secret": {},
        "sb-token cookie": {"jwt_cookie": "sb-token"},
        "aud and iss": {"jwt_audience": AUDIENCE, "jwt_issuer": ISSUER},
        "jwks": {"jwt_secret": None, "jwks_url": jwks.url},
        "jwks and secret": {"jwks_url": jwks.url},
    }
    started: dict[str, Service] = {}
    try:
        for name, settings in configurations.items():
            started[name] = await start_service(database, **settings)
        yield started
    finally:
        for service in started.values():
            await stop_service(service)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def writer(database: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(as_writer(database))
    yield conn
    await conn.close()


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


# --- the tests ----------------------------------------------------------------------------


@pytest.mark.parametrize(("server", "sent", "answer"), TABLE)
async def test_a_request_gets_the_answer_in_the_table(
    servers: dict[str, Service],
    logs: pytest.LogCaptureFixture,
    server: str,
    sent: Sent,
    answer: Answer,
) -> None:
    service = servers[server]
    async with service.session.get(
        service.url(sent.path), headers=list(sent.headers), params=list(sent.params)
    ) as response:
        if answer == OPENS:
            assert response.status == 200, await response.text()
            assert response.content_type == "text/event-stream"
        else:
            body = (await response.read()).decode()
            assert response.status == answer.status, body[:300]
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert response.content_type == "application/json"
            data = json.loads(body)
            assert data["code"] == answer.code, data
            assert data["error"]
            assert answer.says in data["error"]
            for secret in sent.secrets:
                assert not [part for part in secret.split(".") if len(part) >= 8 and part in body]
    assert_quiet(logs, *sent.secrets)


@pytest.mark.parametrize("key", [RSA_KEY, EC_KEY], ids=["RS256", "ES256"])
async def test_a_token_signed_with_a_published_key_opens_the_users_stream(
    servers: dict[str, Service], writer: asyncpg.Connection, user: uuid.UUID, key: SigningKey
) -> None:
    service = servers["jwks"]
    token = key.sign(claims(sub=str(user)))
    async with open_stream(service.session, service.url(EVENTS), token) as stream:
        file_id = await insert_file(writer, user)
        assert (await stream.next()).file["id"] == str(file_id)


@pytest.mark.parametrize("where", ["header", "query"])
async def test_a_one_megabyte_token_gets_a_clean_4xx(
    servers: dict[str, Service], logs: pytest.LogCaptureFixture, where: str
) -> None:
    service = servers["secret"]
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
    async with service.session.get(service.url(EVENTS), headers=bearer(FRESH)) as response:
        assert response.status == 200


async def test_streamer_serve_answers_hostile_tokens_as_the_tests_server_does(
    database_url: str, tmp_path: Path
) -> None:
    async with streamer_serve(database_url, tmp_path) as service, client_session() as session:
        url = service.base_url + EVENTS
        too_long = "a" * (MAX_TOKEN_LENGTH + 8 * 1024)
        for request in ({"headers": {"Authorization": f"Bearer {too_long}"}},
                        {"params": {"access_token": too_long}}):  # fmt: skip
            async with session.get(url, **request) as response:  # type: ignore[arg-type]
                assert response.status == 401
                assert (await response.json())["code"] == "TOKEN_INVALID"
        absurd = "b" * 1_000_000
        for request in ({"headers": {"Authorization": f"Bearer {absurd}"}},
                        {"params": {"access_token": absurd}}):  # fmt: skip
            async with session.get(url, **request) as response:  # type: ignore[arg-type]
                assert response.status == 400
                assert b"Traceback" not in await response.read()
        async with session.get(
            url, headers={"Authorization": f"Bearer {token_for(uuid.uuid4())}"}
        ) as response:
            assert response.status == 200
        assert service.errors() == []
    log = (tmp_path / "streamer.log").read_text()
    assert "aaaaaaaaaaaaaaaa" not in log and "bbbbbbbbbbbbbbbb" not in log


@pytest.mark.parametrize("kind", ["every file", "one file"])
async def test_at_the_tokens_exp_the_stream_says_token_expired_and_ends(
    servers: dict[str, Service], writer: asyncpg.Connection, user: uuid.UUID, kind: str
) -> None:
    service = servers["secret"]
    path = EVENTS
    if kind == "one file":
        path = f"/api/files/{await insert_file(writer, user)}/events"
    token = hs256(claims(sub=str(user), exp=time.time() + 1))
    async with open_stream(service.session, service.url(path), token, synced=False) as stream:
        expired = (await stream.until("token-expired"))[-1]
        assert expired.id is None
        assert expired.json["eventType"] == "token-expired"
        assert expired.json["timestamp"].endswith("Z")
        assert await stream.end() == []

    async def released() -> bool:
        samples = await scrape(service.session, service.url("/metrics"))
        return samples["streamer_streams_open"] == 0

    await wait_until(released)
