"""The README's walk-through with real processes: twistd, cimctl and cim-client.

These are integration tests: a real daemon on free loopback ports, real TCP, real
encryption, the console scripts exactly as a user runs them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

BIN = os.path.dirname(sys.executable)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASSWORD = "correct horse battery"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Daemon:
    """One cim node in its own process, with its own data directory and ports."""

    def __init__(self, workdir: str, extra: str = "") -> None:
        os.makedirs(workdir, exist_ok=True)
        self.workdir = workdir
        self.router_port = free_port()
        self.im_port = free_port()
        self.admin_port = free_port()
        self.config = os.path.join(workdir, "cim.ini")
        with open(self.config, "w", encoding="utf-8") as handle:
            handle.write(
                f"[node]\nid = e2e\ndata_dir = {workdir}/data\n"
                f"[router]\nlisten = tcp:{self.router_port}:interface=127.0.0.1\n"
                f"[im]\nlisten = tcp:{self.im_port}:interface=127.0.0.1\n{extra}"
                f"[admin]\nlisten = tcp:{self.admin_port}:interface=127.0.0.1\n"
                "[accounts]\nscrypt_n = 4096\n"
            )
        self.process: subprocess.Popen[str] | None = None
        self.log_path = os.path.join(workdir, "twistd.log")

    @property
    def router_url(self) -> str:
        return f"http://127.0.0.1:{self.router_port}"

    def cimctl(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [os.path.join(BIN, "cimctl"), "--config", self.config, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                os.path.join(BIN, "twistd"),
                "--nodaemon",
                "--pidfile=",
                f"--logfile={self.log_path}",
                "cim",
                "--config",
                self.config,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited: {self.process.stderr.read()}")  # type: ignore[union-attr]
            try:
                if self.health()["status"] == "ok":
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("daemon did not become healthy in 60 s")

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/health", timeout=5) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def wait_connections(self, count: int) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.health().get("online_here", 0) >= count:
                return
            time.sleep(0.05)
        raise AssertionError(f"{count} clients did not come online")

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        finally:
            for stream in (self.process.stdout, self.process.stderr):
                if stream is not None:
                    stream.close()


def client(
    daemon: Daemon, user: str, *args: str, cipher: str | None = None, background: bool = False
) -> Any:
    command = [os.path.join(BIN, "cim-client"), "--router", daemon.router_url, "--user", user]
    if cipher:
        command += ["--cipher", cipher]
    command += list(args)
    env = dict(os.environ, CIM_PASSWORD=PASSWORD)
    if background:
        return subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
        )
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)


class WalkThroughTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.daemon = Daemon(os.path.abspath(self.mktemp()))
        for user in ("alice", "bob"):
            added = self.daemon.cimctl("user", "add", user, stdin=PASSWORD + "\n")
            self.assertEqual(added.returncode, 0, added.stderr)
        self.daemon.start()
        self.addCleanup(self.daemon.stop)

    def _exchange(self, cipher: str | None, text: str) -> None:
        listener = client(
            self.daemon,
            "bob",
            "listen",
            "--count",
            "1",
            "--timeout",
            "30",
            cipher=cipher,
            background=True,
        )
        try:
            self.daemon.wait_connections(1)
            sent = client(self.daemon, "alice", "send", "bob", text, cipher=cipher)
            out, err = listener.communicate(timeout=60)
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.communicate()
        self.assertEqual(sent.returncode, 0, sent.stderr)
        outcome = json.loads(sent.stdout)
        self.assertEqual(outcome["status"], "delivered")
        self.assertEqual(listener.returncode, 0, err)
        lines = out.strip().splitlines()
        self.assertEqual(len(lines), 1, out)
        message = json.loads(lines[0])
        self.assertEqual(
            (message["from"], message["to"], message["text"], message["type"]),
            ("alice", "bob", text, "text"),
        )
        self.assertEqual(message["msg_id"], outcome["msg_id"])
        self.assertTrue(message["sent_at"].endswith("Z"))

    def test_bob_receives_alices_message_with_each_suite(self) -> None:
        for cipher in (None, "rc4-hmac-sha256", "chacha20-poly1305"):
            self._exchange(cipher, f"hello via {cipher or 'the default suite'}")
        metrics = self.daemon.metrics()
        self.assertIn('cim_messages_total{outcome="delivered"} 3.0', metrics)

    def test_online_and_wrong_password(self) -> None:
        online = client(self.daemon, "alice", "online")
        self.assertEqual(online.returncode, 0, online.stderr)
        self.assertEqual(json.loads(online.stdout)["users"], ["alice"])
        env = dict(os.environ, CIM_PASSWORD="wrong password!")
        refused = subprocess.run(
            [
                os.path.join(BIN, "cim-client"),
                "--router",
                self.daemon.router_url,
                "--user",
                "alice",
                "online",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(refused.returncode, 1)
        self.assertIn("invalid_credentials", refused.stderr)
        self.assertNotIn("Traceback", refused.stderr)

    def test_sigterm_tells_clients_and_exits_cleanly(self) -> None:
        listener = client(self.daemon, "bob", "listen", "--timeout", "60", background=True)
        try:
            self.daemon.wait_connections(1)
            # twistd re-raises the signal it stopped for, as init systems expect.
            self.assertIn(self.daemon.stop(), (0, -signal.SIGTERM))
        finally:
            listener.kill()
            listener.communicate()
        with open(self.daemon.log_path, encoding="utf-8") as handle:
            log = handle.read()
        self.assertIn("cim node e2e stopped", log)
        self.assertNotIn(PASSWORD, log)


class RefusalTests(SynchronousTestCase):
    def test_suite_the_node_does_not_allow(self) -> None:
        daemon = Daemon(os.path.abspath(self.mktemp()), "cipher_suites = chacha20-poly1305\n")
        self.assertEqual(daemon.cimctl("user", "add", "alice", stdin=PASSWORD + "\n").returncode, 0)
        daemon.start()
        self.addCleanup(daemon.stop)
        refused = client(daemon, "alice", "online", cipher="rc4-hmac-sha256")
        self.assertEqual(refused.returncode, 1)
        self.assertEqual(
            refused.stderr.strip(),
            "cim-client: the node does not allow cipher suite 'rc4-hmac-sha256'; "
            "it allows: chacha20-poly1305",
        )

    def test_port_in_use_stops_the_daemon_with_one_line(self) -> None:
        daemon = Daemon(os.path.abspath(self.mktemp()))
        with socket.socket() as squatter:
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            squatter.bind(("127.0.0.1", daemon.im_port))
            squatter.listen()
            result = subprocess.run(
                [
                    os.path.join(BIN, "twistd"),
                    "--nodaemon",
                    "--pidfile=",
                    f"--logfile={daemon.log_path}",
                    "cim",
                    "--config",
                    daemon.config,
                ],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=ROOT,
            )
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(
            result.stderr.strip(),
            f"cim: could not start node e2e: [im] listen = "
            f"'tcp:{daemon.im_port}:interface=127.0.0.1': cannot listen: Address already in use",
        )
