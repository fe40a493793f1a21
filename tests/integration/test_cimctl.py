"""cimctl kick against a running node (a real daemon and client), and the admin API's
tokens on a real node."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

from twisted.trial.unittest import TestCase

import cim


def ask(url: str, body: dict[str, Any] | None = None, token: str | None = None) -> Any:
    """(status, JSON answer) of a GET, or of a POST of body."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


class KickTests(TestCase):
    """cimctl kick against a running node: the client is told, with the admin's code."""

    def test_kick_a_connected_user(self) -> None:
        from tests.integration.support.daemons import PASSWORD as DAEMON_PASSWORD
        from tests.integration.support.daemons import DaemonProcess, client

        daemon = DaemonProcess(os.path.abspath(self.mktemp()))
        added = daemon.cimctl("user", "add", "bob", stdin=DAEMON_PASSWORD + "\n")
        self.assertEqual(added.returncode, 0, added.stderr)
        daemon.start()
        self.addCleanup(daemon.stop)
        listener = client(daemon, "bob", "listen", "--timeout", "30", background=True)
        try:
            daemon.wait_connections(1)
            kicked = daemon.cimctl("kick", "bob", "--json")
            self.assertEqual(kicked.returncode, 0, kicked.stderr)
            reply = json.loads(kicked.stdout)
            self.assertEqual((reply["user"], reply["node"]), ("bob", daemon.node_id))
            deadline = time.monotonic() + 10
            while daemon.online()["total"] and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.communicate()
        self.assertEqual(daemon.online()["total"], 0)
        again = daemon.cimctl("kick", "bob")
        self.assertEqual(again.returncode, 1)
        self.assertEqual(again.stderr.strip(), "cimctl: bob is not logged in")
        with open(os.path.join(daemon.workdir, "data", "operations.log"), encoding="utf-8") as log:
            events = [json.loads(line) for line in log]
        # The router names the operator whose token cimctl sent (tests' DaemonProcess
        # wrote it as cimctl keygen --admin would).
        self.assertIn(
            ("admin", "tester", {"action": "user.kick", "target": "bob", "outcome": "ok"}),
            [(e["event"], e["user"], e["detail"]) for e in events],
        )
        self.assertIn(
            ("kick", "bob", "kicked by an administrator"),
            [(e["event"], e["user"], e["detail"].get("reason")) for e in events],
        )


class AdminTokenTests(TestCase):
    """Issue 17, acceptance 3, against a running node: from loopback, the online list
    and kick need the admin token; with it they work, and the log names who."""

    def test_the_admin_api_asks_who_you_are_from_loopback_too(self) -> None:
        from tests.integration.support.daemons import PASSWORD as DAEMON_PASSWORD
        from tests.integration.support.daemons import DaemonProcess

        daemon = DaemonProcess(os.path.abspath(self.mktemp()))
        added = daemon.cimctl("user", "add", "bob", stdin=DAEMON_PASSWORD + "\n")
        self.assertEqual(added.returncode, 0, added.stderr)
        made = daemon.cimctl("keygen", "--admin", "--name", "ops1")
        self.assertEqual(made.returncode, 0, made.stderr)
        daemon.start()
        self.addCleanup(daemon.stop)
        status, _ = daemon.login("bob")
        self.assertEqual(status, 200)
        router, admin = daemon.router_url, f"http://127.0.0.1:{daemon.admin_port}"

        for token in (None, "x" * 43):
            self.assertEqual(ask(f"{router}/api/v1/online", token=token)[0], 401)
            status, answer = ask(f"{router}/api/v1/admin/kick", {"user": "bob"}, token)
            self.assertEqual((status, answer["error"]), (401, "invalid_token"))
            self.assertEqual(ask(f"{admin}/metrics", token=token)[0], 401)
        status, health = ask(f"{admin}/health")
        self.assertEqual(
            (status, health),
            (200, {"status": "ok", "node": daemon.node_id, "version": cim.__version__}),
        )

        # cimctl picks the operator; the router logs the name.
        ops1 = daemon.cimctl("--operator", "ops1", "kick", "bob", "--json")
        self.assertEqual(ops1.returncode, 0, ops1.stderr)
        self.assertEqual(json.loads(ops1.stdout)["user"], "bob")
        self.assertEqual(daemon.cimctl("--operator", "ops1", "online").returncode, 0)
        chooses = daemon.cimctl("online")
        self.assertEqual(chooses.returncode, 2)
        self.assertIn("choose one with --operator", chooses.stderr)

        # Revoking: a new token for ops1 makes the old one worthless, at once.
        with open(os.path.join(daemon.workdir, "data", "admin_token"), encoding="utf-8") as f:
            old = dict(line.strip().split(":", 1) for line in f if ":" in line)["ops1"]
        self.assertEqual(ask(f"{router}/api/v1/online", token=old)[0], 200)
        self.assertEqual(daemon.cimctl("keygen", "--admin", "--name", "ops1").returncode, 0)
        self.assertEqual(ask(f"{router}/api/v1/online", token=old)[0], 401)

        with open(os.path.join(daemon.workdir, "data", "operations.log"), encoding="utf-8") as log:
            events = [json.loads(line) for line in log if '"event":"admin"' in line]
        kicks = [
            (e["user"], e["peer"], e["detail"]["outcome"])
            for e in events
            if e["detail"].get("action") == "user.kick"
        ]
        self.assertEqual(
            kicks,
            [
                (None, "127.0.0.1", "invalid_token"),
                (None, "127.0.0.1", "invalid_token"),
                ("ops1", "127.0.0.1", "ok"),
            ],
        )
