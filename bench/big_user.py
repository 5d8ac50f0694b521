"""Scenario 5: one user with 200,000 rows must not stall everyone else (issue 14).

A bulk import: one user with 200,000 rows (a 200-byte `error_message` each), inserted by
the table's owner in one statement. Meanwhile another user's stream is live and a writer
updates one of that user's rows every 50 ms, one row per commit. Against a fresh service
each time, the big user's rows reach a stream in four ways:

- `snapshot`: the big user opens `?snapshot=1` and reads as fast as it can;
- `resume`: the big user holds a cursor, all its rows are updated in one transaction, and
  it resumes with `Last-Event-ID`;
- `recovery`: the big user's stream is open (no snapshot); the service's LISTEN connection
  is killed and, while it cannot reconnect (the database refuses new connections), all the
  rows are updated in one transaction; the listener's recovery catches the open stream up;
- `stalled`: a snapshot whose client reads nothing for a while, then reads the rest; and,
  with as many stalled snapshots as the service has pool connections, whether another
  user's snapshot still opens.

Each is measured the same way: the time the big user waits (request to `synced`; for the
recovery, from the service's LISTEN being back to the last row), the service's
peak RSS over its RSS just before (sampled every 10 ms), the other user's latency from
COMMIT to event parsed over that time, and that every row arrived exactly as the SPEC
says. The big user's tab behaves like EventSource: a stream the server ends is reopened
after the `retry:` it was given, with the last `id:` it received.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
import psycopg

from bench.agent import Remote, Reply, now_ns, serve
from bench.harness import DATABASE, SECRET, Postgres, ServerProcess, start_service
from bench.load import STREAM_PATH, TOKEN_TTL, Context, Receivers, Writer, plan
from bench.procfs import machine_share, tracking_rss
from bench.profile import recording
from bench.stats import Arrivals, Commits, deliveries
from streamer.auth import mint_token
from streamer.sse import Parser

MB = 2**20
POOL_SIZE = 4  # the service's default STREAMER_POOL_SIZE
PROBE_TIMEOUT = 10.0  # seconds another user's snapshot may take beside stalled ones
# The service's LISTEN connection: its last query is the LISTEN, or the ping that follows it
# every few seconds (pool connections end on asyncpg's reset query instead).
LISTENER = (
    "select pid from pg_stat_activity where application_name = 'bench-service'"
    " and (query ilike 'listen%' or query = 'select 1')"
)
# The first id in a file-update's data is the row's: Postgres (jsonb) and pydantic alike
# put `id` first.
ROW_ID = re.compile(r'"id": ?"([^"]+)"')


@dataclass(frozen=True)
class Settings:
    rows: int  # the big user's
    rate: float  # the other user's commits per second
    settle: float  # seconds of the other user's stream alone before each variant
    stall: float  # seconds the stalled client reads nothing
    timeout: float  # for the big user's stream to have everything
    profile: float  # seconds of py-spy on the service as the resume's notifications arrive


FULL = Settings(200_000, 20.0, 2.0, 20.0, 180.0, 6.0)
QUICK = Settings(20_000, 20.0, 1.0, 3.0, 60.0, 1.0)


# -- the big user's tab (a process of its own) ------------------------------------------


@dataclass
class Tally:
    """What the big user's tab received."""

    requested_ns: int = 0
    headers_ns: int | None = None  # the first response's head
    synced_ns: int | None = None  # the first `synced`
    done_ns: int | None = None  # every expected row in
    updates: int = 0  # file-update events
    updates_at_synced: int | None = None
    ids: set[str] = field(default_factory=set)  # rows seen in a file-update
    events: Counter[str] = field(default_factory=Counter)
    reconnects: int = 0
    ended: str = ""  # why the tab stopped reading
    last_id: str | None = None
    retry_ms: int = 2000
    received: int = 0  # bytes

    def take(self, parser: Parser, chunk: bytes, expect: int | None) -> None:
        """The events `chunk` completes, in order; the stream's last id and retry."""
        events = parser.feed(chunk)
        t = now_ns()
        for event in events:
            self.events[event.name] += 1
            if event.name == "file-update":
                self.updates += 1
                if found := ROW_ID.search(event.data):
                    self.ids.add(found.group(1))
            elif event.name == "synced" and self.synced_ns is None:
                self.updates_at_synced = self.updates
                self.synced_ns = t
        if parser.last_id is not None:
            self.last_id = parser.last_id
        if parser.retry is not None:
            self.retry_ms = parser.retry
        if expect is not None and self.done_ns is None and len(self.ids) >= expect:
            self.done_ns = t

    def reply(self) -> Reply:
        return {
            "requested_ns": self.requested_ns,
            "headers_ns": self.headers_ns,
            "synced_ns": self.synced_ns,
            "done_ns": self.done_ns,
            "updates": self.updates,
            "updates_at_synced": self.updates_at_synced,
            "rows": len(self.ids),
            "events": dict(self.events),
            "reconnects": self.reconnects,
            "ended": self.ended,
            "last_id": self.last_id,
            "bytes": self.received,
        }


