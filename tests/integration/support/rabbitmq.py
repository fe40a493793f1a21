"""A RabbitMQ node of the test's own, for tests that stop, pause or kill the broker.

The machine's broker (127.0.0.1:5672) is shared and must stay up, so outage tests run a
second node from the same Debian package: its own node name, AMQP and distribution
ports, data and log directory, no plugins, listening on loopback only.

It runs the package's scripts under /usr/lib/rabbitmq/bin directly, as the current
user, with HOME set to its own directory, rather than through /usr/sbin's wrapper.
The wrapper drops to the ``rabbitmq`` user, whose HOME holds the system node's Erlang
cookie, so every directory would have to belong to that user and rabbitmqctl would
need that cookie; the direct way has a cookie of its own (Erlang creates it), works
for root and for a developer alike, and leaves the system node's files alone.
Every environment variable that configures RabbitMQ or Erlang is replaced, so neither
/etc/rabbitmq nor the caller's environment leaks into the node.

Starting takes about 7 s here (wait bounded by ``START_TIMEOUT``); a stop about 4 s.
Where the package is missing the test is skipped, or fails when CIM_REQUIRE_SERVICES=1
(CI), through ``service_missing``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pika
from twisted.trial.unittest import SynchronousTestCase

from tests.integration.support.services import free_port, service_missing

SCRIPTS = os.environ.get("CIM_RABBITMQ_SCRIPTS", "/usr/lib/rabbitmq/bin")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
SHARED_URL = os.environ.get("CIM_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
"""The machine's broker, for tests that only need a working one."""

_CONFIGURING = ("RABBITMQ_", "ERL_", "HOME")


class RabbitMqNotAvailable(Exception):
    """The node could not be started here; the message says why."""


def amqp_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether something there speaks AMQP 0-9-1 (answers the protocol header)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            return sock.recv(1) == b"\x01"  # a method frame: Connection.Start
    except OSError:
        return False


def can_log_in(url: str, timeout: float = 2.0) -> bool:
    """Whether a client can open a connection and a channel (the broker has booted)."""
    parameters = pika.URLParameters(url)
    parameters.socket_timeout = timeout
    parameters.stack_timeout = timeout
    parameters.blocked_connection_timeout = timeout
    parameters.connection_attempts = 1
    try:
        connection = pika.BlockingConnection(parameters)
    except Exception:  # pika's handshake timeouts are not AMQPErrors
        return False
    try:
        connection.channel()
        return True
    except Exception:
        return False
    finally:
        if connection.is_open:
            connection.close()


