"""Hostile requests: odd ids, cursors, parameters, methods, bodies, broken HTTP and clients that
trickle or vanish. Each gets a clear 4xx (JSON with a code wherever our code answers), no
stack trace, nothing logged at error level, and every other client is served meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import quote

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestServer
from yarl import URL

from streamer import keys
from streamer.app import create_app
from streamer.changes import MAX_HORIZON
from streamer.config import Settings
from streamer.server import server_options
from tests.client import open_stream
from tests.conftest import SECRET, Service, insert_file, send_raw, token_for

EVENTS = "/api/files/events"
TIMEOUT = 10.0


@pytest.fixture(autouse=True)
def nothing_logged_at_error(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A client's mistake is never the server's error: no error-level log line at all."""
    caplog.set_level(logging.INFO)
    yield
    records = caplog.get_records("setup") + caplog.get_records("call")
    errors = [f"{r.name}: {r.getMessage()}" for r in records if r.levelno >= logging.ERROR]
    assert errors == []


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


def item_url(service: Service, file_id: str) -> URL:
    """The one-file stream of an id exactly as given, percent-encoded, never normalised."""
    encoded = quote(file_id, safe="")
    return URL(service.url("/")).with_path(f"/api/files/{encoded}/events", encoded=True)


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


async def test_someone_elses_file_and_a_missing_file_are_indistinguishable(
    service: Service, db: asyncpg.Connection, user: uuid.UUID, other_user: uuid.UUID
) -> None:
    theirs = await insert_file(db, other_user, "their-secret.pdf")
    headers = {"Authorization": f"Bearer {token_for(user)}"}
    answers = []
    for file_id in (theirs, uuid.uuid4()):
        async with service.session.get(
            item_url(service, str(file_id)), headers=headers
        ) as response:
            answers.append((response.status, dict(response.headers).get("Content-Type"),
                            await response.read()))  # fmt: skip
    assert answers[0] == answers[1]
    status, _, body = answers[0]
    assert status == 404 and json.loads(body)["code"] == "NOT_FOUND"
    assert str(theirs).encode() not in body and b"their-secret" not in body


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


async def test_a_cursor_from_the_far_future_gets_a_reset_and_a_full_snapshot(
    service: Service, db: asyncpg.Connection, user: uuid.UUID
) -> None:
    mine = await insert_file(db, user, "mine.pdf")
    headers = {"Last-Event-ID": "9" * 19}
    async with open_stream(
        service.session, service.url(EVENTS), token_for(user), headers=headers
    ) as stream:
        names = [e.name for e in stream.events]
        assert names == ["reset", "file-update", "synced"]
        assert stream.events[1].file["id"] == str(mine)


async def test_unknown_query_parameters_are_ignored(
    service: Service, db: asyncpg.Connection, user: uuid.UUID
) -> None:
    params = {
        "callback": "alert(1)",
        "format": "json",
        "__proto__": "x",
        "user_id": str(uuid.uuid4()),
        "snapshot[]": "1",
        "x" * 1000: "y" * 1000,
    }
    async with open_stream(
        service.session, service.url(EVENTS), token_for(user), params=params
    ) as stream:
        file_id = await insert_file(db, user)
        assert (await stream.next()).file["id"] == str(file_id)


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


# -- broken HTTP, clients that vanish or trickle ------------------------------------------