class BigTab:
    """One stream of the big user, read as fast as it comes (or, stalled, not at all)."""

    def __init__(self, port: int, token: str) -> None:
        self.url = f"http://127.0.0.1:{port}{STREAM_PATH}"
        self.token = token
        self.session: aiohttp.ClientSession | None = None
        self.task: asyncio.Task[None] | None = None
        self.tally = Tally()
        self.synced = asyncio.Event()
        self.stalled: list[aiohttp.ClientResponse] = []

    async def handle(self, command: str, args: dict[str, Any]) -> Reply:
        if self.session is None:
            self.session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_read=None)
            )
        if command == "read":  # until `synced` (and, with `expect`, until that many rows)
            self.tally = Tally()
            await self._read(args.get("query", ""), args.get("last_id"), args.get("expect"))
            return self.tally.reply()
        if command == "start":  # the same in the background; answers once synced
            self.tally, self.synced = Tally(), asyncio.Event()
            self.task = asyncio.create_task(self._read("", None, args["expect"]))
            await asyncio.wait_for(self.synced.wait(), args.get("timeout", 60))
            return self.tally.reply()
        if command == "wait":
            assert self.task is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.task), args["timeout"])
            if not self.task.done():
                self.task.cancel()
                self.tally.ended = "timeout"
            return self.tally.reply()
        if command == "stall":  # open one more snapshot, read its head, then nothing
            self.tally = Tally(requested_ns=now_ns())
            response = await self.session.get(
                self.url, params={"snapshot": "1"}, headers=self._headers(None)
            )
            self.tally.headers_ns = now_ns()
            self.stalled.append(response)
            return {"status": response.status}
        if command == "unstall":  # read the rest of the first stalled stream; close the others
            first = self.stalled[0]
            self.tally = Tally(requested_ns=now_ns())
            try:
                self.tally.ended = await self._consume(first, args.get("expect"))
            except aiohttp.ClientError as exc:  # the server cut it for not reading
                self.tally.ended = f"cut: {exc.__class__.__name__}"
            for response in self.stalled:
                response.close()
            self.stalled = []
            return self.tally.reply()
        if command == "probe":  # another user's snapshot: seconds to `synced`, or None
            t0 = now_ns()
            try:
                async with asyncio.timeout(args["seconds"]):
                    async with self.session.get(
                        self.url,
                        params={"snapshot": "1"},
                        headers={"Authorization": f"Bearer {args['token']}"},
                    ) as response:
                        parser = Parser()
                        async for chunk in response.content.iter_any():
                            if any(e.name == "synced" for e in parser.feed(chunk)):
                                return {"seconds": (now_ns() - t0) / 1e9}
            except TimeoutError:
                pass
            return {"seconds": None}
        if command == "stop":
            if self.task is not None:
                self.task.cancel()
            for response in self.stalled:
                response.close()
            await self.session.close()
            return {}
        raise ValueError(f"unknown command {command!r}")

    def _headers(self, last_id: str | None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "text/event-stream"}
        if last_id is not None:
            headers["Last-Event-ID"] = last_id
        return headers

    async def _read(self, query: str, last_id: str | None, expect: int | None) -> None:
        """Like EventSource: when the server ends the stream, reopen it after `retry`, with
        the last id received."""
        assert self.session is not None
        tally = self.tally
        tally.requested_ns = now_ns()
        params = dict(p.split("=", 1) for p in query.split("&") if p)
        while True:
            try:
                async with self.session.get(
                    self.url, params=params, headers=self._headers(tally.last_id or last_id)
                ) as response:
                    if tally.headers_ns is None:
                        tally.headers_ns = now_ns()
                    if response.status != 200:
                        tally.ended = f"HTTP {response.status}"
                        return
                    tally.ended = await self._consume(response, expect)
            except aiohttp.ClientError as exc:
                tally.ended = f"cut: {exc.__class__.__name__}"
            if tally.ended in ("synced", "all rows"):
                return
            tally.reconnects += 1
            await asyncio.sleep(tally.retry_ms / 1000)

    async def _consume(self, response: aiohttp.ClientResponse, expect: int | None) -> str:
        """Read until `synced` (no `expect`) or until `expect` rows arrived; or the end."""
        tally, parser = self.tally, Parser()
        while True:
            chunk = await response.content.readany()
            if not chunk:
                return "server ended the stream"
            tally.received += len(chunk)
            tally.take(parser, chunk, expect)
            if tally.synced_ns is not None:
                self.synced.set()
                if expect is None:
                    return "synced"
            if tally.done_ns is not None:
                return "all rows"


