"""What one open stream keeps in the service's process, by owner (issue 24); not part of
`make bench`.

    python -m bench.investigations.stream_memory [--streams 2000]

The app runs in this process as `streamer serve` sets it up (create_app, the AppRunner's
options, handler cancellation) under tracemalloc, while two crowd processes
(bench/crowd/tabs.py: Chrome's EventSource headers, the token in a cookie, `?snapshot=1`)
open the streams. Once they are synced, four readings:

1. tracemalloc's heap added per stream, by file and line;
2. the objects the garbage collector tracks that appeared, per stream, by type
   (count and sys.getsizeof);
3. for a sample of streams, every object reachable from each of the stream's parts that
   did not exist before (non-tracked ones too: str, bytes, ints), in sys.getsizeof bytes,
   given to the first part that reaches it, in this order: the Subscriber, its Sink, its
   `ended` future, its expiry timer, the Live its connection was handed to, the transport
   (its socket); and how many of aiohttp's requests are still held (none: the handler
   returned). Until 5eca8e5 aiohttp's request, parser and handler task stayed: 20.2 KB.
4. the hub's own index of streams (dicts and sets keyed by owner and user).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import sys
import tracemalloc
import types
from collections import Counter
from typing import Any

from aiohttp import web

from bench.agent import Remote, raise_nofile
from bench.clients import scratch_dir
from bench.crowd import PATH, population
from bench.crowd.tabs import CrowdSpec, crowd_main
from bench.harness import SECRET, Postgres, cleanup
from bench.procfs import rss_bytes
from streamer import keys
from streamer.app import create_app
from streamer.config import Settings
from streamer.embedded import _free_port
from streamer.live import Live
from streamer.server import server_options

SAMPLE = 200  # streams walked object by object
SKIP = (type, types.ModuleType, types.FunctionType, types.CodeType, types.BuiltinFunctionType)


def _short(filename: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", "/work/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def _reachable(roots: list[object]) -> tuple[set[int], list[object]]:
    """The ids of everything reachable from `roots`, and the objects themselves (held, so
    that no id is reused by a new object meanwhile)."""
    seen: set[int] = set()
    held: list[object] = []
    todo = list(roots)
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, SKIP):
            continue
        seen.add(id(obj))
        held.append(obj)
        todo.extend(gc.get_referents(obj))
    return seen, held


def _claim(
    root: object,
    old: set[int],
    claimed: set[int],
    others: set[int],
    kinds: Counter[str] | None = None,
) -> tuple[int, int]:
    """Bytes and objects reachable from `root`, never through another part's root
    (`others`), that are new and not claimed yet."""
    size = count = 0
    todo = [root]
    while todo:
        obj = todo.pop()
        key = id(obj)
        if key in old or key in claimed or key in others or isinstance(obj, SKIP):
            continue
        claimed.add(key)
        size += sys.getsizeof(obj)
        if kinds is not None:
            kinds[type(obj).__name__] += sys.getsizeof(obj)
        count += 1
        todo.extend(gc.get_referents(obj))
    return size, count


def _parts(live: Any, subs: dict[int, Any]) -> list[tuple[str, object]]:
    """A stream's parts once it is live (its connection handed over to a Live: no request,
    no handler task is left). Each claims what it reaches without passing another's root."""
    sub = subs.get(id(live.transport))
    return [
        ("Subscriber (streamer)", sub),
        ("its Sink (streamer)", getattr(sub, "_sink", None)),
        ("its `ended` future", getattr(sub, "ended", None)),
        ("its token's expiry timer", getattr(sub, "expiry", None)),
        ("Live (protocol; start-over: Asked, partial)", live),
        ("transport + socket", live.transport),
    ]


def _print_heap(before: Any, after: Any, n: int, rss: int) -> None:
    stats = after.compare_to(before, "lineno")
    heap = sum(s.size_diff for s in stats)
    print(f"{n} streams: Python heap +{heap / n:,.0f} B per stream (tracemalloc); RSS "
          f"+{rss / n:,.0f} B (tracemalloc's bookkeeping included)\n")  # fmt: skip
    by_file: Counter[str] = Counter()
    for s in stats:
        by_file[_short(s.traceback[0].filename)] += s.size_diff
    print("by file (B per stream):")
    for name, size in by_file.most_common(18):
        print(f"  {size / n:7,.0f}  {name}")
    print("\nby line:")
    for s in stats[:25]:
        frame = s.traceback[0]
        print(f"  {s.size_diff / n:7,.0f} B {s.count_diff / n:5.1f} blocks  "
              f"{_short(frame.filename)}:{frame.lineno}")  # fmt: skip


def _print_objects(
    objects: list[Any], old_types: Counter[str], old_sizes: Counter[str], n: int
) -> None:
    objects = gc.get_objects()
    types_now = Counter(type(o).__name__ for o in objects)
    sizes_now: Counter[str] = Counter()
    for o in objects:
        sizes_now[type(o).__name__] += sys.getsizeof(o)
    print("\ngc-tracked objects added, per stream (count, sys.getsizeof B):")
    added = {t: (types_now[t] - old_types[t], sizes_now[t] - old_sizes[t]) for t in types_now}
    for name, (count, size) in sorted(added.items(), key=lambda kv: -kv[1][1])[:22]:
        print(f"  {count / n:5.2f}  {size / n:7,.0f} B  {name}")


