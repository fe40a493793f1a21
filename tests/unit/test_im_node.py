"""The IM node end to end in memory: handshake, six packets, heartbeats, hostile input."""

from __future__ import annotations

import struct
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from cim.config import SUITE_CHACHA, SUITE_RC4
from cim.im.collaborators import Bounds, Stores
from cim.protocols import cim_pb2
from cim.protocols.wire import HEARTBEAT_FRAME
from tests.fakes.node import ConnectedClient, NodeHarness

SUITES = (SUITE_CHACHA, SUITE_RC4)


def holds_cipher_context(protocol: object) -> bool:
    """Whether the node side of a chacha20-poly1305 connection holds an AEAD context."""
    ciphers = (getattr(protocol, "_sealer", None), getattr(protocol, "_opener", None))
    return any(getattr(cipher, "_aead", None) is not None for cipher in ciphers)


def logged_in(client: ConnectedClient) -> cim_pb2.LoginResult:
    results: list[object] = []
    client.protocol.logged_in.addBoth(results.append)
    assert results, "the handshake did not finish"
    result = results[0]
    assert isinstance(result, cim_pb2.LoginResult), result
    return result


def login_failure(client: ConnectedClient) -> BaseException:
    results: list[object] = []
    client.protocol.logged_in.addBoth(results.append)
    assert results, "the handshake did not finish"
    failure = results[0]
    assert not isinstance(failure, cim_pb2.LoginResult), "the login unexpectedly worked"
    return failure.value  # type: ignore[attr-defined,no-any-return]


class HandshakeTests(SynchronousTestCase):
    def test_login_with_each_suite(self) -> None:
        for suite in SUITES:
            node = NodeHarness()
            client = node.connect("alice", suite=suite)
            result = logged_in(client)
            self.assertEqual(result.status, cim_pb2.LoginResult.OK)
            self.assertEqual(result.user, "alice")
            self.assertEqual(result.heartbeat_interval_ms, 30_000)
            self.assertEqual(result.heartbeat_timeout_ms, 90_000)
            self.assertIs(node.im.sessions.session_for("alice"), client.server)
            self.assertEqual(node.metrics.handshakes_ok, 1)

    def test_suite_not_allowed_is_a_clear_refusal(self) -> None:
        node = NodeHarness(f"cipher_suites = {SUITE_RC4}\n")
        client = node.connect("alice", suite=SUITE_CHACHA, offered=(SUITE_CHACHA,))
        refusal = login_failure(client)
        self.assertEqual(refusal.reason, cim_pb2.HandshakeError.SUITE_NOT_ALLOWED)  # type: ignore[attr-defined]
        self.assertEqual(refusal.allowed_suites, (SUITE_RC4,))  # type: ignore[attr-defined]
        self.assertIn(SUITE_RC4, str(refusal))
        self.assertTrue(client.server_transport.disconnecting)
        self.assertIsNone(node.im.sessions.session_for("alice"))

    def test_downgrade_by_rewriting_the_hello_fails(self) -> None:
        """An attacker who flips the plaintext suite gets a connection nobody can use."""
        node = NodeHarness()
        original = node.factory.buildProtocol

        def tampering_build(addr):  # type: ignore[no-untyped-def]
            server = original(addr)
            receive = server.stringReceived

            def rewrite(body: bytes) -> None:
                if body[:1] == bytes((cim_pb2.CLIENT_HELLO,)):
                    hello = cim_pb2.ClientHello.FromString(body[1:])
                    hello.suite = SUITE_RC4
                    body = body[:1] + hello.SerializeToString()
                receive(body)

            server.stringReceived = rewrite
            return server

        node.factory.buildProtocol = tampering_build  # type: ignore[method-assign]
        client = node.connect("alice", suite=SUITE_CHACHA)
        refusal = login_failure(client)
        # The node sees the edit (the sealed hello digest no longer matches) and closes
        # with BAD_HELLO: no session is established on either side.
        self.assertEqual(refusal.reason, cim_pb2.HandshakeError.BAD_HELLO)  # type: ignore[attr-defined]
        self.assertTrue(client.server_transport.disconnecting)
        self.assertIsNone(node.im.sessions.session_for("alice"))
        self.assertEqual(node.metrics.handshake_failures["bad_hello"], 1)
        self.assertEqual(node.metrics.handshakes_ok, 0)
        self.assertEqual(client.events.frames, [])

    def test_unknown_token(self) -> None:
        node = NodeHarness()
        client = node.connect(token="not-a-token")
        refusal = login_failure(client)
        self.assertEqual(refusal.status, cim_pb2.LoginResult.INVALID_TOKEN)  # type: ignore[attr-defined]
        self.assertEqual(node.metrics.handshake_failures["invalid_token"], 1)

    def test_session_of_another_node_is_redirected(self) -> None:
        node = NodeHarness()
        token, _ = node.login("alice", node_id="node2")
        client = node.connect(token=token)
        refusal = login_failure(client)
        self.assertEqual(refusal.status, cim_pb2.LoginResult.WRONG_NODE)  # type: ignore[attr-defined]
        self.assertEqual(refusal.node.id, "node2")  # type: ignore[attr-defined]

    def test_replayed_hello_is_refused(self) -> None:
        """The same hello bytes twice: the second connection is refused."""
        node = NodeHarness()
        first = node.connect("alice")
        logged_in(first)
        hello = first.recorded[0]
        token, _ = node.login("bob")
        second = node.connect(token=token)
        logged_in(second)
        replay = node.factory.buildProtocol(second.server_transport.getPeer())
        replay.makeConnection(_NullTransport())
        replay.dataReceived(hello)
        self.assertEqual(node.metrics.handshake_failures["replayed"], 1)
        self.assertIsNot(node.im.sessions.session_for("alice"), replay)

    def test_handshake_deadline(self) -> None:
        node = NodeHarness("handshake_timeout = 5\n")
        server = node.factory.buildProtocol(None)  # type: ignore[arg-type]
        transport = _NullTransport()
        server.makeConnection(transport)
        # Heartbeats before the handshake do not stretch the deadline: they close it.
        node.clock.advance(4.9)
        self.assertFalse(transport.aborted)
        node.clock.advance(0.2)
        self.assertTrue(transport.aborted)
        self.assertEqual(node.metrics.handshake_failures["timeout"], 1)

    def test_heartbeat_before_handshake_closes(self) -> None:
        node = NodeHarness()
        server = node.factory.buildProtocol(None)  # type: ignore[arg-type]
        transport = _NullTransport()
        server.makeConnection(transport)
        server.dataReceived(HEARTBEAT_FRAME)
        self.assertTrue(transport.aborted or transport.disconnecting)

    def test_connections_per_address_are_capped(self) -> None:
        node = NodeHarness("max_connections_per_address = 2\n")
        clients = [node.connect(f"user{i}", host="10.9.9.9") for i in range(3)]
        logged_in(clients[0])
        logged_in(clients[1])
        refusal = login_failure(clients[2])
        self.assertEqual(refusal.reason, cim_pb2.HandshakeError.TOO_MANY_CONNECTIONS)  # type: ignore[attr-defined]
        # Another address is not affected, and a closed slot frees up.
        logged_in(node.connect("other", host="10.9.9.10"))
        clients[0].client_transport.loseConnection()
        clients[0].flush()
        logged_in(node.connect("user9", host="10.9.9.9"))


