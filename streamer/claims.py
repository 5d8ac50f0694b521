"""Whose rows a token may stream in a feed (SPEC.md, "Rows shared by many users").

A feed without an owner claim compares its owner column with the token's `sub`. A feed
enabled with `owner_claim => 'app_metadata.org_id'` compares it with that claim instead:
a dotted path into the token's objects, whose value is one owner or an array of up to
MAX_OWNERS of them. A token without it may not use the feed (403 FORBIDDEN).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from streamer.auth import Principal, as_uuid
from streamer.errors import Forbidden, TokenInvalid
from streamer.feeds import Feed

MAX_OWNERS = 100


def owners(principal: Principal, feed: Feed) -> tuple[str, ...]:
    """The owners whose rows the token may stream in `feed`, sorted, each as the owner
    column renders as text."""
    if feed.owner_claim is None:
        return (principal.owner(feed.owner_type),)
    claim = feed.owner_claim
    value = reach(principal.claims, claim)
    if value is None:
        raise Forbidden(f"The token has no {claim} claim, which the {feed.name} feed needs.")
    values = value if isinstance(value, list) else [value]
    if not values:
        raise Forbidden(f"The token's {claim} claim names no owner.")
    if len(values) > MAX_OWNERS:
        raise Forbidden(
            f"The token's {claim} claim names {len(values)} owners; a stream follows at most"
            f" {MAX_OWNERS}."
        )
    found = {_owner(v, claim, feed.owner_type) for v in values}
    return tuple(sorted(found))


def reach(claims: Mapping[str, Any], path: str) -> Any:
    """The claim at a dotted path, or None. A key that itself holds dots (Hasura's
    `https://hasura.io/jwt/claims`) is found too: at each level the longest run of the
    path's parts that is a key is taken."""
    parts = path.split(".")
    value: Any = claims
    while parts:
        if not isinstance(value, Mapping):
            return None
        for n in range(len(parts), 0, -1):
            key = ".".join(parts[:n])
            if key in value:
                value, parts = value[key], parts[n:]
                break
        else:
            return None
    return value


def _owner(value: Any, claim: str, owner_type: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise TokenInvalid(f"The token's {claim} claim holds something that is no owner.")
    text = str(value)
    if owner_type == "uuid":
        return as_uuid(text, f"The token's {claim} claim holds an owner that is not a UUID.")
    if not text:
        raise TokenInvalid(f"The token's {claim} claim holds an empty owner.")
    return text
