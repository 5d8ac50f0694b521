"""Load-generator processes driven by the harness over a pipe: one command at a time.

A child runs an asyncio loop and answers each `(command, args)` with `("ok", reply)` or
`("error", text)`. The parent (`Remote`) starts it with the spawn method, and every Remote
is registered so that the harness can end it on any failure or Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import resource
import time
import traceback
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection
from typing import Any, Protocol

Reply = dict[str, Any]


def now_ns() -> int:
    """CLOCK_MONOTONIC: one clock for every process on this machine (Linux)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def raise_nofile(wanted: int = 65536) -> int:
    """Raise this process's open-file limit (inherited by the processes it starts)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        with contextlib.suppress(ValueError, OSError):  # only root may raise the hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        wanted = hard
    if soft == resource.RLIM_INFINITY or soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        return wanted
    return soft


class Agent(Protocol):
    async def handle(self, command: str, args: dict[str, Any]) -> Reply: ...


class AgentError(RuntimeError):
    """A load-generator process failed a command."""


def serve(conn: Connection, agent: Agent) -> None:
    """The child's side: answer commands until `stop`, or until the parent goes away."""
    raise_nofile()
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: the parent cleans up
        asyncio.run(_serve(conn, agent))


async def _serve(conn: Connection, agent: Agent) -> None:
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

    def readable() -> None:
        try:
            inbox.put_nowait(conn.recv())
        except (EOFError, OSError):
            loop.remove_reader(conn.fileno())
            inbox.put_nowait(("stop", {"orphaned": True}))

    loop.add_reader(conn.fileno(), readable)
    while True:
        command, args = await inbox.get()
        try:
            reply = await agent.handle(command, args)
        except Exception:
            with contextlib.suppress(OSError):
                conn.send(("error", traceback.format_exc()))
        else:
            with contextlib.suppress(OSError):
                conn.send(("ok", reply))
        if command == "stop":
            return


class Remote:
    """The parent's handle on one load-generator process."""

    live: set[Remote] = set()

    def __init__(self, name: str, target: Callable[..., None], *args: object) -> None:
        context = multiprocessing.get_context("spawn")
        self.name = name
        self._conn, child = context.Pipe()
        self.process = context.Process(target=target, args=(child, *args), name=name, daemon=True)
        self.process.start()
        child.close()
        Remote.live.add(self)

    def send(self, command: str, **args: Any) -> None:
        self._conn.send((command, args))

    def receive(self, timeout: float = 120.0) -> Reply:
        if not self._conn.poll(timeout):
            raise AgentError(f"{self.name}: no answer within {timeout:.0f} s")
        try:
            status, reply = self._conn.recv()
        except EOFError:
            raise AgentError(f"{self.name} exited (code {self.process.exitcode})") from None
        if status != "ok":
            raise AgentError(f"{self.name} failed:\n{reply}")
        result: Reply = reply
        return result

    def answered(self) -> bool:
        """Whether the reply to the command sent is in (`receive` would not wait)."""
        return self._conn.poll(0)

    def call(self, command: str, timeout: float = 120.0, **args: Any) -> Reply:
        self.send(command, **args)
        return self.receive(timeout)

    def stop(self) -> None:
        Remote.live.discard(self)
        if self.process.is_alive():
            with contextlib.suppress(AgentError, OSError, EOFError):
                self.call("stop", timeout=15)
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._conn.close()


def call_all(
    remotes: Iterable[Remote], command: str, timeout: float = 120.0, **args: Any
) -> list[Reply]:
    """The same command to several processes at once; their replies in order."""
    remotes = list(remotes)
    for remote in remotes:
        remote.send(command, **args)
    return [remote.receive(timeout) for remote in remotes]


def stop_all() -> None:
    for remote in list(Remote.live):
        remote.stop()
