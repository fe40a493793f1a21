"""The IM connection over WebSocket messages (cim.protocols.websocket), with fakes.

No autobahn here: a fake channel stands for autobahn's protocol, recording the
messages, pongs and closes the adapter asks for, with a StringTransport as the TCP
stream under it. The whole-node tests put the node's own ``ImServerProtocol`` and
the client library's ``ImClientProtocol`` on two adapters joined by a pump, beside a
client on (fake) TCP: the same protocol objects, the other transport.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from cim.client.connection import ImClientProtocol, LoginRefused
from cim.config import KNOWN_SUITES
from cim.interfaces import NodeInfo
from cim.metrics import NodeMetrics
from cim.protocols import cim_pb2
from cim.protocols.handshake import ClientHandshake, HandshakeRefused
from cim.protocols.im import ConnectionState, ImServerProtocol
from cim.protocols.websocket import CLOSE_POLICY, CLOSE_UNSUPPORTED, MessageTransport
from tests.fakes.node import NodeHarness, RecordingEvents
from tests.unit.test_wire import MAX_FRAME, RecordingProtocol

PEER = IPv4Address("TCP", "10.0.0.7", 50000)
HOST = IPv4Address("TCP", "127.0.0.1", 9001)


class FakeChannel:
    """What MessageTransport asks of autobahn's protocol, recorded."""

    def __init__(self, peer: IPv4Address = PEER) -> None:
        self.transport = StringTransport(hostAddress=HOST, peerAddress=peer)
        self.sent: list[bytes] = []
        self.text_sent: list[bytes] = []
        self.closes: list[tuple[int, str]] = []
        self.pongs: list[bytes | None] = []
        self.dropped: list[bool] = []
        self.open = True

    def sending_allowed(self) -> bool:
        return self.open

    def sendMessage(self, payload: bytes, isBinary: bool = False) -> None:
        (self.sent if isBinary else self.text_sent).append(payload)

    def close_with(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))

    def sendPong(self, payload: bytes | None = None) -> None:
        self.pongs.append(payload)

    def dropConnection(self, abort: bool = False) -> None:
        self.dropped.append(abort)


