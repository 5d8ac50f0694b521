"""Catch-ups asked at once are read at once.

After a restart (or a network blip) every client of a process comes back within seconds,
each with its cursor, and each needs what changed since. Read one by one, 100,000 of
them queue behind a pool of four connections for minutes, and Postgres runs 100,000
transactions. Here a stream asking for its catch-up joins those waiting: a read (at most
`lanes` at a time) takes up to `most` of them of one feed, in one REPEATABLE READ
transaction: one snapshot, one count of what each owner has to catch up, one query of
the rows of those with little. An owner with much to catch up (more than BATCH rows), or
a cursor the read cannot honour, is answered None: that stream reads alone, as it always
did (a batch at a time, at its client's pace, or a reset and its snapshot).

Nobody waits for company: with nothing in flight a catch-up is read at once, alone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from streamer.changes import VERSION_SCALE, Gone, Row, Snapshot
from streamer.feeds import Feed

# A stream's owners and its horizon; None: a snapshot (every row they have, no deletes).
Wanted = tuple[tuple[str, ...], int | None]


@dataclass(frozen=True, slots=True)
class Caught:
    """A stream's catch-up, read with others': what changed since its horizon, in
    version order, and the snapshot it was read in."""

    snapshot: Snapshot
    items: list[Row | Gone]


# Reads the catch-ups of these streams of a feed in one snapshot: for each, its Caught,
# or None (read it alone).
ReadMany = Callable[[Feed, Sequence[Wanted]], Awaitable[list[Caught | None]]]


@dataclass(slots=True)
class _Ask:
    wanted: Wanted
    answer: asyncio.Future[Caught | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Gatherer:
    """The catch-ups of one process, read together (see the module's doc)."""

    def __init__(self, read: ReadMany, *, lanes: int, most: int) -> None:
        self._read = read
        self.lanes = lanes
        self.most = most
        self._waiting: dict[tuple[str, bool], tuple[Feed, list[_Ask]]] = {}
        self._running: set[asyncio.Task[None]] = set()
        self.reads = 0  # reads made, and streams caught up by them (for the tests)
        self.caught = 0

    @property
    def waiting(self) -> int:
        return sum(len(asks) for _, asks in self._waiting.values())

    async def since(self, feed: Feed, owners: tuple[str, ...], since: int | None) -> Caught | None:
        """What changed for `owners` of `feed` since the horizon `since` (None: a snapshot,
        every row they have); None: read it alone. A connection error of the read is raised
        to each stream that was in it. Snapshots are read together, catch-ups together."""
        ask = _Ask((owners, since))
        key = (feed.name, since is None)
        self._waiting.setdefault(key, (feed, []))[1].append(ask)
        self._start()
        return await ask.answer  # a stream that leaves meanwhile cancels only its own

    def _start(self) -> None:
        while len(self._running) < self.lanes and self._waiting:
            name, (feed, asks) = next(iter(self._waiting.items()))
            taken, left = asks[: self.most], asks[self.most :]
            if left:
                self._waiting[name] = (feed, left)
            else:
                del self._waiting[name]
            task = asyncio.ensure_future(self._gather(feed, taken))
            self._running.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._start()

    async def _gather(self, feed: Feed, asks: list[_Ask]) -> None:
        asks = [ask for ask in asks if not ask.answer.done()]
        if not asks:
            return
        try:
            answers = await self._read(feed, [ask.wanted for ask in asks])
        except BaseException as exc:
            for ask in asks:
                if not ask.answer.done():
                    ask.answer.set_exception(exc)
                    ask.answer.exception()  # retrieved here too: a stream that left
            if not isinstance(exc, Exception):
                raise
            return
        self.reads += 1
        self.caught += len(asks)
        for ask, answer in zip(asks, answers, strict=True):
            if not ask.answer.done():
                ask.answer.set_result(answer)

    async def close(self) -> None:
        for task in list(self._running):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


def distribute(
    snapshot: Snapshot,
    wanted: Sequence[Wanted],
    items: Sequence[Row | Gone],
    alone: set[str],
    honoured: Callable[[int], bool],
) -> list[Caught | None]:
    """Each stream's share of what one read found for all of them (`items`, in version
    order, since the lowest horizon among them, or every row for snapshots): its owners',
    at or above its own horizon. None for a stream of an owner in `alone` (too much to
    hold: read it alone) or whose horizon is not `honoured`."""
    by_owner: dict[str, list[Row | Gone]] = {}
    for item in items:
        by_owner.setdefault(item.owner, []).append(item)
    answers: list[Caught | None] = []
    for owners, since in wanted:
        if (since is not None and not honoured(since)) or any(o in alone for o in owners):
            answers.append(None)
            continue
        low = 0 if since is None else since * VERSION_SCALE
        mine = [i for owner in owners for i in by_owner.get(owner, ()) if i.version >= low]
        if len(owners) > 1:
            mine.sort(key=lambda item: item.version)
        answers.append(Caught(snapshot, mine))
    return answers
