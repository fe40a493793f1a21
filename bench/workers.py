"""The parent's side of the load-generator workers: start them pinned, talk JSON lines.

The parent is a plain blocking script: it sends every worker the same kind of
command, then waits for all the answers (with a deadline), so phases line up across
workers and the daemon can be sampled between them.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench.daemon import ROOT, ProcSample, pinned, sample_process

Answer = dict[str, Any]


class WorkerFailed(Exception):
    """A worker answered ``ok: false``, died, or did not answer in time."""


class WorkerHandle:
    """One ``python -m bench.loadgen`` process, pinned to ``cpu`` unless it is None."""

    def __init__(self, index: int, router_url: str, cpu: int | None, log_dir: str) -> None:
        self.index = index
        self._stderr = open(os.path.join(log_dir, f"worker{index}.stderr"), "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [*pinned(cpu), sys.executable, "-m", "bench.loadgen"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self._buffer = b""
        self._next_id = 0
        self.send({"cmd": "init", "router": router_url})
        self.receive(30)

    @property
    def pid(self) -> int:
        return self.process.pid

    def sample(self) -> ProcSample:
        return sample_process(self.pid)

    def send(self, command: dict[str, Any]) -> None:
        self._next_id += 1
        command = {**command, "id": self._next_id}
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        self.process.stdin.flush()

    def receive(self, timeout: float) -> Answer:
        """The next answer line; WorkerFailed if it says so, or none comes in time."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerFailed(f"worker {self.index} did not answer within {timeout:.0f} s")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise WorkerFailed(f"worker {self.index} exited: {self.stderr_tail()}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        answer: Answer = json.loads(line)
        if not answer.get("ok"):
            raise WorkerFailed(f"worker {self.index}: {answer.get('cmd')}: {answer.get('error')}")
        return answer

    def stderr_tail(self, limit: int = 2000) -> str:
        try:
            with open(self._stderr.name, encoding="utf-8", errors="replace") as handle:
                return handle.read()[-limit:].strip()
        except OSError:
            return ""

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.send({"cmd": "exit"})
                self.process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                self.process.kill()
                self.process.wait(timeout=10)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()
        self._stderr.close()


class WorkerPool:
    """Several workers driven in lock step."""

    def __init__(self, count: int, router_url: str, cpu: int | None, log_dir: str) -> None:
        self.workers: list[WorkerHandle] = []
        try:
            for index in range(count):
                self.workers.append(WorkerHandle(index, router_url, cpu, log_dir))
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self.workers)

    def call(
        self, make: Callable[[int], dict[str, Any]] | dict[str, Any], timeout: float
    ) -> list[Answer]:
        """Send each worker its command (a dict, or a function of the worker index)."""
        for worker in self.workers:
            worker.send(make(worker.index) if callable(make) else make)
        return [worker.receive(timeout) for worker in self.workers]

    def samples(self) -> list[ProcSample]:
        return [worker.sample() for worker in self.workers]

    def close(self) -> None:
        for worker in self.workers:
            worker.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cpu_between(before: Sequence[ProcSample], after: Sequence[ProcSample]) -> float:
    """CPU seconds used by a group of processes between two sets of samples."""
    return sum(b.cpu_since(a) for a, b in zip(before, after, strict=True))


def split(total: int, parts: int) -> list[tuple[int, int]]:
    """(start, count) of each of ``parts`` nearly equal slices of ``range(total)``."""
    base, extra = divmod(total, parts)
    slices = []
    start = 0
    for index in range(parts):
        count = base + (1 if index < extra else 0)
        slices.append((start, count))
        start += count
    return slices
