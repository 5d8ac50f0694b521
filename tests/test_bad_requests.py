"""Bad requests: ids that are not ids, cursors and parameters the server never issued,
methods other than GET, bodies, paths outside the static files, and HTTP that does not
parse. Each gets a clear 4xx (JSON with a code wherever our code answers), no stack trace,
nothing logged at error level, and the service serves on."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import asyncpg
import pytest
from yarl import URL

from streamer import keys
from tests.client import open_stream
from tests.conftest import Service, insert_file, token_for
from tests.raw_http import item_url, raw_connection

EVENTS = "/api/files/events"
TIMEOUT = 10.0

pytestmark = pytest.mark.usefixtures("nothing_logged_at_error")


def assert_no_stack_trace(body: bytes) -> None:
    assert b"Traceback" not in body
    assert b'File "' not in body
    assert b".py" not in body


async def answer(service: Service, method: str, path: str | URL, **request: Any) -> Any:
    """The JSON error answer to a request, after checking it is a clean 4xx."""
    url = path if isinstance(path, URL) else service.url(path)
    async with service.session.request(method, url, **request) as response:
        assert 400 <= response.status < 500, response.status
        body = await response.read()
        assert_no_stack_trace(body)
        if method == "HEAD":
            return response
        assert response.content_type == "application/json", body[:200]
        data = json.loads(body)
        assert set(data) == {"error", "code"} and data["error"]
        data["status"] = response.status
        return data


# -- ids ----------------------------------------------------------------------------------


NOT_UUIDS = [
    "'; drop table files;--",
    "' or '1'='1",
    "1 OR 1=1",
    "../../etc/passwd",
    "..%2F..%2Fetc%2Fpasswd",
    "%00",
    "\x00",
    "null",
    "undefined",
    "-1",
    "$(reboot)",
    "<script>alert(1)</script>",
    "файл.pdf",
    "😀",
    "é" * 100,
    str(uuid.uuid4()) + "x",
    str(uuid.uuid4())[:-1],
    "a" * 10_000,
]


async def test_an_id_that_is_not_a_uuid_is_invalid_id_whatever_it_looks_like(
    service: Service, db: asyncpg.Connection, user: uuid.UUID
) -> None:
    mine = await insert_file(db, user, "still-here.pdf")
    headers = {"Authorization": f"Bearer {token_for(user)}"}
    for file_id in NOT_UUIDS:
        data = await answer(service, "GET", item_url(service, file_id), headers=headers)
        assert (data["status"], data["code"]) == (400, "INVALID_ID"), file_id[:40]
    # Nothing reached the database as SQL, and the service carries on.
    assert await db.fetchval("select count(*) from files") == 1
    async with open_stream(
        service.session, str(item_url(service, str(mine))), token_for(user), synced=False
    ) as stream:
        assert (await stream.next()).file["filename"] == "still-here.pdf"


async def test_a_path_longer_than_any_real_one_gets_a_clean_400(
    service: Service, user: uuid.UUID
) -> None:
    headers = {"Authorization": f"Bearer {token_for(user)}"}
    async with service.session.get(item_url(service, "a" * 100_000), headers=headers) as response:
        assert response.status == 400
        assert_no_stack_trace(await response.read())


# -- cursors and parameters ---------------------------------------------------------------


BAD_CURSORS = [
    "abc",
    "-1",
    "+1",
    "1e5",
    "0x10",
    "1.5",
    "12abc",
    "NaN",
    "Infinity",
    "1 2",
    " ",
    "9" * 20,
    "9" * 10_000,
    "١٢٣",
    "\uff11\uff12\uff13",  # fullwidth digits
    "'; drop table files;--",
]


async def test_a_cursor_that_is_not_a_number_this_server_issues_is_invalid_cursor(
    service: Service, user: uuid.UUID
) -> None:
    headers = {"Authorization": f"Bearer {token_for(user)}"}
    for cursor in BAD_CURSORS:
        data = await answer(
            service, "GET", EVENTS, headers=headers, params={"last_event_id": cursor}
        )
        assert (data["status"], data["code"]) == (400, "INVALID_CURSOR"), cursor[:40]
        if cursor.isascii() and cursor.strip():  # a blank header is no header
            data = await answer(
                service, "GET", EVENTS, headers={**headers, "Last-Event-ID": cursor}
            )
            assert (data["status"], data["code"]) == (400, "INVALID_CURSOR"), cursor[:40]
    assert service.app[keys.HUB].count == 0


async def test_unknown_query_parameters_are_filters_on_no_column(
    service: Service, user: uuid.UUID
) -> None:
    """Every parameter but snapshot, last_event_id, access_token and select is a filter
    (SPEC.md, "Shaped streams"): one on a column the feed does not send is refused, named,
    and the owner column is no such column (a filter never widens whose rows are sent)."""
    headers = {"Authorization": f"Bearer {token_for(user)}"}
    params = {
        "callback": "alert(1)",
        "format": "json",
        "__proto__": "x",
        "user_id": f"eq.{uuid.uuid4()}",
        "snapshot[]": "1",
        "x" * 1000: "y" * 1000,
    }
    for name, value in params.items():
        data = await answer(service, "GET", EVENTS, headers=headers, params={name: value})
        assert (data["status"], data["code"]) == (400, "INVALID_FILTER"), name
        assert "unknown column" in data["error"] and name[:30] in data["error"], data
        assert len(data["error"]) < 400
    assert service.app[keys.HUB].count == 0


async def test_snapshot_must_be_one_or_zero(service: Service, user: uuid.UUID) -> None:
    headers = {"Authorization": f"Bearer {token_for(user)}"}
    for value in ("banana", "2", "-1", "truee", "\uff11", "1; drop table files"):
        data = await answer(service, "GET", EVENTS, headers=headers, params={"snapshot": value})
        assert (data["status"], data["code"]) == (400, "INVALID_PARAMETER"), value


# -- methods and bodies -------------------------------------------------------------------


async def test_methods_other_than_get_are_405_with_allow_get_and_open_nothing(
    service: Service, user: uuid.UUID
) -> None:
    headers = {"Authorization": f"Bearer {token_for(user)}"}
    for path in (EVENTS, f"/api/files/{uuid.uuid4()}/events"):
        for method in ("POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "PROPFIND"):
            data = await answer(service, method, path, headers=headers)
            assert (data["status"], data["code"]) == (405, "METHOD_NOT_ALLOWED"), method
        head = await answer(service, "HEAD", path, headers=headers)
        assert head.status == 405
        assert head.headers["Allow"] == "GET"
        # A method HTTP does not know never gets as far as routing: aiohttp's own 400.
        async with service.session.request("BREW", service.url(path)) as response:
            assert response.status == 400
            assert_no_stack_trace(await response.read())
    assert service.app[keys.HUB].count == 0


async def test_a_post_with_a_large_body_is_405_without_reading_it(
    service: Service, user: uuid.UUID
) -> None:
    headers = {"Authorization": f"Bearer {token_for(user)}"}
    data = await answer(service, "POST", EVENTS, headers=headers, data=b"x" * 5_000_000)
    assert (data["status"], data["code"]) == (405, "METHOD_NOT_ALLOWED")


async def test_a_get_with_a_body_streams_as_usual(
    service: Service, db: asyncpg.Connection, user: uuid.UUID
) -> None:
    headers = {"Content-Type": "application/json"}
    async with service.session.get(
        service.url(EVENTS),
        headers={**headers, "Authorization": f"Bearer {token_for(user)}"},
        data=json.dumps({"user_id": str(uuid.uuid4())}),
    ) as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
    async with open_stream(service.session, service.url(EVENTS), token_for(user)) as stream:
        file_id = await insert_file(db, user)
        assert (await stream.next()).file["id"] == str(file_id)


# -- paths --------------------------------------------------------------------------------


async def test_anything_under_static_but_its_own_files_is_a_json_404(service: Service) -> None:
    root = URL(service.url("/"))
    for path in (
        "/static/nonexistent.js",
        "/static/../pyproject.toml",
        "/static/..%2F..%2Fpyproject.toml",
        "/static/%2e%2e/%2e%2e/etc/passwd",
        "/static/",
        "/static/demo.css/..",
        "/static/DEMO.CSS",
    ):
        data = await answer(service, "GET", root.with_path(path, encoded=True))
        assert (data["status"], data["code"]) == (404, "NOT_FOUND"), path
    async with service.session.get(service.url("/static/demo.css")) as response:
        assert response.status == 200
        assert response.content_type == "text/css"


# -- HTTP that does not parse -------------------------------------------------------------


async def raw_exchange(service: Service, request: bytes) -> bytes:
    """Send bytes as they are; read the answer until the server closes."""
    async with raw_connection(service) as (reader, writer):
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), TIMEOUT)


UNPARSEABLE = {
    "not-http": b"GARBAGE\r\n\r\n",
    "tls-hello": bytes.fromhex("16030100a5010000a10303") + b"\x00" * 64,
    "http-9": b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    "header-without-colon": b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    "nul-in-header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "space-before-colon": b"GET /healthz HTTP/1.1\r\nHost : x\r\n\r\n",
    "smuggling": (
        b"POST /api/files/events HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "bad-chunk": (
        b"POST /api/files/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\nhello\r\n0\r\n\r\n"
    ),
    "too-many-headers": b"GET /healthz HTTP/1.1\r\n"
    + b"".join(b"X-%d: %d\r\n" % (i, i) for i in range(300))
    + b"\r\n",
    "huge-header": b"GET /healthz HTTP/1.1\r\nX-Big: " + b"b" * 200_000 + b"\r\n\r\n",
}


async def test_requests_that_do_not_parse_get_a_clean_400(service: Service) -> None:
    for case, request in UNPARSEABLE.items():
        reply = await raw_exchange(service, request)
        status = reply.split(b"\r\n", 1)[0].split(b" ")
        assert status[0].startswith(b"HTTP/1.") and status[1].startswith(b"4"), (case, reply)
        assert_no_stack_trace(reply)
    async with service.session.get(service.url("/healthz")) as response:
        assert response.status == 200
