"""What the big user's variants do to the database and read of the service: the bulk
import and update, the service's LISTEN connection and transactions, its counters, log,
readiness and CPU."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
import uuid
from typing import Any

import psycopg

from bench.harness import Postgres, ServerProcess

# The service's LISTEN connection: its last query is the LISTEN, or the ping that follows it
# every few seconds (pool connections end on asyncpg's reset query instead).
LISTENER = (
    "select pid from pg_stat_activity where application_name = 'bench-service'"
    " and (query ilike 'listen%' or query = 'select 1')"
)


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


def row_bytes(pg: Postgres, user: uuid.UUID) -> int:
    with pg.connect() as conn:
        row = conn.execute(
            "select avg(octet_length(to_jsonb(f)::text))::int from files f where user_id = %s",
            (user,),
        ).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


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
