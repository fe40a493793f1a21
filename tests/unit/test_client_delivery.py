"""The client's outbox (retries, outcomes, pacing) and seen stores; the inbox (dedup and
seq order per conversation) is tested with the session in test_client_timelines and
test_client_gaps."""

from __future__ import annotations

import itertools
import json
import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cim.client.delivery import (
    REASON_CONNECTION_CLOSED,
    DeliveryOutcome,
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
        outbox.refused(limited(1))
        outbox.refused(limited(2))
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


class UnavailableTests(SynchronousTestCase):
    """UNAVAILABLE: the node could not write the message durably; it goes again soon."""

    def test_resent_after_a_short_backoff_not_the_ten_second_resend(self) -> None:
        outbox, clock, link, outcomes = make_outbox()
        for seq in (1, 2, 3):
            outbox.add(text(seq))
        for seq in (1, 2, 3):
            outbox.refused(limited(seq, retry_after_ms=0, code=cim_pb2.Error.UNAVAILABLE))
        outbox.add(text(4))  # after the refusals: waits behind them
        self.assertEqual([seq for _, seq in link.sent], [1, 2, 3])
        clock.advance(0.2)  # UNAVAILABLE_BACKOFF's first step: at most 0.2 s
        self.assertEqual([seq for _, seq in link.sent], [1, 2, 3, 1])
        outbox.taken(cim_pb2.MsgA(client_seq=1, msg_id=1001))  # the node is back
        self.assertEqual([seq for _, seq in link.sent], [1, 2, 3, 1, 2, 3, 4])
        self.assertEqual(len(outbox.pacing), 0)
        self.assertEqual(outcomes, [])

    def test_refusals_in_a_row_back_off_and_the_nodes_wait_wins(self) -> None:
        outbox, clock, link, _ = make_outbox()
        outbox.add(text(1))
        waits = []
        for _ in range(4):
            sent = len(link.sent)
            outbox.refused(limited(1, retry_after_ms=0, code=cim_pb2.Error.UNAVAILABLE))
            start = clock.seconds()
            while len(link.sent) == sent:
                clock.advance(0.01)
            waits.append(round(clock.seconds() - start, 2))
        self.assertTrue(all(a < b for a, b in itertools.pairwise(waits)), waits)
        self.assertLessEqual(waits[-1], 1.6)
        sent = len(link.sent)
        outbox.refused(limited(1, retry_after_ms=6000, code=cim_pb2.Error.UNAVAILABLE))
        clock.advance(5.9)
        self.assertEqual(len(link.sent), sent)
        clock.advance(0.1)
        self.assertEqual(len(link.sent), sent + 1)
