"""The demo page in a real browser: headless Chromium against a real server and Postgres.

A writer changes rows with plain SQL; the page must show each change. The service is
stopped and started again on the same port in the middle: the page must come back by
itself and show what changed while the service was down.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web

import streamer.demo
from streamer import keys
from streamer.app import AccessLogger, create_app
from streamer.config import Settings
from streamer.demo import add_demo_routes
from tests.conftest import SECRET, free_port, insert_file

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).parent / "artifacts"
SCREENSHOT = ARTIFACTS / "browser.png"
EVENTS = "/api/files/events"
WAIT = 10.0  # seconds for the page to show a change; it normally takes milliseconds
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",  # we may run as root in CI containers
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1100",
)


@dataclass
class DemoService:
    """The service with the demo routes, on a port that stays the same across restarts,
    as a process manager would restart it. Records the cursor of every stream request."""

    settings: Settings
    user: uuid.UUID
    runner: web.AppRunner | None = None
    requests: list[dict[str, str | None]] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    async def start(self, **changes: Any) -> None:
        """Start (again), on the same port; `changes` are settings that differ this time."""
        self.settings = self.settings.model_copy(update=changes)
        assert self.settings.database_url is not None
        app = create_app(self.settings, self.settings.database_url)
        add_demo_routes(app, self.user)
        app.on_response_prepare.append(self._record)
        runner = web.AppRunner(
            app, access_log_class=AccessLogger, handler_cancellation=True, shutdown_timeout=1.0
        )
        await runner.setup()
        await app[keys.DISPATCHER].ready.wait()
        await web.TCPSite(runner, self.settings.host, self.settings.port).start()
        self.runner = runner

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _record(self, request: web.Request, response: web.StreamResponse) -> None:
        if request.path == EVENTS:
            self.requests.append(
                {
                    "status": str(response.status),
                    "header": request.headers.get("Last-Event-ID"),
                    "query": request.query.get("last_event_id"),
                }
            )


@pytest.fixture
async def demo(database_url: str) -> AsyncIterator[DemoService]:
    settings = Settings(
        database_url=database_url,
        jwt_secret=SECRET,
        port=free_port(),
        retry_ms=200,  # the browser's own reconnect delay: quick, for a quick test
    )
    service = DemoService(settings, uuid.uuid4())
    await service.start()
    yield service
    await service.stop()


@contextlib.contextmanager
def chromium(monkeypatch: pytest.MonkeyPatch, flags: Iterable[str]) -> Iterator[Any]:
    """Debian's Chromium under its chromedriver, with a profile of its own and the page's
    console log kept; never a browser or driver selenium would fetch itself."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found: run `make browser-deps` (it installs "
            "Debian's chromium and chromium-driver; `make test` runs it first)",
            pytrace=False,
        )
    monkeypatch.setenv("SE_OFFLINE", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in flags:
        options.add_argument(flag)
    profile = tempfile.TemporaryDirectory(prefix="streamer-chromium-")
    options.add_argument(f"--user-data-dir={profile.name}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(
        service=DriverService(executable_path=str(CHROMEDRIVER)), options=options
    )
    try:
        yield driver
    finally:
        driver.quit()
        profile.cleanup()


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    with chromium(monkeypatch, CHROMIUM_FLAGS) as driver:
        yield driver


class Page:
    """The demo page as a user sees it, read through the DOM's data attributes."""

    def __init__(self, driver: Any, base: str = "") -> None:
        self.driver = driver
        self.base = base

    async def open(self, url: str) -> None:
        await asyncio.to_thread(self.driver.get, url)

    async def wait(self, condition: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
        """Poll the DOM (in a thread, so the server in this event loop keeps serving)."""
        from selenium.webdriver.support.ui import WebDriverWait

        wait = WebDriverWait(self.driver, timeout, poll_frequency=0.05)
        return await asyncio.to_thread(wait.until, lambda _driver: condition(), what)

    def connection(self) -> str:
        status: str = self.driver.execute_script(
            "return document.querySelector('#connection').dataset.status"
        )
        return status

    def rows(self) -> dict[str, dict[str, str]]:
        """file id → the row's data attributes, for every row on the page."""
        rows: dict[str, dict[str, str]] = self.driver.execute_script(
            "return Object.fromEntries([...document.querySelectorAll('[data-file-id]')]"
            ".map((row) => [row.dataset.fileId, {...row.dataset,"
            " error: row.querySelector('.file-error').textContent,"
            " name: row.querySelector('.file-name').textContent}]))"
        )
        return rows

    async def shows(self, files: dict[uuid.UUID, dict[str, Any]], what: str) -> None:
        """Wait until the page shows exactly these files, in these states."""
        expected = {
            str(file_id): {name: str(value) for name, value in state.items()}
            for file_id, state in files.items()
        }

        def matches() -> bool:
            rows = self.rows()
            return rows.keys() == expected.keys() and all(
                rows[file_id].get(name) == value
                for file_id, state in expected.items()
                for name, value in state.items()
            )

        try:
            await self.wait(matches, what)
        except Exception as exc:
            raise AssertionError(f"{what}: expected {expected}, page shows {self.rows()}") from exc

    async def connection_is(self, status: str) -> None:
        await self.wait(lambda: self.connection() == status, f"connection {status}")

    async def screenshot(self, path: Path) -> None:
        """Once rows have faded in and bars filled: the page as a user looks at it."""
        await self.wait(
            lambda: self.driver.execute_script(
                "return document.getAnimations().every((a) => a.playState !== 'running'"
                " || a.effect.getComputedTiming().iterations === Infinity)"
            ),
            "animations to settle",
        )
        path.parent.mkdir(exist_ok=True)
        assert await asyncio.to_thread(self.driver.save_screenshot, str(path))


async def state(db: asyncpg.Connection, file_id: uuid.UUID) -> dict[str, Any]:
    """What the page should show of a file: its row, as the database has it now."""
    row = await db.fetchrow(
        "select status, progress, streamer_version as version, filename as name from files"
        " where id = $1",
        file_id,
    )
    assert row is not None
    return dict(row)


async def states(db: asyncpg.Connection, *file_ids: uuid.UUID) -> dict[uuid.UUID, dict[str, Any]]:
    """What the page should show: these files, and only these."""
    return {file_id: await state(db, file_id) for file_id in file_ids}


async def test_the_demo_page_shows_every_change_live_and_across_a_service_restart(
    demo: DemoService, browser: Any, db: asyncpg.Connection
):
    user = demo.user
    someone_else = await insert_file(db, uuid.uuid4(), "not-yours.pdf")
    queued = await insert_file(db, user, "invoice-7.pdf", file_type="application/pdf")
    working = await insert_file(
        db, user, "holiday.mov", file_type="video/quicktime", status="processing", progress=30
    )
    page = Page(browser)
    await page.open(demo.base + "/demo/")
    await page.connection_is("live")
    await page.shows(
        await states(db, queued, working), "the files that existed before the page opened"
    )
    assert page.rows()[str(queued)]["status"] == "pending"

    added = await each_change_shows_live(page, db, user, queued, working)
    problems = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert problems == [], problems

    # The service stops; the page says so, and the writer carries on meanwhile.
    await demo.stop()
    await page.wait(lambda: page.connection() != "live", "the page noticing the service left")
    before_restart = len(demo.requests)
    await db.execute(
        "update files set status = 'ready', progress = 100, processing_stage = null where id = $1",
        working,
    )
    await db.execute("delete from files where id = $1", added)
    while_down = await insert_file(db, user, "backup-2024.zip", file_type="application/zip")

    await demo.start()
    await page.connection_is("live")
    await page.shows(
        await states(db, working, while_down), "what changed while the service was down"
    )
    # The browser's own reconnect did it, sending Last-Event-ID: the page reloaded nothing.
    resumed = demo.requests[before_restart:]
    assert [(r["status"], bool(r["header"])) for r in resumed] == [("200", True)], resumed

    # And the page is live again.
    await db.execute(
        "update files set status = 'processing', progress = 5, processing_stage = 'scanning'"
        " where id = $1",
        while_down,
    )
    await page.shows(await states(db, working, while_down), "a change after the restart")
    assert str(someone_else) not in page.rows()
    await page.screenshot(SCREENSHOT)


async def each_change_shows_live(
    page: Page, db: asyncpg.Connection, user: uuid.UUID, queued: uuid.UUID, working: uuid.UUID
) -> uuid.UUID:
    """An update, an insert, a failure with its message, a delete (of `queued`): each shows
    as it commits. Returns the inserted file."""
    await db.execute(
        "update files set progress = 60, processing_stage = 'transcoding' where id = $1", working
    )
    await page.shows(await states(db, queued, working), "an update")
    added = await insert_file(db, user, "team-photo.jpg", file_type="image/jpeg")
    await db.execute(
        "update files set status = 'failed', error_message = 'Document is password-protected'"
        " where id = $1",
        queued,
    )
    await page.shows(await states(db, queued, working, added), "an insert and a failure")
    assert page.rows()[str(queued)]["error"] == "Document is password-protected"
    await db.execute("delete from files where id = $1", queued)
    await page.shows(await states(db, working, added), "a delete")
    return added


async def test_a_page_whose_token_is_refused_after_a_restart_gets_a_new_one_and_resumes(
    demo: DemoService, browser: Any, db: asyncpg.Connection
):
    file_id = await insert_file(db, demo.user, "Q3-report.pdf", status="processing", progress=10)
    page = Page(browser)
    await page.open(demo.base + "/demo/")
    await page.connection_is("live")
    await page.shows(await states(db, file_id), "the file")

    await demo.stop()
    await page.wait(lambda: page.connection() != "live", "the page noticing the service left")
    before_restart = len(demo.requests)
    await db.execute("update files set progress = 70 where id = $1", file_id)
    gone = await insert_file(db, demo.user, "draft.docx")
    await db.execute("delete from files where id = $1", gone)
    added = await insert_file(db, demo.user, "final.docx")

    # A new signing secret: the token in the browser's own reconnect is refused (401), so
    # the client asks /demo/token for a fresh one and resumes with ?last_event_id=.
    await demo.start(jwt_secret=SECRET + "-rotated")
    await page.connection_is("live")
    await page.shows(
        await states(db, file_id, added),
        "what changed while the service was down",
    )
    resumed = [(r["status"], bool(r["header"]), bool(r["query"])) for r in demo.requests]
    assert resumed[before_restart:] == [("401", True, False), ("200", False, True)], resumed


async def test_a_page_whose_token_expires_renews_it_and_resumes_from_its_cursor(
    demo: DemoService, browser: Any, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(streamer.demo, "DEMO_TOKEN_TTL", 2)
    file_id = await insert_file(db, demo.user, "podcast-ep-12.mp3", status="processing")
    page = Page(browser)
    await page.open(demo.base + "/demo/")
    await page.connection_is("live")
    await page.shows(await states(db, file_id), "the file")

    # At exp the server sends token-expired and ends the stream; the client fetches a new
    # token and reconnects from its cursor, and the page carries on.
    await page.wait(lambda: len(demo.requests) >= 2, "a reconnect with a renewed token")
    renewed = demo.requests[1]
    assert renewed["status"] == "200" and renewed["query"] and not renewed["header"], renewed
    await db.execute("update files set progress = 45 where id = $1", file_id)
    await page.shows(await states(db, file_id), "a change after the renewal")


# In the demo page, a store of the client the service serves, followed until it has an
# errorCode: that value's status, error and errorCode.
FOLLOW = """
const [kind, args, token, done] = arguments;
const client = await import("/static/streamer-client.js");
const getToken = token
  ? async () => token
  : async () => (await (await fetch("/demo/token", { cache: "no-store" })).json()).token;
const backoff = { initial: 50, max: 50 };
const stop = client[kind]({ ...args, getToken, backoff }).subscribe((value) => {
  if (value.errorCode === null) return;
  queueMicrotask(() => stop());
  done({ status: value.status, error: value.error, errorCode: value.errorCode });
});
"""


async def refusal(page: Page, kind: str, token: str | None = None, **args: Any) -> Any:
    await page.open(page.base + "/demo/")
    return await asyncio.to_thread(page.driver.execute_async_script, FOLLOW, kind, args, token)


async def test_a_stream_refused_for_good_closes_the_store_with_the_servers_reason(
    demo: DemoService, browser: Any
):
    # EventSource shows no status: the client asks the refused URL again with fetch.
    value = await refusal(Page(browser, demo.base), "watchFile", id="not-a-uuid")
    assert value["status"] == "closed" and value["errorCode"] == "INVALID_ID", value
    assert value["error"] == "The id is not a UUID", value  # the server's sentence, as it is


async def test_a_refused_stream_that_may_pass_later_keeps_retrying_and_says_why(
    demo: DemoService, browser: Any
):
    value = await refusal(Page(browser, demo.base), "connectFiles", token="not-a-jwt")
    assert value["status"] == "reconnecting" and value["errorCode"] == "TOKEN_INVALID", value
