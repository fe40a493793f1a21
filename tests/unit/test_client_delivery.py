"""The client's outbox (retries, outcomes), inbox (dedup, order) and seen stores."""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cim.client.delivery import (
    REASON_CONNECTION_CLOSED,
    DeliveryOutcome,
    Inbox,
    Outbox,
    RetryPolicy,
)
from cim.client.seen import FileSeenStore, MemorySeenStore
from cim.protocols import cim_pb2


def fired(d: Deferred[Any]) -> list[Any]:
    """What the Deferred fired with so far, leaving its result in place."""
    results: list[Any] = []

    def keep(result: Any) -> Any:
        results.append(result)
        return result

    d.addBoth(keep)
    return results


class FakeLink:
    """The connection as the outbox sees it: up or down, and what went out when."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.up = True
        self.sent: list[tuple[float, int]] = []

    def __call__(self, message: cim_pb2.Message) -> bool:
        if self.up:
            self.sent.append((self.clock.seconds(), message.client_seq))
        return self.up


def make_outbox(
    mode: str = "auto", up: bool = True
) -> tuple[Outbox, Clock, FakeLink, list[DeliveryOutcome]]:
    clock = Clock()
    link = FakeLink(clock)
    link.up = up
    outcomes: list[DeliveryOutcome] = []
    return Outbox(clock, link, outcomes.append, RetryPolicy(mode=mode)), clock, link, outcomes


def text(seq: int, to: str = "bob") -> cim_pb2.Message:
    return cim_pb2.Message(to=to, text=f"m{seq}", client_seq=seq)


def ack_n(
    seq: int,
    status: cim_pb2.DeliveryStatus = cim_pb2.DELIVERED,
    msg_id: int = 0,
    reason: str = "",
) -> cim_pb2.AckN:
    return cim_pb2.AckN(msg_id=msg_id or 1000 + seq, client_seq=seq, status=status, reason=reason)


def advance(clock: Clock, seconds: float, step: float = 1.0) -> None:
    for _ in range(round(seconds / step)):
        clock.advance(step)


class RetryPolicyTests(SynchronousTestCase):
    def test_waits(self) -> None:
        self.assertEqual(RetryPolicy().waits, (10.0, 30.0, 60.0, 60.0))
        self.assertEqual(RetryPolicy(final_wait=5).waits, (10.0, 30.0, 60.0, 5))
        self.assertEqual(RetryPolicy(mode="manual").waits, (10.0,))

    def test_rejects_nonsense(self) -> None:
        self.assertRaises(ValueError, RetryPolicy, mode="sometimes")
        self.assertRaises(ValueError, RetryPolicy, delays=())
        self.assertRaises(ValueError, RetryPolicy, delays=(10, 0))


class AutoRetryTests(SynchronousTestCase):
    def test_resends_at_10_40_100_then_fails_at_160(self) -> None:
        outbox, clock, link, outcomes = make_outbox()
        d = outbox.add(text(7))
        advance(clock, 159)
        self.assertEqual(link.sent, [(0, 7), (10, 7), (40, 7), (100, 7)])
        self.assertEqual(outcomes, [])
        self.assertEqual(outbox.waiting(), [7])
        clock.advance(1)
        [outcome] = outcomes
        self.assertEqual((outcome.status, outcome.client_seq), ("failed", 7))
        self.assertIn("no ack:N within 160 s (4 sends)", outcome.reason)
        self.assertEqual(fired(d), [outcome])
        self.assertEqual((len(outbox), outbox.failed()), (0, [7]))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_ack_n_ends_the_wait_with_the_node_msg_id(self) -> None:
        outbox, clock, link, outcomes = make_outbox()
        d = outbox.add(text(1))
        outbox.taken(cim_pb2.MsgA(client_seq=1, msg_id=555))
        clock.advance(10)  # one resend, then the answer
        outbox.acknowledged(cim_pb2.AckN(msg_id=555, client_seq=1, status=cim_pb2.DELIVERED))
        self.assertEqual(fired(d), [DeliveryOutcome(1, 555, "bob", "delivered")])
        self.assertEqual(outcomes, fired(d))
        self.assertEqual(clock.getDelayedCalls(), [])
        advance(clock, 200)
        self.assertEqual(len(link.sent), 2)

    def test_stored_and_accepted_are_final_too(self) -> None:
        outbox, _, _, outcomes = make_outbox()
        outbox.add(text(1))
        outbox.add(cim_pb2.Message(group="g1", text="hi", client_seq=2))
        outbox.acknowledged(ack_n(1, cim_pb2.STORED))
        outbox.acknowledged(ack_n(2, cim_pb2.ACCEPTED))
        self.assertEqual(
            [(o.status, o.to) for o in outcomes], [("stored", "bob"), ("accepted", "g1")]
        )

    def test_node_failed_is_final_even_for_a_receiver_that_dropped(self) -> None:
        outbox, clock, link, outcomes = make_outbox()
        outbox.add(text(1))
        why = "the receiver disconnected before acknowledging"
        outbox.acknowledged(ack_n(1, cim_pb2.FAILED, reason=why))
        advance(clock, 200)
        self.assertEqual([(o.status, o.reason) for o in outcomes], [("failed", why)])
        self.assertEqual(len(link.sent), 1)

    def test_waits_through_a_disconnection_and_resends_in_order_on_reconnect(self) -> None:
        outbox, clock, link, outcomes = make_outbox()
        outbox.add(text(3))
        outbox.add(text(4))
        link.up = False
        outbox.connection_lost(REASON_CONNECTION_CLOSED)
        outbox.add(text(5))  # queued for the next connection
        clock.advance(20)  # the 10 s resends of 3 and 4 are skipped: no connection
        self.assertEqual(link.sent, [(0, 3), (0, 4)])
        link.up = True
        outbox.connection_made()
        self.assertEqual(link.sent[2:], [(20, 3), (20, 4), (20, 5)])
        for seq in (4, 3, 5):
            outbox.acknowledged(ack_n(seq))
        self.assertEqual([o.client_seq for o in outcomes], [4, 3, 5])
        self.assertEqual(outcomes[0].status, "delivered")

    def test_the_schedule_bounds_a_message_even_while_offline(self) -> None:
        outbox, clock, link, outcomes = make_outbox(up=False)
        outbox.add(text(1))
        advance(clock, 160)
        self.assertEqual(link.sent, [])
        self.assertEqual([o.reason for o in outcomes], ["no ack:N within 160 s (0 sends)"])

    def test_bad_request_is_final_other_errors_wait_for_the_resend(self) -> None:
        outbox, clock, link, outcomes = make_outbox()
        outbox.add(text(1))
        outbox.add(text(2))
        outbox.refused(
            cim_pb2.Error(code=cim_pb2.Error.RATE_LIMITED, request_type=cim_pb2.MSG_R, client_seq=1)
        )
        outbox.refused(
            cim_pb2.Error(
                code=cim_pb2.Error.BAD_REQUEST,
                message="no receiver",
                request_type=cim_pb2.MSG_R,
                client_seq=2,
            )
        )
        self.assertEqual([(o.client_seq, o.reason) for o in outcomes], [(2, "no receiver")])
        clock.advance(10)
        self.assertEqual(link.sent[-1], (10, 1))

    def test_fail_all(self) -> None:
        outbox, clock, _, outcomes = make_outbox()
        outbox.add(text(2))
        outbox.add(text(1))
        outbox.fail_all("stopping")
        self.assertEqual(
            [(o.client_seq, o.reason) for o in outcomes], [(1, "stopping"), (2, "stopping")]
        )
        self.assertEqual(clock.getDelayedCalls(), [])


class ManualRetryTests(SynchronousTestCase):
    def test_first_wait_passing_fails_and_resend_starts_over(self) -> None:
        outbox, clock, link, outcomes = make_outbox("manual")
        first = outbox.add(text(9))
        clock.advance(10)
        [failed] = outcomes
        self.assertEqual((failed.status, failed.reason), ("failed", "no ack:N within 10 s"))
        self.assertEqual(fired(first), [failed])
        self.assertEqual(link.sent, [(0, 9)])
        second = outbox.resend(9)
        self.assertEqual(link.sent, [(0, 9), (10, 9)])
        outbox.acknowledged(ack_n(9))
        self.assertEqual([o.status for o in outcomes], ["failed", "delivered"])
        self.assertEqual(fired(second)[0].status, "delivered")
        self.assertRaises(KeyError, outbox.resend, 9)  # delivered: nothing to resend

    def test_connection_drop_and_no_connection_fail_at_once(self) -> None:
        outbox, _, link, outcomes = make_outbox("manual")
        outbox.add(text(1))
        link.up = False
        outbox.connection_lost(REASON_CONNECTION_CLOSED)
        outbox.add(text(2))
        self.assertEqual(
            [(o.client_seq, o.reason) for o in outcomes],
            [(1, REASON_CONNECTION_CLOSED), (2, "not connected")],
        )
        outbox.resend(2)  # still no connection: fails again, and can be resent again
        self.assertEqual(outcomes[-1].reason, "not connected")
        self.assertEqual(outbox.failed(), [1, 2])

    def test_resend_of_a_waiting_message_transmits_and_shares_its_outcome(self) -> None:
        outbox, clock, link, outcomes = make_outbox("manual")
        first = outbox.add(text(1))
        clock.advance(3)
        again = outbox.resend(1)
        self.assertEqual(link.sent, [(0, 1), (3, 1)])
        outbox.acknowledged(ack_n(1))
        self.assertEqual(len(outcomes), 1)
        self.assertEqual(fired(first), fired(again))


class ExactlyOnceTests(SynchronousTestCase):
    def test_every_path_reports_once(self) -> None:
        outbox, clock, _, outcomes = make_outbox("manual")
        d = outbox.add(text(1))
        outbox.acknowledged(ack_n(1))
        outbox.acknowledged(ack_n(1))  # repeated ack:N
        outbox.connection_lost()
        outbox.fail_all("stop")
        clock.advance(100)
        self.assertEqual(len(outcomes), 1)
        self.assertEqual(len(fired(d)), 1)
        late = outbox.add(text(2))
        clock.advance(10)
        outbox.acknowledged(ack_n(2))  # after the failure report: dropped
        self.assertEqual([o.status for o in outcomes], ["delivered", "failed"])
        self.assertEqual(fired(late)[0].status, "failed")

    def test_a_cancelled_deferred_or_a_raising_callback_do_not_break_it(self) -> None:
        clock = Clock()

        def explode(outcome: DeliveryOutcome) -> None:
            raise ZeroDivisionError(outcome)

        outbox = Outbox(clock, lambda message: True, explode)
        d = outbox.add(text(1))
        d.cancel()  # the caller timed out
        other = outbox.add(text(2))
        outbox.acknowledged(ack_n(1))
        outbox.acknowledged(ack_n(2))
        self.assertEqual(fired(other)[0].status, "delivered")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 2)
        self.failureResultOf(d)

    def test_refused_up_front(self) -> None:
        outbox, _, link, outcomes = make_outbox()
        d = outbox.add(text(1), refuse="not connected (offline)")
        self.assertEqual(fired(d)[0].reason, "not connected (offline)")
        self.assertEqual((len(outcomes), link.sent, outbox.failed()), (1, [], [1]))


# ------------------------------------------------------------------------ inbox


def incoming(
    msg_id: int,
    seq: int,
    sender: str = "alice",
    device: str = "phone",
    group: str = "",
    group_seq: int = 0,
) -> cim_pb2.Message:
    message = cim_pb2.Message(
        id=msg_id, to="" if group else "bob", text=f"{sender}/{seq}", client_seq=seq, device=device
    )
    setattr(message, "from", sender)
    if group:
        message.group = group
        message.group_seq = group_seq
    return message


class Receiver:
    def __init__(self, window: float = 0.5, seen: Any = None) -> None:
        self.clock = Clock()
        self.seen = seen if seen is not None else MemorySeenStore()
        self.shown: list[cim_pb2.Message] = []
        self.acks: list[int] = []
        self.inbox = Inbox(self.clock, self.seen, self.shown.append, self.acks.append, window)

    @property
    def ids(self) -> list[int]:
        return [message.id for message in self.shown]


class InboxDedupTests(SynchronousTestCase):
    def test_duplicates_by_id_and_by_sender_sequence_are_dropped_and_acked(self) -> None:
        r = Receiver()
        r.inbox.receive(incoming(100, 1))
        r.inbox.receive(incoming(100, 1))  # the node sent it again
        r.inbox.receive(incoming(101, 1))  # a retry the node did not recognise: new id
        r.inbox.receive(incoming(102, 1, device="laptop"))  # another device: new message
        self.assertEqual(r.ids, [100, 102])
        self.assertEqual(r.acks, [100, 100, 101, 102])
        self.assertEqual(r.inbox.duplicates, 2)

    def test_a_duplicate_of_a_held_message_is_acked_when_it_is_released(self) -> None:
        r = Receiver()
        r.inbox.receive(incoming(1, 1))
        r.inbox.receive(incoming(3, 3))  # gap: held
        r.inbox.receive(incoming(4, 3))  # same sequence, new id: duplicate of a held one
        r.inbox.receive(incoming(3, 3))
        self.assertEqual((r.ids, r.acks), ([1], [1]))
        r.clock.advance(0.5)
        self.assertEqual((r.ids, r.acks), ([1, 3], [1, 3, 4]))

    def test_group_messages_dedup_by_id(self) -> None:
        r = Receiver(window=0)
        r.inbox.receive(incoming(50, 8, group="g"))
        r.inbox.receive(incoming(50, 8, group="g"))
        self.assertEqual((r.ids, r.acks), ([50], [50, 50]))


class InboxOrderTests(SynchronousTestCase):
    def test_a_gap_is_held_for_the_window_then_released_in_order(self) -> None:
        r = Receiver()
        r.inbox.receive(incoming(10, 1))
        r.inbox.receive(incoming(14, 4))
        r.inbox.receive(incoming(13, 3))
        self.assertEqual(r.ids, [10])
        self.assertEqual(r.acks, [10])  # acks go with the hand-over
        r.clock.advance(0.49)
        self.assertEqual(r.ids, [10])
        r.clock.advance(0.01)
        self.assertEqual(r.ids, [10, 13, 14])
        self.assertEqual(r.acks, [10, 13, 14])
        self.assertEqual(r.inbox.held, 0)
        self.assertEqual(r.clock.getDelayedCalls(), [])

    def test_the_missing_one_arriving_releases_the_held_at_once(self) -> None:
        r = Receiver()
        r.inbox.receive(incoming(10, 5))
        r.inbox.receive(incoming(12, 7))
        r.inbox.receive(incoming(13, 8))
        r.inbox.receive(incoming(11, 6))
        self.assertEqual(r.ids, [10, 11, 12, 13])
        self.assertEqual(r.clock.getDelayedCalls(), [])

    def test_later_arrivals_get_their_own_full_window(self) -> None:
        r = Receiver()
        r.inbox.receive(incoming(1, 1))
        r.inbox.receive(incoming(3, 3))  # held from 0
        r.clock.advance(0.3)
        r.inbox.receive(incoming(5, 5))  # held from 0.3
        r.clock.advance(0.2)
        self.assertEqual(r.ids, [1, 3])
        r.inbox.receive(incoming(4, 4))  # fills the gap before 5
        self.assertEqual(r.ids, [1, 3, 4, 5])

    def test_a_message_after_its_window_is_shown_late_not_dropped(self) -> None:
        r = Receiver()
        r.inbox.receive(incoming(1, 1))
        r.inbox.receive(incoming(3, 3))
        r.clock.advance(0.5)
        r.inbox.receive(incoming(2, 2))
        self.assertEqual(r.ids, [1, 3, 2])
        self.assertEqual(r.inbox.late, 1)

    def test_senders_and_devices_are_ordered_separately(self) -> None:
        r = Receiver()
        r.inbox.receive(incoming(1, 1, "alice"))
        r.inbox.receive(incoming(2, 100, "carol"))
        r.inbox.receive(incoming(3, 50, "alice", "laptop"))
        r.inbox.receive(incoming(4, 2, "alice"))
        r.inbox.receive(incoming(5, 102, "carol"))  # gap for carol only
        self.assertEqual(r.ids, [1, 2, 3, 4])
        r.clock.advance(0.5)
        self.assertEqual(r.ids, [1, 2, 3, 4, 5])

    def test_window_zero_is_arrival_order(self) -> None:
        r = Receiver(window=0)
        for msg_id, seq in ((1, 1), (3, 3), (2, 2)):
            r.inbox.receive(incoming(msg_id, seq))
        self.assertEqual(r.ids, [1, 3, 2])

    def test_flush_hands_over_everything_held(self) -> None:
        r = Receiver()
        r.inbox.receive(incoming(1, 1))
        r.inbox.receive(incoming(4, 4))
        r.inbox.receive(incoming(3, 3))
        r.inbox.receive(incoming(10, 8, group="g", group_seq=1))
        r.inbox.receive(incoming(30, 9, group="g", group_seq=3))
        self.assertEqual(r.ids, [1, 10])
        r.inbox.flush()
        self.assertEqual(r.ids, [1, 10, 3, 4, 30])
        self.assertEqual(r.clock.getDelayedCalls(), [])


class GroupOrderTests(SynchronousTestCase):
    """Group messages follow the group's server-assigned sequence (group_seq)."""

    def test_in_sequence_goes_at_once(self) -> None:
        r = Receiver()
        for number, (msg_id, sender) in enumerate(((30, "carol"), (10, "alice"), (20, "dave"))):
            r.inbox.receive(incoming(msg_id, 1, sender, group="g", group_seq=number + 1))
        self.assertEqual(r.ids, [30, 10, 20])
        self.assertEqual(r.clock.getDelayedCalls(), [])

    def test_a_gap_is_held_until_the_missing_one_comes(self) -> None:
        r = Receiver()
        r.inbox.receive(incoming(10, 1, group="g", group_seq=1))
        r.inbox.receive(incoming(30, 1, "carol", group="g", group_seq=3))
        r.inbox.receive(incoming(40, 2, "carol", group="g", group_seq=4))
        self.assertEqual(r.ids, [10])
        r.clock.advance(0.4)
        r.inbox.receive(incoming(20, 1, "dave", group="g", group_seq=2))  # from another node
        self.assertEqual(r.ids, [10, 20, 30, 40])

    def test_a_gap_that_never_fills_is_released_after_the_window(self) -> None:
        r = Receiver()
        r.inbox.receive(incoming(10, 1, group="g", group_seq=1))
        r.inbox.receive(incoming(30, 2, group="g", group_seq=3))
        r.clock.advance(0.5)
        self.assertEqual(r.ids, [10, 30])
        r.inbox.receive(incoming(20, 1, "carol", group="g", group_seq=2))
        self.assertEqual(r.ids, [10, 30, 20])
        self.assertEqual(r.inbox.late, 1)

    def test_groups_and_senders_are_separate_streams(self) -> None:
        r = Receiver()
        r.inbox.receive(incoming(1, 1))
        r.inbox.receive(incoming(2, 2, group="g", group_seq=1))
        # The first seen of "other" is its 7th: earlier ones may be on their way.
        r.inbox.receive(incoming(5, 9, "dave", group="other", group_seq=7))
        # alice's device numbers everything it sends: 3 follows her group message 2.
        r.inbox.receive(incoming(3, 3))
        self.assertEqual(r.ids, [1, 2, 3])
        r.clock.advance(0.5)
        self.assertEqual(r.ids, [1, 2, 3, 5])