def tab_main(conn: Connection, port: int, token: str) -> None:
    serve(conn, BigTab(port, token))


# -- the database side -------------------------------------------------------------------


def bulk_import(pg: Postgres, user: uuid.UUID, rows: int) -> float:
    """The big user's rows, inserted by the table's owner in one statement; seconds taken."""
    t0 = time.monotonic()
    with pg.connect() as conn:
        conn.execute(
            "insert into files (user_id, filename, status, error_message)"
            " select %s, 'import-' || n || '.csv', 'failed', repeat('e', 200)"
            " from generate_series(1, %s) n",
            (user, rows),
        )
        conn.execute("vacuum analyze files")
    return time.monotonic() - t0


def update_all(conn: psycopg.Connection[tuple[Any, ...]], user: uuid.UUID, tag: str) -> float:
    """Every row of `user`, in one transaction; seconds taken."""
    t0 = time.monotonic()
    with conn.transaction():
        conn.execute(
            "update files set progress = 50, processing_stage = %s where user_id = %s",
            (f"big:{tag};", user),
        )
    return time.monotonic() - t0


def listener_pids(conn: psycopg.Connection[tuple[Any, ...]]) -> list[int]:
    return [pid for (pid,) in conn.execute(LISTENER)]


def oldest_transaction(conn: psycopg.Connection[tuple[Any, ...]]) -> float | None:
    """Seconds the service's oldest open transaction has been open, if any."""
    row = conn.execute(
        "select extract(epoch from now() - min(xact_start)) from pg_stat_activity"
        " where application_name = 'bench-service' and xact_start is not null"
    ).fetchone()
    return None if row is None or row[0] is None else round(float(row[0]), 1)


# -- one variant -------------------------------------------------------------------------


@dataclass
class Bench:
    """What every variant shares: the other user's writer, the big user and its token."""

    ctx: Context
    s: Settings
    writer: Writer
    user: uuid.UUID
    token: str


@dataclass
class Window:
    """The span one variant is judged over; other spans reported beside it."""

    start_ns: int = 0
    end_ns: int = 0
    extra: dict[str, tuple[int, int]] = field(default_factory=dict)
    # While the service cannot listen, a row's changes reach it as the row's latest state
    # (the recovery reads rows, not changes): the commits before the last are left out.
    coalesced: tuple[int, int] | None = None
    floor: Arrivals | None = None  # a bare LISTEN's, over the `extra` spans


def within(commits: Commits, start_ns: int, end_ns: int, *, inside: bool = True) -> Commits:
    """The commits that returned between `start_ns` and `end_ns` (or, not `inside`, the
    others)."""
    keep = (commits.t1 >= start_ns) & (commits.t1 <= end_ns)
    if not inside:
        keep = ~keep
    return Commits(commits.key[keep], commits.t0[keep], commits.t1[keep], commits.users[keep])


def latency(commits: Commits, other: Receivers | None, arrivals: Arrivals) -> dict[str, Any]:
    """The other user's events: from the midpoint of COMMIT (and from COMMIT returned) to
    the event parsed by its client (`other`), or to the notification at a bare LISTEN."""
    if other is None:
        delivery = deliveries(commits, arrivals, None, None, 0.0)
    else:
        delivery = deliveries(commits, arrivals, other.stream_user, other.tabs(1), 0.0)
    return {
        "commits": commits.count,
        "lost": delivery.lost,
        "p50_ms": round(delivery.percentile(50), 2),
        "p99_ms": round(delivery.percentile(99), 2),
        "max_ms": round(delivery.percentile(100), 2),
        "ack_p99_ms": round(delivery.percentile(99, ack=True), 2),
        "commit_max_ms": round(float((commits.t1 - commits.t0).max()) / 1e6, 2)
        if commits.count
        else None,
    }


