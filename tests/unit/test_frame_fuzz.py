"""The frame fuzzer, bounded for CI (issue #16, acceptance 6): hypothesis, fixed seed.

Real sessions on a real node (tests/fuzz/target.py), both cipher suites, a few
hundred generated inputs each after the handshake: no traceback, every request
answered or the connection closed, memory bounded. ``make fuzz`` runs the same
generator for a million inputs.
"""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Sequence
from typing import TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.fuzz.frames import REQUEST_TYPES, RandomDraws, draw_action
from tests.fuzz.target import FrameFuzzTarget

T = TypeVar("T")

EXAMPLES = 200
MEMORY_INPUTS = 500
MEMORY_PEAK = 32 * 2**20
"""Peak Python allocations while the node takes MEMORY_INPUTS more inputs (tracemalloc):
a 64 KiB frame decoded and answered is a few MiB at most."""
MEMORY_KEPT = 8 * 2**20
"""What may stay allocated after them: the node's state must not grow with sessions."""


class HypothesisDraws:
    """``tests.fuzz.frames.Draws`` from hypothesis, so failures shrink.

    Structure (which action, which type, which fields, which numbers) is drawn from
    hypothesis; long byte strings and texts come from a Random seeded by one draw, as
    drawing thousands of characters one by one would cost hypothesis most of the run.
    """

    BULK = 64

    def __init__(self, data: st.DataObject) -> None:
        self._data = data
        self._bulk = RandomDraws(data.draw(st.integers(0, 2**32 - 1)))

    def integer(self, low: int, high: int) -> int:
        return self._data.draw(st.integers(low, high))

    def choice(self, options: Sequence[T]) -> T:
        return self._data.draw(st.sampled_from(options))

    def raw(self, max_size: int) -> bytes:
        if max_size > self.BULK:
            return self._bulk.raw(max_size)
        return self._data.draw(st.binary(max_size=max_size))

    def text(self, max_size: int) -> str:
        if max_size > self.BULK:
            return self._bulk.text(max_size)
        return self._data.draw(st.text(max_size=max_size))


FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class FrameFuzzTests(SynchronousTestCase):
    def fuzz(self, suite: str) -> None:
        target = FrameFuzzTarget(os.path.abspath(self.mktemp()), suite)
        self.addCleanup(target.close)

        @FUZZ_SETTINGS
        @given(st.data())
        def one_example(data: st.DataObject) -> None:
            draws = HypothesisDraws(data)
            for _ in range(draws.integer(1, 4)):
                action = draw_action(draws, target.max_frame_size)
                target.send(action)
            tally = target.tally
            self.assertFalse(tally.failed(), "\n".join([tally.summary(), *tally.examples]))

        one_example()
        # Memory, measured without hypothesis' own bookkeeping: the same generator,
        # seeded, on the same node that just took the examples.
        draws = RandomDraws(16)
        tracemalloc.start()
        try:
            for _ in range(MEMORY_INPUTS):
                target.send(draw_action(draws, target.max_frame_size))
            kept, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertLess(peak, MEMORY_PEAK, f"peak {peak / 2**20:.1f} MiB")
        self.assertLess(kept, MEMORY_KEPT, f"kept {kept / 2**20:.1f} MiB")
        tally = target.tally
        self.assertGreaterEqual(tally.inputs, EXAMPLES + MEMORY_INPUTS)
        # Both kinds of outcome were exercised: answered requests and closed sessions.
        self.assertGreater(tally.answered, EXAMPLES // 4, tally.summary())
        self.assertGreater(tally.closed, 10, tally.summary())
        self.assertEqual((tally.tracebacks, tally.unanswered), (0, 0), tally.summary())
        # What the node keeps per connection went with the connections.
        self.assertLessEqual(len(target.node.factory.protocols), 1)
        self.assertLessEqual(target.node.im.sessions.connected_count, 1)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_chacha20_poly1305(self) -> None:
        self.fuzz("chacha20-poly1305")

    def test_rc4_hmac_sha256(self) -> None:
        self.fuzz("rc4-hmac-sha256")

    def test_the_fuzzer_sends_every_frame_type_a_client_may(self) -> None:
        """A frame type added to the connection's table must be added to the fuzzer too."""
        target = FrameFuzzTarget(os.path.abspath(self.mktemp()), "chacha20-poly1305")
        self.addCleanup(target.close)
        inbound = target.node.factory.inbound
        self.assertEqual(sorted(REQUEST_TYPES), sorted(inbound))
        for frame_type, message_class in REQUEST_TYPES.items():
            self.assertIs(inbound[frame_type][0], message_class)
