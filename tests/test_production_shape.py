"""The production shape in a real browser: Chromium over HTTP/2 to nginx (deploy/nginx.conf),
which sends /api/ to two streamer nodes and the pages to the SvelteKit app, each a process
of its own (examples/stack.py, as `make example` runs them), on a real Postgres. The two
nodes are one fleet through a real Redis of the stack's own: one reads the database.

Eight tabs of one user stream through one HTTP/2 connection (over HTTP/1.1 the seventh
would wait for a free connection). The node that reads is SIGKILLed while they are open:
the other reads instead, the tabs it served come back through the other node with what was
written meanwhile. Then the broker is SIGKILLed: the tabs stay open, and once the stack
has restarted it they catch up with what was written while it was gone. Every tab ends
with exactly the database's rows. The files page's tabs but "All" are streams the server
filters: each shows exactly its files, as they come and go.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from examples.stack import ROOT, SITE, Ports, Stack
from tests.conftest import SECRET, insert_file, token_for, wait_until
from tests.scrape import scrape
from tests.test_browser import CHROMIUM_FLAGS, chromium

ARTIFACTS = Path(__file__).parent / "artifacts"
TABS = 8
WAIT = 20.0  # seconds for every tab to show a change; it normally takes well under one
BROWSER_FLAGS = (
    *CHROMIUM_FLAGS,
    "--ignore-certificate-errors",  # the stack's own self-signed certificate
    # Tabs in the background keep their timers and rendering, as a user's open tabs do.
    "--disable-background-timer-throttling",
    "--disable-backgrounding-occluded-windows",
    "--disable-renderer-backgrounding",
)
# Each row as the files page shows it: its data attributes and name.
READ_ROWS = """
return Object.fromEntries([...document.querySelectorAll('#files [data-file-id]')].map(
  (row) => [row.dataset.fileId, {status: row.dataset.status, progress: row.dataset.progress,
   version: row.dataset.version, name: row.querySelector('.file-name').textContent}]))
"""
READ_CONNECTION = "return document.querySelector('#connection')?.dataset.status ?? null"


@pytest.fixture
async def stack(database_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    stack = Stack(
        tmp_path / "stack",
        database_url,
        SECRET,
        Ports.free(),
        # The browser's own reconnect delay: quick, for a quick test.
        node_env={"STREAMER_RETRY_MS": "300", "STREAMER_LOG_LEVEL": "warning"},
    )
    await asyncio.to_thread(stack.start)
    try:
        yield stack
    finally:
        await asyncio.to_thread(stack.stop)


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    with chromium(monkeypatch, BROWSER_FLAGS) as driver:
        yield driver


class Tabs:
    """The browser's tabs of one signed-in user, read through the pages' data attributes."""

    def __init__(self, driver: Any, stack: Stack) -> None:
        self.driver = driver
        self.stack = stack

    def sign_in(self, token: str) -> None:
        """The development sign-in link: it keeps the token in a cookie, lands on /files."""
        self.driver.get(f"{self.stack.url}/signin?token={token}")
        assert self.driver.current_url == f"{self.stack.url}/files"

    def protocol(self) -> str:
        protocol: str = self.driver.execute_script(
            "return performance.getEntriesByType('navigation')[0].nextHopProtocol"
        )
        return protocol

    def open(self, path: str, count: int) -> None:
        for _ in range(count):
            self.driver.switch_to.new_window("tab")
            self.driver.get(self.stack.url + path)

    def each(self, script: str) -> list[Any]:
        """`script`'s value in every tab."""
        values = []
        for handle in self.driver.window_handles:
            self.driver.switch_to.window(handle)
            values.append(self.driver.execute_script(script))
        return values

    def wait(self, condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.05)

    def all_show(self, expected: dict[str, dict[str, str]], what: str) -> None:
        """Wait until every tab is live and shows exactly these rows."""
        seen: list[Any] = []

        def every_tab_matches() -> bool:
            nonlocal seen
            seen = list(zip(self.each(READ_CONNECTION), self.each(READ_ROWS), strict=True))
            return all(status == "live" and rows == expected for status, rows in seen)

        try:
            self.wait(every_tab_matches, what)
        except AssertionError as exc:
            differ = [(i, s, rows) for i, (s, rows) in enumerate(seen) if rows != expected]
            raise AssertionError(f"{exc}: the database has {expected}; tabs: {differ}") from None

    def choose(self, label: str) -> None:
        """Click the files page's tab of that label."""
        clicked = self.driver.execute_script(
            "const tab = [...document.querySelectorAll('.filters button')]"
            ".find((button) => button.textContent.trim() === arguments[0]);"
            "tab?.click(); return Boolean(tab)",
            label,
        )
        assert clicked, f"no tab {label!r} on the page"

    def keep_one(self) -> None:
        """Close every tab but one, which comes to the front (a hidden tab's animations
        never end: its timeline stands still)."""
        first, *others = self.driver.window_handles
        for handle in others:
            self.driver.switch_to.window(handle)
            self.driver.close()
        self.driver.switch_to.window(first)

    def screenshot(self, name: str) -> None:
        """Once transitions and bars have settled: the page as a user looks at it."""
        self.wait(
            lambda: self.driver.execute_script("return document.visibilityState") == "visible",
            "the tab to be in front",
        )
        # A picture for people, not an assertion: while rows keep changing (the simulated
        # processor, a slow machine) bars may never be still, so a settled page is waited for
        # a few seconds at most.
        with contextlib.suppress(AssertionError):
            self.wait(
                lambda: self.driver.execute_script(
                    "return document.getAnimations().every((a) => a.playState !== 'running'"
                    " || a.effect.getComputedTiming().iterations === Infinity)"
                ),
                "animations to settle",
                timeout=5,
            )
        ARTIFACTS.mkdir(exist_ok=True)
        assert self.driver.save_screenshot(str(ARTIFACTS / name))

    def problems(self) -> list[Any]:
        """Console errors, but the failed reconnects to a node that is gone."""
        entries = self.driver.get_log("browser")
        return [e for e in entries if e["level"] == "SEVERE" and "/api/" not in e["message"]]