# ------------------------------------------------------------------------ seen stores


class MemorySeenStoreTests(SynchronousTestCase):
    def test_remembers_ids_sequences_and_the_high_water_mark(self) -> None:
        store = MemorySeenStore()
        self.assertFalse(store.is_duplicate(1, "alice", "phone", 5))
        self.assertIsNone(store.last_seq("alice", "phone"))
        store.record(1, "alice", "phone", 5)
        self.assertTrue(store.is_duplicate(1, "x", "y", 0))
        self.assertTrue(store.is_duplicate(2, "alice", "phone", 5))
        self.assertFalse(store.is_duplicate(2, "alice", "phone", 4))
        self.assertFalse(store.is_duplicate(2, "alice", "tablet", 5))
        store.record(2, "alice", "phone", 3)
        self.assertEqual(store.last_seq("alice", "phone"), 5)

    def test_bounded_and_forgotten_means_not_seen(self) -> None:
        store = MemorySeenStore(max_ids=3, max_senders=2)
        for msg_id, seq in ((1, 10), (2, 11), (3, 12), (4, 13)):
            store.record(msg_id, "alice", "phone", seq)
        self.assertEqual(len(store), 3)
        self.assertFalse(store.is_duplicate(1, "bob", "phone", 0))  # id 1 forgotten
        # A forgotten sequence is not assumed seen: other senders' traffic evicts too,
        # and a late first arrival must reach the application.
        self.assertFalse(store.is_duplicate(99, "alice", "phone", 10))
        self.assertTrue(store.is_duplicate(99, "alice", "phone", 12))
        self.assertFalse(store.is_duplicate(99, "alice", "phone", 14))
        store.record(5, "bob", "phone", 1)
        store.record(6, "carol", "phone", 1)  # a third sender evicts alice's mark
        self.assertIsNone(store.last_seq("alice", "phone"))
        self.assertRaises(ValueError, MemorySeenStore, 0)