def prefixed(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


class AdapterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.channel = FakeChannel()
        self.metrics = NodeMetrics()
        self.protocol = RecordingProtocol(self.metrics)
        self.frames = MessageTransport(self.channel, self.clock, max_pings_per_second=5)
        self.frames.attach(self.protocol)

    def test_one_binary_message_is_one_frame(self) -> None:
        self.frames.message_received(b"\x01hello", True)
        self.frames.message_received(b"\x01again", True)
        self.assertEqual(self.protocol.plaintexts, [b"\x01hello", b"\x01again"])

    def test_an_empty_message_is_the_heartbeat(self) -> None:
        self.frames.message_received(b"", True)
        self.assertEqual(self.protocol.heartbeats, 1)
        self.assertEqual(self.protocol.plaintexts, [])

    def test_each_frame_written_leaves_as_one_message_without_its_prefix(self) -> None:
        # What FrameProtocol writes: whole frames, several at once after a read.
        self.protocol.send_plaintext(b"\x02one")
        self.protocol.send_heartbeat()
        self.frames.write(prefixed(b"\x03two") + prefixed(b"") + prefixed(b"\x04three"))
        self.assertEqual(self.channel.sent, [b"\x02one", b"", b"\x03two", b"", b"\x04three"])
        self.assertEqual(self.channel.text_sent, [])
        self.assertEqual(self.channel.transport.value(), b"", "nothing bypasses the framing")

    def test_a_text_message_closes_with_1003_and_nothing_after_it_is_read(self) -> None:
        self.frames.message_received(b"\x01hello", False)
        self.frames.message_received(b"\x01after", True)
        self.assertEqual(self.protocol.plaintexts, [])
        self.assertEqual(
            self.channel.closes, [(CLOSE_UNSUPPORTED, "cim frames are binary messages")]
        )
        self.assertEqual(self.channel.dropped, [])
        self.assertEqual(self.metrics.frames_rejected["text message"], 1)

    def test_a_message_over_the_frame_size_drops_the_connection(self) -> None:
        self.frames.message_received(b"\x01" + b"x" * MAX_FRAME, True)
        self.frames.message_received(b"\x01after", True)
        self.assertEqual(self.protocol.plaintexts, [])
        self.assertEqual(self.channel.dropped, [True])
        self.assertEqual(self.metrics.frames_rejected["oversized"], 1)

    def test_a_message_of_exactly_the_frame_size_passes(self) -> None:
        body = b"\x01" + b"x" * (MAX_FRAME - 1)
        self.frames.message_received(body, True)
        self.assertEqual(self.protocol.plaintexts, [body])

    def test_pings_are_answered_up_to_the_rate_then_the_connection_closes(self) -> None:
        for _ in range(5):
            self.frames.ping_received(b"p")
        self.assertEqual(len(self.channel.pongs), 5)
        self.assertEqual(self.channel.closes, [])
        self.frames.ping_received(b"p")
        self.assertEqual(len(self.channel.pongs), 5)
        self.assertEqual(self.channel.closes, [(CLOSE_POLICY, "too many pings")])
        self.assertEqual(self.metrics.frames_rejected["ping flood"], 1)

    def test_the_rate_is_per_second(self) -> None:
        for _ in range(20):
            self.frames.ping_received(b"p")
            self.frames.message_received(b"", True)
            self.clock.advance(0.5)
        self.assertEqual(self.channel.closes, [])
        self.assertEqual(len(self.channel.pongs), 20)
        self.assertEqual(self.protocol.heartbeats, 20)

    def test_heartbeats_count_as_pings(self) -> None:
        for _ in range(6):
            self.frames.message_received(b"", True)
        self.assertEqual(self.protocol.heartbeats, 5)
        self.assertEqual(self.channel.closes, [(CLOSE_POLICY, "too many pings")])

    def test_pausing_stops_the_stream_underneath_and_holds_messages(self) -> None:
        self.protocol.pauseProducing()
        self.assertEqual(self.channel.transport.producerState, "paused")
        # Messages autobahn had already read arrive anyway: they wait in the framing.
        self.frames.message_received(b"\x01held", True)
        self.assertEqual(self.protocol.plaintexts, [])
        self.protocol.resumeProducing()
        self.assertEqual(self.channel.transport.producerState, "producing")
        self.assertEqual(self.protocol.plaintexts, [b"\x01held"])

    def test_the_drain_watch_is_registered_on_the_stream_underneath(self) -> None:
        counted: list[tuple[str, int]] = []

        class Accounting:
            counting = True

            def held(self, size: int) -> None:
                counted.append(("held", size))

            def released(self, size: int) -> None:
                counted.append(("released", size))

            def queued(self, size: int) -> None:
                counted.append(("queued", size))

            def drained(self) -> None:
                counted.append(("drained", 0))

        self.protocol.outbound = Accounting()
        self.protocol.send_plaintext(b"\x02one")
        self.assertEqual(counted, [("queued", 8)])
        producer: Any = self.channel.transport.producer
        self.assertIsNotNone(producer, "the stream underneath says when it drained")
        producer.resumeProducing()  # what Twisted does once its buffer is empty
        self.assertEqual(counted[-1], ("drained", 0))
        self.assertIsNone(self.channel.transport.producer)

    def test_lose_connection_closes_the_websocket_cleanly_once(self) -> None:
        self.protocol.lose_connection()
        self.protocol.lose_connection()
        self.assertEqual(self.channel.closes, [(1000, "")])
        self.frames.message_received(b"\x01late", True)
        self.assertEqual(self.protocol.plaintexts, [])

    def test_nothing_is_sent_once_the_websocket_is_closing(self) -> None:
        # The peer's close frame, or autobahn failing the connection (1009): the
        # connection is not lost yet, but no message may follow.
        self.channel.open = False
        self.protocol.send_plaintext(b"\x02late")
        self.protocol.send_heartbeat()
        self.assertEqual(self.channel.sent, [])

    def test_the_peer_is_the_address_under_the_websocket(self) -> None:
        self.assertEqual(self.frames.getPeer(), PEER)
        self.assertEqual(self.frames.getHost(), HOST)

    def test_connection_lost_reaches_the_protocol_once(self) -> None:
        lost: list[Failure] = []
        self.protocol.connectionLost = lost.append  # type: ignore[method-assign]
        self.frames.connection_lost(Failure(ConnectionDone()))
        self.frames.connection_lost(Failure(ConnectionDone()))
        self.assertEqual(len(lost), 1)
        self.frames.write(prefixed(b"\x02late"))
        self.assertEqual(self.channel.sent, [])


class WebSocketClient:
    """The client library's connection on an adapter, joined to a node's by a pump."""

    def __init__(
        self, node: NodeHarness, user: str, auto_ack: bool = False, node_id: str | None = None
    ) -> None:
        token, _ = node.login(user, "browser", node_id)
        self.events = RecordingEvents(auto_ack=auto_ack)
        self.protocol = ImClientProtocol(
            node.clock,
            self.events,
            node.key.public_der,
            token,
            "browser",
            "chacha20-poly1305",
            KNOWN_SUITES,
        )
        self.events.protocol = self.protocol
        self.server_channel = FakeChannel()
        self.client_channel = FakeChannel(HOST)
        self.server_side = MessageTransport(self.server_channel, node.clock, 5)
        self.client_side = MessageTransport(self.client_channel, node.clock, 5)
        self.server: ImServerProtocol = node.factory.buildProtocol(PEER)
        self.server_side.attach(self.server)
        self.client_side.attach(self.protocol)
        self.flush()

    def flush(self) -> None:
        for _ in range(100):
            moved = False
            for source, sink in (
                (self.client_channel, self.server_side),
                (self.server_channel, self.client_side),
            ):
                while source.sent:
                    sink.message_received(source.sent.pop(0), True)
                    moved = True
            if not moved:
                return


class SameSessionTests(SynchronousTestCase):
    """A browser on the gateway is the same kind of session as a phone on TCP."""

    def test_the_handshake_over_messages_establishes_a_session(self) -> None:
        node = NodeHarness()
        alice = WebSocketClient(node, "alice")
        self.assertIs(alice.server.state, ConnectionState.ESTABLISHED)
        self.assertEqual(alice.events.closed, [])
        self.assertEqual(node.metrics.handshakes_ok, 1)

    def test_six_packets_from_websocket_to_tcp(self) -> None:
        node = NodeHarness()
        alice = WebSocketClient(node, "alice")
        bob = node.connect("bob", auto_ack=True)
        alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="bob", text="hi", client_seq=3))
        alice.flush()
        bob.flush()
        alice.flush()
        self.assertEqual([kind for kind, _ in alice.events.frames], [cim_pb2.MSG_A, cim_pb2.ACK_N])
        self.assertEqual([kind for kind, _ in bob.events.frames], [cim_pb2.MSG_N, cim_pb2.ACK_A])
        msg_n = bob.events.of_type(cim_pb2.MSG_N)[0]
        self.assertEqual(
            (getattr(msg_n, "from"), msg_n.device, msg_n.text), ("alice", "browser", "hi")
        )
        self.assertEqual(alice.events.of_type(cim_pb2.ACK_N)[0].status, cim_pb2.DELIVERED)

    def test_six_packets_from_tcp_to_websocket(self) -> None:
        node = NodeHarness()
        alice = WebSocketClient(node, "alice", auto_ack=True)
        bob = node.connect("bob")
        bob.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="alice", text="yo", client_seq=9))
        bob.flush()
        alice.flush()
        bob.flush()
        self.assertEqual([kind for kind, _ in bob.events.frames], [cim_pb2.MSG_A, cim_pb2.ACK_N])
        self.assertEqual([kind for kind, _ in alice.events.frames], [cim_pb2.MSG_N, cim_pb2.ACK_A])
        self.assertEqual(bob.events.of_type(cim_pb2.ACK_N)[0].status, cim_pb2.DELIVERED)

    def test_a_bad_frame_after_the_handshake_ends_only_that_connection(self) -> None:
        node = NodeHarness()
        alice = WebSocketClient(node, "alice")
        bob = node.connect("bob", auto_ack=True)
        # Not sealed with the session's cipher: not authentic.
        alice.server_side.message_received(b"\x01forged", True)
        self.assertEqual(alice.server_channel.dropped, [True])
        self.assertEqual(node.metrics.frames_rejected["authentication"], 1)
        self.assertIs(bob.server.state, ConnectionState.ESTABLISHED)

    def test_connections_per_address_count_both_transports(self) -> None:
        node = NodeHarness("max_connections_per_address = 1")
        node.connect("bob", host=PEER.host)
        alice = WebSocketClient(node, "alice")
        self.assertIsNot(alice.server.state, ConnectionState.ESTABLISHED)
        self.assertEqual(node.metrics.connections_refused["per_address_limit"], 1)
        self.assertEqual(alice.server_channel.closes, [(1000, "")])
        self.failureResultOf(alice.protocol.logged_in, HandshakeRefused)

    def test_a_browser_sent_to_the_wrong_node_is_told_its_websocket_url(self) -> None:
        node = NodeHarness()
        here = node.registry.live_nodes()[0]
        there = NodeInfo("node2", "10.0.0.2", 9000, b"key", "wss://node2.example/ws")
        node.registry.live_nodes = lambda: [here, there]  # type: ignore[method-assign]
        alice = WebSocketClient(node, "alice", node_id="node2")
        refusal = self.failureResultOf(alice.protocol.logged_in, LoginRefused).value
        assert isinstance(refusal, LoginRefused) and refusal.node is not None
        self.assertEqual(refusal.status, cim_pb2.LoginResult.WRONG_NODE)
        self.assertEqual(
            (refusal.node.host, refusal.node.port, refusal.node.ws_url),
            ("10.0.0.2", 9000, "wss://node2.example/ws"),
        )

    def test_the_heartbeat_timeout_drops_a_silent_browser(self) -> None:
        node = NodeHarness()
        alice = WebSocketClient(node, "alice")
        # The page froze: nothing it writes leaves any more.
        alice.client_channel.sendMessage = lambda payload, isBinary=False: None  # type: ignore[method-assign]
        node.clock.advance(node.config.effective_heartbeat_timeout + 2)
        self.assertEqual(alice.server_channel.dropped, [True])
        self.assertEqual(node.metrics.heartbeat_timeouts, 1)


