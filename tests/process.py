"""`streamer serve` in a subprocess, on a fixed port so that clients find it again after it
was killed and started again; its JSON log kept in a file."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from tests.conftest import SECRET, SOURCE, free_port, wait_until

TIMEOUT = 20.0


@dataclass
class Process:
    """One `streamer serve`, on a fixed port so that clients find it again after a restart."""

    database_url: str
    port: int
    log: Path
    process: asyncio.subprocess.Process | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, session: aiohttp.ClientSession) -> None:
        environment = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("STREAMER_") and k != "DATABASE_URL"
        }
        environment.update(
            DATABASE_URL=self.database_url,
            STREAMER_PORT=str(self.port),
            STREAMER_JWT_SECRET=SECRET,
            STREAMER_LOG_FORMAT="json",
            STREAMER_SOURCE=SOURCE,
        )
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                *("-m", "streamer", "serve", "--no-migrate"),
                env=environment,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )
        process = self.process

        async def answers() -> bool:
            assert process.returncode is None, self.log.read_text()[-3000:]
            return await self.ready(session)

        # No event to wait on across processes: ask until it answers.
        try:
            await wait_until(answers, TIMEOUT)
        except TimeoutError:
            raise AssertionError(self.log.read_text()[-3000:]) from None

    async def ready(self, session: aiohttp.ClientSession) -> bool:
        try:
            async with session.get(self.base_url + "/readyz") as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    async def kill(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        await self.process.wait()

    def errors(self) -> list[str]:
        """Log lines at error level, or with a traceback."""
        lines = self.log.read_text().splitlines()
        return [
            line
            for line in lines
            if '"level": "error"' in line or '"level": "critical"' in line or "Traceback" in line
        ]


@contextlib.asynccontextmanager
async def streamer_serve(database_url: str, tmp_path: Path) -> AsyncIterator[Process]:
    process = Process(database_url, free_port(), tmp_path / "streamer.log")
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
    try:
        await process.start(session)
        yield process
    finally:
        if process.process is not None and process.process.returncode is None:
            await process.kill()
        await session.close()


def client_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=30))
