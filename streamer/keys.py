"""Every piece of app state, as a typed key."""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg
from aiohttp import web

if TYPE_CHECKING:
    from streamer.auth import Authenticator
    from streamer.config import Settings
    from streamer.hub import Hub
    from streamer.listener import Listener
    from streamer.metrics import Metrics

SETTINGS = web.AppKey["Settings"]("settings")
DSN = web.AppKey[str]("dsn")
LISTEN_DSN = web.AppKey[str]("listen_dsn")
METRICS = web.AppKey["Metrics"]("metrics")
AUTH = web.AppKey["Authenticator"]("auth")
POOL = web.AppKey[asyncpg.Pool]("pool")
HUB = web.AppKey["Hub"]("hub")
LISTENER = web.AppKey["Listener"]("listener")
