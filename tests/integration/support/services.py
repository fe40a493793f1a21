"""Shared helpers for integration tests that need a real service (Redis, ...).

A missing service skips the test on a developer's machine, but fails it under CI
(``CIM_REQUIRE_SERVICES=1``), so a broken CI image cannot pass by skipping everything.
Every wait here has a deadline: a service that never comes up fails the test, it
does not hang the run.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn
from unittest import SkipTest

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

REQUIRE_SERVICES = "CIM_REQUIRE_SERVICES"


def services_required() -> bool:
    return os.environ.get(REQUIRE_SERVICES) == "1"


def service_missing(test: SynchronousTestCase, name: str, why: str) -> NoReturn:
    """Skip the test, or fail it naming the service when services are required."""
    if services_required():
        test.fail(f"{name} is required ({REQUIRE_SERVICES}=1) but {why}")
    raise SkipTest(f"{name} is not available: {why} (set {REQUIRE_SERVICES}=1 to fail instead)")


def redis_available(host: str = "127.0.0.1", port: int = 6379, timeout: float = 1.0) -> bool:
    """Whether a Redis answers PING there (an open port alone could be anything)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


_given: set[int] = set()
"""Ports this process handed out (never the same one twice while it runs)."""
_ports = random.Random()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now, below Linux's ephemeral range (32768 and up).

    Port 0 would hand out an ephemeral port, which the kernel may give to one of the
    many outgoing connections (to Redis, RabbitMQ, the daemons) before the server
    binds it; picking below that range leaves only listeners to collide with.
    """
    if len(_given) > 8000:
        _given.clear()
    for _ in range(200):
        port = _ports.randrange(20000, 32000)
        if port in _given:
            # Handed out already: its caller may not have bound it yet (a daemon is
            # given its three ports before it starts, and once got the same one twice).
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            _given.add(port)
            return port
    raise RuntimeError("no free port found between 20000 and 32000")


async def eventually(
    reactor: Any,
    check: Callable[[], Awaitable[bool]],
    timeout: float,
    what: str,
    interval: float = 0.05,
) -> None:
    """Poll an async check on the real reactor until it holds; fail after timeout."""
    deadline = reactor.seconds() + timeout
    while True:
        if await check():
            return
        if reactor.seconds() >= deadline:
            raise AssertionError(f"gave up after {timeout:g} s waiting for {what}")
        await task.deferLater(reactor, interval, lambda: None)


class PrivateRedis:
    """A redis-server of the test's own, on a free loopback port, without persistence.

    It can be stopped (or killed, or paused) and started again on the same port, to
    test what a client does while Redis is gone and after it comes back with nothing.
    The test's cleanup stops it.
    """

    host = "127.0.0.1"

    def __init__(self, test: SynchronousTestCase, start_timeout: float = 10.0) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            service_missing(
                test, "redis-server", "it is not installed (apt-get install redis-server)"
            )
        self._executable = executable
        self._start_timeout = start_timeout
        self.port = free_port(self.host)
        self.directory = os.path.abspath(test.mktemp())
        os.makedirs(self.directory)
        self.log_path = os.path.join(self.directory, "redis.log")
        self._process: subprocess.Popen[bytes] | None = None
        test.addCleanup(self.stop)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start and wait (bounded) until it answers PING."""
        if self.running:
            return
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [
                    self._executable,
                    "--port",
                    str(self.port),
                    "--bind",
                    self.host,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    self.directory,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.directory,
            )
        deadline = time.monotonic() + self._start_timeout
        while not redis_available(self.host, self.port, timeout=0.2):
            code = self._process.poll()
            if code is not None:
                self._process = None
                raise RuntimeError(f"redis-server exited with {code}; see {self.log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"redis-server did not answer within {self._start_timeout:g} s; "
                    f"see {self.log_path}"
                )
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (SIGKILL if it does not go in time), then wait for it to exit."""
        self._end(signal.SIGTERM, timeout)

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL: Redis vanishes the way a crashed host's would."""
        self._end(signal.SIGKILL, timeout)

    def flushall(self, timeout: float = 5.0) -> None:
        """FLUSHALL: everything Redis held is gone at once (an operator's mistake, a
        failover to an empty replica), the process and connections stay."""
        with socket.create_connection((self.host, self.port), timeout=timeout) as connection:
            connection.sendall(b"*1\r\n$8\r\nFLUSHALL\r\n")
            reply = connection.recv(64)
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"FLUSHALL answered {reply!r}")

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung Redis)."""
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    def _end(self, signum: int, timeout: float) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGCONT)  # a paused process cannot act on SIGTERM
        process.send_signal(signum)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
