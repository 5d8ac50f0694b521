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

import uuid
from typing import Any

from bench.big_user.service import bulk_import, row_bytes
from bench.big_user.variant import FULL, QUICK, Bench
from bench.big_user.variants import recovery, resume, snapshot, stalled
from bench.harness import SECRET
from bench.load import TOKEN_TTL, Context, Writer
from streamer.auth import mint_token


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