class FileSeenStoreTests(SynchronousTestCase):
    def path(self) -> str:
        directory = self.mktemp()
        return os.path.join(directory, "nested", "seen.jsonl")

    def test_survives_a_restart(self) -> None:
        path = self.path()
        store = FileSeenStore(path)
        store.record(1, "alice", "phone", 5)
        store.record(2, "alice", "phone", 6)
        store.close()
        again = FileSeenStore(path)
        self.assertTrue(again.is_duplicate(1, "", "", 0))
        self.assertTrue(again.is_duplicate(9, "alice", "phone", 6))
        self.assertEqual(again.last_seq("alice", "phone"), 6)
        again.close()

    def test_a_torn_last_line_is_skipped(self) -> None:
        path = self.path()
        store = FileSeenStore(path)
        store.record(1, "alice", "phone", 5)
        store.close()
        with open(path, "a", encoding="utf-8") as handle:
            handle.write('{"id": 2, "from": "ali')
        again = FileSeenStore(path)
        self.assertEqual(again.skipped_lines, 1)
        self.assertTrue(again.is_duplicate(1, "", "", 0))
        self.assertFalse(again.is_duplicate(2, "", "", 0))
        self.flushLoggedErrors()
        again.close()

    def test_compacts_and_keeps_what_it_knows(self) -> None:
        path = self.path()
        store = FileSeenStore(path, max_ids=5, max_senders=2)
        for n in range(1, 40):
            store.record(n, "alice", "phone", n)
        store.close()
        with open(path, encoding="utf-8") as handle:
            lines = [json.loads(line) for line in handle]
        self.assertLessEqual(len(lines), 2 * (5 + 2))
        again = FileSeenStore(path, max_ids=5, max_senders=2)
        self.assertEqual(len(again), 5)
        self.assertTrue(again.is_duplicate(39, "", "", 0))
        self.assertTrue(again.is_duplicate(1000, "alice", "phone", 39))
        self.assertFalse(again.is_duplicate(1000, "alice", "phone", 40))
        self.assertEqual(again.last_seq("alice", "phone"), 39)
        self.assertFalse(os.path.exists(path + ".tmp"))
        again.close()

    def test_writing_after_close_is_an_error(self) -> None:
        store = FileSeenStore(self.path())
        store.close()
        self.assertRaises(ValueError, store.record, 1, "a", "b", 1)


