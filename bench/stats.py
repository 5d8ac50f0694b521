"""Joining what the writers committed with what the receivers got: latency, loss, leaks."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]
CDF_POINTS = 200
LATE_MS = 250.0  # the crowd's target: events slower than this are looked at when they were


@dataclass(frozen=True)
class Commits:
    key: Ints  # writer << 32 | seq
    t0: Ints  # just before COMMIT was sent
    t1: Ints  # COMMIT returned
    users: Ints  # (commits, rows per commit): the user of each row touched

    @classmethod
    def load(cls, path: str) -> Commits:
        with np.load(path) as data:
            return cls(data["key"], data["t0"], data["t1"], data["users"])

    @property
    def count(self) -> int:
        return len(self.key)

    @property
    def rows(self) -> int:
        return int(self.users.size)

    def rate(self) -> float:
        """Commits per second while the writers ran."""
        if self.count < 2:
            return 0.0
        return float((self.count - 1) / ((self.t1.max() - self.t1.min()) / 1e9))

    def commit_ms(self) -> float:
        """Median round trip of COMMIT itself (t1 - t0)."""
        return float(np.median(self.t1 - self.t0) / 1e6) if self.count else 0.0


@dataclass(frozen=True)
class Arrivals:
    stream: Ints
    key: Ints
    t: Ints

    @classmethod
    def load(cls, paths: list[str]) -> Arrivals:
        parts = [np.load(p) for p in paths]
        try:
            return cls(
                np.concatenate([p["stream"] for p in parts]),
                np.concatenate([p["key"] for p in parts]),
                np.concatenate([p["t"] for p in parts]),
            )
        finally:
            for p in parts:
                p.close()


@dataclass(frozen=True)
class Delivery:
    """Every commit's events against every tab that should have had them."""

    expected: int
    received: int  # distinct (stream, commit) pairs among the expected
    duplicates: int
    misrouted: int  # events at a stream whose user the commit did not touch
    unknown: int  # events of commits outside this phase (late from an earlier one)
    latencies_ms: Floats  # from the midpoint of COMMIT (t0 + t1) / 2; sorted; after warm-up
    ack_latencies_ms: Floats  # from COMMIT returned to the writer (t1); sorted; after warm-up
    first_ns: int
    last_ns: int
    # Of the events slower than LATE_MS: when their commit was, in seconds after warm-up.
    late_at_s: Floats = field(default_factory=lambda: np.zeros(0))

    @property
    def lost(self) -> int:
        return self.expected - self.received

    def percentile(self, q: float, *, ack: bool = False) -> float:
        latencies = self.ack_latencies_ms if ack else self.latencies_ms
        if not len(latencies):
            return float("nan")
        return float(np.percentile(latencies, q))

    def cdf(self) -> list[float]:
        """Latency (ms) at CDF_POINTS evenly spaced quantiles from 0 to 1."""
        if not len(self.latencies_ms):
            return []
        quantiles = np.linspace(0, 100, CDF_POINTS)
        return [round(float(v), 4) for v in np.percentile(self.latencies_ms, quantiles)]

    def delivered_per_second(self) -> float:
        """Events delivered per second, from the first commit to the last arrival."""
        span = (self.last_ns - self.first_ns) / 1e9
        return self.received / span if span > 0 else 0.0


def deliveries(
    commits: Commits,
    arrivals: Arrivals,
    stream_user: Ints | None,
    tabs: Ints | None,
    warmup_s: float,
) -> Delivery:
    """`stream_user[s]` is the user of stream s and `tabs[u]` how many live streams user u
    has; both None for the floor, which receives every row's notification once."""
    order = np.argsort(commits.key)
    sorted_keys = commits.key[order]
    pos = np.searchsorted(sorted_keys, arrivals.key)
    pos = np.minimum(pos, max(0, len(sorted_keys) - 1))
    known = sorted_keys[pos] == arrivals.key if len(sorted_keys) else np.zeros(0, dtype=np.bool_)
    commit = order[pos[known]]
    stream = arrivals.stream[known]
    t = arrivals.t[known]

    if stream_user is None or tabs is None:
        expected = commits.rows
        misrouted = 0
        received = int(known.sum())
        duplicates = 0
    else:
        expected = int(tabs[commits.users].sum())
        owner = stream_user[stream]
        ok = (commits.users[commit] == owner[:, None]).any(axis=1)
        misrouted = int((~ok).sum())
        pairs = stream[ok] * np.int64(commits.count) + commit[ok]
        received = len(np.unique(pairs))
        duplicates = int(ok.sum()) - received

    start = commits.t1.min() + int(warmup_s * 1e9) if commits.count else 0
    measured = commits.t1[commit] >= start
    done = commits.t1[commit[measured]]
    midpoint = (commits.t0[commit[measured]] + done) / 2
    unsorted = (t[measured] - midpoint) / 1e6
    late_at = np.sort((midpoint[unsorted > LATE_MS] - start) / 1e9)
    latencies = np.sort(unsorted)
    ack_latencies = np.sort((t[measured] - done) / 1e6)
    first = int(commits.t0.min()) if commits.count else 0
    last = int(t.max()) if len(t) else first
    return Delivery(
        expected=expected,
        received=min(received, expected),
        duplicates=duplicates,
        misrouted=misrouted,
        unknown=int((~known).sum()),
        latencies_ms=latencies,
        ack_latencies_ms=ack_latencies,
        first_ns=first,
        last_ns=last,
        late_at_s=late_at,
    )


def added(arrivals: Arrivals, floor: Arrivals) -> Floats:
    """Per event, its arrival minus the floor's arrival of the same commit (ms), sorted:
    what the design adds over a bare LISTEN for the very same notifications."""
    keys, first = np.unique(floor.key, return_index=True)
    if not len(keys):
        return np.zeros(0)
    pos = np.minimum(np.searchsorted(keys, arrivals.key), len(keys) - 1)
    known = keys[pos] == arrivals.key
    floor_t = floor.t[first[pos[known]]]
    return np.sort((arrivals.t[known] - floor_t) / 1e6)


def late_windows(late_at: Floats, period: float) -> dict[str, object]:
    """When the events slower than the target were committed: the busiest half-seconds,
    and how they fall within the heartbeat period (a round of heartbeats every `period`
    seconds is the service's and the tabs' busiest moment)."""
    if not len(late_at):
        return {}
    bins = np.bincount((late_at * 2).astype(np.int64))
    busiest = np.argsort(bins)[::-1][:12]
    phase = np.bincount(((late_at % period) / period * 10).astype(np.int64), minlength=10)
    return {
        "busiest": {f"{b / 2:.1f}": int(bins[b]) for b in sorted(busiest) if bins[b]},
        "phase_tenths": [int(n) for n in phase[:10]],
    }