class MessageTests(SynchronousTestCase):
    def test_six_packets_in_order(self) -> None:
        for suite in SUITES:
            node = NodeHarness()
            alice = node.connect("alice", suite=suite)
            bob = node.connect("bob", suite=suite, auto_ack=True)
            alice.protocol.send(
                cim_pb2.MSG_R, cim_pb2.Message(to="bob", text="hello", client_seq=7)
            )
            alice.flush()
            bob.flush()
            alice.flush()
            self.assertEqual(
                [kind for kind, _ in alice.events.frames], [cim_pb2.MSG_A, cim_pb2.ACK_N]
            )
            self.assertEqual(
                [kind for kind, _ in bob.events.frames], [cim_pb2.MSG_N, cim_pb2.ACK_A]
            )
            msg_a = alice.events.of_type(cim_pb2.MSG_A)[0]
            msg_n = bob.events.of_type(cim_pb2.MSG_N)[0]
            ack_n = alice.events.of_type(cim_pb2.ACK_N)[0]
            self.assertEqual(msg_a.client_seq, 7)
            self.assertNotEqual(msg_a.msg_id, 0)
            self.assertEqual(msg_n.id, msg_a.msg_id)
            self.assertEqual(msg_n.text, "hello")
            self.assertEqual(getattr(msg_n, "from"), "alice")
            self.assertEqual(msg_n.device, "phone")
            self.assertEqual(
                (ack_n.msg_id, ack_n.client_seq, ack_n.status), (msg_a.msg_id, 7, cim_pb2.DELIVERED)
            )
            self.assertEqual(node.metrics.messages["delivered"], 1)

    def test_sender_is_the_authenticated_user(self) -> None:
        node = NodeHarness()
        alice = node.connect("alice")
        bob = node.connect("bob")
        claim = cim_pb2.Message(
            to="bob", text="it is me, mallory", client_seq=1, device="mallory-phone"
        )
        setattr(claim, "from", "mallory")
        alice.protocol.send(cim_pb2.MSG_R, claim)
        alice.flush()
        bob.flush()
        received = bob.events.of_type(cim_pb2.MSG_N)
        self.assertEqual(len(received), 1)
        self.assertEqual(getattr(received[0], "from"), "alice")
        self.assertEqual(received[0].device, "phone")

    def test_recorded_session_shows_neither_text_nor_token(self) -> None:
        for suite in SUITES:
            node = NodeHarness()
            alice = node.connect("alice", suite=suite)
            bob = node.connect("bob", suite=suite, auto_ack=True)
            secret_text = "the eagle lands at midnight"
            alice.protocol.send(
                cim_pb2.MSG_R, cim_pb2.Message(to="bob", text=secret_text, client_seq=1)
            )
            alice.flush()
            bob.flush()
            alice.flush()
            self.assertEqual(bob.events.of_type(cim_pb2.MSG_N)[0].text, secret_text)
            for client in (alice, bob):
                wire = client.wire_bytes
                self.assertNotIn(secret_text.encode(), wire)
                self.assertNotIn(b"eagle", wire)
                self.assertNotIn(client.token.encode(), wire)
                self.assertNotIn(client.token.encode()[:16], wire)

    def test_receiver_offline_is_stored_and_unknown_fails_explicitly(self) -> None:
        node = NodeHarness(users=("carol",))
        alice = node.connect("alice")
        alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="carol", text="hi", client_seq=1))
        alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="nobody", text="hi", client_seq=2))
        alice.flush()
        outcomes = {ack.client_seq: ack for ack in alice.events.of_type(cim_pb2.ACK_N)}
        self.assertEqual((outcomes[1].status, outcomes[1].reason), (cim_pb2.STORED, ""))
        self.assertEqual(outcomes[2].status, cim_pb2.FAILED)
        self.assertEqual(outcomes[2].reason, "no such user")

    def test_the_live_copy_leaves_before_the_senders_msg_a(self) -> None:
        """Both wait for the append; then the receiver's msg:N is written first (the
        latency that counts is the receiver's), and the sender still hears msg:A
        before any ack:N, whether the receiver is here, offline or unknown."""
        node = NodeHarness(users=("carol",))
        alice = node.connect("alice")
        bob = node.connect("bob", auto_ack=True)
        node.flush_all()
        written: list[str] = []
        for name, client in (("alice", alice), ("bob", bob)):
            write = client.server_transport.write

            def logged(data: bytes, name: str = name, write: Any = write) -> None:
                written.append(name)
                write(data)

            client.server_transport.write = logged  # type: ignore[method-assign]
        alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="bob", text="hi", client_seq=1))
        node.flush_all()
        self.assertEqual(written[:2], ["bob", "alice"])
        self.assertEqual(len(bob.events.of_type(cim_pb2.MSG_N)), 1)
        for n, to in ((2, "carol"), (3, "nobody")):
            alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to=to, text="hi", client_seq=n))
        node.flush_all()
        answers = [
            (kind, frame.client_seq)
            for kind, frame in alice.events.frames
            if kind in (cim_pb2.MSG_A, cim_pb2.ACK_N)
        ]
        self.assertEqual(
            answers,
            [
                (cim_pb2.MSG_A, 1),
                (cim_pb2.ACK_N, 1),
                (cim_pb2.MSG_A, 2),
                (cim_pb2.ACK_N, 2),
                (cim_pb2.MSG_A, 3),
                (cim_pb2.ACK_N, 3),
            ],
        )

    def test_a_conversations_answers_keep_their_order_when_a_copy_is_refused(self) -> None:
        """Two messages in one read, the receiver's budget full after the first: the
        second is stored, and its msg:A and ack:N still come after the first's msg:A."""
        node = NodeHarness()
        alice = node.connect("alice")
        bob = node.connect("bob")
        node.flush_all()
        budget = iter([True])
        bob.server.may_take_live_copy = lambda: next(budget, False)  # type: ignore[method-assign]
        for n in (1, 2):
            alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="bob", text=f"{n}", client_seq=n))
        node.flush_all()
        answers = [
            (kind, frame.client_seq, getattr(frame, "status", 0))
            for kind, frame in alice.events.frames
            if kind in (cim_pb2.MSG_A, cim_pb2.ACK_N)
        ]
        self.assertEqual(
            answers,
            [(cim_pb2.MSG_A, 1, 0), (cim_pb2.MSG_A, 2, 0), (cim_pb2.ACK_N, 2, cim_pb2.STORED)],
        )
        self.assertEqual([m.seq for m in bob.events.of_type(cim_pb2.MSG_N)], [1])

    def test_msg_a_comes_after_the_append_with_conversation_and_seq(self) -> None:
        node = NodeHarness()
        alice = node.connect("alice")
        bob = node.connect("bob")
        for n in (1, 2):
            alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="bob", text=f"{n}", client_seq=n))
        node.flush_all()
        answers = [
            (a.client_seq, a.conversation, a.seq) for a in alice.events.of_type(cim_pb2.MSG_A)
        ]
        self.assertEqual(answers, [(1, "d:alice:bob", 1), (2, "d:alice:bob", 2)])
        copies = [(m.text, m.conversation, m.seq) for m in bob.events.of_type(cim_pb2.MSG_N)]
        self.assertEqual(copies, [("1", "d:alice:bob", 1), ("2", "d:alice:bob", 2)])
        # A resend of a message already appended: the same id and seq, no new row.
        alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="bob", text="1", client_seq=1))
        node.flush_all()
        first, *_, resent = alice.events.of_type(cim_pb2.MSG_A)
        self.assertEqual((resent.msg_id, resent.seq), (first.msg_id, 1))
        self.assertEqual(
            self.successResultOf(node.timelines.summary("bob", "phone"))[0].last_seq, 2
        )

    def test_ack_r_moves_the_devices_cursor(self) -> None:
        node = NodeHarness()
        alice = node.connect("alice")
        bob = node.connect("bob")
        for n in (1, 2, 3):
            alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="bob", text=f"{n}", client_seq=n))
        node.flush_all()
        second = bob.events.of_type(cim_pb2.MSG_N)[1]
        bob.protocol.send(
            cim_pb2.ACK_R,
            cim_pb2.AckR(msg_id=second.id, conversation=second.conversation, through_seq=2),
        )
        node.flush_all()
        [state] = self.successResultOf(node.timelines.summary("bob", "phone"))
        self.assertEqual((state.cursor, state.unread), (2, 1))

    def test_receiver_leaving_before_ack_is_stored(self) -> None:
        node = NodeHarness()
        alice = node.connect("alice")
        bob = node.connect("bob", auto_ack=False)
        alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="bob", text="hi", client_seq=3))
        alice.flush()
        bob.flush()
        self.assertEqual(len(bob.events.of_type(cim_pb2.MSG_N)), 1)
        bob.client_transport.loseConnection()
        bob.flush()
        alice.flush()
        [ack_n] = alice.events.of_type(cim_pb2.ACK_N)
        self.assertEqual((ack_n.client_seq, ack_n.status), (3, cim_pb2.STORED))

    def test_only_the_receiver_can_acknowledge(self) -> None:
        node = NodeHarness()
        alice = node.connect("alice")
        bob = node.connect("bob")
        mallory = node.connect("mallory")
        alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="bob", text="hi", client_seq=1))
        alice.flush()
        bob.flush()
        msg_id = bob.events.of_type(cim_pb2.MSG_N)[0].id
        mallory.protocol.send(cim_pb2.ACK_R, cim_pb2.AckR(msg_id=msg_id))
        mallory.flush()
        alice.flush()
        self.assertEqual(alice.events.of_type(cim_pb2.ACK_N), [])
        bob.protocol.send(cim_pb2.ACK_R, cim_pb2.AckR(msg_id=msg_id))
        bob.flush()
        alice.flush()
        self.assertEqual(alice.events.of_type(cim_pb2.ACK_N)[0].status, cim_pb2.DELIVERED)

    def test_system_messages_cannot_be_sent_by_clients(self) -> None:
        node = NodeHarness()
        alice = node.connect("alice")
        bob = node.connect("bob")
        alice.protocol.send(
            cim_pb2.MSG_R, cim_pb2.Message(to="bob", text="x", client_seq=5, type=cim_pb2.SYSTEM)
        )
        alice.flush()
        self.assertEqual(bob.events.of_type(cim_pb2.MSG_N), [])
        [error] = alice.events.of_type(cim_pb2.ERROR)
        self.assertEqual((error.code, error.client_seq), (cim_pb2.Error.BAD_REQUEST, 5))

    def refused(self, message: cim_pb2.Message) -> str:
        """Send message from alice to bob; bob gets nothing; alice's ERROR's reason."""
        node = NodeHarness()
        alice = node.connect("alice")
        bob = node.connect("bob")
        alice.protocol.send(cim_pb2.MSG_R, message)
        alice.flush()
        bob.flush()
        self.assertEqual(bob.events.of_type(cim_pb2.MSG_N), [])
        self.assertEqual(alice.events.of_type(cim_pb2.MSG_A), [])
        [error] = alice.events.of_type(cim_pb2.ERROR)
        self.assertEqual(
            (error.code, error.request_type, error.client_seq),
            (cim_pb2.Error.BAD_REQUEST, cim_pb2.MSG_R, message.client_seq),
        )
        return error.message

    def test_text_with_escape_is_a_bad_request(self) -> None:
        """Issue 17, acceptance 5: a text with ESC is BAD_REQUEST."""
        reason = self.refused(
            cim_pb2.Message(to="bob", text="\x1b[2J\x1b[31mSYSTEM: send password", client_seq=7)
        )
        self.assertEqual(
            reason, "text may not contain control characters (newline and tab are fine)"
        )
        for text in ("a\rb", "\x9b31m", "nul\x00"):
            self.refused(cim_pb2.Message(to="bob", text=text, client_seq=8))

    def test_control_characters_in_media_and_location_names_are_refused(self) -> None:
        image = cim_pb2.Message(to="bob", type=cim_pb2.IMAGE, client_seq=3)
        image.media.url = "https://cdn.example/a.jpg"
        image.media.name = "invoice\x1b]8;;https://evil/\x07.pdf"
        self.assertIn("media.name", self.refused(image))
        place = cim_pb2.Message(to="bob", type=cim_pb2.LOCATION, client_seq=4)
        place.location.lat = 1.0
        place.location.name = "home\x08\x08\x08school"
        self.assertIn("location.name", self.refused(place))

    def test_a_javascript_media_url_is_a_bad_request(self) -> None:
        """Issue 17, acceptance 5: a javascript: media URL is BAD_REQUEST."""
        for url, thumbnail in (
            ("javascript:alert(1)", ""),
            ("http://cdn.example/a.jpg", ""),
            ("https://cdn.example/a.jpg", "data:image/png;base64,AAAA"),
        ):
            message = cim_pb2.Message(to="bob", type=cim_pb2.IMAGE, client_seq=9)
            message.media.url = url
            message.media.thumbnail_url = thumbnail
            self.assertIn("must be an https URL", self.refused(message))

    def test_text_and_media_are_delivered_as_sent(self) -> None:
        node = NodeHarness()
        node.im.core.media_urls.trust("http://127.0.0.1:8082")
        alice = node.connect("alice")
        bob = node.connect("bob")
        text = "line one\n\tindented 👨‍👩‍👧 <b>not html</b> ' OR 1=1"
        alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="bob", text=text, client_seq=1))
        own = cim_pb2.Message(to="bob", type=cim_pb2.IMAGE, client_seq=2)
        own.media.url = "http://127.0.0.1:8082/files/f1?expires=9&sig=s"
        own.media.thumbnail_url = "https://cdn.example/t.jpg"
        alice.protocol.send(cim_pb2.MSG_R, own)
        alice.flush()
        bob.flush()
        self.assertEqual(alice.events.of_type(cim_pb2.ERROR), [])
        first, second = bob.events.of_type(cim_pb2.MSG_N)
        self.assertEqual(first.text, text)
        self.assertEqual(second.media.url, own.media.url)

    def test_online_list_without_contacts_names_nobody(self) -> None:
        """Presence is on a need-to-know basis (docs/privacy.md): a node that keeps no
        contacts knows nobody's circle, so it names nobody. The lists of a node with
        contacts are tested in tests/unit/test_contacts_node.py."""
        node = NodeHarness()
        alice = node.connect("alice")
        node.connect("bob")
        node.connect("carol")
        alice.protocol.send(cim_pb2.ONLINE_R, cim_pb2.OnlineR(limit=2))
        alice.flush()
        [page] = alice.events.of_type(cim_pb2.ONLINE_A)
        self.assertEqual((page.total, list(page.users)), (0, []))


