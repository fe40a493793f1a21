"""cim.history.answers.Then: the timeline's answer without a Deferred keeps the
semantics of ``addCallback(done); addErrback(failed)``."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from cim.history.answers import Then
from cim.storage.timeline import Appended

APPENDED = Appended(5, "d:alice:bob", 2, True)


class ThenTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.done: list[Any] = []
        self.failed: list[Any] = []

    def record_done(self, appended: Appended, *args: Any) -> None:
        self.done.append((appended, args))

    def record_failed(self, failure: Any, *args: Any) -> None:
        self.failed.append((failure.type, str(failure.value), args))

    def test_callback_calls_done_with_the_arguments(self) -> None:
        answer = Then(self.record_done, self.record_failed, ("session", 3))
        self.assertFalse(answer.called)
        answer.callback(APPENDED)
        self.assertTrue(answer.called)
        self.assertEqual(self.done, [(APPENDED, ("session", 3))])
        self.assertEqual(self.failed, [])

    def test_an_error_or_a_failure_goes_to_failed(self) -> None:
        answer = Then(self.record_done, self.record_failed, ("s",))
        answer.errback(ValueError("too long"))
        self.assertTrue(answer.called)
        self.assertEqual(self.failed, [(ValueError, "too long", ("s",))])
        self.assertEqual(self.done, [])

    def test_an_exception_in_done_goes_to_failed_as_a_chain_would(self) -> None:
        def broken(appended: Appended, *args: Any) -> None:
            raise KeyError("frame")

        answer = Then(broken, self.record_failed, ())
        answer.callback(APPENDED)  # does not raise into the journal's loop
        self.assertEqual(self.failed, [(KeyError, "'frame'", ())])

    def test_an_exception_in_failed_is_logged_not_raised(self) -> None:
        def broken(failure: Any, *args: Any) -> None:
            raise RuntimeError("refusing broke")

        Then(self.record_done, broken, ()).errback(ValueError("x"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
