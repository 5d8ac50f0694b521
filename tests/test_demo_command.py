"""`streamer demo`, run as a user runs it: embedded Postgres, a simulated file processor and
the page, in a fresh data directory; and on SIGTERM it (and `streamer serve`) leaves no
Postgres behind, unless that Postgres was running before."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from streamer.embedded import EmbeddedPostgres
from tests.conftest import free_port

START_TIMEOUT = 60.0  # a first run initialises a Postgres cluster
STOP_TIMEOUT = 30.0


class Command:
    """`streamer <command>` in a subprocess, with only a data dir and a port configured."""

    def __init__(self, data_dir: Path, log: Path, command: str = "demo") -> None:
        self.port = free_port()
        self.log = log
        # Nothing of the test run's own configuration: the demo must need none.
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMER_")}
        env.pop("DATABASE_URL", None)
        env.update(STREAMER_DATA_DIR=str(data_dir), STREAMER_PORT=str(self.port))
        with log.open("w") as out:  # a file, not a pipe: nothing can fill up and block it
            self.process = subprocess.Popen(
                [sys.executable, "-m", "streamer", command], env=env, stdout=out, stderr=out
            )

    def get(self, path: str) -> tuple[int, str, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.getheader("Content-Type", ""), response.read().decode()
        finally:
            conn.close()

    def wait_until_serving(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"streamer exited early:\n{self.output()}")
            try:
                if self.get("/healthz")[0] == 200:
                    return
            except OSError:
                pass  # not listening yet
            time.sleep(0.1)
        raise AssertionError(f"streamer did not answer within {START_TIMEOUT} s")

    def first_event(self, token: str) -> dict[str, Any]:
        """The first file-update the simulated processor causes, read off the SSE stream."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", f"/api/files/events?access_token={token}")
            response = conn.getresponse()
            assert response.status == 200
            assert response.getheader("Content-Type") == "text/event-stream"
            event = None
            for raw in response:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: ") and event == "file-update":
                    data: dict[str, Any] = json.loads(line.removeprefix("data: "))
                    return data
            raise AssertionError("the stream ended before any file-update")
        finally:
            conn.close()

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=STOP_TIMEOUT)

    def output(self) -> str:
        return self.log.read_text()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not under pytest's tmp_path: as root, Postgres runs as another user that must reach
    # its data, and a concurrent pytest session resets /tmp/pytest-of-<user> to 0700.
    root = Path(tempfile.mkdtemp(prefix="streamer-demo-test-"))
    yield root / "data"
    EmbeddedPostgres(root / "data" / "postgres").destroy()
    shutil.rmtree(root, ignore_errors=True)


def test_streamer_demo_serves_its_page_and_live_events_and_stops_only_a_postgres_it_started(
    data_dir: Path, tmp_path: Path
):
    demo = Command(data_dir, tmp_path / "demo.log")
    try:
        demo.wait_until_serving()
        status, content_type, page = demo.get("/demo/")
        assert status == 200 and content_type.startswith("text/html")
        assert "/static/demo.js" in page
        for asset in ("/static/demo.js", "/static/demo.css", "/static/streamer-client.js"):
            assert demo.get(asset)[0] == 200, asset

        status, content_type, body = demo.get("/demo/token")
        assert status == 200 and content_type.startswith("application/json")
        token = json.loads(body)
        user = uuid.UUID(token["user_id"])
        # The simulated processor is writing, and its changes reach the demo user's stream.
        event = demo.first_event(token["token"])
        assert event["eventType"] == "file-update" and event["file"]["filename"]

        assert demo.terminate() == 0, demo.output()
    finally:
        demo.kill()
    assert not EmbeddedPostgres(data_dir / "postgres").is_running(), (
        "streamer demo left its embedded Postgres running"
    )

    # `streamer serve` cleans up the same way.
    serve = Command(data_dir, tmp_path / "serve.log", "serve")
    try:
        serve.wait_until_serving()
        assert serve.terminate() == 0, serve.output()
    finally:
        serve.kill()
    assert not EmbeddedPostgres(data_dir / "postgres").is_running(), (
        "streamer serve left its embedded Postgres running"
    )

    # A server that was already running when the demo started is left running.
    server = EmbeddedPostgres(data_dir / "postgres")
    server.start()
    again = Command(data_dir, tmp_path / "again.log")
    try:
        again.wait_until_serving()
        status, _, body = again.get("/demo/token")
        assert status == 200
        assert json.loads(body)["user_id"] == str(user)  # one demo user per data dir
        assert again.terminate() == 0, again.output()
    finally:
        again.kill()
    assert server.is_running()