class HostileFrameTests(SynchronousTestCase):
    """A bad frame closes its connection and nothing from it reaches anyone."""

    def _capture_next_frame(
        self, client: ConnectedClient, frame_type: int, message: object
    ) -> bytes:
        captured: list[bytes] = []
        real_write = client.client_transport.write
        client.client_transport.write = captured.append  # type: ignore[method-assign]
        try:
            client.protocol.send(frame_type, message)  # type: ignore[arg-type]
        finally:
            client.client_transport.write = real_write  # type: ignore[method-assign]
        return b"".join(captured)

    def _pair(self, suite: str) -> tuple[NodeHarness, ConnectedClient, ConnectedClient]:
        node = NodeHarness()
        alice = node.connect("alice", suite=suite)
        bob = node.connect("bob", suite=suite)
        return node, alice, bob

    def _assert_closed_and_nothing_delivered(
        self, node: NodeHarness, alice: ConnectedClient, bob: ConnectedClient
    ) -> None:
        self.assertTrue(alice.server_transport.disconnecting)
        alice.flush()
        bob.flush()
        self.assertEqual(bob.events.of_type(cim_pb2.MSG_N), [])
        self.assertIsNone(node.im.sessions.session_for("alice"))

    def test_tampered_frame(self) -> None:
        for suite in SUITES:
            node, alice, bob = self._pair(suite)
            wire = bytearray(
                self._capture_next_frame(
                    alice, cim_pb2.MSG_R, cim_pb2.Message(to="bob", text="hi", client_seq=1)
                )
            )
            wire[10] ^= 0x01
            alice.server.dataReceived(bytes(wire))
            self._assert_closed_and_nothing_delivered(node, alice, bob)
            self.assertEqual(node.metrics.frames_rejected["authentication"], 1)

    def test_truncated_frame(self) -> None:
        for suite in SUITES:
            node, alice, bob = self._pair(suite)
            wire = self._capture_next_frame(
                alice, cim_pb2.MSG_R, cim_pb2.Message(to="bob", text="hi", client_seq=1)
            )
            body = wire[4:-3]
            alice.server.dataReceived(struct.pack(">I", len(body)) + body)
            self._assert_closed_and_nothing_delivered(node, alice, bob)

    def test_replayed_frame(self) -> None:
        for suite in SUITES:
            _node, alice, bob = self._pair(suite)
            wire = self._capture_next_frame(
                alice, cim_pb2.MSG_R, cim_pb2.Message(to="bob", text="once", client_seq=1)
            )
            alice.server.dataReceived(wire)
            bob.flush()
            self.assertEqual(len(bob.events.of_type(cim_pb2.MSG_N)), 1)
            alice.server.dataReceived(wire)
            bob.flush()
            self.assertEqual(len(bob.events.of_type(cim_pb2.MSG_N)), 1)
            self.assertTrue(alice.server_transport.disconnecting)

    def test_reordered_frames(self) -> None:
        for suite in SUITES:
            node, alice, bob = self._pair(suite)
            first = self._capture_next_frame(
                alice, cim_pb2.MSG_R, cim_pb2.Message(to="bob", text="one", client_seq=1)
            )
            second = self._capture_next_frame(
                alice, cim_pb2.MSG_R, cim_pb2.Message(to="bob", text="two", client_seq=2)
            )
            alice.server.dataReceived(second + first)
            self._assert_closed_and_nothing_delivered(node, alice, bob)

    def test_oversized_frame(self) -> None:
        node = NodeHarness("max_frame_size = 1024\n")
        alice = node.connect("alice")
        bob = node.connect("bob")
        alice.server.dataReceived(struct.pack(">I", 1025) + b"x" * 1025)
        self._assert_closed_and_nothing_delivered(node, alice, bob)
        self.assertEqual(node.metrics.frames_rejected["oversized"], 1)

    def test_frame_of_the_wrong_direction(self) -> None:
        """msg:N is the node's to send; a client sending one is closed."""
        node, alice, bob = self._pair(SUITE_CHACHA)
        forged = cim_pb2.Message(to="bob", text="forged", id=1)
        setattr(forged, "from", "carol")
        alice.protocol.send(cim_pb2.MSG_N, forged)
        alice.flush()
        self._assert_closed_and_nothing_delivered(node, alice, bob)


