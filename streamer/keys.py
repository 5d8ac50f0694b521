"""Every piece of app state, as a typed key."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from streamer.auth import Authenticator
from streamer.config import Settings
from streamer.dispatch import Dispatcher
from streamer.feeds import Feeds
from streamer.gate import Gate
from streamer.gather import Gatherer
from streamer.hub import Hub
from streamer.metrics import Metrics
from streamer.reads import Reads
from streamer.tasks import Supervisor

SETTINGS = web.AppKey("settings", Settings)
DSN = web.AppKey("dsn", str)
LISTEN_DSN = web.AppKey("listen_dsn", str)
METRICS = web.AppKey("metrics", Metrics)
AUTH = web.AppKey("auth", Authenticator)
POOL = web.AppKey("pool", asyncpg.Pool)
HUB = web.AppKey("hub", Hub)
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
FEEDS = web.AppKey("feeds", Feeds)
READS = web.AppKey("reads", Reads)
GATHERER = web.AppKey("gatherer", Gatherer)
GATE = web.AppKey("gate", Gate)
TASKS = web.AppKey("tasks", Supervisor)
