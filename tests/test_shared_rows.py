"""Rows shared by many users (SPEC.md): a feed enabled with `owner_claim` compares its owner
column with that claim of the token (a dotted path; an array streams every owner in it),
403 FORBIDDEN without it, and the next token's claim decides what a resumed stream sees."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import jwt
import pytest

from streamer import keys
from tests.client import open_stream
from tests.conftest import SECRET, WRITER, Service, start_service, stop_service, wait_until

DOCS = """
    create table docs (
        id     bigint generated always as identity primary key,
        org_id text not null,
        title  text not null,
        status text not null default 'draft'
    );
    grant select, insert, update, delete on docs to {writer};
"""
EVENTS = "/api/docs/events"


def token(**claims: Any) -> str:
    body = {"sub": f"user-{uuid.uuid4()}", "exp": int(time.time()) + 3600, **claims}
    return jwt.encode(body, SECRET, algorithm="HS256")


def orgs(*names: str) -> str:
    return token(app_metadata={"org_id": list(names) if len(names) != 1 else names[0]})


@pytest.fixture
async def docs(service: Service, owner_db: asyncpg.Connection) -> AsyncIterator[None]:
    await owner_db.execute(DOCS.format(writer=WRITER))
    await owner_db.execute(
        "select streamer.enable_feed('docs', owner_column => 'org_id',"
        " owner_claim => 'app_metadata.org_id')"
    )
    feeds = service.app[keys.FEEDS]
    await wait_until(lambda: (f := feeds.get("docs")) is not None and f.owner_claim is not None)
    yield


async def add(db: asyncpg.Connection, org: str, title: str) -> int:
    doc_id: int = await db.fetchval(
        "insert into docs (org_id, title) values ($1, $2) returning id", org, title
    )
    return doc_id


def titles(events: list[Any]) -> set[str]:
    return {e.json["docs"]["title"] for e in events if e.name == "docs-update"}


async def test_a_scalar_claim_streams_that_owner_and_an_array_every_owner_in_it(
    service: Service, docs: None, db: asyncpg.Connection
) -> None:
    await add(db, "acme", "acme plan")
    await add(db, "globex", "globex plan")
    await add(db, "initech", "initech plan")
    url, params = service.url(EVENTS), {"snapshot": "1"}
    async with (
        open_stream(service.session, url, orgs("acme"), params=params) as one,
        open_stream(service.session, url, orgs("acme", "globex"), params=params) as both,
    ):
        assert titles(one.events) == {"acme plan"}
        assert titles(both.events) == {"acme plan", "globex plan"}
        moved = await add(db, "globex", "moving")
        assert (await both.next()).json["docs"]["title"] == "moving"
        # Out of both owners the token names: a delete there; into one: an update here.
        await db.execute("update docs set org_id = 'initech' where id = $1", moved)
        assert (await both.next()).name == "docs-deleted"
        await db.execute("update docs set org_id = 'acme' where id = $1", moved)
        assert (await one.next()).json["docs"]["id"] == moved
        assert (await both.next()).json["docs"]["id"] == moved


async def test_a_token_without_the_claim_is_forbidden_and_a_bad_claim_invalid(
    service: Service, docs: None, db: asyncpg.Connection
) -> None:
    doc_id = await add(db, "acme", "plan")
    cases = [
        (token(), 403, "FORBIDDEN"),
        (token(app_metadata={}), 403, "FORBIDDEN"),
        (token(app_metadata={"org_id": []}), 403, "FORBIDDEN"),
        (token(app_metadata={"org_id": [f"o{n}" for n in range(101)]}), 403, "FORBIDDEN"),
        (token(app_metadata={"org_id": {"name": "acme"}}), 401, "TOKEN_INVALID"),
        (token(app_metadata={"org_id": [True]}), 401, "TOKEN_INVALID"),
    ]
    for path in (EVENTS, f"/api/docs/{doc_id}/events"):
        for bad, status, code in cases:
            headers = {"Authorization": f"Bearer {bad}"}
            async with service.session.get(service.url(path), headers=headers) as answer:
                body = await answer.json()
                assert (answer.status, body["code"]) == (status, code), (path, body)
    assert service.app[keys.HUB].count == 0


async def test_the_one_row_route_follows_the_claim(
    service: Service, docs: None, db: asyncpg.Connection
) -> None:
    doc_id = await add(db, "globex", "plan")
    url = service.url(f"/api/docs/{doc_id}/events")
    async with service.session.get(url, headers={"Authorization": f"Bearer {orgs('acme')}"}) as r:
        assert r.status == 404
    async with open_stream(service.session, url, orgs("acme", "globex"), synced=False) as s:
        assert (await s.next()).json["docs"]["title"] == "plan"


async def test_the_next_token_decides_a_smaller_claim_resets_the_same_resumes(
    service: Service, docs: None, db: asyncpg.Connection
) -> None:
    await add(db, "acme", "acme plan")
    await add(db, "globex", "globex plan")
    url = service.url(EVENTS)
    async with open_stream(
        service.session, url, orgs("acme", "globex"), params={"snapshot": "1"}
    ) as s:
        cursor = s.last_id
    assert cursor is not None
    await add(db, "acme", "acme later")
    headers = {"Last-Event-ID": cursor}
    async with open_stream(service.session, url, orgs("globex", "acme"), headers=headers) as s:
        assert [e.name for e in s.events] == ["docs-update", "synced"]
        assert titles(s.events) == {"acme later"}
    async with open_stream(service.session, url, orgs("acme"), headers=headers) as s:
        assert s.events[0].name == "reset"
        assert titles(s.events) == {"acme plan", "acme later"}


async def test_the_per_user_limit_counts_the_tokens_sub(
    database_url: str, owner_db: asyncpg.Connection
) -> None:
    service = await start_service(database_url, max_streams_per_user=1)
    try:
        await owner_db.execute(DOCS.format(writer=WRITER))
        await owner_db.execute(
            "select streamer.enable_feed('docs', owner_column => 'org_id', owner_claim => 'org')"
        )
        feeds = service.app[keys.FEEDS]
        await wait_until(lambda: feeds.get("docs") is not None)
        same_sub = {"sub": "alice", "exp": int(time.time()) + 3600}
        first = jwt.encode({**same_sub, "org": "acme"}, SECRET, algorithm="HS256")
        second = jwt.encode({**same_sub, "org": "globex"}, SECRET, algorithm="HS256")
        async with open_stream(service.session, service.url(EVENTS), first):
            headers = {"Authorization": f"Bearer {second}"}
            async with service.session.get(service.url(EVENTS), headers=headers) as answer:
                assert answer.status == 429
    finally:
        await stop_service(service)


@pytest.mark.parametrize(
    ("claim", "error"),
    [("", "owner_claim must be"), ("a..b", "owner_claim must be"), (".org", "owner_claim must be")],
)
async def test_enable_feed_refuses_a_claim_that_is_no_path(
    owner_db: asyncpg.Connection, claim: str, error: str
) -> None:
    await owner_db.execute(DOCS.format(writer=WRITER))
    with pytest.raises(asyncpg.RaiseError, match=error):
        await owner_db.execute(
            "select streamer.enable_feed('docs', owner_column => 'org_id', owner_claim => $1)",
            claim,
        )
    assert not await owner_db.fetchval(
        "select exists (select from streamer.feeds where name = 'docs')"
    )


async def test_a_feed_keeps_its_claim_until_it_is_given_again(owner_db: asyncpg.Connection) -> None:
    await owner_db.execute(DOCS.format(writer=WRITER))
    enable = "select streamer.enable_feed('docs', owner_column => 'org_id'{})"
    claim = "select owner_claim from streamer.feeds where name = 'docs'"
    await owner_db.execute(enable.format(", owner_claim => 'org'"))
    await owner_db.execute(enable.format(""))  # as it is: nothing to do
    await owner_db.execute(enable.format(", event => 'doc', replace => true"))
    assert await owner_db.fetchval(claim) == "org"
    with pytest.raises(asyncpg.RaiseError, match="owner claim 'org'"):
        await owner_db.execute(enable.format(", owner_claim => 'team', event => 'doc'"))
    await owner_db.execute(enable.format(", owner_claim => null, event => 'doc', replace => true"))
    assert await owner_db.fetchval(claim) is None
