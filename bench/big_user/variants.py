"""The four ways the big user's rows reach a stream: snapshot, resume, recovery, stalled."""

from __future__ import annotations

import time
from typing import Any

import psycopg

from bench.agent import Remote, now_ns
from bench.big_user.service import (
    listener_pids,
    oldest_transaction,
    readyz,
    settle_cpu,
    update_all,
)
from bench.big_user.variant import MB, Bench, Window, profiling, summary, variant, whole
from bench.harness import DATABASE, ServerProcess
from bench.load import Receivers
from bench.procfs import tracking_rss

POOL_SIZE = 4  # the service's default STREAMER_POOL_SIZE
PROBE_TIMEOUT = 10.0  # seconds another user's snapshot may take beside stalled ones


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
