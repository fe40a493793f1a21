"""A private ZooKeeper server for integration tests, from Debian's `zookeeper` package.

Each server gets its own data directory and a free loopback port, so tests never touch
a developer's ZooKeeper on 2181 and never see each other's znodes. ``tickTime`` is
500 ms so sessions may be as short as one second, which keeps expiry tests quick.

Where the package or Java is missing the test is skipped, or fails when
CIM_REQUIRE_SERVICES=1 (CI), through ``service_missing``.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time

from kazoo.client import KazooClient
from twisted.trial.unittest import SynchronousTestCase

from tests.integration.support.services import free_port, service_missing

ZOOKEEPER_JAR = os.environ.get("CIM_ZOOKEEPER_JAR", "/usr/share/java/zookeeper.jar")
"""Debian's jar; its manifest's Class-Path names every dependency."""
LOGGING_JAR = "/usr/share/java/slf4j-simple.jar"
"""Makes the server log to stderr (its log file) instead of saying nothing."""
MAIN_CLASS = "org.apache.zookeeper.server.quorum.QuorumPeerMain"
START_TIMEOUT = 30.0
MIN_SESSION_TIMEOUT = 1.0


_QUIET = logging.Logger("tests.zookeeper.probe", logging.CRITICAL)
"""Refused connections are expected while the server boots; nobody needs to read them."""
_QUIET.propagate = False
_QUIET.addHandler(logging.NullHandler())


class ZooKeeperNotAvailable(Exception):
    """The server could not be started here; the message says why."""


class PrivateZooKeeper:
    """One standalone ZooKeeper as a child process; ``start`` blocks until it serves."""

    def __init__(self) -> None:
        self.port = 0
        self.directory: str | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def hosts(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        java = shutil.which("java")
        if java is None:
            raise ZooKeeperNotAvailable("no java on PATH (apt-get install default-jre-headless)")
        if not os.path.exists(ZOOKEEPER_JAR):
            raise ZooKeeperNotAvailable(
                f"{ZOOKEEPER_JAR} is missing (apt-get install zookeeper, or .ci/zookeeper.sh)"
            )
        self.directory = tempfile.mkdtemp(prefix="cim-zookeeper-")
        # The free port can be taken between probing and binding; a fresh one fixes that.
        error = ZooKeeperNotAvailable("not started")
        for _ in range(3):
            try:
                self._start_once(java)
                return
            except ZooKeeperNotAvailable as exc:
                error = exc
                self._terminate()
        self.stop()
        raise error

    def _start_once(self, java: str) -> None:
        assert self.directory is not None
        self.port = free_port()
        data = os.path.join(self.directory, "data")
        os.makedirs(data, exist_ok=True)
        config = os.path.join(self.directory, "zoo.cfg")
        with open(config, "w") as out:
            out.write(
                f"tickTime=500\n"
                f"dataDir={data}\n"
                f"clientPort={self.port}\n"
                f"clientPortAddress=127.0.0.1\n"
                f"minSessionTimeout={int(MIN_SESSION_TIMEOUT * 1000)}\n"
                f"maxSessionTimeout=60000\n"
                f"admin.enableServer=false\n"
                f"4lw.commands.whitelist=\n"
                f"maxClientCnxns=0\n"
            )
        classpath = ZOOKEEPER_JAR
        if os.path.exists(LOGGING_JAR):
            classpath += os.pathsep + LOGGING_JAR
        self.log_path = os.path.join(self.directory, "zookeeper.log")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    java,
                    "-Xmx256m",
                    "-XX:+UseSerialGC",
                    "-Djava.net.preferIPv4Stack=true",
                    "-Dzookeeper.admin.enableServer=false",
                    "-cp",
                    classpath,
                    MAIN_CLASS,
                    config,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
            )
        self._wait_until_serving()

    def _wait_until_serving(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise ZooKeeperNotAvailable(
                    f"ZooKeeper exited with {self.process.returncode}: {self.log_tail()}"
                )
            client = KazooClient(hosts=self.hosts, timeout=2.0, logger=_QUIET)
            try:
                client.start(timeout=1.0)
                client.get_children("/")
                return
            except Exception:
                pass  # not listening yet
            finally:
                client.stop()
                client.close()
        raise ZooKeeperNotAvailable(
            f"ZooKeeper did not serve on {self.hosts} within {START_TIMEOUT:g} s: {self.log_tail()}"
        )

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, errors="replace") as log:
                return "".join(log.readlines()[-lines:])
        except (OSError, AttributeError):
            return "(no log)"

    def _terminate(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def stop(self) -> None:
        self._terminate()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


def private_zookeeper(test: SynchronousTestCase) -> PrivateZooKeeper:
    """A started server stopped at the test's cleanup, or skip/fail via service_missing."""
    server = PrivateZooKeeper()
    try:
        server.start()
    except ZooKeeperNotAvailable as exc:
        service_missing(test, "ZooKeeper", str(exc))
    test.addCleanup(server.stop)
    return server


_shared: tuple[str, PrivateZooKeeper | ZooKeeperNotAvailable] | None = None


def shared_zookeeper(test: SynchronousTestCase) -> PrivateZooKeeper:
    """One server for all the tests of the test's class, each using its own path.

    Starting a JVM costs a second or two, so a class pays once. trial runs a class's
    tests one after another: the first test of the next class stops the previous
    server, and the last one is stopped when the process exits.
    """
    global _shared
    key = f"{type(test).__module__}.{type(test).__qualname__}"
    if _shared is None or _shared[0] != key:
        _stop_shared()
        server = PrivateZooKeeper()
        try:
            server.start()
            _shared = (key, server)
        except ZooKeeperNotAvailable as exc:
            _shared = (key, exc)
    state = _shared[1]
    if isinstance(state, ZooKeeperNotAvailable):
        service_missing(test, "ZooKeeper", str(state))
    return state


@atexit.register
def _stop_shared() -> None:
    global _shared
    if _shared is not None and isinstance(_shared[1], PrivateZooKeeper):
        _shared[1].stop()
    _shared = None