async def database_rows(
    db: asyncpg.Connection, user: uuid.UUID, *statuses: str
) -> dict[str, dict[str, str]]:
    """What every tab should show: the user's rows (of these statuses, if given) as the
    database has them now."""
    rows = await db.fetch(
        "select id, status, progress, streamer_version as version, filename from files"
        " where user_id = $1 and (cardinality($2::text[]) = 0 or status = any($2))",
        user,
        list(statuses),
    )
    return {
        str(row["id"]): {
            "status": row["status"],
            "progress": str(row["progress"]),
            "version": str(row["version"]),
            "name": row["filename"],
        }
        for row in rows
    }


async def node_ready(session: aiohttp.ClientSession, stack: Stack, node: int) -> bool:
    try:
        async with session.get(stack.node_url(node) + "/readyz") as response:
            return response.status == 200
    except aiohttp.ClientConnectionError:
        return False


async def streams_open(stack: Stack, session: aiohttp.ClientSession, node: int) -> float:
    """Streams a node holds, from its own /metrics (not public through nginx)."""
    return (await scrape(session, stack.node_url(node) + "/metrics"))["streamer_streams_open"]


async def readers(stack: Stack, session: aiohttp.ClientSession) -> list[int]:
    """The nodes that read the database for the fleet (streamer_fleet_reader 1), by index."""
    reading = []
    for node in (0, 1):
        with contextlib.suppress(aiohttp.ClientConnectionError):
            metrics = await scrape(session, stack.node_url(node) + "/metrics")
            if metrics["streamer_fleet_reader"] == 1:
                reading.append(node)
    return reading


