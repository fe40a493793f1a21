"""A PostgreSQL cluster of the test's own, for tests that kill the database.

The machine's server (127.0.0.1:5432) is shared and must stay up, so a test that kills
PostgreSQL runs a second cluster from the same Debian binaries: ``initdb`` into a
temporary directory, then the ``postgres`` server itself as a child process on a free
loopback port, with its socket directory inside the cluster's own. Run as root (the
CI image) the server must not be root, so the directory belongs to the ``postgres``
user and the processes run as that user; run by a developer, they run as the developer.

The server is started in a session of its own, so ``kill`` can SIGKILL the postmaster
and every backend at once (a crashed host's database), and ``start`` again runs
crash recovery on the same directory and port: what was committed is still there.

Where the binaries are missing the test is skipped, or fails when
CIM_REQUIRE_SERVICES=1 (CI), through ``service_missing``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any

from tests.integration.support.services import free_port, service_missing

START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
DATABASE = "cim"


class PostgreSqlNotAvailable(Exception):
    """The cluster could not be made or started here; the message says why."""


def _binaries() -> str:
    """The newest installed server's bin directory (Debian: /usr/lib/postgresql/NN/bin)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda path: int(path.split("/")[4]) if path.split("/")[4].isdigit() else 0,
    )
    if not found:
        raise PostgreSqlNotAvailable(
            "no /usr/lib/postgresql/*/bin/initdb (apt-get install postgresql)"
        )
    return os.path.dirname(found[-1])


class PrivatePostgreSQL:
    """One cluster as a child process group; ``start`` returns once it takes queries."""

    host = "127.0.0.1"

    def __init__(self) -> None:
        self.bin = _binaries()
        self.as_user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        self.directory = tempfile.mkdtemp(prefix="cim-postgresql-")
        self.data = os.path.join(self.directory, "data")
        self.log_path = os.path.join(self.directory, "postgresql.log")
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._initialised = False
        if os.geteuid() == 0:
            entry = pwd.getpwnam(self.as_user)
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{DATABASE}"

    def _run_as(self) -> dict[str, Any]:
        return {"user": self.as_user} if os.geteuid() == 0 else {}

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Make the cluster the first time, start the server, wait until it serves."""
        if self.running:
            return
        if not self._initialised:
            self._initdb()
            # A free port can be taken between probing and binding: a fresh one fixes that.
            error = PostgreSqlNotAvailable("not started")
            for _ in range(3):
                self.port = free_port(self.host)
                try:
                    self._start_once()
                    self._create_database()
                    self._initialised = True
                    return
                except PostgreSqlNotAvailable as exc:
                    error = exc
                    self.kill()
            raise error
        self._start_once()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL to the postmaster and every backend: the database vanishes mid-work."""
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(STOP_TIMEOUT)
        _wait_group_gone(process.pid, STOP_TIMEOUT)

    def stop(self) -> None:
        """A fast shutdown (SIGINT), SIGKILL to the group if it does not end in time."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGCONT)
                process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(STOP_TIMEOUT)
        self.kill()

    def close(self) -> None:
        """Stop for good and remove the cluster's directory."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    # --- the details ------------------------------------------------------------------

    def _initdb(self) -> None:
        result = subprocess.run(
            [
                os.path.join(self.bin, "initdb"),
                "-D",
                self.data,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=self.directory,
            **self._run_as(),
        )
        if result.returncode != 0:
            raise PostgreSqlNotAvailable(f"initdb exited with {result.returncode}: {result.stderr}")

    def _start_once(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    os.path.join(self.bin, "postgres"),
                    "-D",
                    self.data,
                    "-p",
                    str(self.port),
                    "-k",
                    self.directory,
                    "-c",
                    f"listen_addresses={self.host}",
                    # Durability against a killed server is what the tests look at;
                    # fsync only matters to a crash of the whole machine.
                    "-c",
                    "fsync=off",
                    "-c",
                    "max_connections=200",
                    "-c",
                    "shared_buffers=32MB",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                start_new_session=True,
                **self._run_as(),
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise PostgreSqlNotAvailable(f"postgres exited with {code}: {self.log_tail()}")
            if self._ready():
                return
            time.sleep(0.1)
        raise PostgreSqlNotAvailable(
            f"postgres did not serve on port {self.port} within {START_TIMEOUT:g} s: "
            f"{self.log_tail()}"
        )

    def _ready(self) -> bool:
        result = subprocess.run(
            [
                os.path.join(self.bin, "pg_isready"),
                "-t",
                "1",
                "-h",
                self.host,
                "-p",
                f"{self.port}",
            ],
            capture_output=True,
            timeout=10,
            check=False,
        )
        return result.returncode == 0

    def _create_database(self) -> None:
        result = subprocess.run(
            [
                os.path.join(self.bin, "psql"),
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                f'CREATE DATABASE "{DATABASE}"',
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise PostgreSqlNotAvailable(f"CREATE DATABASE failed: {result.stderr}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, errors="replace") as log:
                return "".join(log.readlines()[-lines:])
        except OSError:
            return "(no log)"


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    """Backends outlive a killed postmaster for a moment; a restart must wait for them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def private_postgresql(test: Any) -> PrivatePostgreSQL:
    """A started cluster closed at the test's cleanup, or skip/fail via service_missing.

    ``test`` is a trial TestCase, or anything with its ``addCleanup`` and ``fail``
    (the chaos run's scope).
    """
    try:
        cluster = PrivatePostgreSQL()
    except PostgreSqlNotAvailable as exc:
        service_missing(test, "PostgreSQL", str(exc))
    test.addCleanup(cluster.close)
    try:
        cluster.start()
    except PostgreSqlNotAvailable as exc:
        service_missing(test, "PostgreSQL", str(exc))
    return cluster
