"""Scenario: shaped streams (issue 23). What filters cost the service, and whether a filtered
snapshot of a large user is served by an index.

- `live`: 1,000 users x 10 tabs, the writers at 1,000 commits/s (one row each), first with
  every stream plain, then with 100 distinct shapes (`status=eq.processing&filename=neq.
  none-<k>`: every row matches, so both phases deliver the same events), a user's ten tabs
  under ten different shapes, so that each change is evaluated and framed once per shape,
  not once per user. The figure: the service's CPU per delivered event, filtered over
  plain (target: within 1.3x), and the latency of each.
- `snapshot`: a user with 200,000 rows, 1% of them failed; `?snapshot=1&status=eq.failed`
  timed to `synced`, without and with an index on (user_id, status), and the plan Postgres
  chose for the shaped snapshot's query.
"""

from __future__ import annotations

import time
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg

from bench.harness import SECRET, start_service
from bench.load import TOKEN_TTL, Context
from bench.phase import measure, running
from streamer import queries
from streamer.auth import mint_token
from streamer.feeds import FILES
from streamer.shapes import parse_shape

TARGET = 1.3  # filtered CPU per delivered event over plain
SHAPES = 100
FILES_COLUMNS = {"status": "text", "filename": "text", "id": "uuid"}


@dataclass(frozen=True)
class Settings:
    users: int
    tabs: int
    rate: float  # commits per second, one row each
    seconds: float
    warmup: float
    big_rows: int


FULL = Settings(1000, 10, 1000, 10, 1, 200_000)
QUICK = Settings(100, 10, 300, 3, 0.5, 20_000)


def shaped_queries(users: int, tabs: int) -> tuple[str, ...]:
    """Stream j (user j % users, tab j // users) asks for shape (user + tab) % SHAPES."""
    return tuple(
        f"status=eq.processing&filename=neq.none-{(j % users + j // users) % SHAPES}"
        for j in range(users * tabs)
    )


def _live(ctx: Context, s: Settings, query: str | tuple[str, ...]) -> dict[str, Any]:
    with running(ctx, "service", s.users, s.tabs, processes=2, query=query) as (
        server,
        receivers,
    ):
        receivers.open(s.users * s.tabs, concurrency=32)
        step = measure(
            ctx,
            "service",
            server,
            receivers,
            rate=s.rate,
            seconds=s.seconds,
            rows=1,
            users=s.users,
            warmup=s.warmup,
        )
    step.pop("cdf_ms")
    delivered = step["received"]
    cpu_s = (step["server_cpu_pct"] or 0) / 100 * s.seconds
    step["server_us_per_event"] = round(1e6 * cpu_s / delivered, 2) if delivered else None
    return step


def _import(ctx: Context, user: uuid.UUID, rows: int) -> None:
    with ctx.pg.connect() as conn:
        conn.execute(
            "insert into files (user_id, filename, status)"
            " select %s, 'big-' || n || '.csv', case when n %% 100 = 0 then 'failed'"
            " else 'ready' end from generate_series(1, %s) n",
            (user, rows),
        )
        conn.execute("vacuum analyze files")


def _plan(ctx: Context, user: uuid.UUID) -> str:
    """The plan of the shaped snapshot's query as the service sends and plans it."""
    shape = parse_shape([("status", "eq.failed")], FILES_COLUMNS)
    where, params = shape.where(3, alias="r")
    sql = queries.since(FILES, tombstones=False, where=where)
    with ctx.pg.connect() as conn:
        conn.execute("set plan_cache_mode = force_custom_plan")  # as the service plans it
        conn.execute(f"prepare shaped(text[], bigint, text) as {sql}")
        # EXECUTE takes no bound parameters: the values are quoted in by the client.
        rows = (
            psycopg.ClientCursor(conn)
            .execute("explain (format json) execute shaped(%s, 0, %s)", ([str(user)], *params))
            .fetchall()
        )
        conn.execute("deallocate shaped")
    return _scans(rows[0][0][0]["Plan"])


def _scans(plan: dict[str, Any]) -> str:
    """The plan's scans of files, as `<node> using <index>`."""
    found = []
    if plan.get("Relation Name") == "files":
        found.append(
            f"{plan['Node Type']}"
            + (f" using {plan['Index Name']}" if "Index Name" in plan else "")
        )
    for child in plan.get("Plans", []):
        found.append(_scans(child))
    return "; ".join(f for f in found if f)


def _snapshot_seconds(port: int, token: str) -> tuple[float, int]:
    """Request to `synced` of the big user's failed rows; the rows received."""
    url = f"http://127.0.0.1:{port}/api/files/events?snapshot=1&status=eq.failed"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    t0 = time.monotonic()
    rows = 0
    with urllib.request.urlopen(request, timeout=120) as answer:
        for line in answer:
            if line.startswith(b"event: file-update"):
                rows += 1
            elif line.startswith(b"event: synced"):
                break
    return time.monotonic() - t0, rows


def _snapshot(ctx: Context, s: Settings) -> dict[str, Any]:
    user = uuid.uuid4()
    _import(ctx, user, s.big_rows)
    token = mint_token(SECRET, user, TOKEN_TTL)
    out: dict[str, Any] = {"rows": s.big_rows, "failed": s.big_rows // 100}
    server = start_service(ctx.pg, code=ctx.code)
    try:
        for index in (False, True):
            if index:
                with ctx.pg.connect() as conn:
                    conn.execute("create index files_user_status on files (user_id, status)")
                    conn.execute("analyze files")
            seconds = [_snapshot_seconds(server.port, token) for _ in range(3)]
            name = "with_index" if index else "without_index"
            out[name] = {
                "seconds": round(sorted(t for t, _ in seconds)[1], 3),
                "rows_sent": seconds[0][1],
                "plan": _plan(ctx, user),
            }
    finally:
        server.stop()
        with ctx.pg.connect() as conn:
            conn.execute("drop index if exists files_user_status")
            conn.execute("delete from files where user_id = %s", (user,))
    return out


def run(ctx: Context) -> dict[str, Any]:
    s = QUICK if ctx.quick else FULL
    plain = _live(ctx, s, "")
    shaped = _live(ctx, s, shaped_queries(s.users, s.tabs))
    ratio = None
    if plain["server_us_per_event"] and shaped["server_us_per_event"]:
        ratio = round(shaped["server_us_per_event"] / plain["server_us_per_event"], 2)
    return {
        "users": s.users,
        "tabs": s.tabs,
        "shapes": SHAPES,
        "rate": s.rate,
        "plain": plain,
        "shaped": shaped,
        "cpu_ratio": ratio,
        "target_ratio": TARGET,
        "snapshot": _snapshot(ctx, s),
    }
