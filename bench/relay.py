"""A lean relay, for diagnosis: the least a process between Postgres and the browsers can do.

One LISTEN connection; each notification decoded with json.loads, one SSE frame built
with json.dumps, and written straight to the socket of every stream of its user. No
pydantic, no queue, no task per stream, no cursor, no snapshot, no recovery: not a design
to ship, but the floor for any design with a relay process in the path (one more process
hop than the bare LISTEN). The gap between it and the service is what the service's own
code adds.

    python -m bench.relay --port 8082   # DATABASE_URL and STREAMER_JWT_SECRET from the env
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal

import asyncpg
import jwt

HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
SYNCED = b'retry: 2000\n\nevent: synced\ndata: {"eventType":"synced"}\n\n'
HEALTHY = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
DENIED = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Relay:
    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.streams: dict[str, set[asyncio.StreamWriter]] = {}

    def notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        # The feed's payload: the envelope, the row's JSON.
        envelope, _, row = payload.partition("\n")
        change = json.loads(envelope)
        writers = self.streams.get(change["u"])
        if not writers or change["o"] != "u" or not row:
            return
        body = '{"eventType":"file-update","file":' + row + "}"
        data = chunk(f"event: file-update\ndata: {body}\n\n".encode())
        for writer in writers:
            writer.write(data)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        user = None
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"GET /healthz"):
                writer.write(HEALTHY)
                return
            token = b""
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"authorization: bearer "):
                    token = line[22:].strip()
            try:
                user = jwt.decode(token, self.secret, algorithms=["HS256"])["sub"]
            except jwt.PyJWTError:
                writer.write(DENIED)
                return
            writer.write(HEAD + chunk(SYNCED))
            self.streams.setdefault(user, set()).add(writer)
            while await reader.read(4096):
                pass
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            if user is not None:
                self.streams.get(user, set()).discard(writer)
            writer.close()


async def main(port: int) -> None:
    relay = Relay(os.environ["STREAMER_JWT_SECRET"])
    conn = await asyncpg.connect(os.environ["DATABASE_URL"])
    await conn.add_listener(await conn.fetchval("select streamer.channel()"), relay.notified)
    server = await asyncio.start_server(relay.serve, "127.0.0.1", port, backlog=1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()
    with contextlib.suppress(OSError, asyncpg.InterfaceError, TimeoutError):
        await conn.close(timeout=2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8082)
    asyncio.run(main(parser.parse_args().port))
