"""The profile of the daemon during a benchmark: py-spy's folded stacks, summarised
(the reactor thread only, by function and by the calls on its way)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from bench.steps import Log


def py_spy_profiler(out_dir: str, log: Log) -> Callable[[int, float], dict[str, Any]] | None:
    """A function that samples a pid with py-spy, or None if py-spy is not installed."""
    binary = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(binary):
        log("py-spy is not installed: no profile (pip install py-spy==0.4.3)")
        return None

    def profile(pid: int, seconds: float) -> dict[str, Any]:
        raw = os.path.join(out_dir, "profile.folded")
        version = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
        completed = subprocess.run(
            [
                binary,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(int(seconds)),
                "--rate",
                "250",
                "--format",
                "raw",
                "--output",
                raw,
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        )
        if completed.returncode != 0 or not os.path.exists(raw):
            return {"error": completed.stderr.strip()[-500:], "tool": version}
        with open(raw, encoding="utf-8") as handle:
            return {"tool": version, **summarise_folded(handle.read())}

    return profile


REACTOR_FRAME = "mainLoop ("


def summarise_folded(text: str, top: int = 25) -> dict[str, Any]:
    """Own and inclusive shares per function of the reactor thread's py-spy samples."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        # Only the reactor thread: the idle database and KDF pool threads sit in
        # Condition.wait, which py-spy does not count as idle.
        if not stack or not count_text.isdigit() or REACTOR_FRAME not in stack:
            continue
        count = int(count_text)
        frames = [_short_frame(frame) for frame in stack.split(";")]
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count

    def ranked(table: dict[str, int]) -> list[tuple[str, float]]:
        rows = sorted(table.items(), key=lambda item: -item[1])
        # Frames on every stack (twistd's start-up chain, the reactor loop) say nothing.
        rows = [(name, count) for name, count in rows if count < 0.99 * total][:top]
        return [(name, 100.0 * count / total) for name, count in rows]

    return {"samples": total, "own": ranked(own), "inclusive": ranked(inclusive)}


def _short_frame(frame: str) -> str:
    """``function (path/to/module.py:123)`` -> ``function (module.py)``; lines dropped."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    parts = path.split("/")
    for marker in ("site-packages", "main", "cim_head"):
        if marker in parts:
            parts = parts[parts.index(marker) + 1 :]
            break
    short = "/".join(parts[-2:]) if parts else path
    return f"{name} ({short})" if where else name
