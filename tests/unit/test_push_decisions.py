"""Push decisions (who, when, collapsed) and the push queue (bounds, retries), on a
task.Clock with fakes for registrations, presence, members, unread counts and
providers."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cim.backends.backoff import Backoff
from cim.interfaces import SessionRecord, StateUnavailable
from cim.metrics import PushMetrics
from cim.protocols import cim_pb2
from cim.push.decisions import DecidingTimeline, DecisionSettings, PushDecisions, is_urgent
from cim.push.notification import ACCEPTED, DEAD, FAILED, RETRY, Notification, Outcome
from cim.push.presence import DevicePresence
from cim.push.queue import PushQueue, QueueSettings
from cim.push.texts import PREVIEW_LENGTH
from cim.storage.push import PushRegistration
from cim.storage.timeline import Appended, ConversationState

SECRET_TEXT = "the secret meeting is at noon"


def registration(
    user: str, device: str, provider: str = "apns", locale: str | None = None
) -> PushRegistration:
    return PushRegistration(
        user, device, provider, f"token-{user}-{device}", None, locale, 0.0, 0.0
    )


def message(sender: str, to: str = "", group: str = "", text: str = SECRET_TEXT) -> cim_pb2.Message:
    built = cim_pb2.Message(to=to, group=group, text=text, type=cim_pb2.TEXT)
    setattr(built, "from", sender)
    return built


def sos(guardian: str, device: str = "watch1") -> cim_pb2.Message:
    notice = {"event": "sos.raised", "priority": "high", "device": device, "lat": 1.0}
    built = cim_pb2.Message(to=guardian, type=cim_pb2.SYSTEM, text=json.dumps(notice))
    setattr(built, "from", "@system")
    return built


class FakeSession:
    def __init__(self, user: str, device: str, background: bool = False) -> None:
        self.record = SessionRecord("s", user, device, "node1", 0.0, 1e12)
        self.background = background


class FakeRoutes:
    def __init__(self) -> None:
        self.devices: dict[str, list[str]] = {}
        """The devices online of users held by other nodes."""
        self.down = False

    def online_devices(self, users: list[str]) -> Deferred[dict[str, list[str]]]:
        if self.down:
            return fail(StateUnavailable("redis is down"))
        return succeed({user: self.devices[user] for user in users if user in self.devices})


class World:
    """The decisions' collaborators, all in memory."""

    def __init__(
        self, settings: DecisionSettings | None = None, clock: Clock | None = None
    ) -> None:
        self.clock = clock or Clock()
        self.registrations: list[PushRegistration] = []
        self.sessions: dict[str, FakeSession] = {}
        self.routes = FakeRoutes()
        self.groups: dict[str, list[str]] = {}
        self.unread: Counter[tuple[str, str]] = Counter()
        self.queued: list[Notification] = []
        self.seq = 0
        self.decisions = PushDecisions(
            self.clock,
            lambda users: succeed([r for r in self.registrations if r.user in users]),
            DevicePresence("node1", self.devices_here, self.routes),  # type: ignore[arg-type]
            lambda group: succeed(list(self.groups.get(group, []))),
            self.summary,
            self.enqueue,
            settings or DecisionSettings(collapse_window=10.0),
        )

    def devices_here(self, user: str) -> list[FakeSession]:
        """One session per user in these tests (several devices: test_devices)."""
        session = self.sessions.get(user)
        return [] if session is None else [session]

    def summary(self, user: str, device: str) -> Deferred[list[ConversationState]]:
        count = self.unread[(user, device)]
        return succeed([ConversationState("d:a:b", "a", None, count, 0, None)])

    def enqueue(self, notification: Notification) -> bool:
        self.queued.append(notification)
        return True

    def append(self, entry: cim_pb2.Message, new: bool = True) -> None:
        """An entry written: every receiver's devices have one more unread."""
        self.seq += 1
        receivers = self.groups.get(entry.group, []) if entry.group else [entry.to]
        for r in self.registrations:
            if r.user in receivers and r.user != getattr(entry, "from"):
                self.unread[(r.user, r.device)] += 1
        conversation = f"g:{entry.group}" if entry.group else f"d:{entry.to}"
        self.decisions.entry_appended(entry, Appended(1000 + self.seq, conversation, self.seq, new))