def scrape(server: ServerProcess) -> dict[str, float]:
    """The service's counters that tell what happened to streams and to its listener."""
    wanted = (
        "streamer_slow_client_disconnects_total",
        "streamer_events_dropped_total",
        "streamer_listener_reconnects_total",
        "streamer_task_failures_total",
        "streamer_notifications_total",
    )
    found: dict[str, float] = {}
    with urllib.request.urlopen(server.url("/metrics"), timeout=5) as response:
        for line in response.read().decode().splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in wanted:
                key = name.removeprefix("streamer_").removesuffix("_total")
                found[key] = found.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return found


def log_lines(server: ServerProcess) -> list[str]:
    """What the service logged about streams cut, recoveries and failures."""
    words = ("stream cut", "recovered", "WARNING", "ERROR")
    lines = server.log_tail(200_000).splitlines()
    return [line[-200:] for line in lines if any(w in line for w in words)][-12:]


def variant(
    b: Bench, name: str, body: Callable[[ServerProcess, Remote, Window], dict[str, Any]]
) -> dict[str, Any]:
    """A fresh service, the other user's stream live and written to; `body` does the big
    user's part and sets the window it is judged over."""
    ctx, s = b.ctx, b.s
    server = start_service(ctx.pg, code=ctx.code)
    other = Receivers.streams(
        f"other-{name}", ctx.population, plan(1, 1), server.port, 1, ctx.records
    )
    tab = Remote(f"big-{name}", tab_main, server.port, b.token)
    window = Window()
    try:
        if other.open(1)["opened"] != 1:
            raise RuntimeError(f"the other user's stream did not open: {other.errors}")
        b.writer.start(s.rate, 3600, 1, 1)
        time.sleep(s.settle)
        cpu0 = server.cpu()
        roots = [os.getpid(), ctx.pg.postmaster_pid()]
        with machine_share(roots) as share:
            result = body(server, tab, window)
        result["server_cpu_s"] = round(server.cpu() - cpu0, 2)
        result["machine"] = share
        time.sleep(0.5)  # the other user's last events of the window
        commits = b.writer.finish(now=True)
        other.drain(commits.count, timeout=10, quiet=2)
        arrivals = other.collect()
        result["other"] = latency(within(commits, window.start_ns, window.end_ns), other, arrivals)
        for label, (start, end) in window.extra.items():
            result[f"other_{label}"] = latency(within(commits, start, end), other, arrivals)
            if window.floor is not None:
                result[f"floor_{label}"] = latency(within(commits, start, end), None, window.floor)
        judged = commits
        if window.coalesced is not None:
            judged = within(commits, *window.coalesced, inside=False)
        result["other"]["lost_all_run"] = latency(judged, other, arrivals)["lost"]
        if server.process.poll() is not None:
            raise RuntimeError(f"the service died:\n{server.log_tail()}")
        result["metrics"] = scrape(server)
        result["log"] = log_lines(server)
        return result
    finally:
        tab.stop()
        other.stop()
        server.stop()


def whole(reply: Reply, rows: int, *, before_synced: bool) -> bool:
    """Every row once, as file-update events (before `synced`, for a read), nothing else
    of the feed's (no reset, no delete)."""
    extra = set(reply["events"]) - {"file-update", "synced", "heartbeat"}
    updates = reply["updates_at_synced"] if before_synced else reply["updates"]
    return bool(reply["rows"] == rows and updates == rows and not extra)


def snapshot(b: Bench) -> dict[str, Any]:
    def body(server: ServerProcess, tab: Remote, window: Window) -> dict[str, Any]:
        with tracking_rss(server.pid) as rss:
            reply = tab.call("read", timeout=b.s.timeout, query="snapshot=1")
        window.start_ns, window.end_ns = reply["requested_ns"], reply["synced_ns"] or now_ns()
        return {
            **summary(reply, reply["synced_ns"], rss.first, rss.peak, b.s.rows),
            "whole": whole(reply, b.s.rows, before_synced=True) and reply["reconnects"] == 0,
        }

    return variant(b, "snapshot", body)


