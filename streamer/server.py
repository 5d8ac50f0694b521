"""How aiohttp's HTTP server is set up: the same for `streamer serve` and the tests' server.

Three things aiohttp does before any handler runs would otherwise break the contract:
- It refuses a request line or header field over 8 KiB with a plain-text 400 of its own.
  Limits of twice the longest token we accept let a too-long token reach authentication
  and get a JSON `TOKEN_INVALID`; only an absurd request still gets aiohttp's 400.
- It logs a request that does not parse at error level with a traceback whose message
  quotes the request, and so perhaps a token. Such a request is the client's mistake:
  it is noted at info level, by the name of the error alone.
- An AppRunner waits an hour (3630 s) for a request's head: a client that trickles its
  headers, or sends none, holds a connection that long. Its keep-alive timeout is what
  bounds that; run_app's 75 s, as `streamer serve` had before it used an AppRunner. A
  stream, once its request has arrived, is not subject to it.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

from streamer.app import AccessLogger
from streamer.auth import MAX_TOKEN_LENGTH

MAX_LINE_BYTES = 2 * MAX_TOKEN_LENGTH  # the request line: path and query
MAX_FIELD_BYTES = 2 * MAX_TOKEN_LENGTH  # one header field: Authorization, Cookie
REQUEST_HEAD_SECONDS = 75.0  # aiohttp's keep-alive timeout: until a request's head is in


class ProtocolLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's protocol logger, quiet about requests that do not parse."""

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError) and 400 <= exc_info.code < 500:
            self.info("rejected a malformed request: %s", type(exc_info).__name__)
            return
        super().exception(msg, *args, exc_info=exc_info, **kwargs)


def server_options() -> dict[str, Any]:
    """Keyword arguments for aiohttp's AppRunner (and so for a TestServer's start_server)."""
    return {
        "access_log_class": AccessLogger,
        "logger": ProtocolLog(logging.getLogger("aiohttp.server"), {}),
        "max_line_size": MAX_LINE_BYTES,
        "max_field_size": MAX_FIELD_BYTES,
        "keepalive_timeout": REQUEST_HEAD_SECONDS,
    }
