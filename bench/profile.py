"""py-spy profiles of the service under load: where its one core goes.

`record` samples a running process for a while (without pausing it) and writes the
collapsed stacks (`<name>.txt`: open in speedscope.app or flamegraph.pl) and a summary
(`<name>-top.txt`): the functions by own time and by total time, like `py-spy top`.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RATE = 100  # samples per second
TOP = 20


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


@dataclass
class Profile:
    samples: int
    seconds: float
    own: list[tuple[str, int]]
    total: list[tuple[str, int]]

    @property
    def busy_pct(self) -> float:
        """Samples with the Python thread not idle, as a share of all samples taken."""
        return 100 * self.samples / max(1, RATE * self.seconds)

    def summary(self) -> dict[str, Any]:
        def pct(rows: list[tuple[str, int]]) -> list[tuple[str, float]]:
            return [(name, round(100 * n / max(1, self.samples), 1)) for name, n in rows]

        return {
            "busy_pct": round(self.busy_pct, 1),
            "own": pct(self.own[:12]),
            "total": pct(self.total[:12]),
        }

    def text(self) -> str:
        lines = [
            f"{self.samples} samples over {self.seconds:.0f} s at {RATE} Hz "
            f"(the main thread busy {self.busy_pct:.0f}% of the time)",
            "",
            "own time (the function itself was running):",
        ]
        lines += [f"  {100 * n / self.samples:5.1f}%  {name}" for name, n in self.own[:TOP]]
        lines += ["", "total time (the function was on the stack):"]
        lines += [f"  {100 * n / self.samples:5.1f}%  {name}" for name, n in self.total[:TOP]]
        return "\n".join(lines) + "\n"


def summarise(raw: Path, seconds: float) -> Profile:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        samples += n
        own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    return Profile(samples, seconds, own.most_common(), total.most_common())


@contextlib.contextmanager
def recording(pid: int, seconds: float, out: Path) -> Iterator[dict[str, Any]]:
    """Sample `pid` for `seconds` while the body runs; the summary lands in the dict."""
    summary: dict[str, Any] = {}
    binary = py_spy()
    if binary is None:
        summary["error"] = "py-spy is not installed (pip install -e '.[bench]')"
        yield summary
        return
    raw = out.with_suffix(".txt")
    command = [
        binary, "record", "--pid", str(pid), "--duration", str(int(seconds)),
        "--rate", str(RATE), "--format", "raw", "--function", "--nonblocking", "-o", str(raw),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield summary
    finally:
        try:
            _, err = process.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            process.kill()
            _, err = process.communicate()
    if process.returncode != 0 or not raw.exists():
        summary["error"] = err.decode(errors="replace").strip()[-500:]
        return
    profile = summarise(raw, seconds)
    out.with_name(out.stem + "-top.txt").write_text(profile.text())
    summary.update(profile.summary())
    summary["files"] = [raw.name, out.stem + "-top.txt"]