def resume(b: Bench) -> dict[str, Any]:
    def body(server: ServerProcess, tab: Remote, window: Window) -> dict[str, Any]:
        held = tab.call("read")  # no snapshot: just a cursor
        # The service gets a notification for each row (its owner has no stream here): wait
        # until it has read them all, and judge the other user's latency meanwhile, beside
        # a bare LISTEN's (Postgres delivers notifications in commit order, to everyone).
        floor = Receivers.floor(b.ctx.pg, b.ctx.records)
        try:
            floor.open(1)
            with b.ctx.pg.connect() as conn:
                t0 = now_ns()
                update_s = update_all(conn, b.user, "resume")
            with profiling(b, server, "notifications") as profile:
                flood_s = settle_cpu(server)
            window.extra["during_update"] = (t0, now_ns())
            window.floor = floor.collect()
        finally:
            floor.stop()
        with tracking_rss(server.pid) as rss:
            reply = tab.call("read", timeout=b.s.timeout, last_id=held["last_id"])
        window.start_ns, window.end_ns = reply["requested_ns"], reply["synced_ns"] or now_ns()
        return {
            **summary(reply, reply["synced_ns"], rss.first, rss.peak, b.s.rows),
            "whole": whole(reply, b.s.rows, before_synced=True) and reply["reconnects"] == 0,
            "update_s": round(update_s, 2),
            "notifications_s": round(flood_s, 2),
            "profile": profile,
        }

    return variant(b, "resume", body)


def recovery(b: Bench) -> dict[str, Any]:
    def body(server: ServerProcess, tab: Remote, window: Window) -> dict[str, Any]:
        tab.call("start", expect=b.s.rows)  # live, no snapshot
        # A database cannot refuse connections from inside itself: the gate is kept from
        # another one.
        admin = b.ctx.pg.server.url("postgres") + "?application_name=bench-harness"
        with b.ctx.pg.connect() as conn, psycopg.connect(admin, autocommit=True) as gate:
            before = listener_pids(conn)
            if len(before) != 1:
                raise RuntimeError(f"expected one LISTEN connection of the service: {before}")
            # Nobody may connect (the service's listener included) until the rows are in.
            gate.execute(f"alter database {DATABASE} allow_connections false")
            try:
                outage_ns = now_ns()
                conn.execute("select pg_terminate_backend(%s)", (before[0],))
                update_s = update_all(conn, b.user, "recovery")
            finally:
                gate.execute(f"alter database {DATABASE} allow_connections true")
            open_ns = now_ns()
            with tracking_rss(server.pid) as rss:
                tab.send("wait", timeout=b.s.timeout)
                listening_ns = None
                while listening_ns is None and not tab.answered():
                    if [p for p in listener_pids(conn) if p not in before]:
                        listening_ns = now_ns()
                    time.sleep(0.005)
                reply = tab.receive(b.s.timeout + 10)
        done_ns = reply["done_ns"]
        window.start_ns = listening_ns or open_ns
        window.end_ns = done_ns or now_ns()
        window.extra["outage"] = (outage_ns, open_ns)
        window.coalesced = (outage_ns, window.start_ns)
        # Judged from the listener's return: how long it stays away is its backoff's doing.
        result = summary(reply, done_ns, rss.first, rss.peak, b.s.rows, start_ns=window.start_ns)
        result.update(
            whole=whole(reply, b.s.rows, before_synced=False) and reply["reconnects"] == 0,
            update_s=round(update_s, 2),
            outage_s=round((open_ns - outage_ns) / 1e9, 2),
            relisten_s=None if listening_ns is None else round((listening_ns - open_ns) / 1e9, 2),
            from_open_s=None if done_ns is None else round((done_ns - open_ns) / 1e9, 2),
        )
        return result

    return variant(b, "recovery", body)


def stalled(b: Bench) -> dict[str, Any]:
    def body(server: ServerProcess, tab: Remote, window: Window) -> dict[str, Any]:
        window.start_ns = now_ns()
        with tracking_rss(server.pid) as rss:
            status = tab.call("stall", timeout=b.s.timeout)["status"]
            time.sleep(b.s.stall)
            held = server.rss() - rss.first
        with b.ctx.pg.connect() as conn:
            open_for = oldest_transaction(conn)
        window.end_ns = now_ns()
        # As many stalled snapshots as the service has pool connections: does anyone else's
        # snapshot still open?
        for _ in range(POOL_SIZE - 1):
            tab.call("stall", timeout=b.s.timeout)
        probe = tab.call(
            "probe", token=b.ctx.population.tokens[1], seconds=PROBE_TIMEOUT, timeout=60
        )
        ready = readyz(server)
        reply = tab.call("unstall", timeout=b.s.timeout, expect=None)
        return {
            "status": status,
            "stall_s": b.s.stall,
            "rss_before_mb": round(rss.first / MB, 1),
            "rss_peak_growth_mb": round(rss.growth / MB, 1),
            "rss_held_mb": round(held / MB, 1),
            "transaction_open_s": open_for,
            "stalled_streams": POOL_SIZE,
            "probe_s": None if probe["seconds"] is None else round(probe["seconds"], 3),
            "readyz": ready,
            "after": reply["ended"],
            "whole": whole(reply, b.s.rows, before_synced=True),
            "updates_at_synced": reply["updates_at_synced"],
            "reconnects": reply["reconnects"],
        }

    return variant(b, "stalled", body)