class HeartbeatTests(SynchronousTestCase):
    def test_heartbeat_is_four_bytes_and_only_when_idle(self) -> None:
        node = NodeHarness("heartbeat_interval = 10\n")
        alice = node.connect("alice")
        logged_in(alice)
        before = len(alice.recorded)
        node.clock.advance(9)
        alice.flush()
        self.assertEqual(len(alice.recorded), before)
        node.clock.advance(1.5)
        alice.flush()
        # The client's heartbeat and the node's echo: 4 bytes each.
        self.assertEqual(alice.recorded[before:], [HEARTBEAT_FRAME, HEARTBEAT_FRAME])

    def test_a_frame_marks_the_device_active_and_a_heartbeat_does_not(self) -> None:
        node = NodeHarness("heartbeat_interval = 10\n")
        alice = node.connect("alice")
        logged_in(alice)
        node.clock.advance(5)
        alice.protocol.send_frame(cim_pb2.DEVICES_R, cim_pb2.DevicesR(request_id=7))
        alice.flush()
        self.assertEqual(alice.server.active_at, node.clock.seconds())
        stamped = alice.server.active_at
        node.clock.advance(10.5)  # the client's heartbeat goes, the node echoes it
        alice.flush()
        self.assertEqual(alice.recorded[-2:], [HEARTBEAT_FRAME, HEARTBEAT_FRAME])
        self.assertEqual(alice.server.active_at, stamped)
        self.assertFalse(alice.server_transport.disconnecting)

    def test_a_quiet_connection_frees_its_cipher_contexts_before_any_heartbeat(self) -> None:
        # Issue #20: the ChaCha20-Poly1305 contexts (2.3 KiB each once used) go at the
        # node's next sweep (at most a second), not at the first heartbeat (30 s); the
        # LOGIN_RESULT's at once.
        node = NodeHarness()
        alice = node.connect("alice")
        logged_in(alice)
        self.assertFalse(holds_cipher_context(alice.server))
        # The next frame rebuilds them and the stream goes on.
        alice.protocol.send_frame(cim_pb2.DEVICES_R, cim_pb2.DevicesR(request_id=7))
        alice.flush()
        self.assertTrue(holds_cipher_context(alice.server))
        [answer] = alice.events.of_type(cim_pb2.DEVICES_A)
        self.assertEqual(answer.request_id, 7)
        node.clock.advance(1.0)
        self.assertFalse(holds_cipher_context(alice.server))
        self.assertFalse(alice.server_transport.disconnecting)

    def test_live_connection_survives_many_intervals(self) -> None:
        node = NodeHarness("heartbeat_interval = 10\n")
        alice = node.connect("alice")
        for _ in range(50):
            node.clock.advance(5)
            alice.flush()
        self.assertFalse(alice.server_transport.disconnecting)
        self.assertFalse(alice.client_transport.disconnecting)
        self.assertEqual(node.metrics.heartbeat_timeouts, 0)

    def test_node_closes_a_silent_client(self) -> None:
        node = NodeHarness("heartbeat_interval = 10\n")
        alice = node.connect("alice")
        logged_in(alice)
        alice.protocol.send_heartbeat = lambda: None  # type: ignore[method-assign]
        node.clock.advance(29)
        alice.flush()
        self.assertFalse(alice.server_transport.disconnecting)
        node.clock.advance(2)
        self.assertTrue(alice.server_transport.disconnecting)
        self.assertEqual(node.metrics.heartbeat_timeouts, 1)
        alice.flush()
        self.assertIsNone(node.im.sessions.session_for("alice"))

    def test_client_notices_a_silent_node(self) -> None:
        node = NodeHarness("heartbeat_interval = 10\n")
        alice = node.connect("alice")
        logged_in(alice)
        alice.server.send_heartbeat = lambda: None  # type: ignore[method-assign]
        node.clock.advance(10.5)
        alice.flush()
        # The client's heartbeat went out at 10 s and got no echo; it gives up 30 s
        # after the last frame it heard (the login result at 0 s).
        self.assertEqual(alice.recorded[-1], HEARTBEAT_FRAME)
        node.clock.advance(19)
        alice.flush()
        self.assertFalse(alice.client_transport.disconnecting)
        node.clock.advance(1)
        self.assertTrue(alice.client_transport.disconnecting)


