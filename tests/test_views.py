"""A selecting view's rows: projected in Python as Postgres renders jsonb (numbers' digits
kept), and claims reached by their dotted path."""

from __future__ import annotations

import asyncpg
import pytest

from streamer.claims import reach
from streamer.shapes import load_row
from streamer.views import dump

ROWS = [
    '{"id": 1, "n": 1.50, "f": 1e+20, "big": 123456789012345678901234567890.000001}',
    '{"id": "x", "nested": {"a": [1, 2.0, {"b": null}], "t": true}, "s": "caf\\u00e9 \\"q\\" \\n"}',
    '{"id": 2, "e": [], "o": {}, "neg": -0.0001, "u": "\\ud83d\\ude00 ☃"}',
]


@pytest.mark.parametrize("text", ROWS)
async def test_a_projection_is_what_postgres_renders(database_url: str, text: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        rendered = await conn.fetchval("select $1::jsonb::text", text)
        keys = sorted(load_row(rendered))[1:]
        kept = await conn.fetchval("select ($1::jsonb - $2::text[])::text", rendered, keys[:1])
    finally:
        await conn.close()
    row = load_row(rendered)
    assert dump(row) == rendered
    assert dump({k: v for k, v in row.items() if k not in keys[:1]}) == kept


def test_a_claim_is_reached_by_its_dotted_path_and_keys_may_hold_dots() -> None:
    claims = {
        "org": "acme",
        "app_metadata": {"org_id": ["a", "b"], "team": {"id": 7}},
        "https://hasura.io/jwt/claims": {"x-hasura-org-id": "h1"},
    }
    assert reach(claims, "org") == "acme"
    assert reach(claims, "app_metadata.org_id") == ["a", "b"]
    assert reach(claims, "app_metadata.team.id") == 7
    assert reach(claims, "https://hasura.io/jwt/claims.x-hasura-org-id") == "h1"
    assert reach(claims, "app_metadata.missing") is None
    assert reach(claims, "org.deeper") is None