class PrivateRabbitMQ:
    """One RabbitMQ node as a detached child; ``start`` returns once clients can log in.

    ``stop`` and ``start`` again keep the ports and the data directory, so durable
    queues and persistent messages survive, as after a real broker restart. With a
    test, its cleanup closes the node for good (stop, then remove its directory).
    """

    host = "127.0.0.1"

    def __init__(self, test: SynchronousTestCase | None = None) -> None:
        for script in ("rabbitmq-server", "rabbitmqctl"):
            if not os.access(os.path.join(SCRIPTS, script), os.X_OK):
                why = f"{SCRIPTS}/{script} is missing (apt-get install rabbitmq-server)"
                if test is None:
                    raise RabbitMqNotAvailable(why)
                service_missing(test, "RabbitMQ", why)
        self.directory = tempfile.mkdtemp(prefix="cim-rabbitmq-")
        self.port = 0
        self.dist_port = 0
        self._started_once = False
        if test is not None:
            test.addCleanup(self.close)

    @property
    def nodename(self) -> str:
        return f"cimtest-{self.port}@localhost"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{self.host}:{self.port}/%2F"

    @property
    def log_path(self) -> str:
        return os.path.join(self.directory, "log", f"{self.nodename}.log")

    @property
    def pid_path(self) -> str:
        return os.path.join(self.directory, "rabbitmq.pid")

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start (on the same ports as before, after the first time) and wait."""
        if self.pid() is not None:
            return
        if self._started_once:
            self._start_once()
            return
        # A free port can be taken between probing and binding: fresh ones fix that.
        error = RabbitMqNotAvailable("not started")
        for _ in range(3):
            self.port = free_port(self.host)
            self.dist_port = free_port(self.host)
            try:
                self._start_once()
                self._started_once = True
                return
            except RabbitMqNotAvailable as exc:
                error = exc
                self.kill()
        raise error

    def stop(self) -> None:
        """rabbitmqctl stop (the node shuts down cleanly, closing its connections),
        SIGKILL if that does not end it in time."""
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGCONT)  # a paused node cannot act on a stop
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(
                [os.path.join(SCRIPTS, "rabbitmqctl"), "-n", self.nodename, "stop"],
                env=self._environment(),
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=STOP_TIMEOUT,
                check=False,
            )
        if not _wait_gone(pid, 10.0):
            self.kill()
        _remove(self.pid_path)

    def kill(self) -> None:
        """SIGKILL: the broker vanishes the way a crashed host's would."""
        pid = self.pid()
        if pid is None:
            return
        for signum in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                break
        _wait_gone(pid, STOP_TIMEOUT)
        _remove(self.pid_path)

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung broker)."""
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGCONT)

    def close(self) -> None:
        """Stop for good and remove the node's directory."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def pid(self) -> int | None:
        """The running node's process id, or None."""
        try:
            with open(self.pid_path) as pid_file:
                pid = int(pid_file.read().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return pid

    # --- the details ------------------------------------------------------------------

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_CONFIGURING)}
        env.update(
            HOME=self.directory,  # where Erlang keeps this node's own cookie
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_IP_ADDRESS=self.host,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=os.path.join(self.directory, "mnesia"),
            RABBITMQ_LOG_BASE=os.path.join(self.directory, "log"),
            RABBITMQ_PID_FILE=self.pid_path,
            RABBITMQ_CONFIG_FILE=os.path.join(self.directory, "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=os.path.join(self.directory, "advanced.config"),
            RABBITMQ_CONF_ENV_FILE=os.path.join(self.directory, "rabbitmq-env.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=os.path.join(self.directory, "enabled_plugins"),
            ERL_EPMD_ADDRESS=self.host,
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    def _write_files(self) -> None:
        for sub in ("mnesia", "log"):
            os.makedirs(os.path.join(self.directory, sub), exist_ok=True)
        files = {
            "rabbitmq.conf": (
                f"listeners.tcp.local = {self.host}:{self.port}\n"
                "loopback_users.guest = true\n"
                # A nearly full test disk must not block publishers (the default is 50 MB).
                "disk_free_limit.absolute = 1MB\n"
            ),
            "advanced.config": "[].\n",
            "rabbitmq-env.conf": "",
            "enabled_plugins": "[].\n",
        }
        for name, text in files.items():
            with open(os.path.join(self.directory, name), "w") as out:
                out.write(text)

    def _start_once(self) -> None:
        self._write_files()
        _remove(self.pid_path)
        output = os.path.join(self.directory, "startup.log")
        with open(output, "ab") as log:
            started = subprocess.run(
                [os.path.join(SCRIPTS, "rabbitmq-server"), "-detached"],
                env=self._environment(),
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=STOP_TIMEOUT,
                check=False,
            )
        if started.returncode != 0:
            raise RabbitMqNotAvailable(
                f"rabbitmq-server -detached exited with {started.returncode}: {_tail(output)}"
            )
        deadline = time.monotonic() + START_TIMEOUT
        seen_pid = False
        while time.monotonic() < deadline:
            if amqp_answers(self.host, self.port, timeout=0.5) and can_log_in(self.url):
                return
            pid = self.pid()
            if pid is not None:
                seen_pid = True
            elif seen_pid:
                raise RabbitMqNotAvailable(f"the node exited while booting: {_tail(self.log_path)}")
            time.sleep(0.1)
        raise RabbitMqNotAvailable(
            f"the node did not accept clients on {self.host}:{self.port} within "
            f"{START_TIMEOUT:g} s: {_tail(self.log_path)}"
        )


def private_rabbitmq(test: SynchronousTestCase) -> PrivateRabbitMQ:
    """A started node closed at the test's cleanup, or skip/fail via service_missing."""
    node = PrivateRabbitMQ(test)
    try:
        node.start()
    except RabbitMqNotAvailable as exc:
        service_missing(test, "RabbitMQ", str(exc))
    return node


_shared: tuple[str, PrivateRabbitMQ | RabbitMqNotAvailable] | None = None


def shared_rabbitmq(test: SynchronousTestCase) -> PrivateRabbitMQ:
    """One private node for all the tests of the test's class, started if it is down.

    A node takes seconds to boot, so a class pays once. trial runs a class's tests one
    after another: the first test of the next class closes the previous node, and the
    last one is closed when the process exits. Tests that stop the node need not start
    it again: the next test's call does.
    """
    global _shared
    key = f"{type(test).__module__}.{type(test).__qualname__}"
    if _shared is None or _shared[0] != key:
        _close_shared()
        try:
            _shared = (key, PrivateRabbitMQ())
        except RabbitMqNotAvailable as exc:
            _shared = (key, exc)
    state = _shared[1]
    if isinstance(state, PrivateRabbitMQ):
        try:
            state.start()
        except RabbitMqNotAvailable as exc:
            state.close()
            _shared = (key, exc)
            state = exc
    if isinstance(state, RabbitMqNotAvailable):
        service_missing(test, "RabbitMQ", str(state))
    return state


@atexit.register
def _close_shared() -> None:
    global _shared
    if _shared is not None and isinstance(_shared[1], PrivateRabbitMQ):
        _shared[1].close()
    _shared = None


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as log:
            return "".join(log.readlines()[-lines:])
    except OSError:
        return f"(no log at {path})"