async def test_eight_tabs_through_nginx_see_every_row_and_outlive_the_reader_and_the_broker(
    stack: Stack, browser: Any, db: asyncpg.Connection
) -> None:
    user = uuid.uuid4()
    for name in ("invoice-7.pdf", "holiday.mov", "team-photo.jpg"):
        await insert_file(db, user, name)
    await insert_file(db, uuid.uuid4(), "someone-elses.pdf")
    tabs = Tabs(browser, stack)
    tabs.sign_in(token_for(user))
    assert tabs.protocol() == "h2"
    tabs.open("/files", TABS - 1)
    tabs.all_show(await database_rows(db, user), f"{TABS} tabs to show the user's files")

    # No stickiness: the eight streams are spread over both nodes.
    async with aiohttp.ClientSession() as session:
        held = [await streams_open(stack, session, node) for node in (0, 1)]
        assert sum(held) == TABS and all(held), held

        await insert_file(db, user, "new-row.csv", file_type="text/csv")
        tabs.all_show(await database_rows(db, user), "a new row in every tab")

        # The node that reads the database for the fleet dies under its open streams,
        # killed from outside by the pid `make example` prints; the writer carries on
        # meanwhile.
        reading = await readers(stack, session)
        assert len(reading) == 1, f"one reader for the fleet, not {reading}"
        dead, other = reading[0], 1 - reading[0]
        assert [stack.nodes[dead]] == await asyncio.to_thread(stack.reading)
        killed = stack.nodes[dead].popen
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        await insert_file(db, user, "while-a-node-died.zip", file_type="application/zip")
        await db.execute(
            "update files set status = 'processing', progress = 35,"
            " processing_stage = 'transcoding' where user_id = $1 and filename = 'holiday.mov'",
            user,
        )
        await db.execute(
            "delete from files where user_id = $1 and filename = 'invoice-7.pdf'", user
        )
        tabs.all_show(await database_rows(db, user), "what was written as the reader died")

        # The other node reads now (within 10 s), and every stream goes through it, live.
        async def the_other_reads() -> bool:
            return await readers(stack, session) == [other]

        await wait_until(the_other_reads, timeout=10)

        async def all_on_the_other_node() -> bool:
            return await streams_open(stack, session, other) == TABS

        await wait_until(all_on_the_other_node, timeout=WAIT)
        await db.execute(
            "update files set status = 'ready', progress = 100, processing_stage = null"
            " where user_id = $1 and filename = 'holiday.mov'",
            user,
        )
        tabs.all_show(await database_rows(db, user), "a change after the node died")

        # The stack restarts it (as `make example` does every half second), nothing else.
        revived = stack.tend()
        assert revived is not None and f"pid {killed.pid}) exited with -9" in revived
        assert stack.dead() is None
        await wait_until(lambda: node_ready(session, stack, dead), timeout=WAIT)
        assert stack.tend() is None  # it serves: nothing else to restart

        # The broker dies under the eight tabs, by the pid `make example` prints. Both nodes
        # know at once (/readyz 503), the tabs stay open, and the writer carries on.
        broker = stack.broker.popen
        os.kill(broker.pid, signal.SIGKILL)
        broker.wait()

        async def no_node_ready() -> bool:
            return not any([await node_ready(session, stack, node) for node in (0, 1)])

        await wait_until(no_node_ready, timeout=WAIT)
        await insert_file(db, user, "while-the-broker-died.csv", file_type="text/csv")
        await db.execute(
            "update files set status = 'failed', error_message = 'corrupt'"
            " where user_id = $1 and filename = 'team-photo.jpg'",
            user,
        )
        await db.execute("delete from files where user_id = $1 and filename = 'new-row.csv'", user)
        assert sum([await streams_open(stack, session, node) for node in (0, 1)]) == TABS
        assert all(node.popen.poll() is None for node in stack.nodes)  # none exits

        # The stack restarts it on the same port; the nodes come back to it and every tab
        # catches up with what was written while it was gone.
        revived = stack.tend()
        assert revived is not None and revived.startswith(f"redis (pid {broker.pid}) exited")
        assert stack.broker.popen.pid != broker.pid

        async def both_ready() -> bool:
            return all([await node_ready(session, stack, node) for node in (0, 1)])

        await wait_until(both_ready, timeout=WAIT)
        tabs.all_show(await database_rows(db, user), "what was written while the broker died")
        assert len(await readers(stack, session)) == 1
        await db.execute(
            "update files set status = 'ready', progress = 100 where user_id = $1"
            " and filename = 'while-the-broker-died.csv'",
            user,
        )
        tabs.all_show(await database_rows(db, user), "a change after the broker came back")
        assert stack.tend() is None and stack.dead() is None
    assert tabs.problems() == []
    tabs.keep_one()
    tabs.screenshot("production-files.png")


async def test_a_files_page_follows_one_file_until_it_is_ready(
    stack: Stack, browser: Any, db: asyncpg.Connection
) -> None:
    user = uuid.uuid4()
    file_id = await insert_file(db, user, "product-demo.mov", file_type="video/quicktime")
    tabs = Tabs(browser, stack)
    tabs.sign_in(token_for(user))
    browser.get(f"{stack.url}/files/{file_id}")

    def page_shows(status: str, progress: int, connection: str) -> Callable[[], bool]:
        def check() -> bool:
            state = browser.execute_script(
                "const file = document.querySelector('article[data-file-id]');"
                "return [file?.dataset.status, file?.dataset.progress,"
                " document.querySelector('#connection').dataset.status]"
            )
            return bool(state == [status, str(progress), connection])

        return check

    tabs.wait(page_shows("pending", 0, "live"), "the file, queued")
    await db.execute(
        "update files set status = 'processing', progress = 40, processing_stage = 'scanning'"
        " where id = $1",
        file_id,
    )
    tabs.wait(page_shows("processing", 40, "live"), "its progress")
    await db.execute(
        "update files set status = 'ready', progress = 100, processing_stage = null where id = $1",
        file_id,
    )
    # The server ends the stream after the ready update; the page stops following.
    tabs.wait(page_shows("ready", 100, "closed"), "the file ready, and the stream ended")
    activity = browser.execute_script(
        "return [...document.querySelectorAll('.activity li')].map((li) => li.dataset.status)"
    )
    assert activity == ["pending", "processing", "ready"]
    assert tabs.problems() == []
    tabs.screenshot("production-file.png")