def limited(seq: int, retry_after_ms: int = 500, code: int = cim_pb2.Error.RATE_LIMITED) -> Any:
    return cim_pb2.Error(
        code=code,  # type: ignore[arg-type]
        request_type=cim_pb2.MSG_R,
        client_seq=seq,
        retry_after_ms=retry_after_ms,
    )


class MovingClock(Clock):
    """A clock that moves on by ``step`` every time it is read, as a real one does on a
    loaded machine."""

    step = 0.02

    def seconds(self) -> float:
        self.rightNow += self.step
        return self.rightNow

    def callLater(self, delay: float, *args: Any, **kwargs: Any) -> Any:
        assert delay >= 0, f"{delay} is not greater than or equal to 0 seconds"  # the reactor's
        return super().callLater(delay, *args, **kwargs)


class PacingTests(SynchronousTestCase):
    """A RATE_LIMITED (or UNAVAILABLE) with retry_after_ms paces the conversation."""

    def test_a_short_retry_after_on_a_moving_clock_still_waits(self) -> None:
        # Seen in tests/integration/test_offline_daemon.py on two loaded cores: the clock
        # moved past a 10 ms retry-after between two readings and callLater was given a
        # negative delay (an AssertionError inside the frame handler).
        clock = MovingClock()
        link = FakeLink(clock)
        outbox = Outbox(clock, link, lambda outcome: None, RetryPolicy())
        outbox.add(text(1))
        outbox.refused(limited(1, retry_after_ms=10))
        self.assertEqual(len(link.sent), 1)
        clock.advance(0.05)
        self.assertEqual([seq for _, seq in link.sent], [1, 1])

    def test_the_refused_one_and_later_ones_wait_then_go_one_at_a_time_in_order(self) -> None:
        outbox, clock, link, outcomes = make_outbox()
        for seq in (1, 2, 3):
            outbox.add(text(seq))
        outbox.taken(cim_pb2.MsgA(client_seq=1, msg_id=1001))
        outbox.refused(limited(2))
        outbox.refused(limited(3))  # pipelined behind 2, refused by the node's order mark
        outbox.add(text(4))  # held: not sent before 2 and 3
        outbox.add(text(5, to="carol"))  # another conversation goes at once
        self.assertEqual([seq for _, seq in link.sent], [1, 2, 3, 5])
        clock.advance(0.5)
        self.assertEqual(link.sent[-1], (0.5, 2))  # the oldest alone
        outbox.taken(cim_pb2.MsgA(client_seq=2, msg_id=1002))
        self.assertEqual(len(link.sent), 5)  # the next after the last retry-after
        clock.advance(0.5)
        self.assertEqual(link.sent[-1], (1.0, 3))
        outbox.taken(cim_pb2.MsgA(client_seq=3, msg_id=1003))
        clock.advance(0.5)
        self.assertEqual(link.sent[-1], (1.5, 4))
        outbox.taken(cim_pb2.MsgA(client_seq=4, msg_id=1004))
        self.assertEqual(len(outbox.pacing), 0)  # nothing held: free again
        outbox.add(text(6))
        self.assertEqual(link.sent[-1], (1.5, 6))
        self.assertEqual(outcomes, [])  # pacing is not a failure

    def test_the_resend_schedule_and_a_reconnect_do_not_send_held_messages(self) -> None:
        outbox, clock, link, _ = make_outbox()
        outbox.add(text(1))
        outbox.add(text(2))
        outbox.refused(limited(1, retry_after_ms=20_000))
        outbox.refused(limited(2, retry_after_ms=20_000))
        clock.advance(10)  # the first resend is due, but 1 and 2 wait their turn
        link.up = False
        outbox.connection_lost()
        link.up = True
        outbox.connection_made()
        self.assertEqual([seq for _, seq in link.sent], [1, 2])
        clock.advance(10)
        self.assertEqual([seq for _, seq in link.sent], [1, 2, 1])

    def test_a_probe_refused_for_good_lets_the_next_go(self) -> None:
        outbox, clock, link, outcomes = make_outbox()
        outbox.add(text(1))
        outbox.add(text(2))
        outbox.refused(limited(1, code=cim_pb2.Error.UNAVAILABLE))
        outbox.refused(limited(2, code=cim_pb2.Error.UNAVAILABLE))
        clock.advance(0.5)
        outbox.refused(
            cim_pb2.Error(code=cim_pb2.Error.BAD_REQUEST, request_type=cim_pb2.MSG_R, client_seq=1)
        )
        self.assertEqual([o.client_seq for o in outcomes], [1])
        clock.advance(0.5)
        self.assertEqual(link.sent[-1], (1.0, 2))
        outbox.acknowledged(ack_n(2))
        self.assertEqual(len(outbox.pacing), 0)
        outbox.fail_all("stop")
