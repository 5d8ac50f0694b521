"""Every long-lived task has an owner: a task that fails is logged once with its traceback,
counted in /metrics and restarted, never left dead while the process stays up."""

from __future__ import annotations

import ast
import asyncio
import logging
from pathlib import Path

import asyncpg
import pytest

from streamer import keys
from streamer.metrics import Metrics
from streamer.tasks import Supervisor, set_within
from tests.client import open_stream
from tests.conftest import Service, insert_file, kill_change_connection, token_for, wait_until
from tests.scrape import scrape

EVENTS = "/api/files/events"


def failures(metrics: Metrics, task: str) -> float | None:
    return metrics.registry.get_sample_value("streamer_task_failures_total", {"task": task})


def supervisor_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "streamer.tasks"]


async def test_a_task_that_fails_twice_is_logged_counted_and_restarted_until_it_runs(
    caplog: pytest.LogCaptureFixture,
):
    metrics = Metrics()
    supervisor = Supervisor(metrics)
    calls = 0
    running = asyncio.Event()

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise RuntimeError(f"failure {calls}")
        running.set()
        await asyncio.Event().wait()

    supervisor.start("flaky", flaky)
    try:
        await asyncio.wait_for(running.wait(), timeout=10)
    finally:
        await supervisor.stop()
    assert calls == 3
    assert failures(metrics, "flaky") == 2
    lines = supervisor_lines(caplog)
    assert [line.levelno for line in lines] == [logging.ERROR, logging.ERROR]
    assert all("'flaky' failed" in line.getMessage() for line in lines)
    errors = [line.exc_info[1] if line.exc_info else None for line in lines]
    assert [str(error) for error in errors] == ["failure 1", "failure 2"]  # with traceback


async def test_stopping_the_supervisor_cancels_every_task_and_waits_until_each_has_ended(
    caplog: pytest.LogCaptureFixture,
):
    metrics = Metrics()
    supervisor = Supervisor(metrics)
    started = asyncio.Event()
    cleaned_up = []

    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # a clean-up that takes a turn of the loop
            cleaned_up.append("forever")

    async def always_failing() -> None:
        raise RuntimeError("always")

    supervisor.start("forever", forever)
    supervisor.start("failing", always_failing)
    await started.wait()
    await wait_until(lambda: failures(metrics, "failing") == 1)  # now waiting to restart
    await supervisor.stop()

    assert cleaned_up == ["forever"]
    assert not [t for t in asyncio.all_tasks() if t.get_name() in ("forever", "failing")]
    assert failures(metrics, "forever") == 0  # a cancelled task did not fail
    assert [line.getMessage().split(";")[0] for line in supervisor_lines(caplog)] == [
        "task 'failing' failed"
    ]


async def test_a_watch_loop_cancelled_as_its_event_is_set_ends():
    """A source's watch waits on an event in a loop; stopping it (a reader stepping down,
    a reconnect) cancels it just as the event may be set (a ping's answer arriving). The
    cancel must end it: Python 3.11's wait_for returned the event's result instead and the
    loop ran for ever, keeping a walsender open under a reader that had lost its election."""
    answered = asyncio.Event()
    rounds = 0

    async def watch() -> None:
        nonlocal rounds
        while True:
            answered.clear()
            await set_within(answered, 5)
            rounds += 1

    task = asyncio.create_task(watch())
    await asyncio.sleep(0)  # the task runs into its wait
    answered.set()
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=1)
    assert done and task.cancelled(), f"still running after {rounds} round(s)"
    assert await set_within(answered, 0) and not await set_within(asyncio.Event(), 0.01)


def test_the_service_never_waits_with_asyncio_wait_for():
    """asyncio.wait_for can lose a cancel (above): the service waits with asyncio.timeout."""
    calls = [
        f"{path}:{node.lineno}"
        for path in sorted((Path(__file__).parent.parent / "streamer").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr == "wait_for"
    ]
    assert not calls, calls


async def test_a_listener_that_raises_is_logged_counted_restarted_and_streams_carry_on(
    service: Service,
    database_url: str,
    db: asyncpg.Connection,
    user,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
):
    listener = service.app[keys.DISPATCHER]
    reads = listener.reads
    changes = reads.changes
    bug = RuntimeError("a bug in recovery")

    async def changes_failing_once(*args, **kwargs):  # as a row that no longer fits would
        monkeypatch.setattr(reads, "changes", changes)
        raise bug

    async def ready() -> bool:
        async with service.session.get(service.url("/readyz")) as response:
            return response.status == 200

    async with open_stream(service.session, service.url(EVENTS), token_for(user)) as stream:
        monkeypatch.setattr(reads, "changes", changes_failing_once)
        # The change connection is cut: the listener reconnects, and its recovery raises.
        owner = await asyncpg.connect(database_url)
        try:
            await kill_change_connection(service, owner)
        finally:
            await owner.close()
        await wait_until(lambda: bool(supervisor_lines(caplog)))

        await wait_until(ready)
        samples = await scrape(service.session, service.url("/metrics"))
        assert samples['streamer_task_failures_total{task="listener"}'] == 1
        assert samples["streamer_listener_up"] == 1
        file_id = await insert_file(db, user, "after.pdf")
        while (await stream.next()).file["id"] != str(file_id):
            pass  # a repeat of what it already has is allowed after a reconnect

    [line] = supervisor_lines(caplog)
    assert "'listener' failed" in line.getMessage()
    assert line.exc_info is not None and line.exc_info[1] is bug
    # Logged once: by its supervisor, not again by asyncio or the listener.
    assert [r for r in caplog.records if r.exc_info and r.exc_info[1] is bug] == [line]


async def test_a_change_whose_dispatch_raises_restarts_the_listener_and_still_arrives(
    service: Service,
    db: asyncpg.Connection,
    user,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
):
    hub = service.app[keys.HUB]
    dispatch = hub.dispatch
    bug = RuntimeError("a bug in dispatch")

    def dispatch_failing_once(*args, **kwargs):  # called from a notification callback
        monkeypatch.setattr(hub, "dispatch", dispatch)
        raise bug

    async with open_stream(service.session, service.url(EVENTS), token_for(user)) as stream:
        monkeypatch.setattr(hub, "dispatch", dispatch_failing_once)
        file_id = await insert_file(db, user, "unlucky.pdf")
        # The recovery after the restart catches the stream up on the change that failed.
        while (await stream.next()).file["id"] != str(file_id):
            pass
    [line] = supervisor_lines(caplog)
    assert "'listener' failed" in line.getMessage()
    assert line.exc_info is not None and line.exc_info[1] is bug
    assert failures(service.app[keys.METRICS], "listener") == 1
