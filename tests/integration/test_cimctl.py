"""cimctl kick against a running node (a real daemon and client)."""

from __future__ import annotations

import json
import os
import time

from twisted.trial.unittest import TestCase


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
        self.assertIn(
            ("admin", {"action": "user.kick", "target": "bob"}),
            [(e["event"], e["detail"]) for e in events],
        )
        self.assertIn(
            ("kick", "bob", "kicked by an administrator"),
            [(e["event"], e["user"], e["detail"].get("reason")) for e in events],
        )
