"""What the crowd's tabs hold against the database, once the writers stopped: every tab's
row version beside the database's, looked at until they agree or CONVERGE_S passed (a tab
behind may be an event lost, or one still on its way from a service busy with a herd).
A tab still behind is looked at closely (`behind`): which worker holds it, the cursors it
resumed from and was synced at, and whether what it lacks was committed before that sync
(its catch-up should have had it) or after (its live stream should have)."""

from __future__ import annotations

import re
import subprocess
import time
from collections import Counter
from typing import Any

import numpy as np

from bench.agent import Remote, call_all
from bench.load import Context, Population

CONVERGE_S = 30.0
SHOWN = 12  # tabs behind described one by one
_SOCKET = re.compile(r"\S+:(\d+)\s+(\S+):(\d+)\s+users:\(\(\"[^\"]*\",pid=(\d+)")


def versions(
    ctx: Context, remotes: list[Remote], people: Population, stream_user: Any
) -> tuple[Any, Any, Any, Any]:
    """Every tab's stream index and row version, the database's for the same row (stream i
    is user stream_user[i]'s), and whether the tab is live (synced on its connection)."""
    replies = call_all(remotes, "state")
    index = np.array([i for r in replies for i in r["index"]], dtype=np.int64)
    seen = np.array([v for r in replies for v in r["version"]], dtype=np.int64)
    live = np.array([v for r in replies for v in r["live"]], dtype=bool)
    with ctx.pg.connect() as conn:
        query = "select id::text, streamer_version from files where id = any(%s::uuid[])"
        found = dict(conn.execute(query, (people.rows,)).fetchall())
    truth = np.array([found[people.rows[u]] for u in stream_user[index]])
    return index, seen, truth, live


def settled(
    ctx: Context, remotes: list[Remote], people: Population, stream_user: Any, port: int
) -> dict[str, Any]:
    """Once the tabs agree with the database (or CONVERGE_S passed): how many are behind
    it (and of those, live), ahead of it, were behind at first, and the seconds it took."""
    started = time.monotonic()
    index, seen, truth, live = versions(ctx, remotes, people, stream_user)
    behind = int((seen < truth).sum())
    while (seen < truth).any() and time.monotonic() - started < CONVERGE_S:
        time.sleep(1)
        index, seen, truth, live = versions(ctx, remotes, people, stream_user)
    lagging = seen < truth
    return {
        "stale": int(lagging.sum()),  # lost, or a tab that is not back
        "stale_live": int((lagging & live).sum()),
        "ahead": int((seen > truth).sum()),
        "stale_at_first": behind,  # 3 s after the last commit
        "converged_s": round(time.monotonic() - started, 1),
        "behind": described(remotes, index[lagging], truth[lagging], stream_user, port),
    }


def workers_of(port: int) -> dict[tuple[str, int], int]:
    """The process holding each connection to the service's `port`, by its client's
    (address, port)."""
    lines = subprocess.run(
        ["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
        capture_output=True, text=True, check=False,
    ).stdout.splitlines()  # fmt: skip
    found = {}
    for line in lines:
        match = _SOCKET.search(line)
        if match and int(match[1]) == port:
            found[(match[2], int(match[3]))] = int(match[4])
    return found


def _number(cursor: str | None) -> int | None:
    return None if not cursor else int(cursor.split(".")[0])


def described(
    remotes: list[Remote], lagging: Any, truth: Any, stream_user: Any, port: int
) -> dict[str, Any]:
    """Where the tabs behind are, and what they lack (see the module's doc)."""
    if not len(lagging):
        return {}
    wanted = set(int(i) for i in lagging)
    replies = call_all(remotes, "state")
    asks = [[i for i in r["index"] if i in wanted] for r in replies]
    for remote, ask in zip(remotes, asks, strict=True):
        remote.send("detail", index=ask)
    tabs = [tab for remote in remotes for tab in remote.receive(60)["tabs"]]
    db_version = {int(i): int(v) for i, v in zip(lagging, truth, strict=True)}
    held_by = workers_of(port)
    users = Counter(int(stream_user[i]) for i in wanted)
    kinds: Counter[str] = Counter()
    by_worker: Counter[str] = Counter()
    for tab in tabs:
        xid = db_version[tab["index"]] // 1024
        synced = _number(tab["synced_id"])
        tab["db_version"] = db_version[tab["index"]]
        tab["lacks_xid"] = xid
        tab["both_tabs_of_user"] = users[int(stream_user[tab["index"]])] > 1
        if synced is None:
            kinds["never synced"] += 1
        elif xid < synced:
            kinds["committed before its sync (the catch-up lacked it)"] += 1
        else:
            kinds["committed after its sync (the live stream lacked it)"] += 1
        where = tuple(tab["sockname"]) if tab["sockname"] else None
        tab["worker"] = held_by.get(where) if where else None
        by_worker[str(tab["worker"])] += 1
    return {
        "kinds": dict(kinds),
        "by_worker": dict(by_worker),
        "users_with_both_tabs_behind": sum(1 for n in users.values() if n > 1),
        "tabs": tabs[:SHOWN],
    }
