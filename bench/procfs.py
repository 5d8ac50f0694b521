"""Readings from /proc: a process's memory and CPU, a process tree's CPU, how busy the
machine is and how much of that is not this run's, and what the machine is."""

from __future__ import annotations

import contextlib
import os
import platform
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int) -> int:
    """Resident set size of one process."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages (Postgres's shared buffers) split among sharers."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (/proc/<pid>/stat utime, stime)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            found.append(int(entry))
    return found


def _process_table() -> dict[int, tuple[int, float]]:
    """pid: (ppid, CPU seconds of the process and of its children it has waited for)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu = sum(int(v) for v in fields[11:15]) / TICKS  # utime stime cutime cstime
        table[int(entry)] = (int(fields[1]), cpu)
    return table


def busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (everyone's)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (
            int(v) for v in f.readline().split()[1:9]
        )
    return (user + nice + system + irq + softirq + steal) / TICKS


def tree_cpu(roots: list[int]) -> float:
    """CPU seconds used by `roots` and every process under them, ended ones included."""
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, todo, seen = 0.0, list(roots), set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in table:
            continue
        seen.add(pid)
        total += table[pid][1]
        todo.extend(children.get(pid, []))
    return total


def machine_busy(seconds: float = 1.0) -> float:
    """Fraction of all cores busy over `seconds` (everyone's processes, ours included)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + values[4]
        return sum(values), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def loadavg() -> tuple[float, float, float]:
    one, five, fifteen = os.getloadavg()
    return one, five, fifteen


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


@contextlib.contextmanager
def machine_share(roots: list[int]) -> Iterator[dict[str, float]]:
    """How busy the machine was meanwhile, and how much of it was not this run."""
    share: dict[str, float] = {}
    t0, busy0, ours0 = time.monotonic(), busy_seconds(), tree_cpu(roots)
    yield share
    wall, cores = time.monotonic() - t0, os.cpu_count() or 1
    busy, ours = busy_seconds() - busy0, tree_cpu(roots) - ours0
    share["busy_pct"] = round(100 * busy / (wall * cores), 1)
    share["others_pct"] = round(100 * max(0.0, busy - ours) / (wall * cores), 1)


# -- sampling one process's memory ------------------------------------------------------


@dataclass
class Rss:
    """One process's RSS, sampled often: the first reading and the highest."""

    first: int = 0
    peak: int = 0
    samples: int = 0

    @property
    def growth(self) -> int:
        return self.peak - self.first


@contextlib.contextmanager
def tracking_rss(pid: int, every: float = 0.01) -> Iterator[Rss]:
    """Sample `pid`'s RSS every `every` seconds, in a thread, until exit: a peak that
    lasts a fraction of a second is seen."""
    rss = Rss()
    rss.first = rss.peak = rss_bytes(pid)
    done = threading.Event()

    def run() -> None:
        while not done.wait(every):
            try:
                rss.peak = max(rss.peak, rss_bytes(pid))
            except OSError:  # it exited
                return
            rss.samples += 1

    thread = threading.Thread(target=run, name="rss", daemon=True)
    thread.start()
    try:
        yield rss
    finally:
        done.set()
        thread.join(10)
        with contextlib.suppress(OSError):
            rss.peak = max(rss.peak, rss_bytes(pid))
