"""Read receipts (#15 acceptance 3) with a real daemon and the real cim-client: alice
marks her conversation with bob read (``cim-client read bob``) and bob's ``listen``
prints ``"event": "read"``; with read receipts turned off it prints nothing, and
alice's catch-up summary agrees with her mark.

Here the other side is bob, through the command line; alice's other devices (a phone
and a web device at once, one node and across a node's death) are
tests.integration.test_devices_reads, and the unit level tests.unit.test_receipts and
tests.unit.test_client_reads.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from cim.history.store import direct_conversation
from tests.integration.support.daemons import client
from tests.integration.test_cli_newcomer import Lines, started_daemon, stop_listener

AB = direct_conversation("alice", "bob")


class ReadReceiptTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.daemon = started_daemon(self)

    def run_ok(self, user: str, *args: str) -> Any:
        ran = client(self.daemon, user, *args)
        self.assertEqual(ran.returncode, 0, (args, ran.stderr))
        return json.loads(ran.stdout) if ran.stdout.strip() else None

    def next_json(self, lines: Lines) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(lines.next(timeout=60))
        return document

    def test_bob_sees_read_up_to_n_and_nothing_with_receipts_off(self) -> None:
        for n in range(3):
            self.run_ok("bob", "send", "alice", f"m{n}")  # stored: alice is offline
        listener = client(self.daemon, "bob", "listen", "--timeout", "120", background=True)
        self.addCleanup(stop_listener, listener)
        lines = Lines(listener.stdout)
        # bob is online once alice's message reaches his listen (after his own three,
        # which his listen catches up on: his send commands took nothing).
        self.run_ok("alice", "send", "bob", "ping")
        texts = [self.next_json(lines).get("text") for _ in range(4)]
        self.assertEqual(texts, ["m0", "m1", "m2", "ping"])

        unread = self.run_ok("alice", "sync")
        [entry] = unread["items"]
        self.assertEqual((entry["peer"], entry["count"], entry["last_seq"]), ("bob", 4, 4))

        marked = self.run_ok("alice", "read", "bob", "3")
        self.assertEqual(marked, {"conversation": AB, "seq": 3, "moved": True, "last_seq": 4})
        seen = self.next_json(lines)
        self.assertEqual(
            (seen["event"], seen["conversation"], seen["reader"], seen["seq"], seen["own"]),
            ("read", AB, "alice", 3, False),
        )
        [entry] = self.run_ok("alice", "sync")["items"]  # the summary agrees: past 3
        self.assertEqual((entry["count"], entry["read_seq"]), (1, 3))

        # Backwards is a no-op; past the end is refused and changes nothing.
        self.assertEqual(self.run_ok("alice", "read", "bob", "2")["moved"], False)
        refused = client(self.daemon, "alice", "read", "bob", "99")
        self.assertEqual(refused.returncode, 1, refused.stderr)
        self.assertIn("past the conversation's newest", refused.stderr)
        stranger = client(self.daemon, "alice", "read", "d:bob:carol", "1")
        self.assertEqual(stranger.returncode, 1, stranger.stderr)  # no such conversation

        # Read receipts off: alice's read moves her mark, bob sees nothing. (bob cannot
        # send meanwhile: one session per user, his listen would be replaced.)
        policy = self.run_ok("alice", "contacts", "policy", "--read-receipts", "off")
        self.assertEqual(policy["read_receipts"], "off")
        self.assertEqual(self.run_ok("alice", "read", "bob")["seq"], 4)  # the newest
        self.assertEqual(self.run_ok("alice", "sync")["items"], [])
        # A READ_N would reach bob before the next message alice sends (one node, one
        # connection, in order), so the next line being that message shows none came.
        self.run_ok("alice", "send", "bob", "after")
        following = self.next_json(lines)
        self.assertEqual(following.get("text"), "after", following)
        self.assertNotIn("event", following)
