"""What README.md tells a newcomer to type works as printed: after `make run` (that is,
`streamer serve` on an embedded Postgres of its own) its curl and psql lines, pasted with
the export line `make run` prints; and every link of README.md and docs/ resolves inside
the repository, headings included. (docs/DATABASE.md's role and grant lines:
test_database_docs.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import SOURCE, free_port
from tests.test_cli import environment

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
START_UP = 120.0  # a first `make run` makes a database cluster
TIMEOUT = 20.0

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def code_blocks(path: Path, language: str) -> list[str]:
    """The fenced blocks of `path` in `language`, in order."""
    return [body for lang, body in _FENCE.findall(path.read_text()) if lang == language]


def shell_lines(path: Path) -> list[str]:
    """Every command line of the `sh` blocks of `path` (comments left out)."""
    lines = [line for block in code_blocks(path, "sh") for line in block.splitlines()]
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


# -- README: after `make run` --------------------------------------------------------


@dataclass
class Printed:
    """What `make run` printed before serving: the export line and the lines it shows."""

    export: str
    lines: list[str]


@contextlib.asynccontextmanager
async def make_run(data_dir: Path) -> AsyncIterator[Printed]:
    """`make run`'s `streamer serve`, with no DATABASE_URL (so an embedded Postgres in
    `data_dir`) on a free port, until what it printed has come; SIGTERM, exit 0 after."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "streamer",
        "serve",
        env=environment(
            STREAMER_DATA_DIR=str(data_dir),
            STREAMER_PORT=str(free_port()),
            STREAMER_SOURCE=SOURCE,  # in the wal pass: `STREAMER_SOURCE=wal make run`
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert process.stdout is not None and process.stderr is not None
    logged: list[str] = []
    serving = asyncio.Event()

    async def log() -> None:
        assert process.stderr is not None
        async for raw in process.stderr:
            logged.append(raw.decode())
            if "serving on" in logged[-1]:
                serving.set()
        serving.set()

    logging = asyncio.create_task(log())
    try:
        printed: list[str] = []
        async with asyncio.timeout(START_UP):
            while not any(line.strip().startswith("psql ") for line in printed):
                raw = await process.stdout.readline()
                assert raw, "streamer serve exited:\n" + "".join(printed + logged)
                printed.append(raw.decode())
            # It prints before the port opens; a person pastes slower than that.
            await serving.wait()
        assert process.returncode is None, "".join(logged)
        [export] = [line.strip() for line in printed if line.strip().startswith("export ")]
        yield Printed(export, [line.strip() for line in printed])
        os.kill(process.pid, signal.SIGTERM)
        async with asyncio.timeout(TIMEOUT):
            await process.wait()
            await logging
        assert process.returncode == 0, "".join(logged)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        logging.cancel()


def pasted(export: str, line: str) -> list[str]:
    """A terminal where the export line was pasted, then `line`."""
    return ["bash", "-c", f"{export}\n{line}"]


async def events_of(
    stdout: asyncio.StreamReader,
) -> AsyncIterator[tuple[str, str | None, dict[str, Any]]]:
    """(event, id, data) of each SSE message curl prints."""
    name, event_id, data = None, None, None
    while raw := await stdout.readline():
        line = raw.decode().rstrip("\n")
        if not line and name is not None:
            yield name, event_id, json.loads(data or "{}")
            name, event_id, data = None, None, None
        elif line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("id: "):
            event_id = line.removeprefix("id: ")
        elif line.startswith("data: "):
            data = line.removeprefix("data: ")


async def test_the_readmes_curl_and_psql_lines_work_as_pasted_after_make_run(tmp_path: Path):
    commands = shell_lines(README)
    [curl] = [line for line in commands if line.startswith("curl ")]
    writes = [line for line in commands if line.startswith("psql ")]
    assert len(writes) >= 3
    async with make_run(tmp_path / "data") as printed:
        # make run shows the README's own lines: what it prints is what the README says.
        for line in printed.lines:
            if line.startswith(("curl ", "psql ")):
                assert line in commands, f"make run prints a line the README lacks: {line}"
        assert re.fullmatch(
            r"export BASE_URL=\S+ USER_ID=\S+ TOKEN=\S+ DATABASE_URL=\S+", printed.export
        )
        watching = await asyncio.create_subprocess_exec(
            *pasted(printed.export, curl), stdout=subprocess.PIPE, start_new_session=True
        )
        assert watching.stdout is not None
        try:
            events = events_of(watching.stdout)
            async with asyncio.timeout(TIMEOUT):
                async for name, _, _ in events:
                    if name == "synced":
                        break
                else:
                    raise AssertionError(f"{curl}: no synced")
                for line in writes:
                    wrote = await asyncio.create_subprocess_exec(
                        *pasted(printed.export, line), stdout=subprocess.DEVNULL
                    )
                    assert await wrote.wait() == 0, line
                seen: list[tuple[str, str | None]] = []
                async for name, event_id, data in events:
                    if name in ("file-update", "file-deleted"):
                        assert event_id is not None
                        seen.append((name, data["file"].get("status")))
                    if name == "file-deleted":
                        break
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(watching.pid, signal.SIGKILL)
            await watching.wait()
    expected: list[tuple[str, str | None]] = [("file-update", "pending")]
    expected += [("file-update", "processing")]
    expected += [("file-update", "ready"), ("file-deleted", None)]
    assert seen == expected


def test_the_readme_shows_every_column_of_files_and_every_allowed_status(database_url: str):
    [shown] = [block for block in README.read_text().split("\n\n") if "files (id uuid" in block]
    with psycopg.connect(database_url) as conn:
        columns = [
            name
            for (name,) in conn.execute(
                "select attname from pg_attribute where attrelid = 'public.files'::regclass"
                " and attnum > 0 and not attisdropped and attname <> 'streamer_version'"
            )
        ]
        [(check,)] = conn.execute(
            "select pg_get_constraintdef(oid) from pg_constraint"
            " where conname = 'files_status_check'"
        ).fetchall()
    for column in columns:
        assert re.search(rf"\b{column}\b", shown), column
    for status in re.findall(r"'(\w+)'", check):
        assert f"`{status}`" in README.read_text(), status


# -- links ---------------------------------------------------------------------------

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_CODE = re.compile(r"^```.*?^```|`[^`\n]*`", re.MULTILINE | re.DOTALL)


def anchors(path: Path) -> set[str]:
    """The anchors GitHub makes of a Markdown file's headings."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    headings = re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_of_the_docs_resolves_inside_the_repository(path: Path):
    text = _CODE.sub("", path.read_text())
    for target in _LINK.findall(text):
        assert not re.match(r"[a-z][a-z0-9+.-]*:", target), f"{target}: outside the repository"
        file, _, fragment = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.is_relative_to(ROOT), f"{target}: outside the repository"
        assert linked.exists(), f"{target}: no such file"
        if fragment:
            assert fragment in anchors(linked), f"{target}: no such heading"
