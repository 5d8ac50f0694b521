"""JWT verification: who is asking, from a shared secret (HS256) or Supabase-style JWKS keys.

The accepted algorithms are fixed by configuration, never by the token: HS256 only
with a configured secret, RS256 and ES256 only with keys fetched from the JWKS URL.
No token ever reaches a log line or an error message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
from aiohttp import hdrs, web
from jwt.algorithms import HMACAlgorithm

from streamer.config import Settings
from streamer.errors import AuthRequired, TokenExpired, TokenInvalid

logger = logging.getLogger(__name__)

QUERY_PARAMETER = "access_token"
MAX_TOKEN_LENGTH = 16 * 1024
LEEWAY_SECONDS = 5.0
JWKS_MAX_AGE_SECONDS = 600.0
JWKS_REFETCH_INTERVAL_SECONDS = 60.0
JWKS_TIMEOUT_SECONDS = 5.0
SECRET_ALGORITHM = "HS256"
JWKS_ALGORITHMS = ("RS256", "ES256")


class _CheckedSecret(HMACAlgorithm):
    """HS256, the secret checked once: pyjwt checks at every decode that it is no PEM, SSH
    or DER key (parsing it as DER twice), half of what a token costs."""

    def __init__(self) -> None:
        super().__init__(HMACAlgorithm.SHA256)
        self._checked: tuple[str | bytes, bytes] | None = None

    def prepare_key(self, key: str | bytes) -> bytes:
        if self._checked is None or self._checked[0] != key:
            self._checked = (key, super().prepare_key(key))
        return self._checked[1]


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str  # the token's sub: the user
    expires_at: float  # the token's exp, epoch seconds
    # Every claim of the token: a feed with an owner claim compares its owners with one
    # (streamer/claims.py).
    claims: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def owner(self, owner_type: str) -> str:
        """The sub as a feed's owner column holds it, compared as text: for a uuid column,
        the canonical form Postgres renders (and anything else is no user of that feed)."""
        if owner_type != "uuid":
            return self.subject
        return as_uuid(self.subject, "The token's sub claim is not a UUID.")


def as_uuid(value: str, problem: str) -> str:
    """`value` as Postgres renders a uuid; TokenInvalid(problem) when it is none."""
    if not _UUID.fullmatch(value):
        raise TokenInvalid(problem)
    return value.lower()


class _JwksUnavailable(Exception):
    """The JWKS endpoint answered with something that is not a JWK set."""


class Authenticator:
    """Finds the token of a request and verifies it; owns the JWKS cache and its HTTP session."""

    def __init__(
        self,
        settings: Settings,
        *,
        jwks_max_age: float = JWKS_MAX_AGE_SECONDS,
        jwks_refetch_interval: float = JWKS_REFETCH_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._secret = settings.jwt_secret or None
        self._jwt = jwt.PyJWT()  # its HS256 checks the secret once (tests/test_auth.py)
        self._jwt._jws.unregister_algorithm(SECRET_ALGORITHM)
        self._jwt._jws.register_algorithm(SECRET_ALGORITHM, _CheckedSecret())
        self._jwks_url = settings.jwks_url or None
        self._audience = settings.jwt_audience or None
        self._issuer = settings.jwt_issuer or None
        self._cookie = settings.jwt_cookie
        # Logged without its query string, in case someone put an API key there.
        self._jwks_log_url = (self._jwks_url or "").split("?", 1)[0].split("#", 1)[0]
        self._jwks_max_age = jwks_max_age
        self._jwks_refetch_interval = jwks_refetch_interval
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        # The JWKS cache: keys from the last successful fetch, kept when a later fetch fails.
        self._keys: tuple[jwt.PyJWK, ...] | None = None
        self._fetched_at = -math.inf
        self._attempted_at = -math.inf
        self._attempts = 0
        self._fetch_lock = asyncio.Lock()

    async def start(self) -> None:
        if self._jwks_url is not None and self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=JWKS_TIMEOUT_SECONDS)
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def token_from(self, request: web.Request) -> str:
        """The request's token: Authorization header, then query parameter, then cookie.

        The first place that holds a token decides: a stale cookie left beside a fresh
        header or query token must not refuse the request (a browser would loop on it).
        Two different tokens in that one place are refused rather than guessed between."""
        headers: list[str] = []
        malformed_header: str | None = None
        for value in request.headers.getall(hdrs.AUTHORIZATION, []):
            scheme, _, credentials = value.strip().partition(" ")
            credentials = credentials.strip()
            if scheme.lower() != "bearer":
                # Perhaps a credential for a proxy in front of us (Basic auth on a staging
                # site): only an error when nothing else carries a token.
                malformed_header = "The Authorization header must use the Bearer scheme."
            elif not credentials:
                raise TokenInvalid("The Authorization header carries an empty bearer token.")
            else:
                headers.append(credentials)
        queries = [value.strip() for value in request.query.getall(QUERY_PARAMETER, [])]
        if "" in queries:
            raise TokenInvalid(f"The {QUERY_PARAMETER} parameter is empty.")
        # An empty cookie is how a logout clears it: the same as no cookie.
        cookie = request.cookies.get(self._cookie, "").strip()
        for found in (headers, queries, [cookie] if cookie else []):
            if found:
                if any(token != found[0] for token in found[1:]):
                    raise TokenInvalid(
                        "The request carries two different tokens in one place; send one."
                    )
                return found[0]
        if malformed_header is not None:
            raise TokenInvalid(malformed_header)
        raise AuthRequired()

    async def authenticate(self, request: web.Request) -> Principal:
        return await self.verify(self.token_from(request))

    async def verify(self, token: str) -> Principal:
        if len(token) > MAX_TOKEN_LENGTH:
            raise TokenInvalid(f"The token is longer than {MAX_TOKEN_LENGTH} characters.")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenInvalid("The token is not a well-formed JWT.") from None

        algorithm = header.get("alg")
        key: jwt.PyJWK | str
        if algorithm == SECRET_ALGORITHM:
            if self._secret is None:
                raise TokenInvalid("HS256 tokens are not accepted by this server.")
            key = self._secret
        elif algorithm in JWKS_ALGORITHMS:
            if self._jwks_url is None:
                raise TokenInvalid(f"{algorithm} tokens are not accepted by this server.")
            key = await self._jwks_key(str(algorithm), header.get("kid"))
            algorithm = key.algorithm_name
        else:
            raise TokenInvalid("The token's signing algorithm is not allowed.")

        return _principal(self._decode(token, key, str(algorithm)))

    def _decode(self, token: str, key: jwt.PyJWK | str, algorithm: str) -> dict[str, Any]:
        required = ["exp", "sub"]
        required += ["aud"] if self._audience is not None else []
        required += ["iss"] if self._issuer is not None else []
        try:
            return self._jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=LEEWAY_SECONDS,
                # An aud claim is only checked when an audience is configured: Supabase
                # tokens carry aud "authenticated" whether or not anyone cares.
                # exp is checked in _principal, which first makes sure it is a number.
                options={
                    "require": required,
                    "verify_aud": self._audience is not None,
                    "verify_exp": False,
                },
            )
        except jwt.ImmatureSignatureError:
            raise TokenInvalid(
                "The token is not valid yet (nbf or iat is in the future)."
            ) from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenInvalid(f"The token has no {exc.claim} claim.") from None
        except jwt.InvalidAudienceError:
            raise TokenInvalid("The token is meant for another audience (aud).") from None
        except jwt.InvalidIssuerError:
            raise TokenInvalid("The token comes from another issuer (iss).") from None
        except jwt.InvalidSignatureError:
            raise TokenInvalid("The token's signature does not match.") from None
        except jwt.InvalidAlgorithmError:
            raise TokenInvalid("The token's signing algorithm is not allowed.") from None
        except jwt.DecodeError:
            raise TokenInvalid("The token is not a well-formed JWT.") from None
        except jwt.PyJWTError:
            raise TokenInvalid() from None

    async def _jwks_key(self, algorithm: str, kid: str | None) -> jwt.PyJWK:
        """The JWKS key for the token's alg and kid; unknown ones refetch, within limits."""
        fresh = self._clock() - self._fetched_at < self._jwks_max_age
        key = self._lookup(algorithm, kid) if fresh else None
        if key is None:
            await self._refresh()
            key = self._lookup(algorithm, kid)
        if key is not None:
            return key
        if self._keys is None:
            raise TokenInvalid("The signing keys are unavailable; try again later.")
        raise TokenInvalid("The token is signed with an unknown key (kid).")

    def _lookup(self, algorithm: str, kid: str | None) -> jwt.PyJWK | None:
        keys = [key for key in self._keys or () if key.algorithm_name == algorithm]
        if kid is not None:
            return next((key for key in keys if key.key_id == kid), None)
        # Without a kid, only an unambiguous key will do.
        return keys[0] if len(keys) == 1 else None

    async def _refresh(self) -> None:
        """Fetch the JWKS, at most one fetch at a time and, once keys are known, once per interval.

        Verifications that wait for a fetch in flight share its outcome. Without any keys,
        nothing can be verified, so each verification may try again.
        """
        attempts = self._attempts
        async with self._fetch_lock:
            if self._attempts != attempts:
                return
            now = self._clock()
            if self._keys is not None and now - self._attempted_at < self._jwks_refetch_interval:
                return
            try:
                keys = await self._fetch()
            except (
                aiohttp.ClientError,
                TimeoutError,
                ValueError,
                RecursionError,
                _JwksUnavailable,
            ) as exc:
                reason = (
                    f"HTTP {exc.status}"
                    if isinstance(exc, aiohttp.ClientResponseError)
                    else f"{type(exc).__name__}: {exc}"
                )
                fallback = "keeping the cached keys" if self._keys else "no signing keys yet"
                logger.warning(
                    "JWKS fetch from %s failed (%s); %s", self._jwks_log_url, reason, fallback
                )
            else:
                self._keys = keys
                self._fetched_at = now
                logger.debug("JWKS fetched: %d usable signing keys", len(keys))
            self._attempted_at = now
            self._attempts += 1

    async def _fetch(self) -> tuple[jwt.PyJWK, ...]:
        if self._session is None or self._jwks_url is None:
            raise RuntimeError("Authenticator.start() must be awaited before verifying tokens")
        async with self._session.get(self._jwks_url, headers={"Accept": "application/json"}) as r:
            r.raise_for_status()
            document = json.loads(await r.read())
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise _JwksUnavailable("the response is not a JWK set")
        return tuple(key for key in map(_signing_key, document["keys"]) if key is not None)