def _print_owners(app: web.Application, objects: list[Any], old: set[int], n: int) -> None:
    hub = app[keys.HUB]
    subs = {id(sub._sink._transport): sub for sub in hub.subscribers() if sub._sink is not None}
    left = sum(1 for o in objects if isinstance(o, web.BaseRequest) and id(o) not in old)
    print(f"\nrequests still held: {left / n:.2f} per stream")
    sample = [o for o in objects if isinstance(o, Live) and id(o) not in old][:SAMPLE]
    owners: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    claimed: set[int] = set()
    kinds: dict[str, Counter[str]] = {}
    for live in sample:
        parts = [(name, root) for name, root in _parts(live, subs) if root]
        roots = {id(root) for _, root in parts}
        for name, root in parts:
            mine = kinds.setdefault(name, Counter())
            size, count = _claim(root, old, claimed, roots - {id(root)}, mine)
            owners[name] += size
            counts[name] += count
    walked = sum(owners.values()) / len(sample)
    print(f"\nper stream, by owner (sys.getsizeof of new objects reachable; {len(sample)} "
          f"streams walked; {walked:,.0f} B in all):")  # fmt: skip
    for name, size in owners.items():
        print(f"  {size / len(sample):7,.0f} B  {counts[name] / len(sample):5.1f} objects  {name}")
        top = ", ".join(f"{k} {v / len(sample):,.0f}" for k, v in kinds[name].most_common(4))
        print(f"             {top}")
    index = sys.getsizeof(hub._by_key) + sys.getsizeof(hub._per_user)
    index += sum(sys.getsizeof(s) for s in hub._by_key.values())
    print(f"  {index / n:7,.0f} B  the hub's index (dict by (feed, owner), sets, per user)")


def _print_timers(old: set[int], n: int) -> None:
    loop = asyncio.get_running_loop()
    timers: Counter[str] = Counter()
    for handle in loop._scheduled:  # type: ignore[attr-defined]
        if id(handle) not in old:
            callback = handle._callback
            timers[getattr(callback, "__qualname__", type(callback).__name__)] += 1
    print("\ntimers added (loop._scheduled), per stream, by callback:")
    for name, count in timers.most_common(8):
        print(f"  {count / n:5.2f}  {name}")


async def _study(pg: Postgres, streams: int) -> None:
    settings = Settings(database_url=pg.url, jwt_secret=SECRET)
    app = create_app(settings, pg.url, pg.url)
    runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True,
                           **server_options())  # fmt: skip
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    people = await asyncio.to_thread(population, pg, streams // 2 + 25)
    records = scratch_dir()

    def crowd(name: str, first: int, count: int, address: str) -> Remote:
        tabs = [(i, people.tokens[i % len(people.tokens)]) for i in range(first, first + count)]
        return Remote(name, crowd_main, CrowdSpec(name, address, port, PATH, tabs, records, 0.5))

    warm = [crowd("warm", 0, 50, "127.0.0.2")]
    half = streams // 2
    main = [crowd("crowd-a", 50, half, "127.0.0.3"),
            crowd("crowd-b", 50 + half, streams - half, "127.0.0.4")]  # fmt: skip

    async def open_all(remotes: list[Remote]) -> None:
        for r in remotes:
            r.send("open", concurrency=64)
        for r in remotes:
            reply = await asyncio.to_thread(r.receive, 300)
            assert reply["live"] == reply["tabs"], reply

    await open_all(warm)  # imports, pools, caches
    await asyncio.sleep(0.5)
    gc.collect()
    # What exists before the streams open (taken first: tracemalloc then counts it in both).
    old, held = _reachable(gc.get_objects())
    old_types = Counter(type(o).__name__ for o in gc.get_objects())
    old_sizes: Counter[str] = Counter()
    for o in gc.get_objects():
        old_sizes[type(o).__name__] += sys.getsizeof(o)
    rss0, before = rss_bytes(os.getpid()), tracemalloc.take_snapshot()
    await open_all(main)
    await asyncio.sleep(1)
    gc.collect()
    rss1, after = rss_bytes(os.getpid()), tracemalloc.take_snapshot()
    _print_heap(before, after, streams, rss1 - rss0)
    objects = gc.get_objects()
    _print_objects(objects, old_types, old_sizes, streams)
    _print_owners(app, objects, old, streams)
    _print_timers(old, streams)
    for r in [*warm, *main]:
        r.stop()
    shutil.rmtree(records, ignore_errors=True)
    del held
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.investigations.stream_memory")
    parser.add_argument("--streams", type=int, default=2000)
    args = parser.parse_args()
    raise_nofile()
    pg = Postgres(fast=True)
    try:
        pg.start()
        tracemalloc.start(1)
        asyncio.run(_study(pg, args.streams))
    finally:
        cleanup(pg)


if __name__ == "__main__":
    main()