class IdleMemoryTests(SynchronousTestCase):
    """What an idle connection holds (issue #20: at most 3 KiB each)."""

    def test_an_established_connection_keeps_its_attributes_in_slots(self) -> None:
        # Twisted's base classes give the protocol an instance dict; CPython 3.11 keeps
        # it compact only up to 29 attributes a class, past which every connection
        # pays about 1.3 KiB more. So every attribute has a slot and the dict is empty:
        # an attribute added without one fails here, not in production's RSS.
        node = NodeHarness()
        alice = node.connect("alice")
        logged_in(alice)
        alice.protocol.send_frame(cim_pb2.DEVICES_R, cim_pb2.DevicesR(request_id=1))
        alice.flush()
        node.clock.advance(31)
        alice.flush()
        self.assertEqual(vars(alice.server), {})
        self.assertFalse(hasattr(alice.server.outbound, "__dict__"))


class DuplicateLoginTests(SynchronousTestCase):
    def test_devices_of_one_user_stay_online_side_by_side(self) -> None:
        node = NodeHarness(policy="kick_old")
        first = node.connect("alice")
        logged_in(first)
        second = node.connect("alice", device="tablet")
        logged_in(second)
        first.flush()
        self.assertEqual(first.events.of_type(cim_pb2.KICKED), [])
        self.assertIs(node.im.sessions.session_for("alice", "phone"), first.server)
        self.assertIs(node.im.sessions.session_for("alice", "tablet"), second.server)
        self.assertEqual(node.im.sessions.connected_count, 2)

    def test_the_same_device_logging_in_again_replaces_its_session(self) -> None:
        node = NodeHarness(policy="kick_old")
        first = node.connect("alice")
        logged_in(first)
        second = node.connect("alice")
        first.flush()
        [kicked] = first.events.of_type(cim_pb2.KICKED)
        self.assertEqual(kicked.reason, "logged in again on this device")
        self.assertEqual(kicked.code, cim_pb2.Kicked.REPLACED)
        self.assertTrue(first.server_transport.disconnecting)
        self.assertIs(node.im.sessions.session_for("alice"), second.server)
        logged_in(second)

    def test_refuse_new(self) -> None:
        from cim.interfaces import AlreadyLoggedIn

        node = NodeHarness(policy="refuse_new", bounds=Bounds(max_devices_per_user=1))
        first = node.connect("alice")
        logged_in(first)
        with self.assertRaises(AlreadyLoggedIn):
            node.login("alice", device="tablet")
        self.assertIs(node.im.sessions.session_for("alice"), first.server)
        self.assertEqual(first.events.of_type(cim_pb2.KICKED), [])

    def test_fast_reconnect_with_the_same_token_replaces_a_stale_connection(self) -> None:
        node = NodeHarness(policy="refuse_new")
        first = node.connect("alice")
        logged_in(first)
        again = node.connect(token=first.token)
        logged_in(again)
        self.assertIs(node.im.sessions.session_for("alice"), again.server)
        self.assertTrue(first.server_transport.disconnecting)

    def test_going_away_on_shutdown(self) -> None:
        node = NodeHarness()
        alice = node.connect("alice")
        node.im.sessions.shutdown("the node is shutting down", 1000)
        alice.flush()
        [notice] = alice.events.of_type(cim_pb2.GOING_AWAY)
        self.assertEqual(notice.reconnect_after_ms, 1000)
        self.assertTrue(alice.server_transport.disconnecting)


