"""Framing, heartbeats, sealing and allow-list dispatch over fake transports."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.protocols.basic import Int32StringReceiver
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
from cim.protocols.held_writes import HeldWrites
from cim.protocols.wire import ACTIVITY_EVERY, HEARTBEAT_FRAME, FrameProtocol
from tests.unit.test_crypto import shared_node_key

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

    def __init__(
        self, metrics: NodeMetrics | None = None, held_writes: HeldWrites | None = None
    ) -> None:
        super().__init__(MAX_FRAME, metrics, held_writes)
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
        self.assertEqual(FrameProtocol(17).MAX_LENGTH, 17)
        self.assertEqual(self.protocol.MAX_LENGTH, MAX_FRAME)
        self.assertEqual(Int32StringReceiver.MAX_LENGTH, 99999)  # Twisted's default untouched

    def test_heartbeat_is_four_bytes_and_calls_the_hook(self) -> None:
        self.protocol.send_heartbeat()
        self.assertEqual(self.transport.value(), b"\x00\x00\x00\x00")
        self.assertEqual(HEARTBEAT_FRAME, b"\x00\x00\x00\x00")
        self.protocol.dataReceived(HEARTBEAT_FRAME * 2)
        self.assertEqual(self.protocol.heartbeats, 2)
        self.assertEqual(self.protocol.activity, 1)  # once per read that brings frames
        self.protocol.dataReceived(HEARTBEAT_FRAME)
        self.assertEqual(self.protocol.activity, 2)
        self.assertEqual(self.metrics.heartbeats_in, 3)
        self.assertEqual(self.metrics.heartbeats_out, 1)
        self.assertEqual(self.metrics.bytes_in, 12)
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

    def test_a_long_read_looks_again_every_activity_every_frames(self) -> None:
        """A flood's read carries hundreds of frames: the hook (the node's look at
        its backpressure) runs before the 1st, the 17th, the 33rd..., and a pause it
        decides stops the read there, the rest waiting in the buffer."""
        protocol = self.protocol
        protocol.dataReceived(HEARTBEAT_FRAME * (2 * ACTIVITY_EVERY + 1))
        self.assertEqual(protocol.activity, 3)
        self.assertEqual(protocol.heartbeats, 2 * ACTIVITY_EVERY + 1)

        def pause_on_the_second_look() -> None:
            protocol.activity += 1
            if protocol.activity == 5:
                protocol.pauseProducing()

        protocol.frame_activity = pause_on_the_second_look  # type: ignore[method-assign]
        protocol.dataReceived(HEARTBEAT_FRAME * (3 * ACTIVITY_EVERY))
        self.assertEqual(protocol.heartbeats, 2 * ACTIVITY_EVERY + 1 + ACTIVITY_EVERY)
        protocol.resumeProducing()
        self.assertEqual(protocol.heartbeats, 2 * ACTIVITY_EVERY + 1 + 3 * ACTIVITY_EVERY)

    def test_a_pause_decided_before_a_read_keeps_all_its_frames(self) -> None:
        """The activity hook runs before the read's first frame (the node's
        backpressure look): a pause there holds every frame of the read, the first
        included, until resumed."""
        protocol = self.protocol

        def pause_once() -> None:
            protocol.activity += 1
            if protocol.activity == 1:
                protocol.pauseProducing()

        protocol.frame_activity = pause_once  # type: ignore[method-assign]
        protocol.dataReceived(frame(b"\x01one") + frame(b"\x01two"))
        self.assertEqual(protocol.plaintexts, [])
        protocol.resumeProducing()
        self.assertEqual(protocol.plaintexts, [b"\x01one", b"\x01two"])
        self.assertEqual(protocol.activity, 2)

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
        self.assertEqual(self.protocol.activity, 1)  # one read
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


class DirectSendTests(unittest.TestCase):
    """Frames go straight to the socket unless some of the connection's bytes wait in
    Twisted's buffer; Twisted's consumer API (a pull producer) says when they no longer do.

    A StringTransport stands in for the TCP connection, with a fake socket where
    ``makeConnection`` would take ``tcp.Connection.getHandle()``.
    """

    def connected(self, sock: _Socket) -> tuple[RecordingProtocol, StringTransport]:
        protocol = RecordingProtocol()
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertIsNone(protocol._socket)  # not a tcp.Connection: no direct sends
        protocol._socket = sock  # type: ignore[assignment]
        return protocol, transport

    def test_straight_to_the_socket_when_nothing_is_queued(self) -> None:
        sock = _Socket()
        protocol, transport = self.connected(sock)
        protocol.send_plaintext(b"\x01frame")
        self.assertEqual((sock.sent, transport.value()), ([frame(b"\x01frame")], b""))
        self.assertIsNone(transport.producer)

    def test_the_rest_of_a_partial_send_is_queued(self) -> None:
        sock = _Socket(room=2)
        protocol, transport = self.connected(sock)
        protocol.send_plaintext(b"\x01frame")
        self.assertEqual((sock.sent, transport.value()), ([b"\x00\x00"], frame(b"\x01frame")[2:]))
        # Registered to hear when Twisted's buffer is empty: a pull producer.
        self.assertIsNotNone(transport.producer)
        self.assertFalse(transport.streaming)

    def test_queued_data_keeps_its_place_until_twisted_has_sent_it(self) -> None:
        sock = _Socket(room=2)
        protocol, transport = self.connected(sock)
        protocol.send_plaintext(b"\x01first")
        sock.room = 1 << 20
        protocol.send_plaintext(b"\x01second")
        self.assertEqual(sock.sent, [b"\x00\x00"])
        self.assertEqual(transport.value(), (frame(b"\x01first") + frame(b"\x01second"))[2:])
        # Twisted's write loop emptied its buffer and asks its producer for more.
        transport.producer.resumeProducing()
        self.assertIsNone(transport.producer)
        protocol.send_plaintext(b"\x01third")
        self.assertEqual(sock.sent, [b"\x00\x00", frame(b"\x01third")])

    def test_a_socket_error_leaves_it_to_twisted(self) -> None:
        protocol, transport = self.connected(_Socket(error=BlockingIOError()))
        protocol.send_heartbeat()
        self.assertEqual(transport.value(), HEARTBEAT_FRAME)
        self.assertIsNotNone(transport.producer)

    def test_closing_transport_is_not_written_directly(self) -> None:
        sock = _Socket()
        protocol, transport = self.connected(sock)
        transport.disconnecting = True
        protocol.send_heartbeat()
        self.assertEqual((sock.sent, transport.value()), ([], HEARTBEAT_FRAME))

    def test_with_another_producer_registered_writes_stay_in_twisted(self) -> None:
        sock = _Socket(room=2)
        protocol, transport = self.connected(sock)
        other = object()
        transport.registerProducer(other, True)
        protocol.send_heartbeat()
        sock.room = 1 << 20
        protocol.send_heartbeat()
        self.assertEqual(sock.sent, [b"\x00\x00"])
        self.assertEqual(transport.value(), HEARTBEAT_FRAME[2:] + HEARTBEAT_FRAME)
        self.assertIs(transport.producer, other)


class LoopbackSendTests(unittest.TestCase):
    """Direct sends over a real TCP connection on the loopback interface."""

    def setUp(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.protocol import Factory

        self.reactor: Any = reactor
        self.receiver = RecordingProtocol()
        self.receiver.MAX_LENGTH = 1 << 20
        received = Deferred[RecordingProtocol]()

        def build() -> RecordingProtocol:
            self.reactor.callLater(0, received.callback, self.receiver)
            return self.receiver

        port = reactor.listenTCP(0, Factory.forProtocol(build), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        self.sender = RecordingProtocol()
        self.sender.MAX_LENGTH = 1 << 20
        self.receiver_ready = received
        self.port = port

    async def connect(self) -> None:
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port.getHost().port)
        await connectProtocol(endpoint, self.sender)
        self.addCleanup(self.close)
        await self.receiver_ready

    async def close(self) -> None:
        for protocol in (self.sender, self.receiver):
            if protocol.transport is not None:
                protocol.transport.loseConnection()
        await deferLater(self.reactor, 0.01)

    async def until(self, condition: Any) -> None:
        for _ in range(500):
            if condition():
                return
            await deferLater(self.reactor, 0.01)
        self.fail("the condition did not come true in 5 s")

    async def _fill_and_drain(self) -> None:
        await self.connect()
        self.assertIsNotNone(self.sender._socket)
        # The receiver stops reading; the sender writes until the kernel's buffers are
        # full and the rest waits in Twisted's.
        self.receiver.pauseProducing()
        body = b"\x01" + b"x" * 65536
        count = 0
        while self.sender._socket is not None and count < 2000:
            self.sender.send_plaintext(body)
            count += 1
        self.assertIsNone(self.sender._socket)  # writing through Twisted
        for _ in range(3):
            self.sender.send_plaintext(body)  # queued behind, not sent past them
        count += 3
        self.receiver.resumeProducing()
        await self.until(lambda: len(self.receiver.plaintexts) == count)
        self.assertEqual(set(self.receiver.plaintexts), {body})
        # Twisted said its buffer is empty: direct sends again, and nothing registered.
        await self.until(lambda: self.sender._socket is not None)
        self.assertIsNone(self.sender.transport.producer)  # type: ignore[union-attr]
        self.sender.send_plaintext(b"\x01last")
        await self.until(lambda: self.receiver.plaintexts[-1:] == [b"\x01last"])

    def test_a_full_socket_queues_in_twisted_until_it_drains(self) -> None:
        return Deferred.fromCoroutine(self._fill_and_drain())


class Relay(RecordingProtocol):
    """Answers each frame with two frames to itself and one to a peer."""

    peer: FrameProtocol

    def __init__(self, held_writes: HeldWrites | None = None) -> None:
        super().__init__(held_writes=held_writes)
        self.inbound = {cim_pb2.MSG_R: (cim_pb2.Message, _relay)}


def _relay(protocol: Any, message: Any) -> None:
    protocol.send_frame(cim_pb2.MSG_A, cim_pb2.MsgA(client_seq=1))
    protocol.send_frame(cim_pb2.ACK_A, cim_pb2.AckA(msg_id=1))
    protocol.peer.send_frame(cim_pb2.MSG_N, message)


def connect_recording_writes(protocol: FrameProtocol) -> list[bytes]:
    """Connect to a StringTransport; the list gets each ``write`` call's bytes."""
    transport = StringTransport()
    writes: list[bytes] = []
    original = transport.write

    def write(data: bytes) -> None:
        writes.append(data)
        original(data)

    transport.write = write  # type: ignore[method-assign]
    protocol.makeConnection(transport)
    return writes