@contextlib.asynccontextmanager
async def raw_connection(
    service: Service,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(service.server.host, service.server.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


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


async def test_clients_that_connect_and_leave_at_once_leave_nothing_behind(
    service: Service, db: asyncpg.Connection, user: uuid.UUID
) -> None:
    hub = service.app[keys.HUB]
    request = (
        f"GET {EVENTS} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token_for(user)}\r\n\r\n"
    ).encode()
    for _ in range(20):
        async with raw_connection(service):
            pass  # connect, then close
        async with raw_connection(service) as (_, writer):
            writer.write(request[:25])  # half a request line
        async with raw_connection(service) as (_, writer):
            writer.write(request)  # a whole request, gone before the answer
        async with raw_connection(service) as (reader, writer):
            writer.write(request)
            await reader.readuntil(b"synced")  # live, then gone
        async with raw_connection(service) as (reader, writer):
            writer.write(request)
            await reader.readuntil(b"synced")
            sock = writer.get_extra_info("socket")
            # Gone with a reset rather than a goodbye.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    async with asyncio.timeout(TIMEOUT):
        while hub.count:
            await asyncio.sleep(0.01)
    async with open_stream(service.session, service.url(EVENTS), token_for(user)) as stream:
        file_id = await insert_file(db, user)
        assert (await stream.next()).file["id"] == str(file_id)


async def test_a_client_trickling_its_headers_byte_by_byte_does_not_hold_up_anyone(
    service: Service, db: asyncpg.Connection, user: uuid.UUID, other_user: uuid.UUID
) -> None:
    slow_request = (
        f"GET {EVENTS} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token_for(other_user)}\r\n\r\n"
    ).encode()
    async with contextlib.AsyncExitStack() as stack:
        # Fifty clients that sent half a request line and went quiet.
        for _ in range(50):
            _, writer = await stack.enter_async_context(raw_connection(service))
            writer.write(b"GET /api/fi")
            await writer.drain()
        reader, slow = await stack.enter_async_context(raw_connection(service))
        url = service.url(EVENTS)
        async with open_stream(service.session, url, token_for(user)) as stream:
            # One byte of the slow request per event the normal stream receives.
            for i in range(40):
                slow.write(slow_request[i : i + 1])
                await slow.drain()
                file_id = await insert_file(db, user, f"{i}.pdf")
                assert (await stream.next()).file["id"] == str(file_id)
        # A new stream opens and closes meanwhile, too.
        async with open_stream(service.session, url, token_for(user)):
            pass
        slow.write(slow_request[40:])
        await slow.drain()
        head = await asyncio.wait_for(reader.readuntil(b"synced"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 200")


# -- forged notifications: anyone connected to the database can NOTIFY the channel --------


async def test_forged_notifications_neither_leak_a_row_nor_make_cursors_unusable(
    service: Service, db: asyncpg.Connection, user: uuid.UUID, other_user: uuid.UUID
) -> None:
    theirs = await insert_file(db, other_user, "their-secret.pdf")

    def change(op: str, file_id: uuid.UUID, owner: uuid.UUID, v: int, x: int, m: int) -> str:
        return json.dumps(
            {"f": "files", "o": op, "id": str(file_id), "u": str(owner), "v": v, "x": x, "m": m}
        )

    stranger = uuid.uuid4()
    forged = [
        "not json",
        "[1, 2, 3]",
        change("x", theirs, user, 1, 1, 1),
        # A reference to someone else's row, addressed to this user: read back, not sent.
        change("u", theirs, user, 1, 1, 1),
        # Horizons no transaction has: cursors must stay ones this server accepts.
        change("d", uuid.uuid4(), stranger, 1, 1, 10**30),
        change("d", uuid.uuid4(), stranger, 1, 1, -5),
        change("d", uuid.uuid4(), stranger, 10**30, 10**30, 2**62),
        # The largest horizon a cursor can carry: resuming from it gets a reset, not a 400.
        change("d", uuid.uuid4(), stranger, 1, 1, MAX_HORIZON),
    ]
    url = service.url(EVENTS)
    async with open_stream(service.session, url, token_for(user)) as stream:
        for payload in forged:
            await send_raw(db, payload)
        mine = await insert_file(db, user, "mine.pdf")
        event = await stream.next()
        assert event.file["id"] == str(mine)
        raw = "".join(e.data for e in stream.events)
        assert str(theirs) not in raw and "their-secret" not in raw
        cursor = event.id
    assert cursor is not None
    async with open_stream(
        service.session, url, token_for(user), headers={"Last-Event-ID": cursor}
    ) as resumed:
        assert resumed.events[-1].name == "synced"


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


async def test_a_client_that_never_finishes_its_headers_is_let_go_while_streams_live_on(
    database_url: str, db: asyncpg.Connection, user: uuid.UUID
) -> None:
    # The service as `streamer serve` runs it, with a head timeout short enough to watch.
    settings = Settings(jwt_secret=SECRET, database_url=database_url, heartbeat_seconds=0.1)
    app = create_app(settings, database_url)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(**{**server_options(), "keepalive_timeout": 0.5})
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=30))
    try:
        await app[keys.DISPATCHER].ready.wait()
        async with open_stream(session, str(server.make_url(EVENTS)), token_for(user)) as stream:
            reader, slow = await asyncio.open_connection(server.host, server.port)
            head = b"GET /api/files/events HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 200
            let_go = asyncio.create_task(reader.read())
            # One byte of the head per heartbeat of the live stream, ten a second.
            sent = 0
            async with asyncio.timeout(TIMEOUT):
                while not let_go.done():
                    await stream.until("heartbeat")
                    with contextlib.suppress(ConnectionError):
                        slow.write(head[sent : sent + 1])
                    sent += 1
            assert await let_go == b""  # closed, without an answer
            assert sent < len(head)
            slow.close()
            # The stream, older than the head timeout already, lives on and still streams.
            for _ in range(3):
                await stream.until("heartbeat")
            file_id = await insert_file(db, user)
            assert (await stream.next()).file["id"] == str(file_id)
    finally:
        await session.close()
        await server.close()
