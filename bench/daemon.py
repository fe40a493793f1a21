"""A real cim daemon for a benchmark: its own config, users, ports and /proc accounting.

Every figure the benchmark prints is charged to the daemon from the kernel's own
books (``/proc/<pid>/stat`` for CPU, ``/proc/<pid>/status`` for RSS), never from the
load generator's clock, so a slow generator cannot make the daemon look cheap. The
daemon runs pinned to one core (``taskset``) so "CPU per message" is also "what one
core can do".
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert

from cim.accounts.store import hash_password
from cim.config import AccountsConfig, load_config
from cim.storage.database import open_engine
from cim.storage.schema import users
from cim.storage.timeline_reads import unread_count_txn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

BENCH_SCRYPT_N = 1024
BENCH_SCRYPT_R = 1
"""The lowest KDF cost the config accepts: router logins of thousands of benchmark
users would otherwise take minutes of daemon CPU and drown the handshake figures.
The router's real cost is measured on its own with users hashed at the default."""

DEFAULT_SCRYPT_N = AccountsConfig.scrypt_n
DEFAULT_SCRYPT_R = AccountsConfig.scrypt_r


@dataclass(frozen=True)
class ProcSample:
    """One reading of a process's accounting: CPU seconds (user + system), RSS, when."""

    at: float
    cpu: float
    rss_kib: int

    def cpu_since(self, earlier: ProcSample) -> float:
        return self.cpu - earlier.cpu

    def wall_since(self, earlier: ProcSample) -> float:
        return self.at - earlier.at


def sample_process(pid: int) -> ProcSample:
    """CPU time of every thread of ``pid`` (live or exited) and its resident set."""
    now = time.monotonic()
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        stat = handle.read()
    # The command name may contain spaces and parentheses; the fields after the last
    # ')' are fixed: state is field 3, utime field 14 and stime field 15.
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    rss = 0
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
                break
    return ProcSample(now, cpu, rss)


@dataclass(frozen=True)
class CoreSample:
    """Busy and total jiffies of each core, from /proc/stat: who else used our cores."""

    busy: tuple[int, ...]
    total: tuple[int, ...]

    def busy_share_since(self, earlier: CoreSample, core: int) -> float:
        total = self.total[core] - earlier.total[core]
        return (self.busy[core] - earlier.busy[core]) / total if total > 0 else 0.0


def sample_cores() -> CoreSample:
    busy: list[int] = []
    total: list[int] = []
    with open("/proc/stat", encoding="ascii") as handle:
        for line in handle:
            name = line.split(" ", 1)[0]
            if not name.startswith("cpu") or name == "cpu":
                continue
            # user nice system idle iowait irq softirq steal (guest time is in user)
            values = [int(v) for v in line.split()[1:9]]
            total.append(sum(values))
            busy.append(sum(values) - values[3] - values[4])
    return CoreSample(tuple(busy), tuple(total))


