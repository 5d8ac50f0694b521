"""One owner for every long-lived task of a process: none of them dies unnoticed.

A task that fails (raises anything but CancelledError, or returns: it was meant to run
forever) is logged once with its traceback, counted in
`streamer_task_failures_total{task=...}` and started again after a jittered exponential
backoff, which starts over once the task has run well for a while. Stopping the supervisor
cancels every task and waits until each has ended. `every` runs a step of such a task on a
fixed cadence (heartbeats, sweeps).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from streamer.metrics import Metrics
from streamer.retry import backoff

log = logging.getLogger(__name__)

FIRST_DELAY = 0.1
MAX_DELAY = 5.0
HEALTHY_AFTER = 60.0  # a task that ran this long before failing restarts from FIRST_DELAY


class Supervisor:
    def __init__(self, metrics: Metrics, *, max_delay: float = MAX_DELAY) -> None:
        self.metrics = metrics
        self.max_delay = max_delay
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run `run()` as the task `name` until `stop`, calling it again whenever it fails."""
        if name in self._tasks:
            raise ValueError(f"a task named {name!r} is already running")
        self.metrics.task_failures.labels(task=name)  # reported, as 0, before any failure
        self._tasks[name] = asyncio.create_task(self._keep(name, run), name=name)

    async def stop(self) -> None:
        """Cancel every task and wait until each has ended."""
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        # Their CancelledError is the expected result; one of our own (stop cancelled)
        # still propagates.
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _keep(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            started = loop.time()
            try:
                await run()
                failed = None
            except Exception as exc:  # not CancelledError: stop() ends the task that way
                failed = exc
            failures = 1 if loop.time() - started > HEALTHY_AFTER else failures + 1
            delay = backoff(failures, FIRST_DELAY, self.max_delay)
            if failed is None:
                log.error("task %r ended; restarting it in %.2f s", name, delay)
            else:
                log.error("task %r failed; restarting it in %.2f s", name, delay, exc_info=failed)
            self.metrics.task_failures.labels(task=name).inc()
            await asyncio.sleep(delay)


async def stopped(task: asyncio.Future[Any]) -> None:
    """Cancel a child task and wait until it has ended. Its CancelledError is the expected
    end; one aimed at the caller (it is being cancelled itself) is never swallowed."""
    if task.done():
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise


async def set_within(event: asyncio.Event, seconds: float) -> bool:
    """Wait until `event` is set, at most `seconds`: True if it is. A cancel that comes as
    the event is set still cancels (Python 3.11's `asyncio.wait_for` loses such a cancel,
    and a watch loop built on it then runs for ever: `asyncio.timeout` does not)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    return event.is_set()


CATCH_UP_STEPS = 10  # steps of `every` run back to back after a hold-up, at most


async def every(
    seconds: float,
    step: Callable[[], Awaitable[None] | None],
    *,
    clock: Callable[[], float] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """`step` every `seconds`, on a fixed cadence: a step that takes a while (a group's
    heartbeats), or a loop held up a moment (a full garbage collection), does not push
    every later one later; the steps missed run at once. Held up for more than
    CATCH_UP_STEPS of them (a machine suspended), the cadence starts again from now.
    (`clock` and `sleep`: the loop's, but for tests.)"""
    now = clock or asyncio.get_running_loop().time
    due = now()
    while True:
        due += seconds
        late = now() - due
        if late > CATCH_UP_STEPS * seconds:
            due = now()
        elif late < 0:
            await sleep(-late)
        done = step()
        if done is not None:
            await done
