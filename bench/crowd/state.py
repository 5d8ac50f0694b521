"""What the crowd's tabs hold against the database, once the writers stopped: every tab's
row version beside the database's, looked at until they agree or CONVERGE_S passed (a tab
behind may be an event lost, or one still on its way from a service busy with a herd)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from bench.agent import Remote, call_all
from bench.load import Context, Population

CONVERGE_S = 30.0


def versions(
    ctx: Context, remotes: list[Remote], people: Population, stream_user: Any
) -> tuple[Any, Any, Any]:
    """Every tab's row version, the database's for the same row (stream i is user
    stream_user[i]'s), and whether the tab is live (synced on its connection)."""
    replies = call_all(remotes, "state")
    index = np.array([i for r in replies for i in r["index"]], dtype=np.int64)
    seen = np.array([v for r in replies for v in r["version"]], dtype=np.int64)
    live = np.array([v for r in replies for v in r["live"]], dtype=bool)
    with ctx.pg.connect() as conn:
        query = "select id::text, streamer_version from files where id = any(%s::uuid[])"
        found = dict(conn.execute(query, (people.rows,)).fetchall())
    truth = np.array([found[people.rows[u]] for u in stream_user[index]])
    return seen, truth, live


def settled(
    ctx: Context, remotes: list[Remote], people: Population, stream_user: Any
) -> dict[str, Any]:
    """Once the tabs agree with the database (or CONVERGE_S passed): how many are behind
    it (and of those, live), ahead of it, were behind at first, and the seconds it took."""
    started = time.monotonic()
    seen, truth, live = versions(ctx, remotes, people, stream_user)
    behind = int((seen < truth).sum())
    while (seen < truth).any() and time.monotonic() - started < CONVERGE_S:
        time.sleep(1)
        seen, truth, live = versions(ctx, remotes, people, stream_user)
    return {
        "stale": int((seen < truth).sum()),  # lost, or a tab that is not back
        "stale_live": int(((seen < truth) & live).sum()),
        "ahead": int((seen > truth).sum()),
        "stale_at_first": behind,  # 3 s after the last commit
        "converged_s": round(time.monotonic() - started, 1),
    }
