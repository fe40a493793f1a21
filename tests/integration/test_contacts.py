"""Contacts, consent and blocking through a real daemon and cim-client (issue #17).

One node (twistd, SQLite, the logic service for device binding) with:
alice (policy ``contacts`` set from the command line), carol (the default
``everyone``), mum, a watch mum binds, and a stranger. Everything goes through the
console scripts as a user types them.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.support.daemons import PASSWORD, DaemonProcess, client, free_port

REFUSED = 4
NOT_ACCEPTED = (
    "cim-client: not delivered: not accepted: the receiver does not exist or does not "
    "accept messages from you\n"
)


class ContactsThroughTheCliTests(SynchronousTestCase):
    def setUp(self) -> None:
        workdir = os.path.abspath(self.mktemp())
        self.logic_port = free_port()
        self.daemon = DaemonProcess(
            workdir,
            extra=f"[logic]\nenabled = true\nlisten = tcp:{self.logic_port}:interface=127.0.0.1\n",
        )
        for user, kind in (
            ("alice", "person"),
            ("carol", "person"),
            ("mum", "person"),
            ("stranger", "person"),
            ("watch", "device"),
        ):
            added = self.daemon.cimctl("user", "add", user, "--kind", kind, stdin=PASSWORD + "\n")
            self.assertEqual(added.returncode, 0, added.stderr)
        self.daemon.start()
        self.addCleanup(self.daemon.stop)

    def run_client(self, user: str, *args: str) -> subprocess.CompletedProcess[str]:
        ran: subprocess.CompletedProcess[str] = client(
            self.daemon, user, "--logic", f"http://127.0.0.1:{self.logic_port}", *args
        )
        return ran

    def ok(self, user: str, *args: str) -> Any:
        ran = self.run_client(user, *args)
        self.assertEqual(ran.returncode, 0, (user, args, ran.stderr))
        return json.loads(ran.stdout)

    def refused(self, user: str, *args: str) -> str:
        ran = self.run_client(user, *args)
        self.assertEqual(ran.returncode, REFUSED, (user, args, ran.stdout, ran.stderr))
        return ran.stderr

    def test_consent_from_the_command_line(self) -> None:
        # --- a watch bound to mum takes nothing from a stranger ------------------------
        code = self.ok("watch", "bind", "code")["code"]
        self.ok("mum", "bind", "add", "watch", code)
        to_watch = self.refused("stranger", "send", "watch", "hello")
        to_nobody = self.refused("stranger", "send", "ghost", "hello")
        self.assertEqual((to_watch, to_nobody), (NOT_ACCEPTED, NOT_ACCEPTED))
        self.assertEqual(self.ok("mum", "send", "watch", "from mum")["status"], "stored")

        # --- a person whose policy is contacts ---------------------------------------------
        policy = self.ok("alice", "contacts", "policy", "contacts")
        expected = {"messages": "contacts", "group_adds": "contacts", "read_receipts": "on"}
        self.assertEqual(policy, expected)
        self.assertEqual(self.refused("stranger", "send", "alice", "hello"), NOT_ACCEPTED)
        self.assertEqual(self.ok("stranger", "send", "carol", "hi")["status"], "stored")

        # --- requests accepted: delivered (stored: the receivers are offline) ---------------
        self.assertEqual(
            self.ok("stranger", "contacts", "request", "alice"),
            {"user": "alice", "status": "requested"},
        )
        listed = self.ok("alice", "contacts", "list")
        self.assertEqual(
            [(i["user"], i["state"]) for i in listed["items"]], [("stranger", "incoming")]
        )
        self.assertEqual(listed["messages"], "contacts")
        self.ok("alice", "contacts", "accept", "stranger")
        self.assertEqual(self.ok("stranger", "send", "alice", "hello")["status"], "stored")

        self.ok("stranger", "contacts", "request", "watch")
        waiting = self.ok("mum", "contacts", "list")["items"]
        self.assertEqual(
            [(i["user"], i["state"], i["device"]) for i in waiting],
            [("stranger", "incoming", "watch")],
        )
        self.refused("watch", "contacts", "accept", "stranger")  # only a guardian may
        self.ok("mum", "contacts", "accept", "stranger", "--for", "watch")
        self.assertEqual(self.ok("stranger", "send", "watch", "hello")["status"], "stored")
        approved = self.ok("watch", "contacts", "list")["items"]
        self.assertEqual([(i["user"], i["approved_by"]) for i in approved], [("stranger", "mum")])

        # --- presence: contacts and family only -------------------------------------------
        listener = client(self.daemon, "alice", "listen", "--timeout", "60", background=True)
        try:
            self.daemon.wait_connections(1)
            self.assertEqual(self.ok("stranger", "online"), {"items": ["alice"], "total": 1})
            self.assertEqual(self.ok("carol", "online"), {"items": [], "total": 0})
        finally:
            listener.kill()
            listener.communicate()

        # --- groups: the guardian adds the watch; a stranger cannot; invitations ---------
        family = self.ok("mum", "group", "create", "family", "watch")
        self.assertEqual((family["member_count"], family.get("invited")), (2, None))
        self.ok("stranger", "group", "create", "club")
        self.assertIn("(not_accepted)", self.refused("stranger", "group", "add", "club", "watch"))
        invited = self.ok("mum", "group", "invite", "family", "carol")
        self.assertEqual((invited["invited"], invited["member_count"]), (["carol"], 2))
        [invitation] = self.ok("carol", "group", "invitations")["items"]
        self.assertEqual((invitation["name"], invitation["invited_by"]), ("family", "mum"))
        self.assertEqual(self.ok("carol", "group", "accept", "family")["member_count"], 3)
        members = self.ok("mum", "group", "members", "family")["items"]
        self.assertEqual(sorted(m["user"] for m in members), ["carol", "mum", "watch"])

        # --- a block: messages, requests and invitations refused like no account -------
        self.ok("alice", "contacts", "block", "stranger")
        self.assertEqual(self.refused("stranger", "send", "alice", "again"), NOT_ACCEPTED)
        to_alice = self.refused("stranger", "contacts", "request", "alice")
        to_ghost = self.refused("stranger", "contacts", "request", "ghost")
        self.assertEqual(to_alice.replace("alice", "X"), to_ghost.replace("ghost", "X"))
        self.ok("alice", "contacts", "policy", "everyone")
        blocked_invite = self.refused("stranger", "group", "invite", "club", "alice")
        ghost_invite = self.refused("stranger", "group", "invite", "club", "ghost")
        self.assertEqual(blocked_invite.replace("alice", "X"), ghost_invite.replace("ghost", "X"))
        self.assertEqual(
            [(i["user"], i["state"]) for i in self.ok("alice", "contacts", "list")["items"]],
            [("stranger", "blocked")],
        )