class DecisionTests(SynchronousTestCase):
    def started(self, settings: DecisionSettings | None = None) -> World:
        world = World(settings)
        # Past the start-up window: a node that has been up a while.
        world.clock.advance(3600)
        world.decisions = PushDecisions(
            world.clock,
            world.decisions._registered,
            world.decisions._presence,
            world.decisions._members,
            world.summary,
            world.enqueue,
            world.decisions.settings,
        )
        world.clock.advance(3600)
        return world

    def test_a_receiver_known_to_have_no_registration_costs_no_lookup(self) -> None:
        world = self.started()
        looked_up: list[list[str]] = []
        registered = world.decisions._registered

        def counting(users: Any) -> Any:
            looked_up.append(list(users))
            return registered(users)

        world.decisions._registered = counting
        world.decisions._unregistered = lambda user: user == "carol"
        world.registrations.append(registration("bob", "phone"))
        world.append(message("alice", to="carol"))
        self.assertEqual(looked_up, [])
        world.append(message("alice", to="bob"))
        self.assertEqual(looked_up, [["bob"]])
        self.assertEqual([n.registration.device for n in world.queued], ["phone"])

    def test_a_registered_device_away_is_pushed_a_connected_one_is_not(self) -> None:
        world = self.started()
        world.registrations += [registration("mum", "phone"), registration("mum", "tablet")]
        world.sessions["mum"] = FakeSession("mum", "tablet")
        world.append(sos("mum"))
        self.assertEqual(
            [(n.registration.device, n.urgent) for n in world.queued], [("phone", True)]
        )
        [push] = world.queued
        self.assertEqual((push.kind, push.title), ("sos", "SOS from watch1"))
        self.assertEqual(push.body, "")

    def test_thirty_messages_in_five_seconds_two_pushes_last_badge_thirty(self) -> None:
        world = self.started()
        world.registrations.append(registration("bob", "phone", "fcm"))
        for _ in range(30):
            world.append(message("alice", to="bob"))
            world.clock.advance(5 / 30)
        self.assertEqual([n.badge for n in world.queued], [1])
        world.clock.advance(10)
        self.assertEqual([n.badge for n in world.queued], [1, 30])
        self.assertEqual(world.queued[-1].seq, 30)
        # Quiet afterwards: the window closes with nothing waiting, and no more pushes.
        world.clock.advance(60)
        self.assertEqual(len(world.queued), 2)
        self.assertEqual(world.decisions.open_windows, 0)

    def test_at_most_one_push_per_window(self) -> None:
        world = self.started()
        world.registrations.append(registration("bob", "phone", "fcm"))
        sent_at: list[float] = []
        for _ in range(200):
            before = len(world.queued)
            world.append(message("alice", to="bob"))
            world.clock.advance(0.7)
            sent_at += [world.clock.seconds()] * (len(world.queued) - before)
        gaps = [b - a for a, b in itertools.pairwise(sent_at)]
        self.assertGreater(len(sent_at), 5)
        self.assertTrue(all(gap >= 10 - 0.7 for gap in gaps), gaps)

    def test_sos_is_never_collapsed(self) -> None:
        world = self.started()
        world.registrations.append(registration("mum", "phone"))
        for _ in range(3):
            world.append(sos("mum"))
        self.assertEqual([n.urgent for n in world.queued], [True, True, True])

    def test_an_entry_found_again_is_not_pushed_again(self) -> None:
        world = self.started()
        world.registrations.append(registration("bob", "phone"))
        world.append(message("alice", to="bob"), new=False)
        self.assertEqual(world.queued, [])

    def test_only_devices_not_online_on_another_node_are_pushed(self) -> None:
        world = self.started()
        world.registrations.append(registration("mum", "phone"))
        world.registrations.append(registration("mum", "tablet"))
        world.routes.devices["mum"] = ["tablet"]  # mum's node is another one
        world.append(message("alice", to="mum"))
        self.assertEqual([n.registration.device for n in world.queued], ["phone"])

    def test_a_state_store_that_cannot_say_pushes_only_urgent(self) -> None:
        world = self.started()
        world.registrations.append(registration("mum", "phone"))
        world.routes.down = True
        world.append(message("alice", to="mum"))
        world.append(sos("mum"))
        self.assertEqual([n.kind for n in world.queued], ["sos"])

    def test_group_members_but_the_sender_collapsed_harder(self) -> None:
        world = self.started(DecisionSettings(collapse_window=10.0, group_rate=1 / 60))
        world.groups["g1"] = ["alice", "bob", "carol"]
        world.registrations += [registration(u, "phone") for u in ("alice", "bob", "carol")]
        world.append(message("alice", group="g1"))
        self.assertEqual(sorted(n.registration.user for n in world.queued), ["bob", "carol"])
        self.assertEqual({n.kind for n in world.queued}, {"group"})
        world.append(message("alice", group="g1"))
        world.clock.advance(30)
        self.assertEqual(len(world.queued), 2)  # a group waits 60 s, not 10
        world.clock.advance(30)
        self.assertEqual(len(world.queued), 4)

    def test_a_node_just_started_waits_a_window_first(self) -> None:
        world = World()
        world.registrations.append(registration("bob", "phone"))
        world.append(message("alice", to="bob"))
        self.assertEqual(world.queued, [])
        world.clock.advance(10)
        self.assertEqual(len(world.queued), 1)

    def test_no_text_by_default_a_preview_when_asked(self) -> None:
        world = self.started()
        world.registrations.append(registration("bob", "phone", locale="zh-Hans-CN"))
        world.append(message("alice", to="bob"))
        [push] = world.queued
        self.assertEqual((push.title, push.body), ("来自alice的新消息", ""))
        shown = self.started(DecisionSettings(collapse_window=10.0, show_text=True))
        shown.registrations.append(registration("bob", "phone"))
        shown.append(message("alice", to="bob", text="x" * 500))
        self.assertEqual(shown.queued[0].body, "x" * PREVIEW_LENGTH)
        self.assertEqual(shown.queued[0].title, "New message from alice")

    def test_stop_cancels_windows(self) -> None:
        world = self.started()
        world.registrations.append(registration("bob", "phone"))
        world.append(message("alice", to="bob"))
        world.append(message("alice", to="bob"))
        world.decisions.stop()
        world.clock.advance(60)
        self.assertEqual(len(world.queued), 1)
        world.append(sos("bob"))
        self.assertEqual(len(world.queued), 1)
        self.assertEqual(world.clock.getDelayedCalls(), [])

    def test_urgent_is_a_high_priority_notice_from_the_server_only(self) -> None:
        self.assertTrue(is_urgent(sos("mum")))
        forged = sos("mum")
        setattr(forged, "from", "alice")
        self.assertFalse(is_urgent(forged))
        self.assertFalse(is_urgent(message("alice", to="bob", text='{"priority": "high"}')))


