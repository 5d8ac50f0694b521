"""Driving a phase: users and their rows, receiver processes, the writer, draining.

A phase is: open streams (service, naive, or the floor's one LISTEN), commit for a while,
wait until every expected event arrived (or stopped arriving), collect the records.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.agent import Remote, call_all
from bench.clients import ClientSpec, client_main, floor_main
from bench.harness import REPO, SECRET, Postgres
from bench.stats import Arrivals, Commits, Ints
from bench.writers import writers_main
from streamer.auth import mint_token

TOKEN_TTL = 6 * 3600
STREAM_PATH = "/api/files/events"


@dataclass(frozen=True)
class Population:
    """Users 0..n-1, each with one row in `files` and a token."""

    users: list[uuid.UUID]
    rows: list[str]
    tokens: list[str]

    @classmethod
    def create(cls, pg: Postgres, count: int) -> Population:
        users = [uuid.uuid4() for _ in range(count)]
        with pg.connect() as conn:
            conn.execute("truncate files")
            with conn.cursor() as cur:
                cur.executemany(
                    "insert into files (user_id, filename, status) values (%s, %s, 'processing')",
                    [(u, f"bench-{i}.pdf") for i, u in enumerate(users)],
                )
            by_user: dict[uuid.UUID, uuid.UUID] = {
                user: row for user, row in conn.execute("select user_id, id from files")
            }
            conn.execute("vacuum analyze files")
        rows = [str(by_user[u]) for u in users]
        tokens = [mint_token(SECRET, u, TOKEN_TTL) for u in users]
        return cls(users, rows, tokens)


def plan(users: int, tabs: int) -> Ints:
    """Stream i belongs to user i % users: opening the first n streams spreads them evenly."""
    return np.arange(users * tabs, dtype=np.int64) % users


class Receivers:
    """Streams spread over client processes (or the floor's single LISTEN connection)."""

    def __init__(
        self,
        name: str,
        remotes: list[Remote],
        stream_user: Ints | None,
    ) -> None:
        self.name = name
        self.remotes = remotes
        self.stream_user = stream_user
        self.live: list[int] = []
        self.errors: dict[str, int] = {}
        self.events_seen = 0

    @classmethod
    def streams(
        cls,
        name: str,
        population: Population,
        stream_user: Ints,
        port: int | list[int],
        processes: int,
        out_dir: str,
        query: str | tuple[str, ...] = "",
    ) -> Receivers:
        """Stream i on client process i % processes, which connects to `port` (of a list:
        the one at its own index modulo its length, as to the nodes of a fleet), asking for
        `query` (of a tuple: the one at its index modulo its length)."""
        ports = port if isinstance(port, list) else [port]
        queries = query if isinstance(query, tuple) else ()
        path = STREAM_PATH + (f"?{query}" if isinstance(query, str) and query else "")
        remotes = []
        for p in range(processes):
            mine = [
                (int(i), population.tokens[int(stream_user[i])])
                for i in range(p, len(stream_user), processes)
            ]
            spec = ClientSpec(f"{name}-{p}", ports[p % len(ports)], path, mine, out_dir, queries)
            remotes.append(Remote(f"client-{name}-{p}", client_main, spec))
        return cls(name, remotes, stream_user)

    @classmethod
    def floor(cls, pg: Postgres, out_dir: str) -> Receivers:
        remote = Remote("floor", floor_main, pg.dsn("bench-floor"), out_dir)
        return cls("floor", [remote], None)

    def open(self, count: int, concurrency: int = 64) -> dict[str, Any]:
        """Open `count` more streams (spread over the processes); wait until each is synced."""
        started = time.monotonic()
        shares = [
            count // len(self.remotes) + (1 if p < count % len(self.remotes) else 0)
            for p in range(len(self.remotes))
        ]
        for remote, share in zip(self.remotes, shares, strict=True):
            remote.send("open", count=share, concurrency=concurrency)
        opened = 0
        for remote in self.remotes:
            reply = remote.receive(timeout=300)
            self.live.extend(reply["opened"])
            opened += len(reply["opened"])
            for error, n in reply["errors"].items():
                self.errors[error] = self.errors.get(error, 0) + n
        return {"opened": opened, "seconds": time.monotonic() - started}

    def pids(self) -> list[int]:
        return [r.process.pid for r in self.remotes if r.process.pid is not None]

    def tabs(self, users: int) -> Ints | None:
        """Live streams per user."""
        if self.stream_user is None:
            return None
        return np.bincount(self.stream_user[self.live], minlength=users).astype(np.int64)

    def stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for reply in call_all(self.remotes, "stats"):
            for key, value in reply.items():
                total[key] = total.get(key, 0) + int(value)
        return total

    def drain(self, expected: int, timeout: float, quiet: float = 2.0) -> None:
        """Wait until `expected` more events arrived, or none arrived for `quiet` seconds."""
        target = self.events_seen + expected
        deadline = time.monotonic() + timeout
        last, last_change = -1, time.monotonic()
        while time.monotonic() < deadline:
            events = self.stats()["events"]
            if events >= target:
                break
            if events != last:
                last, last_change = events, time.monotonic()
            elif time.monotonic() - last_change > quiet:
                break
            time.sleep(0.1)
        self.events_seen = self.stats()["events"]

    def collect(self) -> Arrivals:
        replies = call_all(self.remotes, "dump", timeout=300)
        return Arrivals.load([r["path"] for r in replies])

    def stop(self) -> None:
        for remote in self.remotes:
            remote.stop()


class Writer:
    """The writer process and its connections, kept for the whole run."""

    def __init__(self, pg: Postgres, population: Population, connections: int, out_dir: str):
        self.remote = Remote(
            "writers", writers_main, pg.dsn("bench-writer"), population.rows, out_dir
        )
        self.remote.call("connect", connections=connections)

    @property
    def pid(self) -> int:
        pid = self.remote.process.pid
        assert pid is not None
        return pid

    def run(self, rate: float | None, seconds: float, rows: int, users: int) -> Commits:
        self.start(rate, seconds, rows, users)
        return self.finish(timeout=seconds + 120)

    def start(self, rate: float | None, seconds: float, rows: int, users: int) -> None:
        """Commit in the background for at most `seconds` (see `run`)."""
        self.remote.call("start", rate=rate, seconds=seconds, rows=rows, users=users)

    def finish(self, timeout: float = 120.0, *, now: bool = False) -> Commits:
        """What was committed since `start`, once its run is over (`now`: ended now)."""
        reply = self.remote.call("finish", timeout=timeout, now=now)
        return Commits.load(reply["path"])

    def stop(self) -> None:
        self.remote.stop()


def expected_events(commits: Commits, receivers: Receivers, users: int) -> int:
    tabs = receivers.tabs(users)
    if tabs is None:
        return commits.rows
    return int(tabs[commits.users].sum())


# -- one phase ------------------------------------------------------------------------


@dataclass
class Context:
    """What every scenario shares within one run."""

    pg: Postgres
    population: Population
    writer: Writer
    records: str  # scratch directory for the .npz records
    results: str  # bench/results
    quick: bool
    profile: bool
    code: Path = REPO  # the checkout whose service is measured
    crowd: dict[str, Any] | None = None  # the crowd's scale, when not its default (run.py)
