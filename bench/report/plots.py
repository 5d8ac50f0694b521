"""The plots beside results.md: latency CDFs, fan-out, memory against open streams."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.report.targets import TARGET_FANOUT, TARGET_FANOUT_P99_MS, TARGET_P99_MS

MAX_CONNECTIONS = 500  # Postgres's, as the harness starts it
LOST_AT_MS = 10_000.0  # phase.DRAIN_TIMEOUT


def plot_latency(latency: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for p in latency["phases"]:
        values = p["cdf_ms"]
        if len(values) < 2:
            continue
        # Log scale: a negative or zero latency (clock granularity) is left off the curve.
        points = [(v, i / (len(values) - 1)) for i, v in enumerate(values) if v > 0]
        ax.plot(
            [v for v, _ in points],
            [f for _, f in points],
            label=f"{p['label']} ({p['live_streams']:,} live)",
        )
    ax.set_xscale("log")
    ax.set_xlabel("latency, COMMIT (midpoint) to event parsed (ms, log)")
    ax.set_ylabel("fraction of events")
    ax.axvline(TARGET_P99_MS, color="grey", linestyle=":", label=f"{TARGET_P99_MS:.0f} ms")
    ax.set_title(f"Latency at {latency['rate']:.0f} commits/s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fanout(fanout: dict[str, Any], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    tabs = fanout["tabs"]
    top = 0.0
    for design, style in (("floor", "s-"), ("service", "o-"), ("naive", "^-")):
        # x: notifications committed per second, the same for every design; in order of x
        # (flat out may commit less than the last paced step, the machine being full).
        steps = sorted(
            fanout[design]["steps"], key=lambda s: s["commit_rate"] * s["rows_per_commit"]
        )
        x = [s["commit_rate"] * s["rows_per_commit"] for s in steps]
        top = max([top, *x])
        if design != "floor":
            left.plot(x, [s["delivered_per_s"] for s in steps], style, label=design)
        right.plot(x, [s["p99_ms"] for s in steps], style, label=design)
        for xi, step in zip(x, steps, strict=True):
            if step["lost"]:  # events that never came: drawn at the drain limit
                right.plot([xi], [LOST_AT_MS], "x", color="red")
                right.annotate(f"{design}: {step['lost']:,} lost", (xi, LOST_AT_MS),
                               fontsize=7, xytext=(4, -10), textcoords="offset points")  # fmt: skip
        for ax, ys in ((left, [s["delivered_per_s"] for s in steps]), (right, None)):
            if ax is left and design == "floor":
                continue
            for i, step in enumerate(steps):
                y = ys[i] if ys is not None else step["p99_ms"]
                if step["offered_rows_per_s"] is None and y == y:  # flat out, not NaN
                    ax.annotate("flat out", (x[i], y), fontsize=7, xytext=(4, -10),
                                textcoords="offset points")  # fmt: skip
    left.plot([0, top], [0, top * tabs], "k:", label=f"every notification x {tabs} tabs")
    left.axhline(TARGET_FANOUT, color="grey", linestyle="--", label=f"{TARGET_FANOUT:,}/s target")
    left.set_xlabel("notifications/s (rows committed per second)")
    left.set_ylabel("delivered events/s")
    left.set_title(f"Fan-out, {fanout['users']} users x {tabs} tabs")
    left.legend(fontsize=8)
    left.grid(True, alpha=0.3)
    right.set_yscale("log")
    right.axhline(TARGET_FANOUT_P99_MS, color="grey", linestyle="--", label="100 ms")
    right.set_xlabel("notifications/s (rows committed per second)")
    right.set_ylabel("p99 latency (ms, log)")
    right.set_title("p99 latency (x: events lost, not delivered within 10 s)")
    right.legend(fontsize=8)
    right.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rss(capacity: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    zoom = 1.2 * max(MAX_CONNECTIONS, *(r["streams"] for r in capacity["naive"]["readings"]))
    for ax, limit in zip(axes, (None, zoom), strict=True):
        for design, style in (("service", "o-"), ("naive", "^-")):
            readings = [
                r for r in capacity[design]["readings"] if limit is None or r["streams"] <= limit
            ]
            streams = [r["streams"] for r in readings]
            base = readings[0]["pg_memory_mb"]
            ax.plot(streams, [r["rss_mb"] for r in readings], style, label=f"{design}: RSS")
            ax.plot(
                streams,
                [r["rss_mb"] + r["pg_memory_mb"] - base for r in readings],
                style,
                alpha=0.45,
                label=f"{design}: RSS + Postgres memory added",
            )
        ax.axvline(MAX_CONNECTIONS, color="grey", linestyle=":", label="max_connections")
        ax.set_xlabel("open streams")
        ax.set_ylabel("MB")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("Server memory against open streams")
    axes[1].set_title(f"The same, up to {zoom:,.0f} streams")
    axes[1].set_xlim(0, zoom)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
