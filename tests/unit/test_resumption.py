"""Session resumption: a reconnect to the same node with the ticket of the last login.

Against a whole node in memory (NodeHarness, fake clock): the ticket resumes once, on
this node, for this device, before it expires, with the proof of its secret, while its
token lives; every other case is a RESUME_REFUSED handshake error before any session
is touched. The ticket itself (cim.protocols.resumption.Tickets) and the memory store's
redemption are checked directly too.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import replace
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from cim.backends.state import (
    REASON_KICKED_BY_ADMIN,
    REASON_LOGGED_OUT,
    REASON_PASSWORD_CHANGED,
)
from cim.backends.state.memory import MemoryState
from cim.protocols import cim_pb2
from cim.protocols.crypto import NodeKey
from cim.protocols.handshake import HandshakeRefused, Resumption
from cim.protocols.im import ConnectionState
from cim.protocols.resumption import TICKET_KEY_LABEL, Tickets
from tests.fakes.node import ConnectedClient, NodeHarness
from tests.unit.test_im_node import logged_in

RESUME_REFUSED = cim_pb2.HandshakeError.RESUME_REFUSED
WINDOW = 600.0


def refusal_of(client: ConnectedClient) -> HandshakeRefused:
    results: list[Any] = []
    client.protocol.logged_in.addBoth(results.append)
    assert results, "the handshake did not finish"
    failure = results[0]
    assert isinstance(failure, Failure), failure
    assert isinstance(failure.value, HandshakeRefused), failure.value
    return failure.value


def wait(d: Any) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


class NodeResumptionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.node = NodeHarness()
        self.first = self.node.connect("alice")
        self.first_result = logged_in(self.first)
        resumption = self.first.protocol.resumption
        assert resumption is not None
        self.resumption: Resumption = resumption
        self.token_hash = hashlib.sha256(self.first.token.encode()).hexdigest()

    def resume(self, resumption: Resumption | None = None) -> ConnectedClient:
        return self.node.connect(
            token=self.first.token, resume=resumption or self.resumption, device="phone"
        )

    def assert_refused(self, client: ConnectedClient, why: str) -> None:
        refusal = refusal_of(client)
        self.assertEqual(refusal.reason, RESUME_REFUSED)
        self.assertIn(why, refusal.message)
        self.assertIn("log in again", refusal.message)
        self.assertIsNot(client.server.state, ConnectionState.ESTABLISHED)
        self.assertTrue(client.server_transport.disconnected)

    def test_full_login_carries_a_ticket(self) -> None:
        self.assertTrue(self.first_result.resume_ticket)
        self.assertEqual(self.first_result.resume_window_ms, int(WINDOW * 1000))
        self.assertEqual(self.resumption.device, "phone")
        # The resumption secret never travels: not in the ticket, not on the wire.
        self.assertNotIn(self.resumption.secret, self.first.wire_bytes)
        self.assertNotIn(self.resumption.secret, self.first_result.resume_ticket)

    def test_reconnect_resumes_without_rsa_and_is_a_full_session(self) -> None:
        second = self.resume()
        result = logged_in(second)
        self.assertEqual((result.status, result.user, result.device), (0, "alice", "phone"))
        self.assertTrue(second.protocol.resumed)
        hello = cim_pb2.ClientHello.FromString(second.recorded[0][5:])
        self.assertEqual(hello.sealed_key, b"")
        # The same kind of session: registered for the device, the older one replaced.
        self.assertIs(self.node.im.sessions.session_for("alice"), second.server)
        second.flush()
        self.first.flush()
        self.assertEqual(len(self.first.events.of_type(cim_pb2.KICKED)), 1)
        second.protocol.send(cim_pb2.ONLINE_R, cim_pb2.OnlineR())
        second.flush()
        self.assertEqual(len(second.events.of_type(cim_pb2.ONLINE_A)), 1)
        # A new ticket for the next time, with a new secret.
        following = second.protocol.resumption
        assert following is not None
        self.assertNotEqual(following.ticket, self.resumption.ticket)
        self.assertNotEqual(following.secret, self.resumption.secret)
        third = self.resume(following)
        self.assertEqual(logged_in(third).status, 0)

    def test_a_ticket_is_single_use(self) -> None:
        logged_in(self.resume())
        self.assert_refused(self.resume(), "used before")
        self.assertEqual(self.node.metrics.handshake_failures["resume_refused"], 1)

    def test_an_exact_replay_of_the_resume_hello_is_refused(self) -> None:
        second = self.resume()
        logged_in(second)
        body = second.recorded[0]
        address = IPv4Address("TCP", "10.6.6.6", 50001)
        server = self.node.factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        server.makeConnection(transport)
        server.dataReceived(body)
        answer = transport.value()
        (length,) = struct.unpack(">I", answer[:4])
        self.assertEqual(answer[4], cim_pb2.HANDSHAKE_ERROR)
        error = cim_pb2.HandshakeError.FromString(answer[5 : 4 + length])
        self.assertEqual(error.reason, RESUME_REFUSED)
        self.assertIs(self.node.im.sessions.session_for("alice"), second.server)

    def test_expired_ticket(self) -> None:
        self.node.clock.advance(WINDOW + 1)
        self.assert_refused(self.resume(), "expired")

    def test_another_device(self) -> None:
        # The right secret and a proof over the other device name: the ticket says phone.
        self.assert_refused(self.resume(replace(self.resumption, device="tablet")), "device")

    def test_bad_proof_does_not_burn_the_ticket(self) -> None:
        forged = replace(self.resumption, secret=bytes(32))
        self.assert_refused(self.resume(forged), "not valid here")
        self.assertEqual(logged_in(self.resume()).status, 0)

    def test_altered_ticket(self) -> None:
        ticket = bytearray(self.resumption.ticket)
        ticket[-1] ^= 1
        self.assert_refused(self.resume(replace(self.resumption, ticket=bytes(ticket))), "valid")

    def test_another_node_does_not_take_it(self) -> None:
        # Same key file on two nodes: the node id (the AEAD's associated data) differs.
        other = NodeHarness(node_id="node2")
        other.key = self.node.key
        other.factory.node_key = self.node.key
        other.factory.tickets = Tickets(
            self.node.key.derived_key(TICKET_KEY_LABEL), "node2", WINDOW
        )
        token, _ = other.login("alice")
        client = other.connect(token=token, resume=self.resumption, device="phone")
        refusal = refusal_of(client)
        self.assertEqual(refusal.reason, RESUME_REFUSED)

    def test_ticket_dies_with_its_token(self) -> None:
        cases = {
            "logout": lambda: self.node.state.sessions.end_session(
                self.token_hash, REASON_LOGGED_OUT
            ),
            "kick": lambda: self.node.state.sessions.end_user_sessions(
                "alice", REASON_KICKED_BY_ADMIN
            ),
            "new login of the device": lambda: self.node.login("alice", "phone"),
            "password changed on another device": lambda: (
                self.node.state.sessions.end_user_sessions(
                    "alice", REASON_PASSWORD_CHANGED, keep_device="web"
                )
            ),
        }
        for name, end in cases.items():
            with self.subTest(name):
                self.setUp()  # a fresh node, login and ticket per case
                end()
                self.node.flush_all()
                self.assert_refused(self.resume(), "session ended")

    def test_resumption_off(self) -> None:
        node = NodeHarness("resume_window = 0\n")
        client = node.connect("alice")
        result = logged_in(client)
        self.assertEqual((result.resume_ticket, result.resume_window_ms), (b"", 0))
        self.assertIsNone(client.protocol.resumption)
        late = node.connect(token=client.token, resume=self.resumption, device="phone")
        self.assertEqual(refusal_of(late).reason, RESUME_REFUSED)


class TicketTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.key = NodeKey.generate()
        self.tickets = Tickets(self.key.derived_key(TICKET_KEY_LABEL), "node1", 60.0)
        self.token_hash = hashlib.sha256(b"token").hexdigest()

    def test_round_trip(self) -> None:
        sealed = self.tickets.seal(1000.0, self.token_hash, "alice", "phone", bytes(range(32)))
        opened = self.tickets.open(sealed)
        assert opened is not None
        self.assertEqual(
            (opened.token_hash, opened.user, opened.device, opened.secret, opened.expires_at),
            (self.token_hash, "alice", "phone", bytes(range(32)), 1060.0),
        )
        self.assertNotIn(b"alice", sealed)
        again = self.tickets.open(self.tickets.seal(1000.0, self.token_hash, "a", "p", bytes(32)))
        assert again is not None
        self.assertNotEqual(again.ticket_id, opened.ticket_id)

    def test_other_node_or_key_cannot_open(self) -> None:
        sealed = self.tickets.seal(1000.0, self.token_hash, "alice", "phone", bytes(32))
        same_key_other_node = Tickets(self.key.derived_key(TICKET_KEY_LABEL), "node2", 60.0)
        other_key = Tickets(NodeKey.generate().derived_key(TICKET_KEY_LABEL), "node1", 60.0)
        self.assertIsNone(same_key_other_node.open(sealed))
        self.assertIsNone(other_key.open(sealed))
        self.assertIsNone(self.tickets.open(b""))
        self.assertIsNone(self.tickets.open(b"\x02" + sealed[1:]))

    def test_the_key_survives_a_reload_of_the_node_key(self) -> None:
        self.assertEqual(
            self.key.derived_key(TICKET_KEY_LABEL), self.key.derived_key(TICKET_KEY_LABEL)
        )
        self.assertNotEqual(self.key.derived_key(TICKET_KEY_LABEL), self.key.derived_key(b"x"))


class MemoryRedemptionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.node = NodeHarness()
        self.state: MemoryState = self.node.state
        self.token, self.record = self.node.login("alice")
        self.hash = hashlib.sha256(self.token.encode()).hexdigest()
        self.expires = self.node.clock.seconds() + 60

    def redeem(self, ticket_id: str) -> Any:
        return wait(self.state.sessions.redeem_ticket(ticket_id, self.hash, self.expires))

    def test_once(self) -> None:
        self.assertEqual(self.redeem("t1"), self.record)
        self.assertIsNone(self.redeem("t1"))
        self.assertEqual(self.redeem("t2"), self.record)

    def test_unknown_or_ended_session(self) -> None:
        self.assertIsNone(wait(self.state.sessions.redeem_ticket("t1", "0" * 64, self.expires)))
        wait(self.state.sessions.end_session(self.hash, REASON_LOGGED_OUT))
        self.assertIsNone(self.redeem("t2"))

    def test_used_ids_are_forgotten_after_the_ticket_expires(self) -> None:
        self.redeem("t1")
        used = self.state.sessions._used_tickets
        self.assertEqual(len(used.ids), 1)
        self.node.clock.advance(61)
        # Expired: refused by its expiry; the id is pruned on the way.
        self.assertIsNone(self.redeem("t1"))
        self.assertEqual(len(used.ids), 0)
