"""The README's walk-through with real processes: twistd, cimctl and cim-client.

These are integration tests: a real daemon on free loopback ports, real TCP, real
encryption, the console scripts exactly as a user runs them.
"""

from __future__ import annotations

import json
import os
import signal
import socket

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.support.daemons import PASSWORD, DaemonProcess, client


class WalkThroughTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.daemon = DaemonProcess(os.path.abspath(self.mktemp()))
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
        # Presence is for contacts only (docs/privacy.md), and alice has none yet.
        self.assertEqual(json.loads(online.stdout), {"items": [], "total": 0})
        refused = client(self.daemon, "alice", "online", password="wrong password!")
        self.assertEqual(refused.returncode, 4)  # refused: the login
        self.assertEqual(
            refused.stderr,
            "cim-client: wrong user name or password (invalid_credentials, HTTP 401)\n",
        )

    def test_groups_from_the_command_line(self) -> None:
        created = client(self.daemon, "alice", "group", "create", "friends")
        self.assertEqual(created.returncode, 0, created.stderr)
        group = json.loads(created.stdout)
        self.assertEqual(
            (group["name"], group["owner"], group["member_count"]), ("friends", "alice", 1)
        )
        # bob is not alice's contact: adding him is an invitation he accepts.
        added = client(self.daemon, "alice", "group", "add", "friends", "bob")
        self.assertEqual(
            (json.loads(added.stdout)["member_count"], json.loads(added.stdout)["invited"]),
            (1, ["bob"]),
            added.stderr,
        )
        told = client(self.daemon, "bob", "listen", "--count", "1", "--timeout", "30")
        notice = json.loads(json.loads(told.stdout.splitlines()[0])["text"])
        self.assertEqual((notice["event"], notice["invited_by"]), ("group.invited", "alice"))
        accepted = client(self.daemon, "bob", "group", "accept", "friends")
        self.assertEqual(json.loads(accepted.stdout)["member_count"], 2, accepted.stderr)
        listed = client(self.daemon, "bob", "group", "list")
        self.assertEqual([g["id"] for g in json.loads(listed.stdout)["items"]], [group["id"]])
        listener = client(
            self.daemon, "bob", "listen", "--count", "1", "--timeout", "30", background=True
        )
        try:
            self.daemon.wait_connections(1)
            sent = client(self.daemon, "alice", "group", "send", "friends", "hi all")
            out, _err = listener.communicate(timeout=60)
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.communicate()
        self.assertEqual(sent.returncode, 0, sent.stderr)
        self.assertEqual(
            json.loads(sent.stdout),
            {
                "msg_id": json.loads(sent.stdout)["msg_id"],
                "status": "accepted",
                "group": group["id"],
            },
        )
        message = json.loads(out.strip().splitlines()[0])
        self.assertNotIn("to", message)  # a group message has no receiver, not "to": ""
        self.assertEqual(
            (message["group"], message["from"], message["text"]), (group["id"], "alice", "hi all")
        )
        refused = client(self.daemon, "bob", "group", "send", "nonexistent", "x")
        self.assertEqual(refused.returncode, 1)
        self.assertIn("no group", refused.stderr)
        left = client(self.daemon, "bob", "group", "leave", "friends")
        self.assertEqual(json.loads(left.stdout), {"ok": True}, left.stderr)

    def test_offline_message_is_stored_then_pulled_and_in_history(self) -> None:
        sent = client(self.daemon, "alice", "send", "bob", "while you were away")
        self.assertEqual(sent.returncode, 0, sent.stderr)
        outcome = json.loads(sent.stdout)
        self.assertEqual(outcome["status"], "stored")
        listened = client(self.daemon, "bob", "listen", "--count", "1", "--timeout", "30")
        self.assertEqual(listened.returncode, 0, listened.stderr)
        message = json.loads(listened.stdout.strip().splitlines()[0])
        self.assertEqual((message["from"], message["text"]), ("alice", "while you were away"))
        self.assertEqual(message["msg_id"], outcome["msg_id"])
        # Pulled and acknowledged: a second login brings nothing more.
        again = client(self.daemon, "bob", "listen", "--count", "1", "--timeout", "3")
        self.assertEqual(again.stdout.strip(), "")
        history = client(self.daemon, "bob", "history", "alice")
        self.assertEqual(history.returncode, 0, history.stderr)
        texts = [json.loads(line)["text"] for line in history.stdout.strip().splitlines()]
        self.assertIn("while you were away", texts)
        log_path = os.path.join(self.daemon.workdir, "data", "operations.log")
        with open(log_path, encoding="utf-8") as handle:
            events = [json.loads(line) for line in handle]
        self.assertIn("login", {event["event"] for event in events})
        with open(log_path, encoding="utf-8") as handle:
            self.assertNotIn(PASSWORD, handle.read())

    def test_sigterm_tells_clients_and_exits_cleanly(self) -> None:
        listener = client(self.daemon, "bob", "listen", "--timeout", "60", background=True)
        try:
            self.daemon.wait_connections(1)
            # twistd re-raises the signal it stopped for, as init systems expect.
            self.assertIn(self.daemon.stop(), (0, -signal.SIGTERM))
        finally:
            listener.kill()
            listener.communicate()
        log = self.daemon.log()
        self.assertIn("cim node e2e stopped", log)
        self.assertNotIn(PASSWORD, log)


class RefusalTests(SynchronousTestCase):
    def test_suite_the_node_does_not_allow(self) -> None:
        daemon = DaemonProcess(
            os.path.abspath(self.mktemp()), extra="[im]\ncipher_suites = chacha20-poly1305\n"
        )
        self.assertEqual(daemon.cimctl("user", "add", "alice", stdin=PASSWORD + "\n").returncode, 0)
        daemon.start()
        self.addCleanup(daemon.stop)
        refused = client(daemon, "alice", "online", cipher="rc4-hmac-sha256")
        self.assertEqual(refused.returncode, 4)
        self.assertEqual(
            refused.stderr.strip(),
            "cim-client: the node does not allow cipher suite 'rc4-hmac-sha256'; "
            "it allows: chacha20-poly1305",
        )

    def test_port_in_use_stops_the_daemon_with_one_line(self) -> None:
        daemon = DaemonProcess(os.path.abspath(self.mktemp()))
        with socket.socket() as squatter:
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            squatter.bind(("127.0.0.1", daemon.im_port))
            squatter.listen()
            result = daemon.run_to_exit()
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(
            result.stderr.strip(),
            f"cim: could not start node e2e: [im] listen = "
            f"'tcp:{daemon.im_port}:interface=127.0.0.1': cannot listen: Address already in use",
        )
