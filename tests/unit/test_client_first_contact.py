"""The client library's first connection has a deadline, and an application can stop
taking messages without acknowledging (moving the cursor over) those it did not take
(issue #21, on timelines since #14)."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from cim.client.router import LoginTicket, RouterError
from cim.client.session import SessionFailed, SessionRefused, Unreachable
from cim.protocols import cim_pb2
from tests.fakes.node import NodeHarness
from tests.fakes.timeline_node import TimelineNode, session, texts
from tests.unit.test_client_session import FakeRouter, make_client, result_of, settle


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
    """What the application did not take stays unread: the cursor stays below it."""

    def unread(self, count: int) -> TimelineNode:
        node = TimelineNode("bob", page=10)
        for number in range(count):
            node.append("alice", str(number), peer="bob")
        return node

    def test_stored_messages_past_the_ones_taken_stay_stored(self) -> None:
        node = self.unread(3)
        bob, _, _ = session(node, ordered=True)
        shown: list[str] = []

        def take_one(message: cim_pb2.Message) -> None:
            shown.append(message.text)
            bob.stop_receiving()

        bob.on_message = take_one
        node.connect(bob)
        node.pump()
        self.successResultOf(Deferred.fromCoroutine(bob.stop()))
        self.assertEqual(shown, ["0"])
        self.assertEqual(node.cursors["d:alice:bob"], 1)
        again, _, later = session(node, ordered=True)
        node.connect(again)
        node.pump()
        self.assertEqual(texts(later), ["1", "2"])
        self.assertEqual(node.cursors["d:alice:bob"], 3)

    def test_a_declined_message_is_not_acknowledged(self) -> None:
        node = self.unread(1)
        bob, _, _ = session(node)

        def decline(message: cim_pb2.Message) -> bool:
            bob.stop_receiving()
            return False

        bob.on_message = decline
        node.connect(bob)
        node.pump()
        self.successResultOf(Deferred.fromCoroutine(bob.stop()))
        self.assertEqual(node.cursors["d:alice:bob"], 0)
        # The pull ends (OFFLINE_ACK_R) without a cursor, and no ack:R went.
        self.assertEqual([list(end.cursors) for end in node.of_type(cim_pb2.OFFLINE_ACK_R)], [[]])
        self.assertEqual(node.of_type(cim_pb2.ACK_R), [])

    def test_a_client_that_takes_nothing_does_not_pull(self) -> None:
        node = self.unread(1)
        bob, _, _ = session(node)
        bob.on_message = lambda message: self.fail("handed over")
        bob.stop_receiving()
        node.connect(bob)
        node.pump()
        self.assertEqual(bob.state, "online")
        self.assertEqual(node.sent, [])
        node.live(node.append("alice", "live", peer="bob"))
        self.assertEqual(node.sent, [])
        self.assertEqual(node.cursors["d:alice:bob"], 0)

    def test_held_messages_are_dropped_unacknowledged(self) -> None:
        node = self.unread(0)
        bob, _, shown = session(node)
        node.connect(bob)
        node.pump()
        one, two, three = (node.append("alice", str(n), peer="bob") for n in range(3))
        node.swallow = {cim_pb2.HISTORY_R}  # the gap's fill is slow
        node.live(one)
        node.live(three)  # after a gap: held
        self.assertEqual(bob.inbox.held(), 1)
        bob.stop_receiving()
        node.live(two)
        node.pump()
        self.successResultOf(Deferred.fromCoroutine(bob.stop()))
        self.assertEqual([m.id for m in shown], [one.id])
        self.assertEqual([m.msg_id for m in node.of_type(cim_pb2.ACK_R)], [one.id])
        self.assertEqual(node.cursors["d:alice:bob"], 1)
