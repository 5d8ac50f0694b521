"""Requests exactly as a client sends them: a raw TCP connection to the service, and paths
percent-encoded as given, never normalised by the HTTP client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import quote

from yarl import URL

from tests.conftest import Service


@contextlib.asynccontextmanager
async def raw_connection(
    service: Service,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(service.server.host, service.server.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def item_url(service: Service, file_id: str) -> URL:
    """The one-file stream of an id exactly as given, percent-encoded, never normalised."""
    encoded = quote(file_id, safe="")
    return URL(service.url("/")).with_path(f"/api/files/{encoded}/events", encoded=True)