class HeldWritesTests(unittest.TestCase):
    def connected(self, protocol: FrameProtocol) -> list[bytes]:
        return connect_recording_writes(protocol)

    def relay_and_peer(
        self, held: HeldWrites | None
    ) -> tuple[Relay, RecordingProtocol, list[bytes], list[bytes]]:
        """A relay and its peer, encrypted, sharing ``held`` (None: each its own), and
        the writes each makes."""
        relay, peer = Relay(held), RecordingProtocol(held_writes=held)
        relay.peer = peer
        relay_writes, peer_writes = self.connected(relay), self.connected(peer)
        for protocol in (relay, peer):
            protocol.start_encryption(*ciphers(SUITE_CHACHA, "node"))
        return relay, peer, relay_writes, peer_writes

    def test_frames_made_during_a_read_leave_in_one_write_per_connection(self) -> None:
        # The node's connections share one HeldWrites (the IM factory's).
        held = HeldWrites()
        relay, _peer, relay_writes, peer_writes = self.relay_and_peer(held)
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

    def test_without_a_shared_one_other_connections_send_at_once(self) -> None:
        relay, _peer, relay_writes, peer_writes = self.relay_and_peer(None)
        sealer, _ = ciphers(SUITE_CHACHA, "client")
        relay.dataReceived(b"".join(frame(sealer.seal(message_body(str(n)))) for n in range(3)))
        self.assertEqual((len(relay_writes), len(peer_writes)), (1, 3))

    def test_outside_a_read_frames_go_at_once(self) -> None:
        protocol = RecordingProtocol()
        writes = self.connected(protocol)
        protocol.send_heartbeat()
        protocol.send_heartbeat()
        self.assertEqual(writes, [HEARTBEAT_FRAME, HEARTBEAT_FRAME])

    def test_work_at_the_read_end_runs_before_the_held_frames_leave(self) -> None:
        # The timelines' journal writes what a read numbered there: its answers (here a
        # msg:N to the peer) must leave in the same sends as the read's own frames.
        held = HeldWrites()
        relay, peer, relay_writes, peer_writes = self.relay_and_peer(held)
        seen: list[tuple[int, int]] = []
        kept: list[bool] = []

        def at_end() -> None:
            seen.append((len(relay_writes), len(peer_writes)))
            peer.send_frame(cim_pb2.MSG_N, cim_pb2.Message(text="answered at the end"))

        def relay_and_defer(protocol: Any, message: Any) -> None:
            _relay(protocol, message)
            if not kept:  # once for the read, as the journal does
                kept.append(held.at_read_end(at_end))

        relay.inbound = {cim_pb2.MSG_R: (cim_pb2.Message, relay_and_defer)}
        sealer, _ = ciphers(SUITE_CHACHA, "client")
        relay.dataReceived(b"".join(frame(sealer.seal(message_body(str(n)))) for n in range(2)))
        self.assertEqual(kept, [True])  # a read was under way: the work was kept
        self.assertEqual(seen, [(0, 0)])  # ran once, before anything was written
        self.assertEqual((len(relay_writes), len(peer_writes)), (1, 1))
        _, opener = ciphers(SUITE_CHACHA, "client")
        texts = [
            cim_pb2.Message.FromString(opener.open(body)[1:]).text
            for body in split_frames(peer_writes[0])[0]
        ]
        self.assertEqual(texts, ["0", "1", "answered at the end"])

    def test_no_work_is_kept_outside_a_read(self) -> None:
        held = HeldWrites()
        ran: list[int] = []
        self.assertFalse(held.at_read_end(lambda: ran.append(1)))
        held.around(lambda: None)
        self.assertEqual(ran, [])
        # Inside ``around`` (as a read) it is kept and runs as that ends.
        held.around(lambda: held.at_read_end(lambda: ran.append(2)))
        self.assertEqual(ran, [2])

    def test_failing_work_at_the_read_end_is_logged_and_the_frames_still_leave(self) -> None:
        held = HeldWrites()
        relay, _peer, relay_writes, peer_writes = self.relay_and_peer(held)

        def fails() -> None:
            raise RuntimeError("broken")

        def relay_and_fail(protocol: Any, message: Any) -> None:
            _relay(protocol, message)
            held.at_read_end(fails)

        relay.inbound = {cim_pb2.MSG_R: (cim_pb2.Message, relay_and_fail)}
        sealer, _ = ciphers(SUITE_CHACHA, "client")
        with capturedLogs() as events:
            relay.dataReceived(frame(sealer.seal(message_body("x"))))
        self.assertEqual((len(relay_writes), len(peer_writes)), (1, 1))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(any("end of a read" in e.get("log_format", "") for e in events))

    def test_work_after_the_flush_runs_once_the_held_frames_left(self) -> None:
        # A 1:1 sender's msg:A: built and sent after the receiver's copy is on its
        # way; the answers of one read still leave in one send per connection.
        held = HeldWrites()
        relay, peer, relay_writes, peer_writes = self.relay_and_peer(held)
        seen: list[tuple[int, int]] = []

        def answer(n: int) -> None:
            seen.append((len(relay_writes), len(peer_writes)))
            relay.send_frame(cim_pb2.MSG_A, cim_pb2.MsgA(client_seq=n))

        def copy_now_answer_later(protocol: Any, message: Any) -> None:
            peer.send_frame(cim_pb2.MSG_N, message)
            self.assertTrue(held.after_flush(lambda: answer(int(message.text))))

        relay.inbound = {cim_pb2.MSG_R: (cim_pb2.Message, copy_now_answer_later)}
        sealer, _ = ciphers(SUITE_CHACHA, "client")
        relay.dataReceived(b"".join(frame(sealer.seal(message_body(str(n)))) for n in range(3)))
        # The peer's three copies had left (one write) before the first answer was made.
        self.assertEqual(seen, [(0, 1)] * 3)
        self.assertEqual((len(relay_writes), len(peer_writes)), (1, 1))
        _, opener = ciphers(SUITE_CHACHA, "client")
        answers = [
            cim_pb2.MsgA.FromString(opener.open(body)[1:]).client_seq
            for body in split_frames(relay_writes[0])[0]
        ]
        self.assertEqual(answers, [0, 1, 2])

    def test_work_after_the_flush_outside_a_read_is_not_kept_and_failures_are_logged(
        self,
    ) -> None:
        held = HeldWrites()
        ran: list[int] = []
        self.assertFalse(held.after_flush(lambda: ran.append(1)))
        held.around(lambda: None)
        self.assertEqual(ran, [])

        def fails() -> None:
            raise RuntimeError("broken")

        def keep_both() -> None:
            held.after_flush(fails)
            held.after_flush(lambda: ran.append(2))

        with capturedLogs() as events:
            held.around(keep_both)
        self.assertEqual(ran, [2])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(any("frames left" in e.get("log_format", "") for e in events))

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


