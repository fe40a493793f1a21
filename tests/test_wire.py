"""Framing, heartbeats, sealing and allow-list dispatch over fake transports."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.test import iosim
from twisted.trial import unittest

from cim.metrics import NodeMetrics
from cim.protocols import cim_pb2
from cim.protocols.crypto import (
    SUITE_CHACHA,
    SUITE_RC4,
    FrameOpener,
    FrameSealer,
    NodeKey,
    session_ciphers,
)
from cim.protocols.handshake import ClientHandshake, accept_client_hello
from cim.protocols.wire import HEARTBEAT_FRAME, FrameProtocol, send_now
from tests.test_crypto import shared_node_key

MAX_FRAME = 1024
SECRET = bytes(range(32))
NONCES = (b"c" * 16, b"s" * 16)
FINGERPRINT = bytes(32)
BOTH = (SUITE_CHACHA, SUITE_RC4)


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def message_body(text: str, frame_type: int = cim_pb2.MSG_R) -> bytes:
    return bytes((frame_type,)) + cim_pb2.Message(to="bob", text=text).SerializeToString()


def _record(protocol: Any, message: Any) -> None:
    protocol.received.append(message)


def _record_login(protocol: Any, message: Any) -> None:
    protocol.login_results.append(message)


class RecordingProtocol(FrameProtocol):
    """Allows MSG_R and ACK_R once encrypted and records what reaches it."""

    def __init__(self, metrics: NodeMetrics | None = None) -> None:
        super().__init__(MAX_FRAME, metrics)
        self.received: list[Any] = []
        self.plaintexts: list[bytes] = []
        self.heartbeats = 0
        self.activity = 0
        self.inbound = {
            cim_pb2.MSG_R: (cim_pb2.Message, _record),
            cim_pb2.ACK_R: (cim_pb2.AckR, _record),
        }

    def heartbeat_received(self) -> None:
        self.heartbeats += 1

    def plaintext_frame_received(self, body: bytes) -> None:
        self.plaintexts.append(body)

    def frame_activity(self) -> None:
        self.activity += 1


def ciphers(suite: str, role: str) -> tuple[FrameSealer, FrameOpener]:
    return session_ciphers(suite, SECRET, *NONCES, FINGERPRINT, BOTH, role)  # type: ignore[arg-type]


class FramingTests(unittest.TestCase):
    def setUp(self) -> None:
        self.metrics = NodeMetrics()
        self.protocol = RecordingProtocol(self.metrics)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 4242))
        self.protocol.makeConnection(self.transport)

    def assertClosed(self, reason: str) -> None:
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.metrics.frames_rejected[reason], 1)

    def test_max_length_is_per_instance(self) -> None:
        self.assertEqual(self.protocol.MAX_LENGTH, MAX_FRAME)
        self.assertEqual(RecordingProtocol.MAX_LENGTH, 99999)

    def test_heartbeat_is_four_bytes_and_calls_the_hook(self) -> None:
        self.protocol.send_heartbeat()
        self.assertEqual(self.transport.value(), b"\x00\x00\x00\x00")
        self.assertEqual(HEARTBEAT_FRAME, b"\x00\x00\x00\x00")
        self.protocol.dataReceived(HEARTBEAT_FRAME * 2)
        self.assertEqual(self.protocol.heartbeats, 2)
        self.assertEqual(self.protocol.activity, 2)
        self.assertEqual(self.metrics.heartbeats_in, 2)
        self.assertEqual(self.metrics.heartbeats_out, 1)
        self.assertEqual(self.metrics.bytes_in, 8)
        self.assertEqual(self.metrics.bytes_out, 4)

    def test_heartbeats_stay_plain_after_encryption(self) -> None:
        sealer, opener = ciphers(SUITE_CHACHA, "node")
        self.protocol.start_encryption(sealer, opener)
        self.protocol.send_heartbeat()
        self.protocol.dataReceived(HEARTBEAT_FRAME)
        self.assertEqual(self.transport.value(), HEARTBEAT_FRAME)
        self.assertEqual(self.protocol.heartbeats, 1)

    def test_oversized_frame_closes_and_nothing_is_dispatched(self) -> None:
        with capturedLogs() as events:
            self.protocol.dataReceived(struct.pack(">I", MAX_FRAME + 1) + b"x" * 10)
        self.assertClosed("oversized")
        self.assertEqual(self.protocol.plaintexts, [])
        self.assertEqual(self.protocol.activity, 0)
        self.assertEqual(len(events), 1)
        self.assertEqual(events[0]["log_level"].name, "warn")
        # Nothing more is read from a rejected connection.
        self.protocol.dataReceived(frame(b"\x01hello") + HEARTBEAT_FRAME)
        self.assertEqual(self.protocol.plaintexts, [])
        self.assertEqual(self.protocol.heartbeats, 0)

    def test_largest_allowed_frame_passes(self) -> None:
        self.protocol.dataReceived(frame(b"\x01" * MAX_FRAME))
        self.assertEqual(len(self.protocol.plaintexts), 1)
        self.assertFalse(self.transport.disconnecting)

    def test_plaintext_before_encryption_goes_to_the_hook(self) -> None:
        self.protocol.dataReceived(frame(b"\x01hello")[:5])
        self.assertEqual(self.protocol.plaintexts, [])
        self.protocol.dataReceived(frame(b"\x01hello")[5:])
        self.assertEqual(self.protocol.plaintexts, [b"\x01hello"])
        self.assertEqual(self.protocol.activity, 1)
        self.assertEqual(self.metrics.frames_in[1], 1)
        self.assertEqual(self.metrics.bytes_in, 10)

    def test_default_plaintext_hook_rejects(self) -> None:
        protocol = FrameProtocol(MAX_FRAME, self.metrics)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(frame(b"\x01hello"))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.metrics.frames_rejected["unexpected plaintext"], 1)

    def test_send_plaintext(self) -> None:
        self.protocol.send_plaintext(b"\x02refused")
        self.assertEqual(self.transport.value(), frame(b"\x02refused"))
        self.assertEqual(self.metrics.frames_out[2], 1)
        self.assertEqual(self.metrics.bytes_out, 12)
        self.assertRaises(ValueError, self.protocol.send_plaintext, b"")

    def test_send_frame_needs_encryption(self) -> None:
        self.assertRaises(
            RuntimeError, self.protocol.send_frame, cim_pb2.MSG_A, cim_pb2.MsgA(msg_id=1)
        )
        self.assertEqual(self.transport.value(), b"")

    def test_encryption_starts_once(self) -> None:
        self.protocol.start_encryption(*ciphers(SUITE_CHACHA, "node"))
        self.assertRaises(
            RuntimeError, self.protocol.start_encryption, *ciphers(SUITE_CHACHA, "node")
        )


if TYPE_CHECKING:
    _MixinBase = unittest.TestCase
else:
    _MixinBase = object


class EncryptedFramingTestsMixin(_MixinBase):
    """The same tests for both suites; ``suite`` is set by the concrete classes."""

    suite: str

    def setUp(self) -> None:
        self.metrics = NodeMetrics()
        self.protocol = RecordingProtocol(self.metrics)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 4242))
        self.protocol.makeConnection(self.transport)
        self.protocol.start_encryption(*ciphers(self.suite, "node"))
        self.peer_sealer, self.peer_opener = ciphers(self.suite, "client")

    def sealed(self, body: bytes) -> bytes:
        return frame(self.peer_sealer.seal(body))

    def assertRejected(self, reason: str, delivered: int) -> None:
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.metrics.frames_rejected[reason], 1)
        self.assertEqual(len(self.protocol.received), delivered)

    def test_frames_are_dispatched_by_type(self) -> None:
        self.protocol.dataReceived(
            self.sealed(message_body("one"))
            + self.sealed(bytes((cim_pb2.ACK_R,)) + cim_pb2.AckR(msg_id=7).SerializeToString())
        )
        self.assertEqual(len(self.protocol.received), 2)
        self.assertEqual(self.protocol.received[0].text, "one")
        self.assertEqual(self.protocol.received[1].msg_id, 7)
        self.assertEqual(self.metrics.frames_in[cim_pb2.MSG_R], 1)
        self.assertEqual(self.metrics.frames_in[cim_pb2.ACK_R], 1)
        self.assertEqual(self.protocol.activity, 2)
        self.assertFalse(self.transport.disconnecting)

    def test_frames_split_anywhere_arrive_whole(self) -> None:
        stream = self.sealed(message_body("one")) + HEARTBEAT_FRAME
        stream += self.sealed(message_body("two"))
        for index in range(len(stream)):
            self.protocol.dataReceived(stream[index : index + 1])
        self.assertEqual([m.text for m in self.protocol.received], ["one", "two"])
        self.assertEqual(self.protocol.heartbeats, 1)
        self.assertEqual(self.protocol._unprocessed, b"")
        self.assertFalse(self.transport.disconnecting)

    def test_send_frame_is_sealed(self) -> None:
        self.protocol.send_frame(cim_pb2.MSG_N, cim_pb2.Message(text="secret words"))
        wire = self.transport.value()
        self.assertNotIn(b"secret words", wire)
        (length,) = struct.unpack(">I", wire[:4])
        self.assertEqual(length, len(wire) - 4)
        plaintext = self.peer_opener.open(wire[4:])
        self.assertEqual(plaintext[0], cim_pb2.MSG_N)
        self.assertEqual(cim_pb2.Message.FromString(plaintext[1:]).text, "secret words")
        self.assertEqual(self.metrics.frames_out[cim_pb2.MSG_N], 1)
        self.assertEqual(self.metrics.bytes_out, len(wire))

    def test_tampered_frame_closes_and_later_frames_are_dropped(self) -> None:
        good = self.sealed(message_body("good"))
        bad = bytearray(self.sealed(message_body("tampered")))
        bad[-1] ^= 0x01
        after = self.sealed(message_body("after"))
        with capturedLogs() as events:
            self.protocol.dataReceived(good + bytes(bad) + after + HEARTBEAT_FRAME)
        self.assertRejected("authentication", delivered=1)
        self.assertEqual(self.protocol.heartbeats, 0)
        self.assertEqual(len(events), 1)
        line = events[0]
        self.assertEqual(line["log_level"].name, "warn")
        self.assertEqual(line["peer"], "192.0.2.7:4242")
        self.assertEqual(line["reason"], "authentication")
        self.assertNotIn("tampered", repr(line))

    def test_replayed_frame_closes(self) -> None:
        first = self.sealed(message_body("once"))
        self.protocol.dataReceived(first)
        self.protocol.dataReceived(first + self.sealed(message_body("later")))
        self.assertRejected("authentication", delivered=1)

    def test_reordered_frames_close(self) -> None:
        first = self.sealed(message_body("first"))
        second = self.sealed(message_body("second"))
        self.protocol.dataReceived(second + first)
        self.assertRejected("authentication", delivered=0)

    def test_truncated_frame_closes(self) -> None:
        body = self.peer_sealer.seal(message_body("whole"))
        self.protocol.dataReceived(frame(body[:-1]))
        self.assertRejected("authentication", delivered=0)

    def test_empty_plaintext_closes(self) -> None:
        self.protocol.dataReceived(self.sealed(b""))
        self.assertRejected("empty", delivered=0)

    def test_unexpected_type_closes(self) -> None:
        self.protocol.dataReceived(
            self.sealed(message_body("from the node?", frame_type=cim_pb2.MSG_N))
            + self.sealed(message_body("allowed"))
        )
        self.assertRejected("unexpected frame type", delivered=0)

    def test_allow_list_follows_state(self) -> None:
        self.protocol.inbound = {}
        self.protocol.dataReceived(self.sealed(message_body("not yet")))
        self.assertRejected("unexpected frame type", delivered=0)

    def test_malformed_protobuf_closes(self) -> None:
        self.protocol.dataReceived(
            self.sealed(bytes((cim_pb2.MSG_R,)) + b"\xff\xff\xff\xff")
            + self.sealed(message_body("allowed"))
        )
        self.assertRejected("malformed", delivered=0)

    def test_plaintext_after_encryption_fails_authentication(self) -> None:
        self.protocol.dataReceived(frame(message_body("plain")))
        self.assertRejected("authentication", delivered=0)
        self.assertEqual(self.protocol.plaintexts, [])


class ChaChaFramingTests(EncryptedFramingTestsMixin, unittest.TestCase):
    suite = SUITE_CHACHA


class Rc4FramingTests(EncryptedFramingTestsMixin, unittest.TestCase):
    suite = SUITE_RC4


# ------------------------------------------------------------------ over iosim

TOKEN = "tok-never-on-the-wire"


class NodeSide(RecordingProtocol):
    def __init__(self, node_key: NodeKey, metrics: NodeMetrics) -> None:
        super().__init__(metrics)
        self.node_key = node_key

    def plaintext_frame_received(self, body: bytes) -> None:
        accepted = accept_client_hello(body, self.node_key, BOTH)
        result = cim_pb2.LoginResult(user="alice")
        self.send_plaintext(
            accepted.reply_body(bytes((cim_pb2.LOGIN_RESULT,)) + result.SerializeToString())
        )
        self.start_encryption(accepted.sealer, accepted.opener)


class ClientSide(RecordingProtocol):
    def __init__(self, handshake: ClientHandshake) -> None:
        super().__init__()
        self.handshake = handshake
        self.login_results: list[Any] = []
        self.inbound = {}

    def connectionMade(self) -> None:
        self.send_plaintext(self.handshake.hello_body())

    def plaintext_frame_received(self, body: bytes) -> None:
        sealer, opener, first = self.handshake.finish(body)
        self.start_encryption(sealer, opener)
        self.inbound = {cim_pb2.LOGIN_RESULT: (cim_pb2.LoginResult, _record_login)}
        self.dispatch_plaintext(first)
        self.inbound = {cim_pb2.MSG_N: (cim_pb2.Message, _record)}


class ConnectedTests(unittest.TestCase):
    def connect(self, suite: str) -> tuple[NodeSide, ClientSide, iosim.IOPump]:
        node_key = shared_node_key()
        handshake = ClientHandshake(node_key.public_der, TOKEN, "phone", suite, BOTH, 0)
        self.metrics = NodeMetrics()
        client, node, pump = iosim.connectedServerAndClient(
            lambda: NodeSide(node_key, self.metrics),
            lambda: ClientSide(handshake),
            greet=False,
        )
        # Everything either side receives, as an eavesdropper would record it.
        self.wire: list[bytes] = []
        for fake in (pump.clientIO, pump.serverIO):
            original = fake.bufferReceived

            def recording(data: bytes, original: Any = original) -> None:
                self.wire.append(data)
                original(data)

            fake.bufferReceived = recording  # type: ignore[method-assign]
        pump.flush()
        return node, client, pump

    def exchange(self, suite: str) -> None:
        node, client, pump = self.connect(suite)
        self.assertEqual([r.user for r in client.login_results], ["alice"])
        client.send_frame(cim_pb2.MSG_R, cim_pb2.Message(to="bob", text="hello bob"))
        client.send_heartbeat()
        node.send_frame(cim_pb2.MSG_N, cim_pb2.Message(text="hello alice"))
        pump.flush()
        self.assertEqual([m.text for m in node.received], ["hello bob"])
        self.assertEqual(node.heartbeats, 1)
        self.assertEqual([m.text for m in client.received], ["hello alice"])
        recorded = b"".join(self.wire)
        self.assertIn(HEARTBEAT_FRAME, recorded)
        for secret in (b"hello bob", b"hello alice", TOKEN.encode()):
            self.assertNotIn(secret, recorded)
        self.assertEqual(self.metrics.frames_in[cim_pb2.CLIENT_HELLO], 1)
        self.assertEqual(self.metrics.frames_in[cim_pb2.MSG_R], 1)

    def test_chacha(self) -> None:
        self.exchange(SUITE_CHACHA)

    def test_rc4(self) -> None:
        self.exchange(SUITE_RC4)


class _Socket:
    """Takes at most ``room`` bytes per send, like a socket with a full buffer."""

    def __init__(self, room: int = 1 << 20, error: OSError | None = None) -> None:
        self.room = room
        self.error = error
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        if self.error is not None:
            raise self.error
        taken = data[: self.room]
        self.sent.append(taken)
        return len(taken)


class _SocketTransport(StringTransport):
    """A StringTransport with what send_now looks at on a tcp.Connection."""

    def __init__(self, sock: _Socket) -> None:
        super().__init__()
        self.socket = sock
        self.dataBuffer = b""
        self._tempDataBuffer: list[bytes] = []
        self.connected = True


class SendNowTests(unittest.TestCase):
    def test_straight_to_the_socket_when_nothing_is_queued(self) -> None:
        transport = _SocketTransport(_Socket())
        send_now(transport, b"frame")
        self.assertEqual((transport.socket.sent, transport.value()), ([b"frame"], b""))

    def test_the_rest_of_a_partial_send_is_queued(self) -> None:
        transport = _SocketTransport(_Socket(room=2))
        send_now(transport, b"frame")
        self.assertEqual((transport.socket.sent, transport.value()), ([b"fr"], b"ame"))

    def test_queued_data_keeps_its_place(self) -> None:
        transport = _SocketTransport(_Socket())
        transport._tempDataBuffer.append(b"earlier")
        send_now(transport, b"later")
        self.assertEqual((transport.socket.sent, transport.value()), ([], b"later"))

    def test_a_socket_error_leaves_it_to_twisted(self) -> None:
        transport = _SocketTransport(_Socket(error=BlockingIOError()))
        send_now(transport, b"frame")
        self.assertEqual(transport.value(), b"frame")

    def test_closing_transport_is_not_written_directly(self) -> None:
        transport = _SocketTransport(_Socket())
        transport.disconnecting = True
        send_now(transport, b"frame")
        self.assertEqual((transport.socket.sent, transport.value()), ([], b"frame"))


class Relay(RecordingProtocol):
    """Answers each frame with two frames to itself and one to a peer."""

    peer: FrameProtocol

    def __init__(self) -> None:
        super().__init__()
        self.inbound = {cim_pb2.MSG_R: (cim_pb2.Message, _relay)}


def _relay(protocol: Any, message: Any) -> None:
    protocol.send_frame(cim_pb2.MSG_A, cim_pb2.MsgA(client_seq=1))
    protocol.send_frame(cim_pb2.ACK_A, cim_pb2.AckA(msg_id=1))
    protocol.peer.send_frame(cim_pb2.MSG_N, message)


class HeldWritesTests(unittest.TestCase):
    def connected(self, protocol: FrameProtocol) -> list[bytes]:
        transport = StringTransport()
        writes: list[bytes] = []
        original = transport.write

        def write(data: bytes) -> None:
            writes.append(data)
            original(data)

        transport.write = write  # type: ignore[method-assign]
        protocol.makeConnection(transport)
        return writes

    def test_frames_made_during_a_read_leave_in_one_write_per_connection(self) -> None:
        relay, peer = Relay(), RecordingProtocol()
        relay.peer = peer
        relay_writes, peer_writes = self.connected(relay), self.connected(peer)
        for protocol in (relay, peer):
            protocol.start_encryption(*ciphers(SUITE_CHACHA, "node"))
        sealer, _ = ciphers(SUITE_CHACHA, "client")
        relay.dataReceived(b"".join(frame(sealer.seal(message_body(str(n)))) for n in range(3)))
        # Six frames back to the sender and three to the peer, in one write each.
        self.assertEqual((len(relay_writes), len(peer_writes)), (1, 1))
        _, opener = ciphers(SUITE_CHACHA, "client")
        frames, rest = split_frames(relay_writes[0])
        self.assertEqual(rest, b"")
        types = [opener.open(body)[0] for body in frames]
        self.assertEqual(types, [cim_pb2.MSG_A, cim_pb2.ACK_A] * 3)
        self.assertEqual(len(split_frames(peer_writes[0])[0]), 3)

    def test_outside_a_read_frames_go_at_once(self) -> None:
        protocol = RecordingProtocol()
        writes = self.connected(protocol)
        protocol.send_heartbeat()
        protocol.send_heartbeat()
        self.assertEqual(writes, [HEARTBEAT_FRAME, HEARTBEAT_FRAME])

    def test_closing_during_a_read_sends_the_held_frames_first(self) -> None:
        class Refuser(RecordingProtocol):
            def plaintext_frame_received(self, body: bytes) -> None:
                self.send_plaintext(b"\x07no")
                self.lose_connection()

        protocol = Refuser()
        self.connected(protocol)
        transport: Any = protocol.transport
        protocol.dataReceived(frame(b"\x01hello"))
        self.assertEqual(transport.value(), frame(b"\x07no"))
        self.assertTrue(transport.disconnecting)


def split_frames(data: bytes) -> tuple[list[bytes], bytes]:
    frames = []
    while len(data) >= 4:
        (length,) = struct.unpack(">I", data[:4])
        if len(data) < 4 + length:
            break
        frames.append(data[4 : 4 + length])
        data = data[4 + length :]
    return frames, data
