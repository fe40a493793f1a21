"""The client library resumes on its own: a reconnect to the same node within the
window offers the last ticket; a refused ticket falls back to a full hello on the same
attempt, with the cached token and without the router."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from cim.protocols.crypto import NodeKey
from cim.protocols.resumption import TICKET_KEY_LABEL, Tickets
from tests.fakes.node import NodeHarness
from tests.unit.test_client_session import drop, make_client, result_of, run_for, settle


class ClientResumptionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.node = NodeHarness()
        self.client, self.router, self.network = make_client(self.node)
        self.client.start()
        settle(self.node)
        assert self.client.protocol is not None
        self.assertFalse(self.client.protocol.resumed)
        self.assertIsNotNone(self.client.dialer.resumption)

    def reconnect(self) -> None:
        drop(self.client)
        settle(self.node)
        settle(self.node, 2.0)
        self.assertEqual(self.client.state, "online")

    def test_reconnect_resumes(self) -> None:
        self.reconnect()
        assert self.client.protocol is not None
        self.assertTrue(self.client.protocol.resumed)
        self.assertEqual(self.router.logins, 1)
        self.assertEqual(self.node.metrics.handshakes_ok, 2)
        # And again, with the ticket the resumed session left.
        self.reconnect()
        assert self.client.protocol is not None
        self.assertTrue(self.client.protocol.resumed)

    def test_refused_ticket_falls_back_to_a_full_hello(self) -> None:
        # The node's ticket key changed (say, a new node key): the ticket no longer opens.
        self.node.factory.tickets = Tickets(
            NodeKey.generate().derived_key(TICKET_KEY_LABEL), "node1", 600.0
        )
        self.reconnect()
        assert self.client.protocol is not None
        self.assertFalse(self.client.protocol.resumed)
        self.assertEqual(self.router.logins, 1)
        self.assertEqual(self.node.metrics.handshake_failures["resume_refused"], 1)
        # Two connections for this attempt: the refused resumption, then the full hello.
        self.assertEqual(len(self.network.attempts), 3)
        # The full login left a ticket of the new key: the next reconnect resumes.
        self.reconnect()
        assert self.client.protocol is not None
        self.assertTrue(self.client.protocol.resumed)

    def test_expired_ticket_is_not_offered(self) -> None:
        run_for(self.node, 630.0, step=30.0)
        self.assertEqual(self.client.state, "online")
        self.reconnect()
        assert self.client.protocol is not None
        self.assertFalse(self.client.protocol.resumed)
        self.assertEqual(len(self.network.attempts), 2)

    def test_logout_forgets_the_ticket(self) -> None:
        stopped = Deferred.fromCoroutine(self.client.stop(logout=True))
        settle(self.node)
        self.assertIsNone(result_of(stopped))
        self.assertIsNone(self.client.dialer.resumption)