class PauseTests(unittest.TestCase):
    """The framing is a push producer: paused, it delivers nothing, buffered or not."""

    def setUp(self) -> None:
        self.protocol = RecordingProtocol()
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def test_pausing_stops_delivery_mid_read_and_resuming_delivers_the_rest(self) -> None:
        class PausesOnSecond(RecordingProtocol):
            def plaintext_frame_received(self, body: bytes) -> None:
                super().plaintext_frame_received(body)
                if body == b"\x01two":
                    self.pauseProducing()

        protocol = PausesOnSecond()
        transport = StringTransport()
        protocol.makeConnection(transport)
        stream = b"".join(frame(b"\x01" + word) for word in (b"one", b"two", b"three"))
        four = frame(b"\x01four")
        protocol.dataReceived(stream + HEARTBEAT_FRAME + four[:6])
        self.assertEqual(protocol.plaintexts, [b"\x01one", b"\x01two"])
        self.assertEqual(transport.producerState, "paused")
        # More bytes while paused are kept, not delivered.
        protocol.dataReceived(four[6:] + frame(b"\x01fi"))
        self.assertEqual(protocol.plaintexts, [b"\x01one", b"\x01two"])
        self.assertEqual(protocol.heartbeats, 0)
        protocol.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(
            protocol.plaintexts, [b"\x01one", b"\x01two", b"\x01three", b"\x01four", b"\x01fi"]
        )
        self.assertEqual(protocol.heartbeats, 1)
        # An incomplete frame waits for its end, as before the pause.
        protocol.dataReceived(frame(b"\x01five")[:5])
        self.assertEqual(protocol.plaintexts[-1], b"\x01fi")
        protocol.dataReceived(frame(b"\x01five")[5:])
        self.assertEqual(protocol.plaintexts[-1], b"\x01five")

    def test_bytes_arriving_while_paused_wait_for_resume(self) -> None:
        self.protocol.pauseProducing()
        self.protocol.dataReceived(frame(b"\x01one") + frame(b"\x01two")[:-1])
        self.protocol.dataReceived(b"o" + HEARTBEAT_FRAME)
        self.assertEqual((self.protocol.plaintexts, self.protocol.heartbeats), ([], 0))
        self.assertEqual(self.protocol.activity, 0)
        self.protocol.resumeProducing()
        self.assertEqual(self.protocol.plaintexts, [b"\x01one", b"\x01two"])
        self.assertEqual(self.protocol.heartbeats, 1)
        self.assertEqual(self.protocol._unprocessed, b"")

    def test_pause_and_resume_inside_a_frame_handler_delivers_each_frame_once(self) -> None:
        class Blinks(RecordingProtocol):
            def plaintext_frame_received(self, body: bytes) -> None:
                super().plaintext_frame_received(body)
                self.pauseProducing()
                self.resumeProducing()

        protocol = Blinks()
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(b"".join(frame(b"\x01%d" % n) for n in range(4)))
        self.assertEqual(protocol.plaintexts, [b"\x01%d" % n for n in range(4)])

    def test_resuming_a_rejected_connection_delivers_nothing(self) -> None:
        sealer, opener = ciphers(SUITE_CHACHA, "node")
        self.protocol.start_encryption(sealer, opener)
        self.protocol.dataReceived(frame(b"not sealed") + HEARTBEAT_FRAME)
        self.assertTrue(self.transport.disconnecting)
        self.transport.disconnecting = False  # so resumeProducing may reach the transport
        self.protocol.resumeProducing()
        self.assertEqual(self.protocol.heartbeats, 0)

    def test_frames_a_resume_produces_leave_in_one_write(self) -> None:
        protocol = Relay()
        protocol.peer = RecordingProtocol()
        protocol.peer.makeConnection(StringTransport())
        writes = connect_recording_writes(protocol)
        protocol.start_encryption(*ciphers(SUITE_CHACHA, "node"))
        protocol.peer.start_encryption(*ciphers(SUITE_CHACHA, "node"))
        sealer, _ = ciphers(SUITE_CHACHA, "client")
        protocol.pauseProducing()
        protocol.dataReceived(b"".join(frame(sealer.seal(message_body(str(n)))) for n in range(2)))
        self.assertEqual(writes, [])
        protocol.resumeProducing()
        self.assertEqual(len(writes), 1)
        self.assertEqual(len(split_frames(writes[0])[0]), 4)

    def test_stop_producing_closes_and_delivers_nothing_more(self) -> None:
        self.protocol.stopProducing()
        self.protocol.dataReceived(frame(b"\x01late"))
        self.assertEqual(self.protocol.plaintexts, [])
        self.assertEqual(self.transport.producerState, "stopped")
