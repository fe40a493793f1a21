"""The timeline journal with a real daemon on SQLite (cim.history.journal): what was
promised before kill -9 is there after the restart, numbered on, never twice.

alice sends 30 messages to bob (away) through the client library, all at once; each is
answered "stored" (promised: in the journal). The node is killed at once, most of them
likely not yet copied into SQLite, and started again on the same directory: bob's
catch-up gets all 30, once each, in order, seq 1..30, and the next message is 31.
"""

from __future__ import annotations

import os

from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.trial.unittest import TestCase

from cim.history.store import direct_conversation
from tests.integration.support.daemons import PASSWORD, DaemonProcess
from tests.integration.support.devices import Device

AB = direct_conversation("alice", "bob")
COUNT = 30


class KilledNodeTests(TestCase):
    timeout = 180

    def test_promised_messages_survive_kill_9(self) -> None:
        return ensureDeferred(self._killed())

    async def _killed(self) -> None:
        daemon = DaemonProcess(os.path.abspath(self.mktemp()))
        for user in ("alice", "bob"):
            added = daemon.cimctl("user", "add", user, stdin=PASSWORD + "\n")
            self.assertEqual(added.returncode, 0, added.stderr)
        daemon.start()
        self.addCleanup(daemon.stop)
        routers = [daemon.router_url]
        alice = await Device(routers, "alice", "phone").start()
        texts = [f"m{n}" for n in range(COUNT)]
        outcomes = await gatherResults([alice.client.send_text("bob", t) for t in texts])
        self.assertEqual({o.status for o in outcomes}, {"stored"})
        daemon.kill()
        await alice.stop()

        daemon.start()
        bob = await Device(routers, "bob", "phone").start()
        self.addCleanup(bob.stop)
        await bob.has(COUNT, "alice's messages")
        self.assertEqual(bob.texts(), texts)
        self.assertEqual([m.seq for m in bob.messages], list(range(1, COUNT + 1)))
        alice = await Device(routers, "alice", "phone").start()
        self.addCleanup(alice.stop)
        await alice.client.send_text("bob", "after")
        await bob.has(COUNT + 1, "the message after the restart")
        self.assertEqual((bob.messages[-1].text, bob.messages[-1].seq), ("after", COUNT + 1))
