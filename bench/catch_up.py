"""The catch-up scenario (issue 14, acceptance 5): a long absence caught up by the
client library.

``catch_up_conversations`` connected senders store ``catch_up_messages`` msg:R for a
user who is not connected (window ``offline_window`` each, an equal share each), until
every one is answered ack:N STORED and the daemon's database holds them all. With the
daemon idle again, the user's device logs in with the client library (``ChatClient``,
default hand-over: the newest page of the newest conversation first) in a process of
its own pinned to the generator's core (``bench.catch_up_client``), and is watched:
when the summary came, when the first page reached the application, when the pull
ended (OFFLINE_ACK_A), every frame each way. The daemon's CPU from the login to the
pull's end is divided by the messages handed over.

The counts are checked as in the offline scenario: the summary is one frame with one
entry per conversation; the first page is the newest conversation's, handed over
before a second page was asked for; pulled = stored, each once, every conversation
complete, nothing left past the device's cursors.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections import Counter
from typing import IO, Any

from bench.daemon import ROOT, BenchDaemon, DaemonSettings, pinned, sample_cores
from bench.scenarios import Context, Plan, _fill
from bench.steps import GENERATOR_CPU, PASSWORD, SUITES, Interval, _connect, _login, _Meter, _shares
from bench.workers import WorkerPool

__all__ = ["CATCH_UP_USER", "catch_up", "observe"]

CATCH_UP_USER = "u0"
WARM_UP_USER = "u1"
DEVICE = "bench"
"""The device that catches up; ``BenchDaemon.offline_count`` counts for it."""
CATCH_UP_TIMEOUT = 300.0


def catch_up(ctx: Context, plan: Plan) -> dict[str, Any]:
    settings = DaemonSettings(heartbeat_interval=plan.heartbeat_interval)
    daemon = ctx.daemon("catch_up", settings)
    count = plan.catch_up_messages
    conversations = plan.catch_up_conversations
    results: dict[str, Any] = {
        "messages": count,
        "conversations": conversations,
        "window": plan.offline_window,
    }
    try:
        daemon.add_users((f"k{n}" for n in range(conversations)), PASSWORD)
        daemon.add_users([CATCH_UP_USER, WARM_UP_USER], PASSWORD)
        daemon.start()
        with WorkerPool(plan.workers, daemon.router_url, GENERATOR_CPU, daemon.workdir) as pool:
            _login(pool, "k", conversations)
            _connect(pool, "k", conversations, SUITES[0])

            warm_up = 4 * conversations
            ctx.log(f"catch_up: warming up ({warm_up} messages stored and caught up)")
            _fill(pool, daemon, WARM_UP_USER, warm_up, plan.offline_window)
            observe(daemon, WARM_UP_USER, warm_up, conversations)

            ctx.log(f"catch_up: storing {count:,} messages for {CATCH_UP_USER} ")
            daemon.settle()
            meter = _Meter(daemon, pool)
            fill = _fill(pool, daemon, CATCH_UP_USER, count, plan.offline_window)
            interval = meter.stop()
            stored = fill["totals"]["stored"]
            row = _shares(interval, stored)
            row.update(fill)
            row["stored_per_s"] = stored / row["seconds"] if row["seconds"] else 0.0
            results["fill"] = row
            pool.call({"cmd": "close"}, 120)

        ctx.log(f"catch_up: {CATCH_UP_USER} logs in with the client library and catches up")
        results["catch_up"] = observe(daemon, CATCH_UP_USER, stored, conversations)
    finally:
        ctx.finish(daemon)
    return results


def observe(
    daemon: BenchDaemon,
    user: str,
    stored: int,
    conversations: int,
    cpu: int | None = GENERATOR_CPU,
) -> dict[str, Any]:
    """One catch-up by ``bench.catch_up_client`` (pinned to ``cpu``), measured: its
    observation, the daemon's CPU over it, and the checks against ``stored`` messages
    in ``conversations``."""
    log_path = os.path.join(daemon.workdir, f"catch_up_client_{user}.stderr")
    with open(log_path, "wb") as stderr:
        process = subprocess.Popen(
            [
                *pinned(cpu),
                sys.executable,
                "-m",
                "bench.catch_up_client",
                "--router",
                daemon.router_url,
                "--user",
                user,
                "--password",
                PASSWORD,
                "--device",
                DEVICE,
                "--timeout",
                f"{CATCH_UP_TIMEOUT:g}",
            ],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        try:
            return _measured(daemon, process, user, stored, conversations)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    stream.close()


def _measured(
    daemon: BenchDaemon,
    process: subprocess.Popen[bytes],
    user: str,
    stored: int,
    conversations: int,
) -> dict[str, Any]:
    assert process.stdin is not None and process.stdout is not None
    reader = _Lines(process.stdout)
    reader.next(60)  # imported and ready
    start = daemon.settle()
    cores = sample_cores()
    process.stdin.write(b"go\n")
    process.stdin.flush()
    done = reader.next(CATCH_UP_TIMEOUT + 60)
    if not done.get("done"):
        raise RuntimeError(f"the catch-up client failed: {done.get('error', done)}")
    interval = Interval(start, daemon.sample(), done["client_cpu_seconds"], cores, sample_cores())
    seen = reader.next(120)
    if not seen.get("ok"):
        raise RuntimeError(f"the catch-up client failed: {seen.get('error', seen)}")
    handed = [tuple(entry) for entry in seen.pop("handed")]
    row = _shares(interval, len(handed))
    row.update({k: v for k, v in seen.items() if k != "ok"})
    row["daemon_cpu_us_per_message"] = row["daemon_cpu_us_per_unit"]
    ids = Counter(entry[2] for entry in handed)
    per_conversation = Counter(entry[0] for entry in handed)
    first = [entry[2] for entry in handed[: len(seen["first_page"])]]
    newest = seen["summary_conversations"][:1]
    row.update(
        user=user,
        stored=stored,
        pulled=len(handed),
        unique=len(ids),
        conversations_pulled=len(per_conversation),
        left_in_database=daemon.offline_count(user, DEVICE),
    )
    checks = {
        "one_summary_frame": seen["summaries"] == 1
        and seen["received"].get("OFFLINE_SUMMARY_A") == 1
        and len(seen["summary_conversations"]) == conversations
        and seen["summary_total"] == stored,
        "newest_page_first": bool(first)
        and [seen["first_page_conversation"]] == newest
        and sorted(first) == sorted(seen["first_page"])
        and seen["pulls_sent_at_first_message"] == 1
        and seen["pages_received_at_first_message"] == 1,
        "pulled_is_stored_once": len(handed) == stored
        and len(ids) == stored
        and len(per_conversation) == conversations,
        "nothing_left": seen["left_after"] == 0 and row["left_in_database"] == 0,
    }
    row["checks"] = checks
    row["consistent"] = all(checks.values()) and not seen["timed_out"]
    row["frames_received"] = sum(seen["received"].values())
    row["frames_sent"] = sum(seen["sent"].values())
    return row


class _Lines:
    """JSON lines from a child's stdout, each waited for with a deadline."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.buffer = b""

    def next(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        fd = self.stream.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"the catch-up client did not answer within {timeout:g} s")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise RuntimeError("the catch-up client exited without an answer")
                self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        answer: dict[str, Any] = json.loads(line)
        return answer