def upgrade_request(origin: str | None, *extra: str) -> bytes:
    lines = [
        "GET / HTTP/1.1",
        "Host: 127.0.0.1:9001",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    lines.extend(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (zero key), as a browser sends."""
    length = len(payload)
    if length < 126:
        header = struct.pack(">BB", 0x80 | opcode, 0x80 | length)
    else:
        header = struct.pack(">BBH", 0x80 | opcode, 0x80 | 126, length)
    return header + b"\x00\x00\x00\x00" + payload


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    frames = []
    while data:
        opcode, length, offset = data[0] & 0x0F, data[1] & 0x7F, 2
        if length == 126:
            (length,) = struct.unpack_from(">H", data, 2)
            offset = 4
        frames.append((opcode, data[offset : offset + length]))
        data = data[offset + length :]
    return frames


class TcpStream(StringTransport):
    """A StringTransport that, like Twisted's TCP transport, lets a consumer without a
    producer unregister (autobahn does it on every close)."""

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None


class GatewayProtocolTests(SynchronousTestCase):
    """autobahn's protocol in front of the node's, on a StringTransport and a fake clock."""

    PAGE = "https://chat.example.com"

    def setUp(self) -> None:
        from cim.config import WsConfig
        from cim.protocols.gateway import GatewayFactory

        self.node = NodeHarness("max_connections_per_address = 2")
        config = WsConfig(enabled=True, allowed_origins=(self.PAGE,))
        self.factory = GatewayFactory(config, self.node.factory, self.node.clock)

    def connect(self, origin: str | None) -> tuple[Any, StringTransport]:
        protocol = self.factory.buildProtocol(PEER)
        transport = TcpStream(hostAddress=HOST, peerAddress=PEER)
        protocol.makeConnection(transport)
        protocol.dataReceived(upgrade_request(origin))
        return protocol, transport

    def test_a_page_of_another_origin_is_refused_at_the_upgrade(self) -> None:
        _, transport = self.connect("https://evil.example")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 403"), transport.value())
        self.assertEqual(self.node.metrics.connections_refused["origin"], 1)
        self.assertEqual(self.node.factory.protocols, set())

    def test_the_handshake_through_autobahn_reaches_the_node(self) -> None:
        token, _ = self.node.login("alice", "browser")
        protocol, transport = self.connect(self.PAGE)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 101"), transport.value())
        transport.clear()
        handshake = ClientHandshake(
            self.node.key.public_der,
            token,
            "browser",
            "chacha20-poly1305",
            KNOWN_SUITES,
            int(self.node.clock.seconds() * 1000),
        )
        protocol.dataReceived(client_frame(0x2, handshake.hello_body()))
        [(opcode, reply)] = server_frames(transport.value())
        self.assertEqual(opcode, 0x2)
        _sealer, _opener, first = handshake.finish(reply)
        result = cim_pb2.LoginResult.FromString(first[1:])
        self.assertEqual((result.status, result.user), (cim_pb2.LoginResult.OK, "alice"))
        [server] = self.node.factory.protocols
        self.assertIs(server.state, ConnectionState.ESTABLISHED)
        self.assertEqual(self.node.metrics.websocket_open, 1)
        # A text message: the close frame with 1003, then nothing more is read.
        transport.clear()
        protocol.dataReceived(client_frame(0x1, b"hi"))
        [(opcode, payload)] = server_frames(transport.value())
        self.assertEqual((opcode, payload[:2]), (0x8, struct.pack(">H", 1003)))
        # Until the TCP connection is gone the session is still in the rooms: what
        # they deliver to it is dropped, and the room (someone else's send) goes on.
        transport.clear()
        server.deliver(cim_pb2.MSG_N, cim_pb2.Message(to="alice", text="late"))
        self.assertEqual(transport.value(), b"")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.node.metrics.websocket_open, 0)
        self.assertEqual(self.node.factory.protocols, set())

    def test_compression_offered_by_a_browser_is_declined_and_the_upgrade_goes_on(self) -> None:
        # Browsers and Node's ws offer permessage-deflate: sealed frames do not compress,
        # and a compressed message could inflate past the frame limit.
        protocol = self.factory.buildProtocol(PEER)
        transport = TcpStream(hostAddress=HOST, peerAddress=PEER)
        protocol.makeConnection(transport)
        offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"
        protocol.dataReceived(upgrade_request(self.PAGE, offer))
        answer = transport.value()
        self.assertTrue(answer.startswith(b"HTTP/1.1 101"), answer)
        self.assertNotIn(b"permessage-deflate", answer)

    def test_a_request_without_origin_is_not_a_page_and_goes_on(self) -> None:
        _, transport = self.connect(None)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 101"), transport.value())
        self.assertEqual(len(self.node.factory.protocols), 1)

    def test_connections_still_upgrading_count_toward_the_per_address_limit(self) -> None:
        waiting = []
        for _ in range(3):
            protocol = self.factory.buildProtocol(PEER)
            transport = TcpStream(hostAddress=HOST, peerAddress=PEER)
            protocol.makeConnection(transport)
            waiting.append(transport)
        self.assertEqual([t.disconnecting for t in waiting], [False, False, True])
        self.assertEqual(self.node.metrics.connections_refused["per_address_limit"], 1)

    def test_an_endless_upgrade_request_is_cut(self) -> None:
        protocol = self.factory.buildProtocol(PEER)
        transport = TcpStream(hostAddress=HOST, peerAddress=PEER)
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET / HTTP/1.1\r\n")
        for _ in range(20):
            protocol.dataReceived(b"X-Padding: " + b"a" * 1000 + b"\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.node.metrics.connections_refused["upgrade_too_large"], 1)

    def test_the_upgrade_has_the_handshake_deadline(self) -> None:
        protocol = self.factory.buildProtocol(PEER)
        transport = TcpStream(hostAddress=HOST, peerAddress=PEER)
        protocol.makeConnection(transport)
        self.node.clock.advance(self.node.config.handshake_timeout - 1)
        self.assertFalse(transport.disconnecting)
        self.node.clock.advance(2)
        self.assertTrue(transport.disconnecting or transport.disconnected)
