"""What a newcomer meets first: a version, a token for any owner, parameters whose errors
say what was sent, and a one-row stream that a plain EventSource stops asking for once it
is over."""

from __future__ import annotations

import uuid

import jwt
import pytest

from streamer import __version__
from tests.client import open_stream
from tests.conftest import SECRET, Service, insert_file, token_for
from tests.test_cli import streamer

EVENTS = "/api/files/events"


def test_streamer_version_prints_the_packages_version() -> None:
    result = streamer("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"streamer {__version__}")
    assert __version__[0].isdigit()


async def test_healthz_says_the_version(service: Service) -> None:
    async with service.session.get(service.url("/healthz")) as response:
        assert await response.json() == {"status": "ok", "version": __version__}


@pytest.mark.parametrize("owner", ["alice", "org:42", str(uuid.UUID(int=7))])
def test_a_token_can_be_minted_for_any_owner_type(owner: str) -> None:
    result = streamer("token", "--user", owner, STREAMER_JWT_SECRET=SECRET)
    assert result.returncode == 0, result.stderr
    assert jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])["sub"] == owner


def test_the_help_speaks_of_any_table_and_any_owner() -> None:
    top = streamer("--help").stdout
    assert "any table made a feed" in top and "streamer.enable_feed" in top
    assert "for an owner (any feed's owner type)" in top
    assert "(uuid or text)" in streamer("token", "--help").stdout


def test_an_empty_owner_is_one_line() -> None:
    result = streamer("token", "--user", " ", STREAMER_JWT_SECRET=SECRET)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("streamer: --user must be an owner")


async def bad_request(service: Service, params: dict[str, str], **headers: str) -> dict[str, str]:
    headers["Authorization"] = f"Bearer {token_for(uuid.uuid4())}"
    async with service.session.get(service.url(EVENTS), params=params, headers=headers) as response:
        assert response.status == 400
        body: dict[str, str] = await response.json()
        return body


@pytest.mark.parametrize("value", ["1", "true", "YES", "on"])
async def test_snapshot_takes_every_spelling_its_message_names(service: Service, value: str):
    async with open_stream(
        service.session, service.url(EVENTS), token_for(uuid.uuid4()), params={"snapshot": value}
    ) as stream:
        assert stream.events[-1].name == "synced"


async def test_a_bad_snapshot_names_what_was_sent(service: Service) -> None:
    body = await bad_request(service, {"snapshot": "maybe"})
    assert body["code"] == "INVALID_PARAMETER"
    assert body["error"] == (
        "Query parameter snapshot must be 1, true, yes or on (or 0, false, no, off), not 'maybe'."
    )


async def test_a_bad_cursor_names_where_it_came_from_and_what_it_was(service: Service) -> None:
    body = await bad_request(service, {"last_event_id": "-1"})
    assert (body["code"], body["error"]) == (
        "INVALID_CURSOR",
        "The last_event_id parameter is not a cursor this server issued (an event's id:),"
        " it is '-1'.",
    )
    body = await bad_request(service, {}, **{"Last-Event-ID": "x" * 100})
    assert body["error"].startswith("The Last-Event-ID header is not a cursor")
    assert "'" + "x" * 40 + "…'" in body["error"]


@pytest.mark.parametrize("parameter", ["last_event_id", "snapshot"])
async def test_a_token_sent_as_a_parameter_is_never_repeated_in_the_error(
    service: Service, parameter: str
) -> None:
    token = token_for(uuid.uuid4())
    body = await bad_request(service, {parameter: token})
    assert body["error"].endswith("what looks like a token (not repeated here).")
    assert not any(part[:8] in body["error"] for part in token.split("."))


async def test_a_one_row_stream_that_is_over_answers_a_reconnect_with_204(
    service: Service, db, user: uuid.UUID
) -> None:
    done = await insert_file(db, user, status="ready", progress=100)
    gone = await insert_file(db, user)
    await db.execute("delete from files where id = $1", gone)
    headers = {"Authorization": f"Bearer {token_for(user)}"}
    async with service.session.get(service.url(f"/api/files/{done}/events"), headers=headers) as r:
        assert r.status == 200  # the first time: its state, then the end
        first = await r.text()
    cursor = next(line[4:] for line in first.splitlines() if line.startswith("id: "))
    for file_id in (done, gone):
        async with service.session.get(
            service.url(f"/api/files/{file_id}/events"),
            headers={**headers, "Last-Event-ID": cursor},
        ) as again:
            assert again.status == 204
        async with service.session.get(
            service.url(f"/api/files/{file_id}/events"),
            headers=headers,
            params={"last_event_id": cursor},
        ) as again:
            assert again.status == 204
    async with service.session.get(service.url(f"/api/files/{gone}/events"), headers=headers) as r:
        assert r.status == 404  # not a reconnect: a page asking for a file it cannot have
