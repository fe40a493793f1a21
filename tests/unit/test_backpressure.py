"""Outbound backpressure (issue 16, acceptance 2): the budget of each connection, the
live-copy decision, the cut of a slow reader, pausing the heaviest senders, and the
bound on a stop. Fake time and fake transports only (cim.protocols.outbound)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from cim.protocols import cim_pb2
from cim.protocols.outbound import (
    BACKLOG_EVERY,
    HEAVY_SENDER_RATE,
    NodeQueue,
    OutboundBudget,
    OutboundRules,
)
from cim.protocols.timeouts import NEVER
from cim.services.stopping import BoundedStop
from tests.fakes.node import ConnectedClient, NodeHarness
from tests.unit.test_delivery import FakeGroups
from tests.unit.test_wire import RecordingProtocol, _Socket


class Recorder:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


class Owner:
    """What a budget tells its connection, counted."""

    def __init__(self) -> None:
        self.cut = Recorder()
        self.notice = Recorder()
        self.behind_calls: list[bool] = []

    def cut_slow_reader(self) -> None:
        self.cut()

    def pull_notice(self) -> None:
        self.notice()

    def behind(self, over: bool) -> None:
        self.behind_calls.append(over)


class FakeSender:
    """A connection as the node queue sees it."""

    def __init__(self, queue: NodeQueue, clock: Clock) -> None:
        self.outbound = OutboundBudget(OutboundRules(1 << 20, 30.0, clock, queue), Owner())
        self.paused = 0
        self.resumed = 0

    def pause_reading(self) -> None:
        self.paused += 1

    def resume_reading(self) -> None:
        self.resumed += 1


class OutboundBudgetTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.queue = NodeQueue(self.clock, 1 << 30, lambda: [])
        self.owner = Owner()
        self.cut = self.owner.cut
        self.notice = self.owner.notice
        self.budget = OutboundBudget(OutboundRules(1000, 5.0, self.clock, self.queue), self.owner)

    def test_under_its_budget_a_receiver_takes_live_copies(self) -> None:
        self.budget.queued(999)
        self.assertTrue(self.budget.may_take_live_copy())
        self.assertFalse(self.budget.over_budget)
        self.assertEqual(self.queue.total, 999)

    def test_over_it_copies_are_refused_and_a_notice_to_pull_follows_the_drain(self) -> None:
        self.budget.queued(1000)
        self.assertFalse(self.budget.may_take_live_copy())
        self.assertTrue(self.budget.hold_notice())  # a notice would queue behind the rest
        self.assertEqual(self.notice.calls, 0)
        self.budget.drained()
        self.assertEqual((self.notice.calls, self.queue.total), (1, 0))
        self.assertTrue(self.budget.may_take_live_copy())
        self.assertFalse(self.budget.hold_notice())

    def test_no_notice_when_nothing_was_refused(self) -> None:
        self.budget.queued(1500)
        self.budget.drained()
        self.assertEqual(self.notice.calls, 0)

    def test_frames_held_by_a_read_count_until_they_leave(self) -> None:
        self.budget.held(600)
        self.budget.queued(500)
        self.assertFalse(self.budget.may_take_live_copy())
        self.budget.released(600)  # the socket took the held frames
        self.assertEqual((self.budget.queued_bytes, self.notice.calls), (500, 1))
        self.assertTrue(self.budget.may_take_live_copy())

    def test_over_budget_for_the_slow_reader_timeout_it_is_cut(self) -> None:
        self.budget.queued(2000)
        self.clock.advance(4.9)
        self.assertEqual(self.cut.calls, 0)
        self.clock.advance(0.1)
        self.assertEqual(self.cut.calls, 1)

    def test_a_drain_in_time_spares_it(self) -> None:
        self.budget.queued(2000)
        self.clock.advance(4.0)
        self.budget.drained()
        self.clock.advance(10.0)
        self.assertEqual(self.cut.calls, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.owner.behind_calls, [True, False])

    def test_a_closed_connection_gives_its_bytes_back_to_the_node(self) -> None:
        self.budget.held(100)
        self.budget.queued(2000)
        self.budget.closed()
        self.assertEqual((self.queue.total, self.clock.getDelayedCalls()), (0, []))


class FramingAccountingTests(SynchronousTestCase):
    """What the framing reports: bytes Twisted holds, until its consumer API says it
    sent them all (the pull producer's resumeProducing); never its private buffer."""

    def connected(self, sock: _Socket | None) -> tuple[RecordingProtocol, StringTransport]:
        protocol = RecordingProtocol()
        clock = Clock()
        protocol.outbound = OutboundBudget(
            OutboundRules(8, 5.0, clock, NodeQueue(clock, 1 << 30, lambda: [])), Owner()
        )
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol._socket = sock  # type: ignore[assignment]
        return protocol, transport

    def test_what_the_socket_takes_is_not_queued(self) -> None:
        protocol, _transport = self.connected(_Socket())
        protocol.send_plaintext(b"\x01frame")
        self.assertEqual(protocol.outbound.queued_bytes, 0)  # type: ignore[attr-defined]

    def test_the_rest_of_a_partial_send_is_queued_until_twisted_drains(self) -> None:
        protocol, transport = self.connected(_Socket(room=2))
        protocol.send_plaintext(b"\x01frame")
        budget: Any = protocol.outbound
        self.assertEqual(budget.queued_bytes, 4 + 6 - 2)
        self.assertFalse(budget.may_take_live_copy())
        transport.producer.resumeProducing()  # Twisted's buffer is empty
        self.assertEqual(budget.queued_bytes, 0)
        self.assertIsNone(transport.producer)

    def test_without_a_socket_of_ours_the_drain_is_watched_too(self) -> None:
        protocol, transport = self.connected(None)
        protocol.send_heartbeat()
        protocol.send_heartbeat()
        budget: Any = protocol.outbound
        self.assertEqual(budget.queued_bytes, 8)
        self.assertFalse(transport.streaming)
        transport.producer.resumeProducing()
        self.assertEqual((budget.queued_bytes, transport.producer), (0, None))


class NodeQueueTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.senders: list[FakeSender] = []
        self.queue = NodeQueue(self.clock, 1000, lambda: self.senders, max_pending=10)
        self.flooder = FakeSender(self.queue, self.clock)
        self.chatter = FakeSender(self.queue, self.clock)
        self.senders.extend([self.flooder, self.chatter])

    def over_after(self, seconds: float, flooded: int, chatted: int) -> None:
        """One over-bound moment starts the window; ``seconds`` later they sent so much."""
        self.queue.grew(1000)
        self.clock.advance(seconds)
        self.flooder.outbound.received += flooded
        self.chatter.outbound.received += chatted
        self.queue.grew(10)

    def test_the_heaviest_sender_is_paused_and_resumed_below_half(self) -> None:
        self.over_after(1.0, flooded=HEAVY_SENDER_RATE * 4, chatted=HEAVY_SENDER_RATE * 2)
        self.assertEqual((self.flooder.paused, self.chatter.paused), (1, 0))
        self.queue.shrank(500)  # 510 left: not below half yet
        self.assertEqual(self.flooder.resumed, 0)
        self.queue.shrank(20)
        self.assertEqual((self.flooder.resumed, self.queue.paused), (1, set()))

    def test_senders_are_paused_until_they_account_for_half(self) -> None:
        self.over_after(1.0, flooded=HEAVY_SENDER_RATE * 2, chatted=HEAVY_SENDER_RATE * 3)
        self.assertEqual((self.flooder.paused, self.chatter.paused), (0, 1))

    def test_a_light_sender_is_never_paused(self) -> None:
        self.over_after(1.0, flooded=HEAVY_SENDER_RATE * 4, chatted=HEAVY_SENDER_RATE // 2)
        self.clock.advance(1.0)
        self.queue.grew(100_000)  # the pressure grows a lot: decide again
        self.assertEqual((self.flooder.paused, self.chatter.paused), (1, 0))

    def test_no_further_pauses_while_the_pressure_does_not_grow(self) -> None:
        self.over_after(1.0, flooded=HEAVY_SENDER_RATE * 4, chatted=HEAVY_SENDER_RATE * 2)
        self.clock.advance(0.5)
        self.chatter.outbound.received += HEAVY_SENDER_RATE * 2
        self.queue.grew(10)
        self.assertEqual(self.chatter.paused, 0)

    def test_looks_back_off_while_nobody_is_heavy(self) -> None:
        looks = []

        def senders() -> list[FakeSender]:
            looks.append(self.clock.seconds())
            return self.senders

        queue = NodeQueue(self.clock, 1000, senders, max_pending=10)
        queue.database_backlog = lambda: 50  # a slow database, no flood
        for _ in range(300):
            queue.check()
            self.clock.advance(0.01)
        # Every 10 ms would be 300 looks over every connection; doubling to 1 s: 9.
        self.assertLess(len(looks), 12)
        self.assertEqual((self.flooder.paused, self.chatter.paused), (0, 0))

    def test_the_database_work_is_looked_at_once_in_every_few_checks(self) -> None:
        looks = []
        self.queue.database_backlog = lambda: looks.append(1) or 0
        for _ in range(3 * BACKLOG_EVERY):
            self.queue.check()
        self.assertEqual(len(looks), 3)

    def test_work_waiting_for_the_database_pauses_the_heaviest_too(self) -> None:
        waiting = [10]
        self.queue.database_backlog = lambda: waiting[0]
        self.queue.check()
        self.clock.advance(1.0)
        self.flooder.outbound.received += HEAVY_SENDER_RATE * 4
        waiting[0] = 11
        # Looked at once in BACKLOG_EVERY checks: the bound is seen within them.
        for _ in range(BACKLOG_EVERY - 1):
            self.queue.check()
        self.assertEqual(self.flooder.paused, 0)
        self.queue.check()
        self.assertEqual(self.flooder.paused, 1)
        waiting[0] = 5  # not below half
        self.clock.advance(self.queue._decision_interval)
        self.assertEqual(self.flooder.resumed, 0)
        waiting[0] = 4
        self.clock.advance(self.queue._decision_interval)
        self.assertEqual(self.flooder.resumed, 1)


class NodeBackpressureTests(SynchronousTestCase):
    """A whole node on a fake clock, on real timelines: bob never reads (his pump is not
    run). A live copy bob's budget refuses is skipped, never lost: the message is in
    his timeline already, and he is told to pull once his queue drains."""

    def node(self, extra: str, groups: Any = None) -> NodeHarness:
        return NodeHarness(config_extra=extra, users=("alice", "bob"), groups=groups)

    def established(self, node: NodeHarness, user: str) -> ConnectedClient:
        client = node.connect(user)
        client.flush()
        return client

    def send(self, alice: ConnectedClient, count: int, first: int = 1) -> None:
        for seq in range(first, first + count):
            alice.protocol.send(
                cim_pb2.MSG_R, cim_pb2.Message(to="bob", text="x" * 1000, client_seq=seq)
            )
        alice.flush()

    def unread_for_bob(self, node: NodeHarness) -> int:
        """Messages in bob's timelines past his phone's cursor: what his pull gets."""
        states = self.successResultOf(node.timelines.summary("bob", "phone"))
        return sum(state.unread for state in states)

    def test_over_budget_copies_are_skipped_and_bob_pulls_once_drained(self) -> None:
        node = self.node("outbound_budget = 4KiB\n")
        alice, bob = self.established(node, "alice"), self.established(node, "bob")
        self.send(alice, 10)
        statuses = [a.status for a in alice.events.of_type(cim_pb2.ACK_N)]
        live = 10 - len(statuses)
        self.assertEqual(statuses, [cim_pb2.STORED] * len(statuses))
        self.assertEqual((live, len(statuses)), (4, 6))
        self.assertEqual(self.unread_for_bob(node), 10)  # all ten in his timeline
        self.assertTrue(bob.server.outbound.over_budget)
        # Its own requests wait too: a client that does not read its answers cannot
        # make the node produce more.
        self.assertTrue(bob.server.paused)
        self.assertEqual(bob.server.deadline, NEVER)
        self.assertEqual(bob.events.of_type(cim_pb2.MSG_N), [])
        bob.flush()  # bob reads: the transport drains
        self.assertEqual(len(bob.events.of_type(cim_pb2.MSG_N)), 4)
        self.assertEqual(len(bob.events.of_type(cim_pb2.OFFLINE_NOTICE)), 1)
        self.assertFalse(bob.server.outbound.over_budget)
        self.assertFalse(bob.server.paused)
        self.assertLess(bob.server.deadline, NEVER)

    def test_a_group_member_over_budget_is_told_to_pull_once_drained(self) -> None:
        node = self.node("outbound_budget = 4KiB\n", FakeGroups({"g1": ["alice", "bob"]}))
        alice, bob = self.established(node, "alice"), self.established(node, "bob")
        for seq in range(1, 11):
            alice.protocol.send(
                cim_pb2.MSG_R, cim_pb2.Message(group="g1", text="x" * 1000, client_seq=seq)
            )
        alice.flush()
        node.clock.advance(0)  # the fan-out's slices
        alice.flush()
        self.assertEqual(node.metrics.messages["group_behind"], 6)
        bob.flush()
        self.assertEqual(len(bob.events.of_type(cim_pb2.MSG_N)), 4)
        self.assertEqual(len(bob.events.of_type(cim_pb2.OFFLINE_NOTICE)), 1)

    def test_group_copies_from_another_node_are_skipped_when_over_budget(self) -> None:
        node = self.node("outbound_budget = 4KiB\n")
        bob = self.established(node, "bob")
        for seq in range(1, 11):
            message = cim_pb2.Message(
                id=seq, group="g1", text="x" * 1000, conversation="g:g1", seq=seq
            )
            setattr(message, "from", "carol")
            envelope = cim_pb2.BusEnvelope(
                origin_node="node2",
                deliver=cim_pb2.BusDelivery(message=message, receivers=["bob"]),
            )
            node.im.routing.bus_message_received(envelope.SerializeToString())
        self.assertEqual(node.metrics.messages["group_behind"], 6)
        bob.flush()
        self.assertEqual(len(bob.events.of_type(cim_pb2.MSG_N)), 4)
        self.assertEqual(len(bob.events.of_type(cim_pb2.OFFLINE_NOTICE)), 1)

    def test_a_slow_reader_is_cut_and_everything_waits_for_it_in_its_timeline(self) -> None:
        node = self.node("outbound_budget = 4KiB\nslow_reader_timeout = 5s\n")
        alice, bob = self.established(node, "alice"), self.established(node, "bob")
        self.send(alice, 10)
        node.clock.advance(4.9)
        self.assertIsNotNone(node.im.sessions.session_for("bob"))
        node.clock.advance(0.1)
        self.assertIsNone(node.im.sessions.session_for("bob"))
        self.assertTrue(bob.server_transport.disconnecting)
        self.assertEqual(node.metrics.slow_readers_cut, 1)
        alice.flush()
        statuses = [a.status for a in alice.events.of_type(cim_pb2.ACK_N)]
        self.assertEqual(statuses, [cim_pb2.STORED] * 10)
        self.assertEqual(self.unread_for_bob(node), 10)

    def test_the_heaviest_sender_is_paused_and_no_frame_is_handed_up_meanwhile(self) -> None:
        node = self.node("max_queued_bytes = 64KiB\n")
        alice, bob = self.established(node, "alice"), self.established(node, "bob")
        self.send(alice, 70)  # over 64 KiB queued for bob: the window starts
        node.clock.advance(0.5)
        self.send(alice, 10, first=71)  # 11 KB in 0.5 s: heavy
        self.assertTrue(alice.server.paused)
        self.assertEqual(alice.server.deadline, NEVER)  # not cut for a silence we made
        taken = len(alice.events.of_type(cim_pb2.MSG_A))
        self.send(alice, 5, first=81)
        self.assertEqual(len(alice.events.of_type(cim_pb2.MSG_A)), taken)
        bob.flush()  # bob reads everything: the node's queue is empty again
        alice.flush()
        self.assertFalse(alice.server.paused)
        self.assertEqual(len(alice.events.of_type(cim_pb2.MSG_A)), 85)
        self.assertEqual(len(bob.events.of_type(cim_pb2.MSG_N)), 85)
        self.assertLess(alice.server.deadline, NEVER)


class BoundedStopTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.armed: list[tuple[float, Any]] = []
        self.cancelled = 0
        self.exits: list[str] = []

        def watchdog(seconds: float, action: Any) -> Any:
            self.armed.append((seconds, action))

            def cancel() -> None:
                self.cancelled += 1

            return cancel

        self.bound = BoundedStop(
            self.clock, 45.0, "node1", grace=5.0, watchdog=watchdog, hard_exit=self.exits.append
        )

    def test_a_stop_in_time_disarms_the_watchdog(self) -> None:
        stopping: Deferred[None] = Deferred()
        done = self.bound.run(stopping, lambda: "database")
        self.clock.advance(10)
        stopping.callback(None)
        self.assertIs(self.successResultOf(done), True)
        self.assertEqual((self.cancelled, self.clock.getDelayedCalls()), (1, []))

    def test_a_stop_that_overstays_is_given_up_and_the_watchdog_ends_the_process(self) -> None:
        stopping: Deferred[None] = Deferred()
        done = self.bound.run(stopping, lambda: "offline pipeline")
        self.clock.advance(44.9)
        self.assertNoResult(done)
        self.clock.advance(0.1)
        self.assertIs(self.successResultOf(done), False)
        [(seconds, action)] = self.armed
        self.assertEqual((seconds, self.cancelled), (50.0, 0))
        action()  # the process is still there 5 s later
        self.assertEqual(self.exits, ["cim: node node1 did not stop in 50 s; exiting now"])
        stopping.callback(None)  # finishing late changes nothing
        self.assertEqual(self.cancelled, 0)
