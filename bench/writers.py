"""The writing side of the load: commits at a steady rate (or flat out), timed.

Each writer connection updates rows of users it alone owns (no lock waits between
writers), `rows` rows per transaction, and stamps them `processing_stage =
'bench:<writer>:<seq>;'`. It records the time just before COMMIT is sent (t0) and when
COMMIT returns (t1); a receiver's latency is its arrival time minus t1.
"""

from __future__ import annotations

import asyncio
import random
from array import array
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np

from bench.agent import Reply, now_ns, serve

UPDATE = (
    "update files set progress = $1, processing_stage = $2, status = 'processing' "
    "where id = any($3::uuid[])"
)
CATCH_UP_SLACK_NS = 50_000_000  # a paced writer that fell behind does not burst to catch up


class Writers:
    def __init__(self, dsn: str, row_ids: list[str], out_dir: str) -> None:
        self.dsn = dsn
        self.row_ids = row_ids  # row_ids[u] is the one row of user u
        self.out_dir = out_dir
        self.conns: list[asyncpg.Connection] = []
        self.seq: list[int] = []
        self.task: asyncio.Task[None] | None = None
        self.end = 0  # CLOCK_MONOTONIC ns: no commit starts after it
        self.runs = 0
        self._reset()

    def _reset(self) -> None:
        self.writer = array("q")
        self.seqs = array("q")
        self.t0 = array("q")
        self.t1 = array("q")
        self.users = array("q")
        self.errors = 0

    async def handle(self, command: str, args: dict[str, Any]) -> Reply:
        if command == "connect":
            for _ in range(args["connections"] - len(self.conns)):
                self.conns.append(await asyncpg.connect(self.dsn))
                self.seq.append(0)
            return {"connections": len(self.conns)}
        if command == "start":
            self._reset()
            self.task = asyncio.create_task(
                self._run(args["rate"], args["seconds"], args["rows"], args["users"])
            )
            return {}
        if command == "finish":
            assert self.task is not None
            if args.get("now"):  # end the run early: no commit starts from now on
                self.end = now_ns()
            await self.task
            return self._dump()
        if command == "stop":
            if self.task is not None:
                self.task.cancel()
            for conn in self.conns:
                conn.terminate()
            return {}
        raise ValueError(f"unknown command {command!r}")

    async def _run(self, rate: float | None, seconds: float, rows: int, users: int) -> None:
        """Commit for `seconds` at `rate` commits/s over all connections (None: flat out),
        touching `rows` rows of the first `users` users per commit."""
        self.end = now_ns() + int(seconds * 1e9)
        n = len(self.conns)
        interval = None if rate is None else int(n / rate * 1e9)
        rows = max(1, min(rows, users // n))  # the same for every connection
        loops = [
            self._loop(w, [u for u in range(users) if u % n == w], rows, interval) for w in range(n)
        ]
        await asyncio.gather(*loops)

    async def _loop(self, w: int, mine: list[int], rows: int, interval: int | None) -> None:
        conn = self.conns[w]
        rng = random.Random(w)
        next_at = now_ns() + rng.randrange(interval or 1)  # connections out of phase
        while (t := now_ns()) < self.end:
            if interval is not None:
                if next_at > t:
                    await asyncio.sleep((next_at - t) / 1e9)
                    if now_ns() >= self.end:
                        break
                next_at = max(next_at + interval, now_ns() - CATCH_UP_SLACK_NS)
            chosen = rng.sample(mine, rows)
            seq = self.seq[w] = self.seq[w] + 1
            try:
                await conn.execute("begin")
                await conn.execute(
                    UPDATE,
                    rng.randrange(101),
                    f"bench:{w}:{seq};",
                    [self.row_ids[u] for u in chosen],
                )
                t0 = now_ns()
                await conn.execute("commit")
                t1 = now_ns()
            except asyncpg.PostgresError:
                self.errors += 1
                await conn.execute("rollback")
                continue
            self.writer.append(w)
            self.seqs.append(seq)
            self.t0.append(t0)
            self.t1.append(t1)
            self.users.extend(chosen)

    def _dump(self) -> Reply:
        self.runs += 1
        path = Path(self.out_dir) / f"writers-{self.runs}.npz"
        count = len(self.t1)
        users = np.frombuffer(self.users, dtype=np.int64)
        np.savez(
            path,
            key=(np.frombuffer(self.writer, dtype=np.int64) << 32)
            | np.frombuffer(self.seqs, dtype=np.int64),
            t0=np.frombuffer(self.t0, dtype=np.int64),
            t1=np.frombuffer(self.t1, dtype=np.int64),
            users=users.reshape(count, -1) if count else users.reshape(0, 1),
        )
        return {"path": str(path), "commits": count, "errors": self.errors}


def writers_main(conn: Connection, dsn: str, row_ids: list[str], out_dir: str) -> None:
    serve(conn, Writers(dsn, row_ids, out_dir))
