"""`streamer serve` as an operator runs it: settings checked at start-up, SIGTERM (while
serving, or while starting up), JSON logs, several workers on one port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from streamer.embedded import EmbeddedPostgres
from tests.client import open_stream
from tests.conftest import SECRET, SOURCE, free_port, insert_file, token_for, wait_until
from tests.scrape import scrape

EVENTS = "/api/files/events"
NOWHERE = "postgresql://streamer@127.0.0.1:1/nowhere"  # nothing listens on port 1
TIMEOUT = 20.0


def environment(**variables: str) -> dict[str, str]:
    """This environment without any streamer setting, plus `variables`."""
    inherited = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("STREAMER_")
        and name not in ("DATABASE_URL", "PROMETHEUS_MULTIPROC_DIR")
    }
    return {**inherited, **variables}


def streamer(*args: str, **variables: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamer", *args],
        env=environment(**variables),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


# -- settings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("STREAMER_PORT", "abc"),
        ("STREAMER_PORT", "70000"),
        ("STREAMER_HEARTBEAT_SECONDS", "-1"),
        ("STREAMER_CORS_ORIGINS", "*"),
        ("STREAMER_MAX_STREAMS_PER_USER", "0"),
        ("STREAMER_LOG_FORMAT", "xml"),
        ("STREAMER_JWKS_URL", "jwks.json"),
        ("STREAMER_SOURCE", "kafka"),
        ("DATABASE_URL", "host=localhost dbname=files"),
    ],
)
def test_an_invalid_setting_stops_start_up_with_one_line_naming_it(name: str, value: str):
    variables = {"DATABASE_URL": NOWHERE, "STREAMER_JWT_SECRET": SECRET, name: value}
    result = streamer("serve", **variables)
    assert result.returncode != 0
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert re.search(rf"(?<![A-Z_]){name}\b", line), line  # that very name, no other


def test_a_database_without_a_secret_or_jwks_stops_start_up_with_one_line():
    result = streamer("serve", DATABASE_URL=NOWHERE)
    assert result.returncode != 0
    [line] = result.stderr.splitlines()
    assert "STREAMER_JWT_SECRET" in line and "STREAMER_JWKS_URL" in line


def test_an_unreachable_database_stops_start_up_with_one_line():
    result = streamer("serve", DATABASE_URL=NOWHERE, STREAMER_JWT_SECRET=SECRET)
    assert result.returncode != 0
    [line] = result.stderr.splitlines()
    assert "DATABASE_URL" in line


def test_migrations_use_the_direct_listen_connection_when_one_is_set(database_url):
    # DATABASE_URL through PgBouncer in transaction mode cannot hold migrate's advisory lock.
    result = streamer("migrate", DATABASE_URL=NOWHERE, STREAMER_LISTEN_DATABASE_URL=database_url)
    assert result.returncode == 0, result.stderr
    assert "none needed" in result.stdout


def test_a_minted_token_opens_nothing_but_names_its_user():
    user = uuid.uuid4()
    result = streamer("token", "--user", str(user), "--ttl", "60", STREAMER_JWT_SECRET=SECRET)
    assert result.returncode == 0, result.stderr
    import jwt

    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == str(user)
    assert claims["exp"] - claims["iat"] == 60


# -- a running service ---------------------------------------------------------------


@dataclass
class Serving:
    """`streamer serve` in a subprocess, its stderr read line by line as it comes."""

    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    _grew: asyncio.Event = field(default_factory=asyncio.Event)
    _reader: asyncio.Task[None] | None = None
    base_url: str = ""

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            self.lines.append(raw.decode().rstrip("\n"))
            self._grew.set()
        self._grew.set()

    async def wait_for(self, count: int, match: Callable[[str], bool]) -> list[str]:
        """The first `count` lines that match, waiting for them."""
        async with asyncio.timeout(TIMEOUT):
            while True:
                self._grew.clear()
                found = [line for line in self.lines if match(line)]
                if len(found) >= count:
                    return found[:count]
                assert self._reader is not None
                if self._reader.done():
                    raise AssertionError("streamer exited:\n" + "\n".join(self.lines))
                await self._grew.wait()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]

    def sigterm(self) -> None:
        """os.kill, not Process.send_signal: that polls, and a poll that reaps a process
        exiting meanwhile leaves asyncio's watcher without its exit code (255)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGTERM)

    async def stop(self) -> int:
        self.sigterm()
        async with asyncio.timeout(TIMEOUT):
            code = await self.process.wait()
            assert self._reader is not None
            await self._reader
        return code


