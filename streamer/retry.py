"""The one backoff of the service: how long to wait before trying again."""

from __future__ import annotations

import random


def backoff(attempt: int, first: float, cap: float, *, jitter: bool = True) -> float:
    """The wait before try `attempt` + 1 (1: after the first failure): `first`, doubling,
    at most `cap`; with `jitter` a random half of it or more, so that a fleet of processes
    that failed together does not retry together."""
    delay: float = min(cap, first * 2.0 ** min(max(attempt, 1) - 1, 30))
    return delay * random.uniform(0.5, 1.0) if jitter else delay
