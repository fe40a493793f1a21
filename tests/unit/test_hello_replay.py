"""A captured CLIENT_HELLO replayed against the node, exactly or with a field changed.

The attacker sees the victim's plaintext hello on the wire and connects with it (or
with it edited) while the victim is logged in. Every variant must be refused and
closed by the node, and the victim's session must not notice: still registered,
not kicked, still answered.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from cim.config import SUITE_CHACHA, SUITE_RC4
from cim.protocols import cim_pb2
from cim.protocols.handshake import ClientHandshake
from cim.protocols.im import ConnectionState
from tests.fakes.node import ConnectedClient, NodeHarness
from tests.unit.test_im_node import logged_in

Reason = cim_pb2.HandshakeError
Edit = Callable[[cim_pb2.ClientHello], None]


def hello_body_of(client: ConnectedClient) -> bytes:
    """The victim's hello as it crossed the wire (the client's first write)."""
    frame = client.recorded[0]
    (length,) = struct.unpack(">I", frame[:4])
    body = frame[4 : 4 + length]
    assert body[0] == cim_pb2.CLIENT_HELLO
    return body


def frame_of(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def edited(body: bytes, edit: Edit) -> bytes:
    hello = cim_pb2.ClientHello.FromString(body[1:])
    edit(hello)
    return body[:1] + hello.SerializeToString()


class ReplayedHelloTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.node = NodeHarness()
        self.victim = self.node.connect("alice")
        logged_in(self.victim)
        self.hello = hello_body_of(self.victim)
        self.attackers = 0

    def replay(self, body: bytes) -> tuple[StringTransport, bytes]:
        """Connect as the attacker and send ``body``; the node's answer and transport."""
        self.attackers += 1
        address = IPv4Address("TCP", "10.6.6.6", 50000 + self.attackers)
        server = self.node.factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        server.makeConnection(transport)
        server.dataReceived(frame_of(body))
        self.assertIsNot(server.state, ConnectionState.ESTABLISHED)
        self.assertIsNot(self.node.im.sessions.session_for("alice"), server)
        return transport, transport.value()

    def assert_refused(self, body: bytes, reason: int) -> None:
        transport, answer = self.replay(body)
        self.assertTrue(transport.disconnecting, "the node kept the connection open")
        (length,) = struct.unpack(">I", answer[:4])
        reply = answer[4 : 4 + length]
        self.assertEqual(reply[0], cim_pb2.HANDSHAKE_ERROR, reply[:1])
        error = cim_pb2.HandshakeError.FromString(reply[1:])
        self.assertEqual(Reason.Reason.Name(error.reason), Reason.Reason.Name(reason))
        self.assert_victim_untouched()

    def assert_victim_untouched(self) -> None:
        self.victim.flush()
        self.assertIs(self.node.im.sessions.session_for("alice"), self.victim.server)
        self.assertIs(self.victim.server.state, ConnectionState.ESTABLISHED)
        self.assertFalse(self.victim.server_transport.disconnecting)
        self.assertEqual(self.victim.events.of_type(cim_pb2.KICKED), [])
        self.assertEqual(self.victim.events.closed, [])
        # And it is still served.
        before = len(self.victim.events.of_type(cim_pb2.ONLINE_A))
        self.victim.protocol.send(cim_pb2.ONLINE_R, cim_pb2.OnlineR())
        self.victim.flush()
        self.assertEqual(len(self.victim.events.of_type(cim_pb2.ONLINE_A)), before + 1)

    def test_changed_client_nonce(self) -> None:
        """The issue's attack: a fresh nonce passes the replay cache, not the digest."""

        def new_nonce(hello: cim_pb2.ClientHello) -> None:
            hello.client_nonce = bytes(b ^ 0xFF for b in hello.client_nonce)

        self.assert_refused(edited(self.hello, new_nonce), Reason.BAD_HELLO)
        self.assertEqual(self.node.metrics.handshake_failures["bad_hello"], 1)

    def test_each_other_field_changed(self) -> None:
        def version(number: int) -> Edit:
            def edit(hello: cim_pb2.ClientHello) -> None:
                hello.version = number

            return edit

        def offered(*names: str) -> Edit:
            def edit(hello: cim_pb2.ClientHello) -> None:
                del hello.offered_suites[:]
                hello.offered_suites.extend(names)

            return edit

        def suite(hello: cim_pb2.ClientHello) -> None:
            hello.suite = SUITE_RC4

        def fingerprint(hello: cim_pb2.ClientHello) -> None:
            hello.key_fingerprint = bytes(32)

        def sealed_key(hello: cim_pb2.ClientHello) -> None:
            # The timestamp, device, token and secret live in here: any change to the
            # blob fails RSA-OAEP.
            hello.sealed_key = hello.sealed_key[:-1] + bytes((hello.sealed_key[-1] ^ 1,))

        cases: list[tuple[str, Edit, int]] = [
            ("version 1 (no digest)", version(1), Reason.UNSUPPORTED_VERSION),
            ("version 3", version(3), Reason.UNSUPPORTED_VERSION),
            ("offer reordered", offered(SUITE_RC4, SUITE_CHACHA), Reason.BAD_HELLO),
            ("offer stripped", offered(SUITE_CHACHA), Reason.BAD_HELLO),
            ("offer extended", offered(SUITE_CHACHA, SUITE_RC4, "x-none"), Reason.BAD_HELLO),
            ("suite", suite, Reason.BAD_HELLO),
            ("key fingerprint", fingerprint, Reason.UNKNOWN_KEY),
            ("sealed key", sealed_key, Reason.BAD_HELLO),
        ]
        for name, edit, reason in cases:
            with self.subTest(name):
                self.assert_refused(edited(self.hello, edit), reason)
        self.assertEqual(self.node.metrics.handshakes_ok, 1)

    def test_another_users_key_material_with_the_victims_nonce(self) -> None:
        """Mallory, with an account of her own, seals her material around the victim's
        hello: it names her own digest, so the victim's nonce gives her nothing."""
        token, _ = self.node.login("mallory")
        mallory = ClientHandshake(
            self.node.key.public_der, token, "phone", SUITE_CHACHA, (SUITE_CHACHA, SUITE_RC4), 0
        )
        own = cim_pb2.ClientHello.FromString(mallory.hello_body()[1:])

        def splice(hello: cim_pb2.ClientHello) -> None:
            hello.sealed_key = own.sealed_key

        self.assert_refused(edited(self.hello, splice), Reason.BAD_HELLO)

    def test_exact_replay_is_refused_as_replayed(self) -> None:
        for body in (self.hello, self.hello + b"\x78\x01"):  # an unknown field appended
            transport, answer = self.replay(body)
            self.assertTrue(transport.disconnecting)
            self.assertEqual(answer[4], cim_pb2.LOGIN_RESULT)
            self.assert_victim_untouched()
        self.assertEqual(self.node.metrics.handshake_failures["replayed"], 2)
        self.assertEqual(self.node.metrics.handshakes_ok, 1)

    def test_the_victims_client_reads_the_refusal_of_an_exact_replay(self) -> None:
        """The answer to a replay is sealed under the replayed secret: the attacker
        cannot read it, the victim's own handshake can, and it says REPLAYED_HELLO."""
        _, answer = self.replay(self.hello)
        (length,) = struct.unpack(">I", answer[:4])
        handshake = self.victim.protocol._handshake
        _, _, first = handshake.finish(answer[4 : 4 + length])
        result = cim_pb2.LoginResult.FromString(first[1:])
        self.assertEqual(result.status, cim_pb2.LoginResult.REPLAYED_HELLO)


