"""Prometheus metrics, on a registry of the app's own (several apps can live in one process).

Under `streamer serve --workers N` every worker writes its values to files in
PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode), and a scrape, whichever
worker it lands on, reports the sum over all of them.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.streams_open = Gauge(
            "streamer_streams_open", "Open SSE streams", multiprocess_mode="livesum", registry=r
        )
        self.events_sent = Counter("streamer_events_sent", "Events written to streams", registry=r)
        self.events_dropped = Counter(
            "streamer_events_dropped",
            "Events not delivered: queued for a stream that was disconnected for falling behind",
            registry=r,
        )
        self.slow_disconnects = Counter(
            "streamer_slow_client_disconnects", "Streams cut for not reading", registry=r
        )
        self.listener_reconnects = Counter(
            "streamer_listener_reconnects",
            "Times the change connection (LISTEN, or replication with STREAMER_SOURCE=wal)"
            " was re-established",
            registry=r,
        )
        self.listener_up = Gauge(
            "streamer_listener_up",
            "1 while the change connection is up and caught up (of every worker)",
            multiprocess_mode="livemin",
            registry=r,
        )
        self.notifications = Counter(
            "streamer_notifications", "Change notifications received", registry=r
        )
        self.notifications_rejected = Counter(
            "streamer_notifications_rejected",
            "Payloads on the channel dropped unread: not signed by a feed trigger (forged), "
            "or signed but not readable by this version",
            registry=r,
        )
        self.notification_lag = Histogram(
            "streamer_notification_lag_seconds",
            "From the writer's statement to the notification being fanned out",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            registry=r,
        )
        self.rejected_streams = Counter(
            "streamer_streams_rejected", "Streams refused for a limit", ["reason"], registry=r
        )
        self._waits(r)
        self._fleet(r)
        self.task_failures = Counter(
            "streamer_task_failures",
            "Times a long-lived task (listener, heartbeats, ...) failed and was restarted",
            ["task"],
            registry=r,
        )

    def _waits(self, r: CollectorRegistry) -> None:
        """What a stream's set-up waits for: a connection of the pool, its turn at the gate."""
        self.pool_wait = Histogram(
            "streamer_pool_wait_seconds",
            "How long a read (a stream's catch-up or snapshot, a recovery) waited for a"
            " connection of the pool",
            buckets=(0.001, 0.005, 0.025, 0.1, 0.25, 1, 2.5, 10, 30, 60),
            registry=r,
        )
        self.pool_waiting = Gauge(
            "streamer_pool_waiting",
            "Reads waiting for a connection of the pool now",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.connections_waiting = Gauge(
            "streamer_connections_waiting",
            "Connections accepted but not read yet: STREAMER_MAX_OPENING are being set up",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.connections_waited = Counter(
            "streamer_connections_waited",
            "Connections that waited at the gate before they were read",
            registry=r,
        )

    def _fleet(self, r: CollectorRegistry) -> None:
        """With STREAMER_BROKER_URL: the fleet's reader and its broker."""
        self.reader = Gauge(
            "streamer_fleet_reader",
            "1 while this process reads the database for its fleet (STREAMER_BROKER_URL)",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.broker_published = Counter(
            "streamer_broker_published", "Messages published to the fleet's broker", registry=r
        )
        self.broker_stale = Counter(
            "streamer_broker_stale",
            "Broker messages dropped: from a reader that lost its election",
            registry=r,
        )

    def exposition(self) -> bytes:
        """The Prometheus text format: this process's values, or every worker's together."""
        if os.environ.get(MULTIPROCESS_DIR):
            everyone = CollectorRegistry()
            MultiProcessCollector(everyone)  # type: ignore[no-untyped-call]
            return generate_latest(everyone)
        return generate_latest(self.registry)