def _signing_key(jwk: object) -> jwt.PyJWK | None:
    """A JWK as a verification key, or None for keys this server does not use."""
    if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
        return None
    if jwk.get("alg") not in (None, *JWKS_ALGORITHMS) or not isinstance(jwk.get("kid", ""), str):
        return None
    try:
        key = jwt.PyJWK(jwk)
    except jwt.PyJWTError:
        return None
    return key if key.algorithm_name in JWKS_ALGORITHMS else None


def _principal(claims: dict[str, Any]) -> Principal:
    exp, sub = claims["exp"], claims["sub"]
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise TokenInvalid("The token's exp claim is not a number.")
    try:
        expires_at = float(exp)  # a JSON integer can be too large for a float
    except OverflowError:
        raise TokenInvalid("The token's exp claim is out of range.") from None
    if not math.isfinite(expires_at):
        raise TokenInvalid("The token's exp claim is not a number.")
    if expires_at <= time.time() - LEEWAY_SECONDS:
        raise TokenExpired()
    if not isinstance(sub, str) or not sub:
        raise TokenInvalid("The token's sub claim is not a string.")
    return Principal(subject=sub, expires_at=expires_at, claims=claims)


def mint_token(
    secret: str,
    user_id: uuid.UUID | str,
    ttl_seconds: int,
    *,
    audience: str | None = None,
    issuer: str | None = None,
) -> str:
    """A development HS256 token for `user_id`, valid for `ttl_seconds` from now."""
    if ttl_seconds <= 0:
        raise ValueError("ttl_seconds must be positive")
    now = int(time.time())
    claims: dict[str, Any] = {"sub": str(user_id), "iat": now, "exp": now + ttl_seconds}
    if audience is not None:
        claims["aud"] = audience
    if issuer is not None:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm=SECRET_ALGORITHM)
