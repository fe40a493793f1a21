"""Heartbeats by the app's state (issue #15, acceptance 6): APP_STATE_R moves the node's
idle timeout for the connection, and the client library's heartbeat follows.

A whole node on a fake clock (``NodeHarness``) with iosim clients; the bytes each side
wrote are recorded, so the heartbeat's size is read off the wire.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from cim.config import ConfigError, parse_config
from cim.protocols import cim_pb2
from cim.protocols.wire import HEARTBEAT_FRAME
from tests.fakes.node import ConnectedClient, NodeHarness
from tests.unit.test_client_session import make_client, settle
from tests.unit.test_im_node import logged_in


def tell(node: NodeHarness, client: ConnectedClient, state: int, request_id: int = 1) -> None:
    client.protocol.send(cim_pb2.APP_STATE_R, cim_pb2.AppStateR(state=state, request_id=request_id))
    client.flush()


def silence(client: ConnectedClient) -> None:
    """The device sends nothing at all any more (a phone whose app was frozen), and
    never gives up on the node itself: what closes the connection is the node."""
    client.protocol.send_heartbeat = lambda: None  # type: ignore[method-assign]
    client.protocol.set_heartbeat(client.protocol.heartbeat_interval, 100_000.0)


class NodeTimeoutTests(SynchronousTestCase):
    def test_background_device_is_not_cut_after_90_s_but_after_its_timeout(self) -> None:
        node = NodeHarness()  # the defaults: 30 s / 270 s, timeouts 90 s / 810 s
        alice = node.connect("alice")
        logged_in(alice)
        tell(node, alice, cim_pb2.APP_BACKGROUND)
        [answer] = alice.events.of_type(cim_pb2.APP_STATE_A)
        self.assertEqual(
            (answer.state, answer.heartbeat_interval_ms, answer.heartbeat_timeout_ms),
            (cim_pb2.APP_BACKGROUND, 270_000, 810_000),
        )
        self.assertEqual(answer.request_id, 1)
        silence(alice)
        node.clock.advance(90)
        alice.flush()
        node.clock.advance(30)  # 120 s of silence: well past the foreground's 90 s
        alice.flush()
        self.assertFalse(alice.server_transport.disconnecting)
        self.assertEqual(node.metrics.heartbeat_timeouts, 0)
        self.assertIs(node.im.sessions.session_for("alice"), alice.server)
        node.clock.advance(810 - 120 - 2)
        alice.flush()
        self.assertFalse(alice.server_transport.disconnecting)
        node.clock.advance(3)  # past 810 s (the sweeper checks every second)
        self.assertTrue(alice.server_transport.disconnecting)
        self.assertEqual(node.metrics.heartbeat_timeouts, 1)
        alice.flush()
        self.assertIsNone(node.im.sessions.session_for("alice"))

    def test_foreground_again_brings_the_short_timeout_back(self) -> None:
        node = NodeHarness()
        alice = node.connect("alice")
        logged_in(alice)
        tell(node, alice, cim_pb2.APP_BACKGROUND, 1)
        tell(node, alice, cim_pb2.APP_FOREGROUND, 2)
        answer = alice.events.of_type(cim_pb2.APP_STATE_A)[-1]
        self.assertEqual(
            (answer.heartbeat_interval_ms, answer.heartbeat_timeout_ms), (30_000, 90_000)
        )
        silence(alice)
        node.clock.advance(89)
        self.assertFalse(alice.server_transport.disconnecting)
        node.clock.advance(2)
        self.assertTrue(alice.server_transport.disconnecting)

    def test_configured_intervals_and_timeout_ratio(self) -> None:
        node = NodeHarness(
            "heartbeat_interval = 10\nheartbeat_timeout = 25\nbackground_heartbeat_interval = 60\n"
        )
        alice = node.connect("alice")
        logged_in(alice)
        tell(node, alice, cim_pb2.APP_BACKGROUND)
        [answer] = alice.events.of_type(cim_pb2.APP_STATE_A)
        # 2.5 foreground intervals may pass in silence, so 2.5 background ones too.
        self.assertEqual(
            (answer.heartbeat_interval_ms, answer.heartbeat_timeout_ms), (60_000, 150_000)
        )

    def test_unknown_state_is_refused_and_changes_nothing(self) -> None:
        node = NodeHarness()
        alice = node.connect("alice")
        logged_in(alice)
        tell(node, alice, cim_pb2.APP_STATE_UNSPECIFIED, 7)
        [error] = alice.events.of_type(cim_pb2.ERROR)
        self.assertEqual(
            (error.code, error.request_type, error.request_id),
            (cim_pb2.Error.BAD_REQUEST, cim_pb2.APP_STATE_R, 7),
        )
        self.assertEqual(alice.events.of_type(cim_pb2.APP_STATE_A), [])
        self.assertEqual(alice.server.heartbeat_timeout(), 90.0)

    def test_app_state_before_the_handshake_closes_the_connection(self) -> None:
        """Only an established connection has the frame in its allow-list."""
        node = NodeHarness()
        server = node.factory.buildProtocol(None)
        self.assertNotIn(cim_pb2.APP_STATE_R, server.inbound)
        self.assertIn(cim_pb2.APP_STATE_R, node.factory.inbound)


class WireTests(SynchronousTestCase):
    def test_background_heartbeat_is_at_most_10_bytes_and_paced_by_the_state(self) -> None:
        node = NodeHarness()
        alice = node.connect("alice")
        logged_in(alice)
        tell(node, alice, cim_pb2.APP_BACKGROUND)
        # The client's connection took the node's pace from the answer...
        alice.protocol.set_heartbeat(270.0, 810.0)
        before = len(alice.recorded)
        for _ in range(26):  # 260 s: no heartbeat at 30, 60, ... s any more
            node.clock.advance(10)
            alice.flush()
        self.assertEqual(alice.recorded[before:], [])
        node.clock.advance(11)
        alice.flush()
        sent = alice.recorded[before:]
        # The client's heartbeat and the node's echo, each the 4-byte empty frame.
        self.assertEqual(sent, [HEARTBEAT_FRAME, HEARTBEAT_FRAME])
        self.assertTrue(all(len(chunk) <= 10 for chunk in sent))
        self.assertFalse(alice.server_transport.disconnecting)


class ClientLibraryTests(SynchronousTestCase):
    def test_session_tells_the_state_and_its_heartbeat_follows(self) -> None:
        node = NodeHarness()
        client, _router, network = make_client(node)
        client.start()
        settle(node)
        answers: list[object] = []
        client.set_app_state("background").addBoth(answers.append)
        settle(node)
        [answer] = answers
        assert isinstance(answer, cim_pb2.AppStateA)
        protocol = client.protocol
        assert protocol is not None
        self.assertEqual((protocol.heartbeat_interval, protocol.heartbeat_timeout), (270.0, 810.0))
        server = node.im.sessions.session_for("alice")
        self.assertTrue(server.background)  # type: ignore[union-attr]
        client.set_app_state("foreground")
        settle(node)
        self.assertEqual((protocol.heartbeat_interval, protocol.heartbeat_timeout), (30.0, 90.0))
        self.assertEqual([frame for _, frame, _ in network.sent].count(cim_pb2.APP_STATE_R), 2)

    def test_state_set_offline_is_told_on_the_next_connection(self) -> None:
        node = NodeHarness()
        client, _router, network = make_client(node)
        self.assertIsNone(self.successResultOf(client.set_app_state("background")))
        client.start()
        settle(node)
        settle(node)
        self.assertIn(cim_pb2.APP_STATE_R, [frame for _, frame, _ in network.sent])
        protocol = client.protocol
        assert protocol is not None
        self.assertEqual(protocol.heartbeat_interval, 270.0)
        self.assertRaises(ValueError, client.set_app_state, "asleep")


class ConfigTests(SynchronousTestCase):
    def test_defaults_and_validation(self) -> None:
        im = parse_config("[node]\nid = n\n").im
        self.assertEqual(
            (im.background_heartbeat_interval, im.background_heartbeat_timeout), (270.0, 810.0)
        )
        with self.assertRaises(ConfigError) as caught:
            parse_config(
                "[node]\nid = n\n[im]\nheartbeat_interval = 60\n"
                "background_heartbeat_interval = 30\n"
            )
        self.assertEqual(caught.exception.key, "background_heartbeat_interval")
        with self.assertRaises(ConfigError):
            parse_config("[node]\nid = n\n[im]\nbackground_heartbeat_interval = 2h\n")