class DecidingTimelineTests(SynchronousTestCase):
    def test_append_hands_new_entries_over_and_passes_the_result_on(self) -> None:
        seen: list[Any] = []

        class Decisions:
            log = None

            def entry_appended(self, entry: Any, appended: Appended) -> None:
                seen.append(appended)
                raise RuntimeError("a decision that breaks must not break the message")

        class Inner:
            def append(self, entry: Any, device: str) -> Deferred[Appended]:
                return succeed(Appended(1, "d:a:b", 1, True))

        from twisted.logger import Logger

        decisions: Any = Decisions()
        decisions.log = Logger()
        timeline = DecidingTimeline(Inner(), decisions)  # type: ignore[arg-type]
        results: list[Any] = []
        timeline.append(message("a", to="b"), "phone").addBoth(results.append)
        self.assertEqual(results, [Appended(1, "d:a:b", 1, True)])
        self.assertEqual(len(seen), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_append_then_decides_then_answers_and_passes_refusals_on(self) -> None:
        from cim.history.answers import Then
        from cim.history.timeline import TimelineUnavailable

        seen: list[Any] = []

        class Decisions:
            def entry_appended(self, entry: Any, appended: Appended) -> None:
                seen.append((getattr(entry, "from"), appended.seq))

        class Inner:
            refuse = False

            def append_then(
                self, entry: Any, device: str, done: Any, failed: Any, *args: Any
            ) -> None:
                answer = Then(done, failed, args)
                if self.refuse:
                    answer.errback(TimelineUnavailable("down"))
                else:
                    answer.callback(Appended(1, "d:a:b", 3, True))

        inner = Inner()
        timeline = DecidingTimeline(inner, Decisions())  # type: ignore[arg-type]
        done: list[Any] = []
        failed: list[Any] = []

        def ok(appended: Appended, *args: Any) -> None:
            done.append((appended.seq, args))

        def refused(failure: Any, *args: Any) -> None:
            failed.append((failure.type, args))

        timeline.append_then(message("a", to="b"), "phone", ok, refused, "x", 7)
        self.assertEqual((seen, done, failed), ([("a", 3)], [(3, ("x", 7))], []))
        inner.refuse = True
        timeline.append_then(message("a", to="b"), "phone", ok, refused, "y")
        self.assertEqual(failed, [(TimelineUnavailable, ("y",))])
        self.assertEqual(len(seen), 1)  # nothing to decide about a refused message


def notification(urgent: bool = False, provider: str = "apns", at: float = 0.0) -> Notification:
    return Notification(
        registration=registration("bob", "phone", provider),
        conversation="d:a:b",
        seq=1,
        msg_id=1,
        badge=1,
        title="New message from alice",
        body="",
        urgent=urgent,
        kind="sos" if urgent else "message",
        appended_at=at,
        ttl=86400.0,
    )


class FakeProvider:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.answers: list[Outcome | Exception] = []
        self.calls: list[tuple[float, Notification]] = []
        self.held: list[Deferred[Outcome]] = []
        self.hold = False

    def send(self, notification: Notification) -> Deferred[Outcome]:
        self.calls.append((self.clock.seconds(), notification))
        if self.hold:
            d: Deferred[Outcome] = Deferred()
            self.held.append(d)
            return d
        answer = self.answers.pop(0) if self.answers else Outcome(ACCEPTED, 200)
        if isinstance(answer, Exception):
            raise answer
        return succeed(answer)


class QueueTests(SynchronousTestCase):
    def make(self, **settings: Any) -> tuple[PushQueue, FakeProvider, PushMetrics, list[Any]]:
        clock = Clock()
        provider = FakeProvider(clock)
        metrics = PushMetrics()
        dead: list[Any] = []
        options: dict[str, Any] = {"backoff": Backoff(1.0, 60.0, jitter=0.5), **settings}
        queue = PushQueue(
            clock,
            provider.send,
            lambda n, outcome: dead.append((n.registration.device, outcome.reason)),
            QueueSettings(**options),
            metrics,
            random.Random(7),
        )
        self.clock = clock
        return queue, provider, metrics, dead

    def test_accepted_is_counted_with_its_latency(self) -> None:
        queue, _provider, metrics, _ = self.make()
        self.clock.advance(2)
        self.assertTrue(queue.put(notification(at=1.5)))
        self.assertEqual(metrics.outcomes[("apns", ACCEPTED)], 1)
        self.assertEqual((metrics.latency.count, metrics.latency.sum), (1, 0.5))
        self.assertEqual(queue.depth, 0)

    def test_retry_after_is_honoured(self) -> None:
        queue, provider, metrics, _ = self.make()
        provider.answers = [Outcome(RETRY, 503, retry_after=30.0)]
        queue.put(notification())
        self.clock.advance(29.9)
        self.assertEqual(len(provider.calls), 1)
        self.assertEqual(queue.depth, 1)
        self.clock.advance(0.1)
        self.assertEqual([at for at, _ in provider.calls], [0.0, 30.0])
        self.assertEqual(metrics.outcomes[("apns", ACCEPTED)], 1)
        self.assertEqual(metrics.outcomes[("apns", "retried")], 1)

    def test_backoff_with_jitter_then_a_normal_push_gives_up(self) -> None:
        queue, provider, metrics, _ = self.make(max_attempts=4)
        provider.answers = [Outcome(RETRY, 500)] * 10
        queue.put(notification())
        for _ in range(20):
            self.clock.advance(10)
        times = [at for at, _ in provider.calls]
        self.assertEqual(len(times), 4)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        for attempt, gap in enumerate(gaps, start=1):
            step = Backoff(1.0, 60.0).after(attempt)
            self.assertTrue(step * 0.5 - 10 <= gap <= step + 10, (attempt, gap))
        self.assertEqual(metrics.outcomes[("apns", "gave_up")], 1)
        self.assertEqual(queue.depth, 0)

    def test_urgent_is_retried_until_accepted(self) -> None:
        queue, provider, metrics, _ = self.make(max_attempts=2)
        provider.answers = [Outcome(RETRY, 503)] * 8 + [RuntimeError("connection reset")]
        queue.put(notification(urgent=True))
        for _ in range(100):
            self.clock.advance(60)
        self.assertEqual(len(provider.calls), 10)
        self.assertEqual(metrics.outcomes[("apns", ACCEPTED)], 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_dead_token_is_reported_failed_is_not_retried(self) -> None:
        queue, provider, metrics, dead = self.make()
        provider.answers = [Outcome(DEAD, 410, "Unregistered"), Outcome(FAILED, 400, "BadTopic")]
        queue.put(notification())
        queue.put(notification())
        self.clock.advance(600)
        self.assertEqual(dead, [("phone", "Unregistered")])
        self.assertEqual(len(provider.calls), 2)
        self.assertEqual(metrics.outcomes[("apns", "failed")], 1)

    def test_bounded_non_urgent_dropped_urgent_displaces_and_goes_first(self) -> None:
        queue, provider, metrics, _ = self.make(size=3, concurrency=1)
        provider.hold = True
        for _ in range(3):
            self.assertTrue(queue.put(notification()))
        self.assertFalse(queue.put(notification()))
        self.assertEqual(metrics.outcomes[("apns", "dropped")], 1)
        self.assertTrue(queue.put(notification(urgent=True)))
        self.assertEqual(metrics.outcomes[("apns", "dropped")], 2)
        self.assertEqual(queue.depth, 3)
        provider.held.pop(0).callback(Outcome(ACCEPTED))
        self.assertTrue(provider.calls[-1][1].urgent)

    def test_stop_drops_what_waits(self) -> None:
        queue, provider, _metrics, _ = self.make()
        provider.answers = [Outcome(RETRY, 503)]
        queue.put(notification())
        queue.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(queue.put(notification()))


class AlarmTests(SynchronousTestCase):
    def test_an_acknowledged_alarm_stops_its_retries(self) -> None:
        clock = Clock()
        provider = FakeProvider(clock)
        provider.answers = [Outcome(RETRY, 503)] * 20
        metrics = PushMetrics()
        open_alarms = {7}
        queue = PushQueue(
            clock,
            provider.send,
            lambda n, o: None,
            QueueSettings(backoff=Backoff(1.0, 4.0)),
            metrics,
            alarm_open=lambda alarm: succeed(alarm in open_alarms),
        )
        sos_push = notification(urgent=True)
        queue.put(type(sos_push)(**{**_fields(sos_push), "alarm": 7}))
        for _ in range(10):
            clock.advance(1)
        tries = len(provider.calls)
        self.assertGreater(tries, 2)
        open_alarms.clear()  # a guardian acknowledged it
        for _ in range(60):
            clock.advance(1)
        self.assertEqual(len(provider.calls), tries)
        self.assertEqual(metrics.outcomes[("apns", "acknowledged")], 1)
        self.assertEqual(queue.depth, 0)

    def test_the_decision_names_the_alarm(self) -> None:
        world = World()
        world.clock.advance(3600)
        world.registrations.append(registration("mum", "phone"))
        notice = {"event": "sos.raised", "priority": "high", "device": "watch1", "sos": 41}
        entry = cim_pb2.Message(to="mum", type=cim_pb2.SYSTEM, text=json.dumps(notice))
        setattr(entry, "from", "@system")
        world.append(entry)
        self.assertEqual([n.alarm for n in world.queued], [41])


def _fields(n: Notification) -> dict[str, Any]:
    return {name: getattr(n, name) for name in Notification.__slots__}


class BreakerTests(SynchronousTestCase):
    """A provider that is down is probed one request at a time, not hammered."""

    def make(self) -> tuple[PushQueue, FakeProvider, PushMetrics]:
        self.clock = Clock()
        provider = FakeProvider(self.clock)
        metrics = PushMetrics()
        settings = QueueSettings(backoff=Backoff(1.0, 60.0, jitter=0.5), max_attempts=5)
        queue = PushQueue(
            self.clock, provider.send, lambda n, o: None, settings, metrics, random.Random(7)
        )
        return queue, provider, metrics

    def test_a_provider_that_is_down_gets_few_requests_and_what_waits_goes_when_it_is_back(
        self,
    ) -> None:
        queue, provider, metrics = self.make()
        provider.answers = [Outcome(RETRY, 503)] * 1000
        for _ in range(50):
            queue.put(notification())
        for _ in range(60):  # a minute of outage
            self.clock.advance(1)
        down_calls = len(provider.calls)
        # Without the breaker: 8 at once, then every push retried (250 requests);
        # with it: the first failures, then one probe per breaker wait.
        self.assertLess(down_calls, 40, down_calls)
        self.assertEqual(queue.depth, 50)  # nothing given up while it only waited
        provider.answers = []  # it answers again: accepted
        for _ in range(120):
            self.clock.advance(1)
        self.assertEqual(metrics.outcomes[("apns", ACCEPTED)], 50)
        self.assertEqual(queue.depth, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_an_urgent_push_is_the_probe(self) -> None:
        queue, provider, _metrics = self.make()
        provider.answers = [Outcome(RETRY, 503)] * 8
        for _ in range(8):
            queue.put(notification())
        self.clock.advance(0)
        queue.put(notification(urgent=True))
        for _ in range(100):
            self.clock.advance(1)
            if len(provider.calls) > 8:
                break
        self.assertTrue(provider.calls[8][1].urgent)

    def test_stop_cancels_the_breakers_wait(self) -> None:
        queue, provider, _metrics = self.make()
        provider.answers = [Outcome(RETRY, 503)] * 100
        for _ in range(10):
            queue.put(notification())
        queue.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(queue.depth, 0)
