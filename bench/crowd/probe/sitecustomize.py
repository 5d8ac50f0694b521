"""The crowd's probe of the pool's waits, loaded into every process of the service (the
supervisor and each worker) through PYTHONPATH when BENCH_POOL_PROBE is set: the service
exposes no pool metric, so this times each `asyncpg.Pool` acquire from the outside.

Every half second a thread (each forked worker's own) writes this process's figures to
BENCH_POOL_PROBE/<pid>.json: acquires, the longest wait, waits over 10/100/1000 ms, and the
most acquires waiting at once; and its full garbage collections (how many, how long). A
SIGKILLed process keeps what it wrote last.
"""

from __future__ import annotations

import os

if os.environ.get("BENCH_POOL_PROBE"):
    import gc
    import json
    import threading
    import time

    import asyncpg.pool

    _figures = {"acquires": 0, "max_wait_ms": 0.0, "over_10ms": 0, "over_100ms": 0,
                "over_1s": 0, "waiting": 0, "max_waiting": 0, "wait_ms_total": 0.0,
                "full_gcs": 0, "full_gc_ms_total": 0.0, "max_full_gc_ms": 0.0}  # fmt: skip
    _gc_started = [0.0]

    def _timed_gc(phase: str, info: dict[str, int]) -> None:
        """The loop stops for a full collection: how often, and for how long."""
        if info["generation"] != 2:
            return
        if phase == "start":
            _gc_started[0] = time.monotonic()
            return
        ms = (time.monotonic() - _gc_started[0]) * 1000
        _figures["full_gcs"] += 1
        _figures["full_gc_ms_total"] += ms
        _figures["max_full_gc_ms"] = max(_figures["max_full_gc_ms"], ms)

    gc.callbacks.append(_timed_gc)
    _plain = asyncpg.pool.Pool._acquire

    async def _acquire(self, timeout):  # type: ignore[no-untyped-def]  # noqa: ASYNC109
        f = _figures
        f["waiting"] += 1
        f["max_waiting"] = max(f["max_waiting"], f["waiting"])
        started = time.monotonic()
        try:
            return await _plain(self, timeout)
        finally:
            ms = (time.monotonic() - started) * 1000
            f["waiting"] -= 1
            f["acquires"] += 1
            f["wait_ms_total"] += ms
            f["max_wait_ms"] = max(f["max_wait_ms"], ms)
            f["over_10ms"] += ms > 10
            f["over_100ms"] += ms > 100
            f["over_1s"] += ms > 1000

    asyncpg.pool.Pool._acquire = _acquire

    def _write() -> None:
        path = os.path.join(os.environ["BENCH_POOL_PROBE"], f"{os.getpid()}.json")
        while True:
            time.sleep(0.5)
            if _figures["acquires"] or _figures["waiting"] or _figures["full_gcs"]:
                with open(path + ".tmp", "w") as out:
                    json.dump(_figures, out)
                os.replace(path + ".tmp", path)

    def _start() -> None:
        threading.Thread(target=_write, name="bench-pool-probe", daemon=True).start()

    _start()
    # The workers are forked from a fork server this was loaded into: a thread does not
    # survive a fork, so each child starts its own (its figures, its file).
    os.register_at_fork(after_in_child=_start)
