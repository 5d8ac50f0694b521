"""The herd's restart: the whole service SIGKILLed under its open tabs and started again at
once, what it cost and who had the cores meanwhile (the tabs' processes share them), and when
each tab was back."""

from __future__ import annotations

import time
from typing import Any

from bench.agent import Remote, call_all
from bench.crowd.service import Service
from bench.procfs import cpu_seconds


def cpu_of(remotes: list[Remote]) -> float:
    """CPU seconds the load generator's processes used so far."""
    total = 0.0
    for remote in remotes:
        if remote.process.pid is not None:
            total += cpu_seconds(remote.process.pid)
    return total


def restarted(
    service: Service, remotes: list[Remote], timeout: float
) -> tuple[float | None, str | None, dict[str, Any]]:
    """Kill the service and start it again: seconds until it was ready (None: not within
    `timeout`, and why), and the CPU it and the tabs used meanwhile (its processes are new)."""
    clients = cpu_of(remotes)
    service.kill()
    error = None
    try:
        ready_s: float | None = service.start(timeout=timeout)
    except RuntimeError as exc:  # not every worker listening and ready: measured anyway
        ready_s, error = None, str(exc).splitlines()[0]
    cpu = {
        "service_to_listen_s": round(service.listen_cpu, 1),
        "service_s": round(service.cpu(), 1),
        "clients_s": round(cpu_of(remotes) - clients, 1),
        "clients_before": clients,
    }
    return ready_s, error, cpu


def to_all_back(service: Service, remotes: list[Remote], cpu: dict[str, Any]) -> dict[str, Any]:
    """The CPU both used from the kill until every tab was back."""
    return {
        "service_to_all_back_s": round(service.cpu(), 1),
        "clients_to_all_back_s": round(cpu_of(remotes) - cpu.pop("clients_before"), 1),
    }


def resynced_since(remotes: list[Remote], killed: int, streams: int, timeout: float) -> list[int]:
    """When each tab synced again after the kill, once all `streams` have or `timeout`
    passed. A client process busy with its tabs' reconnects may answer late: it is waited
    for."""
    deadline = time.monotonic() + timeout
    while True:
        replies = call_all(remotes, "synced_since", timeout=timeout, t=killed)
        synced = [t for r in replies for t in r["synced"]]
        if len(synced) >= streams or time.monotonic() >= deadline:
            return synced
        time.sleep(1)
