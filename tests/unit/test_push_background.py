"""A device connected with its app in the background: pushed only when it does not
acknowledge an entry within ``[push] background_grace`` (cim.push.grace), on a
task.Clock with the in-memory world of test_push_decisions."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cim.protocols import cim_pb2
from cim.push.decisions import DecidingTimeline, DecisionSettings, PushDecisions
from cim.push.grace import BackgroundGrace, Held
from cim.push.presence import DevicePresence, Presence
from tests.unit.test_push_decisions import (
    FakeRoutes,
    FakeSession,
    World,
    message,
    registration,
    sos,
)

GRACE = 3.0


class Devices(World):
    """Several devices per user on this node, each with its app state."""

    def __init__(self, settings: DecisionSettings) -> None:
        self.here: dict[str, list[FakeSession]] = {}
        super().__init__(settings)

    def devices_here(self, user: str) -> list[FakeSession]:  # type: ignore[override]
        return list(self.here.get(user, []))

    def connect(self, user: str, device: str, background: bool) -> FakeSession:
        session = FakeSession(user, device, background)
        self.here.setdefault(user, []).append(session)
        return session


class InnerTimeline:
    def __init__(self) -> None:
        self.moved: list[tuple[str, str, str, int]] = []

    def move_cursor(self, user: str, device: str, conversation: str, seq: int) -> None:
        self.moved.append((user, device, conversation, seq))

    def move_cursors(self, user: str, device: str, marks: Any) -> Deferred[int]:
        for mark in marks:
            self.moved.append((user, device, mark.conversation, mark.seq))
        return succeed(len(marks))


class BackgroundGraceTests(SynchronousTestCase):
    def started(self, grace: float = GRACE, pending: int = 100, collapse: float = 10.0) -> Devices:
        settings = DecisionSettings(
            collapse_window=collapse, background_grace=grace, background_pending=pending
        )
        world = Devices(settings)
        world.clock.advance(3600)  # past the start-up window
        world.decisions = PushDecisions(
            world.clock,
            world.decisions._registered,
            world.decisions._presence,
            world.decisions._members,
            world.summary,
            world.enqueue,
            settings,
        )
        world.clock.advance(3600)
        world.registrations.append(registration("bob", "phone", "fcm"))
        return world

    def test_a_background_device_that_acks_in_time_is_not_pushed(self) -> None:
        world = self.started()
        world.connect("bob", "phone", background=True)
        inner = InnerTimeline()
        timeline = DecidingTimeline(inner, world.decisions)  # type: ignore[arg-type]
        world.append(message("alice", to="bob"))
        self.assertEqual(world.decisions.grace.pending, 1)
        world.clock.advance(GRACE - 1)
        # ack:R with through_seq, through the node's timelines as direct.py sends it.
        timeline.move_cursor("bob", "phone", "d:bob", 1)
        self.assertEqual(inner.moved, [("bob", "phone", "d:bob", 1)])
        self.assertEqual(world.decisions.grace.pending, 0)
        world.clock.advance(60)
        self.assertEqual(world.queued, [])
        self.assertEqual(world.decisions.grace.acknowledged_in_time, 1)

    def test_a_background_device_that_does_not_ack_gets_one_push(self) -> None:
        world = self.started()
        world.connect("bob", "phone", background=True)
        world.append(message("alice", to="bob"))
        world.clock.advance(GRACE - 0.5)
        self.assertEqual(world.queued, [])
        world.clock.advance(0.5)
        [push] = world.queued
        self.assertEqual((push.registration.device, push.seq, push.urgent), ("phone", 1, False))
        world.clock.advance(120)
        self.assertEqual(len(world.queued), 1)
        self.assertEqual(world.clock.getDelayedCalls(), [])

    def test_unacked_entries_are_collapsed_like_other_pushes(self) -> None:
        world = self.started()
        world.connect("bob", "phone", background=True)
        for _ in range(5):
            world.append(message("alice", to="bob"))
            world.clock.advance(0.5)
        world.clock.advance(GRACE)
        self.assertEqual([n.seq for n in world.queued], [1])
        world.clock.advance(10)
        self.assertEqual([(n.seq, n.badge) for n in world.queued], [(1, 5), (5, 5)])

    def test_an_ack_of_an_older_entry_leaves_newer_ones_waiting(self) -> None:
        world = self.started()
        world.connect("bob", "phone", background=True)
        world.append(message("alice", to="bob"))
        world.append(message("alice", to="bob"))
        world.decisions.cursor_moved("bob", "phone", "d:bob", 1)
        world.decisions.cursor_moved("bob", "phone", "d:other", 9)  # another conversation
        world.clock.advance(GRACE)
        self.assertEqual([n.seq for n in world.queued], [2])

    def test_an_offline_ack_moves_the_cursor_too(self) -> None:
        world = self.started()
        world.connect("bob", "phone", background=True)
        timeline = DecidingTimeline(InnerTimeline(), world.decisions)  # type: ignore[arg-type]
        world.append(message("alice", to="bob"))
        timeline.move_cursors("bob", "phone", [cim_pb2.Cursor(conversation="d:bob", seq=3)])
        world.clock.advance(60)
        self.assertEqual(world.queued, [])

    def test_a_foreground_connected_device_is_never_pushed(self) -> None:
        world = self.started()
        world.connect("bob", "phone", background=False)
        world.append(message("alice", to="bob"))
        world.clock.advance(60)
        self.assertEqual(world.queued, [])
        self.assertEqual(world.decisions.grace.pending, 0)
        self.assertEqual(world.clock.getDelayedCalls(), [])

    def test_back_in_front_before_the_grace_ends_is_not_pushed(self) -> None:
        world = self.started()
        session = world.connect("bob", "phone", background=True)
        world.append(message("alice", to="bob"))
        session.background = False
        world.clock.advance(GRACE)
        self.assertEqual(world.queued, [])

    def test_gone_during_the_grace_is_pushed(self) -> None:
        world = self.started()
        world.connect("bob", "phone", background=True)
        world.append(message("alice", to="bob"))
        world.here.clear()
        world.clock.advance(GRACE)
        self.assertEqual([n.seq for n in world.queued], [1])

    def test_an_sos_to_a_background_device_is_pushed_at_once(self) -> None:
        world = self.started()
        world.registrations.append(registration("bob", "tablet"))
        world.connect("bob", "phone", background=True)
        world.connect("bob", "tablet", background=False)
        world.append(sos("bob"))
        self.assertEqual(
            [(n.registration.device, n.urgent) for n in world.queued], [("phone", True)]
        )
        self.assertEqual(world.decisions.grace.pending, 0)

    def test_on_another_node_an_sos_is_pushed_a_message_is_not(self) -> None:
        world = self.started()
        world.routes.devices["bob"] = ["phone"]  # online, on another node
        world.append(message("alice", to="bob"))
        world.clock.advance(60)
        self.assertEqual(world.queued, [])
        world.append(sos("bob"))
        self.assertEqual([n.urgent for n in world.queued], [True])

    def test_past_the_bound_entries_are_pushed_without_waiting(self) -> None:
        world = self.started(pending=2)
        world.registrations += [registration("bob", "tablet"), registration("bob", "watch")]
        for device in ("phone", "tablet", "watch"):
            world.connect("bob", device, background=True)
        world.append(message("alice", to="bob"))
        self.assertEqual(world.decisions.grace.pending, 2)
        self.assertEqual([n.registration.device for n in world.queued], ["watch"])
        self.assertEqual(world.decisions.grace.overflowed, 1)

    def test_stop_cancels_the_graces(self) -> None:
        world = self.started()
        world.connect("bob", "phone", background=True)
        world.append(message("alice", to="bob"))
        world.decisions.stop()
        world.clock.advance(60)
        self.assertEqual(world.queued, [])
        self.assertEqual(world.clock.getDelayedCalls(), [])


class GraceTests(SynchronousTestCase):
    def test_once_per_entry_and_an_ack_that_overtook_the_decision(self) -> None:
        clock = Clock()
        grace = BackgroundGrace(clock, 2.0, 10)
        fired: list[int] = []
        key = ("bob", "phone", "d:bob")
        self.assertIs(grace.wait(key, 1, lambda: fired.append(1)), Held.HELD)
        self.assertIs(grace.wait(key, 1, lambda: fired.append(1)), Held.HELD)
        self.assertEqual(grace.pending, 1)
        grace.cursor_moved(key, 4)  # the ack came before entry 3's decision
        self.assertIs(grace.wait(key, 3, lambda: fired.append(3)), Held.ACKNOWLEDGED)
        self.assertIs(grace.wait(key, 5, lambda: fired.append(5)), Held.HELD)
        clock.advance(2)
        self.assertEqual(fired, [5])

    def test_the_remembered_cursors_are_bounded(self) -> None:
        grace = BackgroundGrace(Clock(), 2.0, 3)
        for n in range(10):
            grace.cursor_moved(("bob", f"d{n}", "c"), 1)
        self.assertIs(grace.wait(("bob", "d0", "c"), 1, lambda: None), Held.HELD)
        self.assertIs(grace.wait(("bob", "d9", "c"), 1, lambda: None), Held.ACKNOWLEDGED)


class PresenceTests(SynchronousTestCase):
    def test_states(self) -> None:
        here = {"bob": [FakeSession("bob", "phone", True), FakeSession("bob", "tab")]}
        routes = FakeRoutes()
        routes.devices["carol"] = ["phone"]
        presence = DevicePresence("node1", lambda u: here.get(u, []), routes)  # type: ignore[arg-type,return-value]

        def state(user: str, device: str) -> Presence:
            result: list[Presence] = []
            Deferred.fromCoroutine(presence.state(user, device)).addCallback(result.append)
            return result[0]

        self.assertIs(state("bob", "phone"), Presence.BACKGROUND)
        self.assertIs(state("bob", "tab"), Presence.FOREGROUND)
        self.assertIs(state("bob", "watch"), Presence.AWAY)
        self.assertIs(state("carol", "phone"), Presence.ELSEWHERE)
        self.assertIs(state("carol", "tab"), Presence.AWAY)
        routes.down = True
        self.assertIs(state("carol", "phone"), Presence.UNKNOWN)