class NodeWithoutCollaboratorsTests(SynchronousTestCase):
    """A node without groups, timelines, history or bus answers through its null
    collaborators the way such a node must."""

    def test_the_rooms_answer_exactly_the_client_frame_types(self) -> None:
        node = NodeHarness()
        self.assertEqual(
            sorted(node.im.inbound),
            sorted(
                [
                    cim_pb2.MSG_R,
                    cim_pb2.ACK_R,
                    cim_pb2.ONLINE_R,
                    cim_pb2.GROUP_R,
                    cim_pb2.OFFLINE_R,
                    cim_pb2.OFFLINE_ACK_R,
                    cim_pb2.OFFLINE_SUMMARY_R,
                    cim_pb2.HISTORY_R,
                    cim_pb2.CONTACTS_R,
                    cim_pb2.TYPING_R,
                    cim_pb2.CHANGE_R,
                    cim_pb2.READ_R,
                    cim_pb2.READERS_R,
                    cim_pb2.DEVICES_R,
                ]
            ),
        )
        # The connection answers its own frame besides the rooms'.
        self.assertEqual(
            sorted(node.factory.inbound), sorted([*node.im.inbound, cim_pb2.APP_STATE_R])
        )

    def test_two_rooms_cannot_answer_one_frame_type(self) -> None:
        from cim.im.node import _merged

        node = NodeHarness()
        with self.assertRaises(ValueError):
            _merged(node.im.direct, node.im.direct)

    def test_requests_are_answered_as_unavailable(self) -> None:
        node = NodeHarness(stores=Stores())
        alice = node.connect("alice")
        alice.protocol.send(cim_pb2.GROUP_R, cim_pb2.GroupRequest(request_id=3))
        alice.protocol.send(cim_pb2.HISTORY_R, cim_pb2.HistoryR(peer="bob", request_id=4))
        mark = cim_pb2.Cursor(conversation="d:alice:bob", seq=2)
        alice.protocol.send(cim_pb2.OFFLINE_R, cim_pb2.OfflineR(acks=[mark], request_id=5))
        alice.protocol.send(
            cim_pb2.OFFLINE_ACK_R, cim_pb2.OfflineAckR(cursors=[mark], request_id=6)
        )
        alice.protocol.send(cim_pb2.OFFLINE_SUMMARY_R, cim_pb2.OfflineSummaryR(request_id=7))
        alice.flush()
        [group] = alice.events.of_type(cim_pb2.GROUP_A)
        self.assertEqual(
            (group.request_id, group.ok, group.error, group.message),
            (3, False, "unavailable", "groups are not available on this node"),
        )
        [history] = alice.events.of_type(cim_pb2.HISTORY_A)
        self.assertEqual(
            (history.error, history.message),
            ("unavailable", "history is not kept on this node"),
        )
        # Never silence: each catch-up request is refused by type and id.
        refusals = [
            (e.code, e.request_type, e.request_id, e.retry_after_ms > 0)
            for e in alice.events.of_type(cim_pb2.ERROR)
        ]
        unavailable = cim_pb2.Error.UNAVAILABLE
        self.assertEqual(
            refusals,
            [
                (unavailable, cim_pb2.OFFLINE_R, 5, True),
                (unavailable, cim_pb2.OFFLINE_ACK_R, 6, True),
                (unavailable, cim_pb2.OFFLINE_SUMMARY_R, 7, True),
            ],
        )

    def test_a_node_without_timelines_promises_nothing(self) -> None:
        node = NodeHarness(stores=Stores())
        alice = node.connect("alice")
        bob = node.connect("bob")
        alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="bob", text="x", client_seq=4))
        node.flush_all()
        [error] = alice.events.of_type(cim_pb2.ERROR)
        self.assertEqual((error.code, error.client_seq), (cim_pb2.Error.UNAVAILABLE, 4))
        self.assertGreater(error.retry_after_ms, 0)
        self.assertEqual(alice.events.of_type(cim_pb2.MSG_A), [])
        self.assertEqual(alice.events.of_type(cim_pb2.ACK_N), [])
        self.assertEqual(bob.events.of_type(cim_pb2.MSG_N), [])

    def test_nobody_posts_to_a_group(self) -> None:
        node = NodeHarness()
        alice = node.connect("alice")
        alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(group="g1", text="x", client_seq=4))
        alice.flush()
        [error] = alice.events.of_type(cim_pb2.ERROR)
        self.assertEqual((error.client_seq, error.message), (4, "only members can post to a group"))

    def test_a_receiver_on_another_node_is_offline_to_a_node_without_a_bus(self) -> None:
        one = NodeHarness(node_id="node1")
        two = NodeHarness(
            node_id="node2",
            clock=one.clock,
            state=one.state,
            known=one.users,
            database=one.database,
        )
        alice = one.connect("alice")
        bob = two.connect("bob")
        alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="bob", text="x", client_seq=1))
        alice.flush()
        [ack_n] = alice.events.of_type(cim_pb2.ACK_N)
        self.assertEqual((ack_n.status, ack_n.reason), (cim_pb2.STORED, ""))
        # It waits in bob's timeline: his pull on his own node finds it.
        bob.protocol.send(cim_pb2.OFFLINE_R, cim_pb2.OfflineR(request_id=1))
        bob.flush()
        [page] = bob.events.of_type(cim_pb2.OFFLINE_A)
        self.assertEqual([(m.text, m.seq) for m in page.messages], [("x", 1)])

    def test_a_receiver_leaving_unacknowledged_finds_it_at_its_next_catch_up(self) -> None:
        node = NodeHarness()
        alice = node.connect("alice")
        bob = node.connect("bob")
        alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="bob", text="x", client_seq=1))
        alice.flush()
        bob.flush()
        self.assertEqual(len(bob.events.of_type(cim_pb2.MSG_N)), 1)
        bob.client_transport.loseConnection()
        bob.flush()
        alice.flush()
        [ack_n] = alice.events.of_type(cim_pb2.ACK_N)
        self.assertEqual((ack_n.status, ack_n.reason), (cim_pb2.STORED, ""))
        self.assertEqual(node.metrics.messages["stored"], 1)
        again = node.connect("bob")
        again.protocol.send(cim_pb2.OFFLINE_SUMMARY_R, cim_pb2.OfflineSummaryR(request_id=2))
        again.protocol.send(cim_pb2.OFFLINE_R, cim_pb2.OfflineR(request_id=3))
        again.flush()
        [summary] = again.events.of_type(cim_pb2.OFFLINE_SUMMARY_A)
        self.assertEqual([(c.peer, c.count) for c in summary.conversations], [("alice", 1)])
        [page] = again.events.of_type(cim_pb2.OFFLINE_A)
        self.assertEqual([m.text for m in page.messages], ["x"])

    def test_system_messages_need_timelines(self) -> None:
        from cim.history.timeline import TimelineUnavailable

        node = NodeHarness(stores=Stores())
        self.failureResultOf(node.im.system.send_system(["alice"], "{}"), TimelineUnavailable)
        self.assertEqual(node.metrics.messages["system"], 0)


class _NullTransport:
    """Just enough transport for a protocol nobody answers."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.disconnecting = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.written.extend(data)

    def loseConnection(self) -> None:
        self.disconnecting = True

    def abortConnection(self) -> None:
        self.aborted = True

    def getPeer(self) -> object:
        return None

    def getHost(self) -> object:
        return None
