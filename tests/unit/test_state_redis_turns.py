"""PerTurn (cim.backends.state.redis.turns): one script call per reactor turn, on a
fake clock; the scripts themselves run against real Redis in the receipts contract
(tests/integration/test_state_redis.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cim.backends.state.redis.turns import PerTurn
from cim.interfaces import StateUnavailable


class PerTurnTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.sent: list[list[str]] = []
        self.reply: Any = None

    def send(self, items: Sequence[str]) -> Deferred[list[Any]]:
        self.sent.append(list(items))
        if isinstance(self.reply, Exception):
            return fail(self.reply)
        if self.reply is not None:
            return succeed(self.reply)
        return succeed([item.upper() for item in items])

    def test_a_turns_calls_go_as_one_call_in_order(self) -> None:
        batch = PerTurn(self.clock, self.send)
        answers = [batch.call(item) for item in ("a", "b", "c")]
        self.assertEqual(self.sent, [])
        self.clock.advance(0)
        self.assertEqual(self.sent, [["a", "b", "c"]])
        self.assertEqual([self.successResultOf(d) for d in answers], ["A", "B", "C"])
        later = batch.call("d")
        self.clock.advance(0)
        self.assertEqual(self.sent, [["a", "b", "c"], ["d"]])
        self.assertEqual(self.successResultOf(later), "D")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_full_batch_goes_at_once(self) -> None:
        batch = PerTurn(self.clock, self.send, limit=2)
        first = [batch.call(item) for item in ("a", "b")]
        self.assertEqual(self.sent, [["a", "b"]])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual([self.successResultOf(d) for d in first], ["A", "B"])
        rest = batch.call("c")
        self.clock.advance(0)
        self.assertEqual(self.sent, [["a", "b"], ["c"]])
        self.assertEqual(self.successResultOf(rest), "C")

    def test_a_failed_call_fails_every_item_of_it(self) -> None:
        self.reply = StateUnavailable("Redis is unreachable")
        batch = PerTurn(self.clock, self.send)
        answers = [batch.call(item) for item in ("a", "b")]
        self.clock.advance(0)
        for d in answers:
            self.failureResultOf(d, StateUnavailable)

    def test_a_reply_of_the_wrong_length_fails_every_item(self) -> None:
        self.reply = ["only one"]
        batch = PerTurn(self.clock, self.send)
        answers = [batch.call(item) for item in ("a", "b")]
        self.clock.advance(0)
        for d in answers:
            self.failureResultOf(d, ValueError)

    def test_a_send_that_raises_fails_its_items(self) -> None:
        def broken(items: Sequence[str]) -> Deferred[list[Any]]:
            raise StateUnavailable("not connected")

        batch = PerTurn(self.clock, broken)
        answer = batch.call("a")
        self.clock.advance(0)
        self.failureResultOf(answer, StateUnavailable)

    def test_limit_must_be_positive(self) -> None:
        self.assertRaises(ValueError, PerTurn, self.clock, self.send, 0)
