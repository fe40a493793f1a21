"""The client library's first connection has a deadline, and an application can stop
taking messages without acknowledging those it did not take (issue #21)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from cim.client.router import LoginTicket, RouterError
from cim.client.session import SessionFailed, SessionRefused, Unreachable
from cim.protocols import cim_pb2
from tests.fakes.node import NodeHarness
from tests.unit.test_client_session import FakeRouter, incoming, make_client, result_of, settle
from tests.unit.test_offline_delivery import OfflineHarness, message_from


class SilentRouter(FakeRouter):
    """A router whose address swallows the request: the login never answers."""

    def __init__(self, node: NodeHarness) -> None:
        super().__init__(node)
        self.pending: list[Deferred[LoginTicket]] = []
        self.cancelled = 0

    def login(self, user: str, password: str, device: str) -> Deferred[LoginTicket]:  # type: ignore[override]
        def cancelled(d: Deferred[LoginTicket]) -> None:
            self.cancelled += 1

        waiting: Deferred[LoginTicket] = Deferred(cancelled)
        self.pending.append(waiting)
        return waiting


class FirstContactTests(SynchronousTestCase):
    def test_no_router_fails_by_the_deadline_naming_it(self) -> None:
        node = NodeHarness()
        client, router, network = make_client(node)
        router.down = True
        started = client.start(deadline=10)
        settle(node)
        for _ in range(9):
            settle(node, 1.0)
            self.assertNoResult(started)
        settle(node, 1.0)
        failure = self.failureResultOf(started, Unreachable)
        self.assertEqual(
            str(failure.value), "cannot reach the router (gave up after 10 s)", failure.value
        )
        self.assertEqual(client.state, "stopped")
        self.assertEqual(network.attempts, [])
        # No retry after giving up.
        calls = len(node.clock.getDelayedCalls())
        settle(node, 60.0)
        self.assertEqual(router.logins, 0)
        self.assertLessEqual(len(node.clock.getDelayedCalls()), calls)

    def test_no_node_fails_by_the_deadline_naming_it(self) -> None:
        node = NodeHarness()
        client, _, network = make_client(node)
        network.down = True
        started = client.start(deadline=5)
        settle(node)
        for _ in range(5):
            settle(node, 1.0)
        failure = self.failureResultOf(started, Unreachable)
        self.assertIn("cannot reach the node node1 at 127.0.0.1:9000", str(failure.value))
        self.assertIn("gave up after 5 s", str(failure.value))
        self.assertGreater(len(network.attempts), 1)  # retried within the deadline

    def test_a_router_that_never_answers_is_cancelled_at_the_deadline(self) -> None:
        node = NodeHarness()
        router = SilentRouter(node)
        client, _, _ = make_client(node, router=router)
        started = client.start(deadline=3)
        settle(node, 3.0)
        failure = self.failureResultOf(started, Unreachable)
        self.assertEqual(
            str(failure.value), "cannot reach the router: no answer (gave up after 3 s)"
        )
        self.assertEqual(router.cancelled, 1)

    def test_a_router_error_is_reported_as_its_answer(self) -> None:
        node = NodeHarness()
        client, router, _ = make_client(node)
        router.refuse = RouterError(503, "unavailable", "no IM node is available")
        started = client.start(deadline=2)
        settle(node, 2.0)
        failure = self.failureResultOf(started, Unreachable)
        self.assertEqual(
            str(failure.value),
            "the router answered: no IM node is available (unavailable, HTTP 503) "
            "(gave up after 2 s)",
        )

    def test_a_refusal_is_not_unreachable(self) -> None:
        node = NodeHarness()
        client, router, _ = make_client(node)
        router.refuse = RouterError(401, "invalid_credentials", "wrong user or password")
        started = client.start(deadline=10)
        settle(node)
        failure = self.failureResultOf(started, SessionRefused)
        self.assertIsInstance(failure.value, SessionFailed)
        self.assertIn("invalid_credentials", str(failure.value))

    def test_online_in_time_cancels_the_deadline(self) -> None:
        node = NodeHarness()
        client, _, network = make_client(node)
        network.down = True
        started = client.start(deadline=10)
        settle(node, 2.0)
        network.down = False
        settle(node, 6.0)
        self.assertIsNone(result_of(started))
        self.assertEqual(client.state, "online")
        settle(node, 10.0)
        self.assertEqual(client.state, "online")


class StopReceivingTests(SynchronousTestCase):
    def test_stored_messages_past_the_ones_taken_stay_stored(self) -> None:
        h = OfflineHarness(self)
        h.store([message_from("alice", "bob", 700 + n, n + 1, str(n)) for n in range(3)])
        bob, _, _ = make_client(h.node, "bob")
        shown: list[str] = []

        def take_one(message: cim_pb2.Message) -> None:
            shown.append(message.text)
            bob.stop_receiving()

        bob.on_message = take_one
        bob.start()
        settle(h.node)
        self.successResultOf(Deferred.fromCoroutine(bob.stop()))
        settle(h.node)
        self.assertEqual(shown, ["0"])
        self.assertEqual(h.stored("bob"), 2)
        again, _, _ = make_client(h.node, "bob")
        later: list[str] = []
        again.on_message = lambda message: later.append(message.text)
        again.start()
        settle(h.node)
        self.assertEqual(later, ["1", "2"])
        self.assertEqual(h.stored("bob"), 0)

    def test_a_declined_message_is_not_acknowledged(self) -> None:
        h = OfflineHarness(self)
        h.store([message_from("alice", "bob", 800, 1, "x")])
        bob, _, _ = make_client(h.node, "bob")

        def decline(message: cim_pb2.Message) -> bool:
            bob.stop_receiving()
            return False

        bob.on_message = decline
        bob.start()
        settle(h.node)
        self.successResultOf(Deferred.fromCoroutine(bob.stop()))
        settle(h.node)
        self.assertEqual(h.stored("bob"), 1)

    def test_a_client_that_takes_nothing_does_not_pull(self) -> None:
        h = OfflineHarness(self)
        h.store([message_from("alice", "bob", 900, 1, "x")])
        bob, _, network = make_client(h.node, "bob")
        bob.on_message = lambda message: self.fail("handed over")
        bob.stop_receiving()
        bob.start()
        settle(h.node)
        self.assertEqual(bob.state, "online")
        self.assertEqual([t for _, t, _ in network.sent if t == cim_pb2.OFFLINE_R], [])
        self.successResultOf(Deferred.fromCoroutine(bob.stop()))
        settle(h.node)
        self.assertEqual(h.stored("bob"), 1)

    def test_held_messages_are_dropped_unacknowledged(self) -> None:
        node = NodeHarness()
        bob, _, _ = make_client(node, "bob", order_window=2.0)
        shown: list[Any] = []
        bob.on_message = shown.append
        bob.start()
        settle(node)
        sent: list[int] = []
        assert bob.protocol is not None
        original = bob.protocol.send

        def send(frame_type: int, message: Any) -> None:
            if frame_type == cim_pb2.ACK_R:
                sent.append(message.msg_id)
            original(frame_type, message)

        bob.protocol.send = send  # type: ignore[method-assign]
        bob.frame_received(cim_pb2.MSG_N, incoming(10, 1))
        bob.frame_received(cim_pb2.MSG_N, incoming(12, 3))  # after a gap: held
        self.assertEqual(bob.inbox.held, 1)
        bob.stop_receiving()
        bob.frame_received(cim_pb2.MSG_N, incoming(11, 2))
        settle(node, 5.0)
        self.successResultOf(Deferred.fromCoroutine(bob.stop()))
        self.assertEqual([m.id for m in shown], [10])
        self.assertEqual(sent, [10])