@contextlib.asynccontextmanager
async def serving(
    database_url: str, *, workers: int = 1, **variables: str
) -> AsyncIterator[Serving]:
    """Run `streamer serve`, JSON logs on stderr, until every worker is serving."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "streamer",
        "serve",
        "--no-migrate",
        "--workers",
        str(workers),
        env=environment(
            **{
                "DATABASE_URL": database_url,
                "STREAMER_JWT_SECRET": SECRET,
                "STREAMER_LOG_FORMAT": "json",
                "STREAMER_SOURCE": SOURCE,
                **variables,
            }
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its workers too can be killed if a test fails
    )
    server = Serving(process)
    server._reader = asyncio.create_task(server._read())
    try:
        serving_lines = await server.wait_for(workers, lambda line: "serving on" in line)
        server.base_url = json.loads(serving_lines[0])["message"].removeprefix("serving on ")
        yield server
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # a worker left behind by a failure
        await server._reader


async def test_sigterm_ends_open_streams_cleanly_and_exits_0(database_url, user):
    async with (
        serving(database_url, STREAMER_PORT="0") as server,
        aiohttp.ClientSession() as session,
    ):
        url = f"{server.base_url}{EVENTS}"
        headers = {"Authorization": f"Bearer {token_for(user)}"}
        async with session.get(url, headers=headers) as response:
            assert response.status == 200
            assert await response.content.readuntil(b"event: synced\n")
            server.sigterm()
            async with asyncio.timeout(TIMEOUT):
                # The stream ends with the end of its chunked body: a clean end, not a cut.
                await response.content.read()
            assert response.content.is_eof()
        # A second SIGTERM while it stops (stop() sends one) changes nothing.
        assert await server.stop() == 0
        messages = [record["message"] for record in server.records()]
        assert "stopping: ending open streams" in messages


async def test_sigterms_until_it_exits_change_nothing(database_url, user):
    """An impatient operator (or two supervisors) sends SIGTERM again and again: the
    shutdown the first began ends as it would have, with 0."""
    async with serving(database_url, STREAMER_PORT="0") as server:
        async with asyncio.timeout(TIMEOUT):
            while server.process.returncode is None:
                server.sigterm()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(server.process.wait()), 0.001)
        code = await server.process.wait()
        assert server._reader is not None
        await server._reader  # every line it wrote
        assert code == 0, "\n".join(server.lines)
        assert "Traceback" not in "\n".join(server.lines)


async def test_json_logs_are_one_object_per_line_and_never_contain_a_token(database_url, user):
    token = token_for(user)
    async with (
        serving(database_url, STREAMER_PORT="0") as server,
        aiohttp.ClientSession() as session,
    ):
        url = f"{server.base_url}{EVENTS}"
        async with open_stream(session, url, params={"access_token": token}):
            pass
        async with session.get(f"{url}?access_token={token}x") as response:
            assert response.status == 401
        async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as response:
            assert response.status == 200
        await server.wait_for(3, lambda line: '"aiohttp.access"' in line)
        assert await server.stop() == 0

    records = server.records()  # every line parses as JSON
    assert all({"time", "level", "logger", "pid", "message"} <= set(r) for r in records)
    access = [r for r in records if r["logger"] == "aiohttp.access"]
    assert {r["status"] for r in access} == {200, 401}
    assert all(r["path"].startswith(EVENTS) for r in access)
    assert sum("access_token=[redacted]" in r["path"] for r in access) == 2
    assert token.split(".")[1] not in "\n".join(server.lines)


async def test_two_workers_share_one_port_and_every_stream_sees_every_event_of_its_user(
    database_url, db
):
    users = [uuid.uuid4() for _ in range(3)]
    port = str(free_port())
    async with (
        serving(database_url, workers=2, STREAMER_PORT=port) as server,
        aiohttp.ClientSession() as session,
        contextlib.AsyncExitStack() as streams,
    ):
        url = f"{server.base_url}{EVENTS}"
        # Enough streams that the kernel hands some to each worker.
        opened = [
            (user, await streams.enter_async_context(open_stream(session, url, token_for(user))))
            for user in users
            for _ in range(6)
        ]
        files = {u: [str(await insert_file(db, u, f"{i}.pdf")) for i in range(3)] for u in users}
        for user, stream in opened:
            assert [(await stream.next()).file["id"] for _ in range(3)] == files[user]

        # Whichever worker a scrape lands on, it reports both.
        samples = await scrape(session, f"{server.base_url}/metrics")
        assert samples["streamer_streams_open"] == len(opened)
        assert samples["streamer_events_sent_total"] == 3 * len(opened)
        await streams.aclose()
        assert await server.stop() == 0

    records = server.records()
    changes_flow = ("listening on channel", "decoding the feed tables")  # NOTIFY, WAL
    listening = {r["pid"] for r in records if r["message"].startswith(changes_flow)}
    assert len(listening) == 2, "\n".join(server.lines)  # one change connection per worker
    served = {r["pid"] for r in records if r["logger"] == "aiohttp.access" and r["path"] == EVENTS}
    assert served == listening  # and both served streams


async def test_a_worker_that_dies_stops_the_whole_service_for_its_supervisor_to_restart(
    database_url,
):
    async with serving(database_url, workers=2, STREAMER_PORT=str(free_port())) as server:
        lines = await server.wait_for(2, lambda line: "serving on" in line)
        dead, other = (json.loads(line)["pid"] for line in lines)
        os.kill(dead, signal.SIGKILL)
        async with asyncio.timeout(TIMEOUT):
            assert await server.process.wait() == 1
        with pytest.raises(ProcessLookupError):
            os.kill(other, 0)  # ended, and reaped by the service
        errors = [r["message"] for r in server.records() if r["level"] == "error"]
        assert errors == [f"worker {dead} exited (-9); stopping the others"]


@pytest.mark.parametrize("moment", ["postgres-starting", "migrating"])
async def test_sigterm_during_start_up_stops_the_embedded_postgres_and_exits_0(
    tmp_path: Path, moment: str
):
    data_dir = tmp_path / "data"
    postgres = EmbeddedPostgres(data_dir / "postgres")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "streamer",
        "serve",
        env=environment(
            STREAMER_DATA_DIR=str(data_dir), STREAMER_PORT="0", STREAMER_LOG_FORMAT="json"
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    server = Serving(process)
    server._reader = asyncio.create_task(server._read())
    try:
        if moment == "postgres-starting":
            # The server has begun its log: pg_ctl waits for it to accept connections.
            log = postgres.data_dir / "postgres.log"
            await wait_until(lambda: log.exists() and "starting PostgreSQL" in log.read_text(), 60)
        else:
            await server.wait_for(1, lambda line: "applied migration" in line)
        code = await server.stop()
        assert not postgres.is_running()
        assert code == 0, "\n".join(server.lines)
        assert "Traceback" not in "\n".join(server.lines)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        postgres.destroy()


async def test_the_listen_backlog_is_the_configured_one(database_url):
    """A crowd reconnecting at once (a restart under 100,000 tabs) meets the kernel's queue
    of connections not yet accepted: aiohttp's 128 dropped most of them (bench `crowd`).
    `ss` shows a listening socket's backlog as its Send-Q."""
    async with serving(database_url, STREAMER_PORT="0", STREAMER_LISTEN_BACKLOG="777") as server:
        port = server.base_url.rsplit(":", 1)[1]
        ss = await asyncio.create_subprocess_exec(
            "ss", "-Hltn", f"sport = :{port}", stdout=subprocess.PIPE
        )
        listing = (await ss.communicate())[0].decode().split()
        assert listing[0] == "LISTEN" and listing[2] == "777", listing
        assert await server.stop() == 0