async def test_the_in_progress_and_failed_tabs_show_exactly_their_files_as_they_come_and_go(
    stack: Stack, browser: Any, db: asyncpg.Connection
) -> None:
    user = uuid.uuid4()
    await insert_file(db, user, "invoice-7.pdf")
    holiday = await insert_file(
        db, user, "holiday.mov", status="processing", progress=40, processing_stage="transcoding"
    )
    await insert_file(db, user, "team-photo.jpg", status="ready", progress=100)
    await insert_file(db, user, "backup.zip", status="failed", error_message="corrupt")
    await insert_file(db, uuid.uuid4(), "someone-elses.pdf", status="processing")
    tabs = Tabs(browser, stack)
    tabs.sign_in(token_for(user))
    tabs.all_show(await database_rows(db, user), "every file under All")

    tabs.choose("In progress")
    in_progress = ("pending", "processing")
    tabs.all_show(await database_rows(db, user, *in_progress), "only the files in progress")
    # A file that is ready leaves the tab; a new upload arrives in it.
    await db.execute(
        "update files set status = 'ready', progress = 100, processing_stage = null where id = $1",
        holiday,
    )
    await insert_file(db, user, "new-row.csv", file_type="text/csv")
    tabs.all_show(await database_rows(db, user, *in_progress), "holiday.mov gone once ready")

    tabs.choose("Failed")
    tabs.all_show(await database_rows(db, user, "failed"), "only the failed files")
    await db.execute(
        "update files set status = 'failed', error_message = 'password-protected'"
        " where user_id = $1 and filename = 'invoice-7.pdf'",
        user,
    )
    tabs.all_show(await database_rows(db, user, "failed"), "a file that failed since")

    # Only the tab shown streams, beside All's stream for the counts: In progress closed.
    async with aiohttp.ClientSession() as session:

        async def two_streams_open() -> bool:
            return sum([await streams_open(stack, session, node) for node in (0, 1)]) == 2

        await wait_until(two_streams_open, timeout=WAIT)
    tabs.choose("All")
    tabs.all_show(await database_rows(db, user), "every file under All again")
    assert tabs.problems() == []


def test_a_node_that_dies_again_before_it_serves_stops_the_stack_instead_of_looping(
    tmp_path: Path,
) -> None:
    stack = Stack(tmp_path, "", "", Ports.free())
    port = stack.ports.nodes[0]
    # A node that served (start() waited for it), then exits; each restart exits at once.
    crashing = stack._spawn(
        "streamer-a", [sys.executable, "-c", "exit(3)"], {"STREAMER_PORT": str(port)}, port
    )
    crashing.popen.wait()
    said = stack.tend()
    assert said is not None and said.startswith(
        f"streamer-a (pid {crashing.popen.pid}) exited with 3"
    )
    again = stack.nodes[0]
    assert again.popen.pid != crashing.popen.pid
    again.popen.wait()
    assert stack.tend() is None
    assert stack.dead() is again
    stack.stop()


def test_the_operations_docs_show_deploy_nginx_conf_as_it_is() -> None:
    """docs/OPERATIONS.md's nginx lines are deploy/nginx.conf's, in its order: what the docs
    show is what the test above runs."""
    readme = (ROOT / "docs" / "OPERATIONS.md").read_text()
    shown = [
        line.strip()
        for block in re.findall(r"```nginx\n(.*?)```", readme, flags=re.DOTALL)
        for line in block.splitlines()
        if line.strip()
    ]
    assert shown, "docs/OPERATIONS.md shows no nginx configuration"
    site = [line.strip() for line in SITE.read_text().splitlines()]
    at = 0
    for line in shown:
        assert line in site[at:], f"the docs' {line!r} is not in {SITE} (in this order)"
        at = site.index(line, at) + 1