@contextlib.contextmanager
def profiling(b: Bench, server: ServerProcess, name: str) -> Iterator[dict[str, Any]]:
    """py-spy on the service for the first `profile` seconds of the body (unless the run
    has profiles off); the summary lands in the dict, the files beside results.md."""
    if not b.ctx.profile:
        yield {}
        return
    path = Path(b.ctx.results) / f"profile-big-user-{name}"
    with recording(server.pid, b.s.profile, path) as summary:
        yield summary


def readyz(server: ServerProcess, timeout: float = 5.0) -> str:
    """What /readyz answers (it reads the database through the pool)."""
    try:
        with urllib.request.urlopen(server.url("/readyz"), timeout=timeout) as response:
            return str(response.status)
    except urllib.error.HTTPError as exc:
        return str(exc.code)
    except (TimeoutError, urllib.error.URLError):
        return f"no answer in {timeout:.0f} s"


def settle_cpu(server: ServerProcess, idle: float = 0.05, window: float = 0.5) -> float:
    """Seconds until the service uses under `idle` of a core over `window` seconds."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:
        cpu0 = server.cpu()
        time.sleep(window)
        if server.cpu() - cpu0 < idle * window:
            break
    return time.monotonic() - t0 - window


def summary(
    reply: Reply,
    end_ns: int | None,
    rss_first: int,
    rss_peak: int,
    rows: int,
    *,
    start_ns: int | None = None,
) -> dict[str, Any]:
    start = reply["requested_ns"] if start_ns is None else start_ns
    seconds = None if end_ns is None else (end_ns - start) / 1e9
    return {
        "seconds": None if seconds is None else round(seconds, 2),
        "rows_per_s": None if not seconds else round(rows / seconds),
        "first_byte_s": None
        if reply["headers_ns"] is None
        else round((reply["headers_ns"] - reply["requested_ns"]) / 1e9, 3),
        "rss_before_mb": round(rss_first / MB, 1),
        "rss_peak_growth_mb": round((rss_peak - rss_first) / MB, 1),
        "rows_received": reply["rows"],
        "updates": reply["updates"],
        "updates_at_synced": reply["updates_at_synced"],
        "events": reply["events"],
        "reconnects": reply["reconnects"],
        "ended": reply["ended"],
        "megabytes": round(reply["bytes"] / MB, 1),
    }


def run(ctx: Context) -> dict[str, Any]:
    s = QUICK if ctx.quick else FULL
    user = uuid.uuid4()
    import_s = bulk_import(ctx.pg, user, s.rows)
    writer = Writer(ctx.pg, ctx.population, 1, ctx.records)  # one connection: one commit
    b = Bench(ctx, s, writer, user, mint_token(SECRET, user, TOKEN_TTL))
    out: dict[str, Any] = {
        "rows": s.rows,
        "rate": s.rate,
        "import_s": round(import_s, 1),
        "row_bytes": row_bytes(ctx.pg, user),
    }
    try:
        for name, how in (
            ("snapshot", snapshot),
            ("resume", resume),
            ("recovery", recovery),
            ("stalled", stalled),
        ):
            out[name] = how(b)
    finally:
        writer.stop()
        with ctx.pg.connect() as conn:
            # Gone without a trace (no triggers: no tombstones, no notifications).
            conn.execute("set session_replication_role = replica")
            conn.execute("delete from files where user_id = %s", (user,))
    return out


def row_bytes(pg: Postgres, user: uuid.UUID) -> int:
    with pg.connect() as conn:
        row = conn.execute(
            "select avg(octet_length(to_jsonb(f)::text))::int from files f where user_id = %s",
            (user,),
        ).fetchone()
    return int(row[0]) if row and row[0] is not None else 0