def pinned(cpu: int | None) -> list[str]:
    """The command prefix that runs a program on one core (``taskset`` execs it)."""
    return [] if cpu is None else ["taskset", "-c", str(cpu)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class DaemonSettings:
    """The knobs a scenario may turn in the benchmark config."""

    heartbeat_interval: float = 5.0
    cipher_suites: tuple[str, ...] = ("chacha20-poly1305", "rc4-hmac-sha256")
    max_connections_per_address: int = 100_000
    cpu: int | None = 0
    """The core to pin the daemon to; None leaves it unpinned (the tests)."""
    node_id: str = "bench"
    """Also names the daemon's RabbitMQ queue, so runs on a shared broker differ."""
    extra_config: str = ""
    """Whole sections appended to the config (the external backends of figure 6)."""
    external: bool = False
    """The daemon uses the machine's PostgreSQL, Redis and RabbitMQ (bench.services)."""
    lag_probe_interval: float = 0.0
    """[node] lag_probe_interval: the reactor lag probe on /metrics (bench.steady)."""
    websocket: bool = False
    """The WebSocket gateway ([ws]) on a port of its own (bench.gateway)."""


class BenchDaemon:
    """One daemon in a scratch directory: configure, add users, start, measure, stop.

    ``source`` runs the daemon from another checkout (a scratch copy with a hot-path
    change, say) while the load generator stays the same: it is put first on the
    daemon's PYTHONPATH, so its ``cim`` package shadows the installed one.
    """

    def __init__(
        self, workdir: str, settings: DaemonSettings = DaemonSettings(), source: str | None = None
    ) -> None:
        self.workdir = os.path.abspath(workdir)
        self.settings = settings
        self.source = os.path.abspath(source) if source else None
        os.makedirs(self.workdir, exist_ok=True)
        self.router_port = free_port()
        self.im_port = free_port()
        self.admin_port = free_port()
        self.ws_port = free_port() if settings.websocket else 0
        self.config_path = os.path.join(self.workdir, "bench.ini")
        self.log_path = os.path.join(self.workdir, "twistd.log")
        self.process: subprocess.Popen[bytes] | None = None
        with open(self.config_path, "w", encoding="utf-8") as handle:
            handle.write(self.config_text())
        self.config = load_config(self.config_path)

    def config_text(self) -> str:
        s = self.settings
        gateway = (
            f"[ws]\nenabled = true\nlisten = tcp:{self.ws_port}:interface=127.0.0.1\n"
            if s.websocket
            else ""
        )
        # Only when asked: a checkout from before the probe (--source) has no such key.
        probe = f"lag_probe_interval = {s.lag_probe_interval:g}\n" if s.lag_probe_interval else ""
        return (
            "# Written by bench/daemon.py for one benchmark run.\n"
            f"[node]\nid = {s.node_id}\ndata_dir = {self.workdir}/data\n{probe}"
            f"[router]\nlisten = tcp:{self.router_port}:interface=127.0.0.1\n"
            # Every benchmark client logs in from 127.0.0.1, so only the address cap
            # has to go; the per-user throttle only counts failures.
            "max_failed_logins_per_address = 1000000\n"
            # The KDF cost is lowered for the bulk logins; see BENCH_SCRYPT_N.
            f"[accounts]\nscrypt_n = {BENCH_SCRYPT_N}\nscrypt_r = {BENCH_SCRYPT_R}\n"
            f"[im]\nlisten = tcp:{self.im_port}:interface=127.0.0.1\n"
            f"heartbeat_interval = {s.heartbeat_interval:g}\n"
            f"max_connections_per_address = {s.max_connections_per_address}\n"
            f"cipher_suites = {', '.join(s.cipher_suites)}\n"
            f"[admin]\nlisten = tcp:{self.admin_port}:interface=127.0.0.1\n"
            # metrics_text() reads /metrics without an operator's token.
            "metrics_open = loopback\n"
            f"{gateway}"
            # A benchmark measures capacity, not the limits: thousands of clients log
            # in from one address and a few users send at the offered rate.
            "[limits]\nmessages = off\ngroup_posts = off\ngroup_messages = off\n"
            "hellos = off\nlogins = off\nlogic = off\nfiles = off\n"
            "group_backlog = 1000000\nfanout_backlog = 100000000\n"
            "fanout_backlog_bytes = 4GiB\n"
            f"{s.extra_config}"
        )

    @property
    def router_url(self) -> str:
        return f"http://127.0.0.1:{self.router_port}"

    @property
    def pid(self) -> int:
        assert self.process is not None, "the daemon is not running"
        return self.process.pid

    # --- users ------------------------------------------------------------------------

    def add_users(self, names: Iterable[str], password: str, default_cost: bool = False) -> int:
        """Insert users straight into the daemon's database before it starts.

        One password hash is computed and shared by every user of a batch: the hash
        carries its own cost parameters, so each login still runs the KDF in full,
        but creating 15,000 users takes a second instead of a minute of hashing.
        ``default_cost`` hashes at the shipped default (for the router measurement).
        """
        accounts = self.config.accounts
        if default_cost:
            accounts = dataclasses.replace(
                accounts, scrypt_n=DEFAULT_SCRYPT_N, scrypt_r=DEFAULT_SCRYPT_R
            )
        encoded = hash_password(password, accounts)
        now = time.time()
        rows = [
            {"name": name, "password_hash": encoded, "kind": "person", "created_at": now}
            for name in names
        ]
        if not rows:
            return 0
        engine = open_engine(self.config.database_url)
        try:
            with engine.begin() as connection:
                connection.execute(insert(users), rows)
        finally:
            engine.dispose()
        return len(rows)

    def offline_count(self, user: str, device: str = "bench") -> int:
        """Messages ``user``'s ``device`` has not read (past its cursors), read with
        the daemon's own query, not SQL of ours, once the daemon has copied what it
        journaled (a message is promised before it reaches the database file)."""
        self.wait_for_copies()
        engine = open_engine(self.config.database_url)
        try:
            with engine.connect() as connection:
                return unread_count_txn(connection, user, device)
        finally:
            engine.dispose()

    # --- process ----------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        env = dict(os.environ)
        if self.source is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [self.source, env.get("PYTHONPATH")]))
        command = [
            *pinned(self.settings.cpu),
            os.path.join(BIN, "twistd"),
            "--nodaemon",
            "--pidfile=",
            f"--logfile={self.log_path}",
            "cim",
            "--config",
            self.config_path,
        ]
        # taskset execs twistd, so the pid we hold is the daemon's own.
        self.process = subprocess.Popen(
            command,
            cwd=self.source or ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(self.workdir, "twistd.stderr"), "wb"),  # noqa: SIM115
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the daemon exited at start-up: {self.stderr_tail()}")
            try:
                if self.health().get("status") == "ok":
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the daemon did not become healthy within {timeout:.0f} s")

    def health(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.admin_port}/health"
        with urllib.request.urlopen(url, timeout=5) as response:
            result: dict[str, Any] = json.loads(response.read())
            return result

    def metrics_text(self) -> str:
        url = f"http://127.0.0.1:{self.admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    def wait_for_copies(self, timeout: float = 30.0) -> None:
        """Until the daemon's timeline writer holds nothing uncommitted
        (``cim_offline_writer_pending`` on /metrics), checked every 20 ms."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.metrics_text().splitlines():
                if line.startswith("cim_offline_writer_pending "):
                    if float(line.split()[1]) == 0:
                        return
                    break
            else:
                return  # a daemon without the gauge writes before it promises
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the daemon's timeline copies did not finish in {timeout:.0f} s"
                )
            time.sleep(0.02)

    def sample(self) -> ProcSample:
        return sample_process(self.pid)

    def settle(self, seconds: float = 0.5, max_wait: float = 10.0) -> ProcSample:
        """Wait until the daemon is idle (no CPU used for ``seconds``), then sample.

        A sample taken while the daemon is still finishing the previous phase's
        closes or logins would charge that work to the next phase.
        """
        deadline = time.monotonic() + max_wait
        previous = self.sample()
        while time.monotonic() < deadline:
            time.sleep(seconds)
            current = self.sample()
            if current.cpu_since(previous) <= 1.5 / CLOCK_TICKS:
                return current
            previous = current
        return previous

    def stderr_tail(self, limit: int = 2000) -> str:
        try:
            with open(os.path.join(self.workdir, "twistd.stderr"), encoding="utf-8") as handle:
                return handle.read()[-limit:].strip()
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        return process.returncode

    def remove(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> BenchDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
