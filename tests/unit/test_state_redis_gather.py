"""Gather (cim.backends.state.redis.gather): a call goes at once when none is in
flight, the calls made meanwhile go together next; the scripts themselves run against
real Redis in the receipts contract (tests/integration/test_state_redis.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from cim.backends.state.redis.gather import Gather
from cim.interfaces import StateUnavailable


class GatherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.sent: list[list[str]] = []
        self.replies: list[Deferred[list[Any]]] = []

    def send(self, items: Sequence[str]) -> Deferred[list[Any]]:
        self.sent.append(list(items))
        reply: Deferred[list[Any]] = Deferred()
        self.replies.append(reply)
        return reply

    def answer(self, index: int) -> None:
        self.replies[index].callback([item.upper() for item in self.sent[index]])

    def test_a_call_goes_at_once_when_none_is_in_flight(self) -> None:
        batch = Gather(self.send)
        first = batch.call("a")
        self.assertEqual(self.sent, [["a"]])
        self.answer(0)
        self.assertEqual(self.successResultOf(first), "A")
        second = batch.call("b")
        self.assertEqual(self.sent, [["a"], ["b"]])
        self.answer(1)
        self.assertEqual(self.successResultOf(second), "B")

    def test_calls_made_meanwhile_go_together_in_order(self) -> None:
        batch = Gather(self.send)
        first = batch.call("a")
        waiting = [batch.call(item) for item in ("b", "c", "d")]
        self.assertEqual(self.sent, [["a"]])
        for d in waiting:
            self.assertNoResult(d)
        self.answer(0)
        self.assertEqual(self.successResultOf(first), "A")
        self.assertEqual(self.sent, [["a"], ["b", "c", "d"]])
        self.answer(1)
        self.assertEqual([self.successResultOf(d) for d in waiting], ["B", "C", "D"])

    def test_a_full_batch_goes_without_waiting(self) -> None:
        batch = Gather(self.send, limit=2)
        batch.call("a")
        rest = [batch.call(item) for item in ("b", "c", "d")]
        self.assertEqual(self.sent, [["a"], ["b", "c"]])
        self.answer(0)
        self.assertEqual(self.sent, [["a"], ["b", "c"]])  # one still in flight
        self.answer(1)
        self.assertEqual(self.sent, [["a"], ["b", "c"], ["d"]])
        self.answer(2)
        self.assertEqual([self.successResultOf(d) for d in rest], ["B", "C", "D"])

    def test_a_failed_call_fails_every_item_of_it_and_the_next_ones_still_go(self) -> None:
        batch = Gather(self.send)
        first = batch.call("a")
        waiting = [batch.call(item) for item in ("b", "c")]
        self.replies[0].errback(StateUnavailable("Redis is unreachable"))
        self.failureResultOf(first, StateUnavailable)
        self.assertEqual(self.sent, [["a"], ["b", "c"]])
        self.replies[1].errback(StateUnavailable("Redis is unreachable"))
        for d in waiting:
            self.failureResultOf(d, StateUnavailable)

    def test_a_reply_of_the_wrong_length_fails_every_item(self) -> None:
        batch = Gather(self.send)
        batch.call("a")
        waiting = [batch.call(item) for item in ("b", "c")]
        self.answer(0)
        self.replies[1].callback(["only one"])
        for d in waiting:
            self.failureResultOf(d, ValueError)

    def test_a_send_that_raises_fails_its_items(self) -> None:
        def broken(items: Sequence[str]) -> Deferred[list[Any]]:
            raise StateUnavailable("not connected")

        batch = Gather(broken)
        self.failureResultOf(batch.call("a"), StateUnavailable)
        self.failureResultOf(batch.call("b"), StateUnavailable)

    def test_limit_must_be_positive(self) -> None:
        self.assertRaises(ValueError, Gather, self.send, 0)