class TamperedOfferTests(SynchronousTestCase):
    def test_a_tampered_offer_is_closed_by_the_node(self) -> None:
        """Not established on the node and left open: refused with BAD_HELLO, closed."""
        node = NodeHarness()
        hello = ClientHandshake(
            node.key.public_der,
            node.login("alice")[0],
            "phone",
            SUITE_RC4,
            (SUITE_CHACHA, SUITE_RC4),
            int(node.clock.seconds() * 1000),
        ).hello_body()

        def strip(hello: cim_pb2.ClientHello) -> None:
            del hello.offered_suites[:]
            hello.offered_suites.append(SUITE_RC4)

        address = IPv4Address("TCP", "10.0.0.9", 40999)
        server = node.factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        server.makeConnection(transport)
        server.dataReceived(frame_of(edited(hello, strip)))
        self.assertTrue(transport.disconnecting)
        self.assertIs(server.state, ConnectionState.CLOSING)
        body = transport.value()[4:]
        self.assertEqual(body[0], cim_pb2.HANDSHAKE_ERROR)
        self.assertEqual(cim_pb2.HandshakeError.FromString(body[1:]).reason, Reason.BAD_HELLO)
        self.assertIsNone(node.im.sessions.session_for("alice"))
        self.assertEqual(node.metrics.handshakes_ok, 0)
