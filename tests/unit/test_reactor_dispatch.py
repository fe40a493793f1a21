"""The daemon's event dispatch: epoll events go to their selectables without a log context.

Each test makes its own ``EPollReactor`` (never the global one) and polls it with a
timeout of 0: nothing here waits.
"""

from __future__ import annotations

import os
import socket

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.testing import MemoryReactorClock
from twisted.python import context, failure, log
from twisted.trial.unittest import SynchronousTestCase

from cim.metrics import ReactorHolds
from cim.reactor import dispatch_without_log_context


class _Reader:
    """A selectable the reactor reads: records what each ``doRead`` saw."""

    def __init__(self, sock: socket.socket, fail: bool = False) -> None:
        self.sock = sock
        self.fail = fail
        self.systems: list[object] = []
        self.lost: list[failure.Failure] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "reader-prefix"

    def doRead(self) -> None:
        self.systems.append(context.get(log.ILogContext)["system"])
        self.sock.recv(100)
        if self.fail:
            raise RuntimeError("a protocol's bug")

    def connectionLost(self, reason: failure.Failure) -> None:
        self.lost.append(reason)
        if self.fail:
            raise ValueError("and a bug in its cleanup")


class DispatchTests(SynchronousTestCase):
    def _reactor(self) -> EPollReactor:
        reactor = EPollReactor()

        def close() -> None:
            reactor._poller.close()
            waker = getattr(reactor, "waker", None)
            if waker is not None:
                for fd in (getattr(waker, "i", None), getattr(waker, "o", None)):
                    if isinstance(fd, int):
                        os.close(fd)

        self.addCleanup(close)
        return reactor

    def _pair(self) -> tuple[socket.socket, socket.socket]:
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        return ours, theirs

    def _ready_reader(self, reactor: EPollReactor, fail: bool = False) -> _Reader:
        """A reader added to ``reactor`` with a byte waiting for it."""
        ours, theirs = self._pair()
        reader = _Reader(ours, fail)
        reactor.addReader(reader)
        theirs.send(b"x")
        return reader

    def test_a_read_event_reaches_its_selectable_without_the_log_context(self) -> None:
        reactor = self._reactor()
        self.assertTrue(dispatch_without_log_context(reactor))
        reader = self._ready_reader(reactor)
        reactor.doIteration(0)
        # Twisted's own doPoll would have run it with {"system": "reader-prefix"}.
        self.assertEqual(reader.systems, ["-"])
        reactor.doIteration(0)  # nothing more to read: no second call
        self.assertEqual(len(reader.systems), 1)

    def test_twisteds_own_dispatch_sets_the_context_this_one_leaves_out(self) -> None:
        # The control: the same reader on an unchanged reactor sees its prefix, so the
        # test above would see it too had nothing been changed.
        reactor = self._reactor()
        reader = self._ready_reader(reactor)
        reactor.doIteration(0)
        self.assertEqual(reader.systems, ["reader-prefix"])

    def test_a_failing_read_is_logged_and_its_selectable_closed_as_before(self) -> None:
        reactor = self._reactor()
        dispatch_without_log_context(reactor)
        reader = self._ready_reader(reactor, fail=True)
        reactor.doIteration(0)
        self.assertEqual(len(reader.lost), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.flushLoggedErrors(ValueError)  # its cleanup's bug: the test below
        self.assertNotIn(reader, reactor.getReaders())

    def test_an_event_that_raises_is_logged_and_the_others_still_run(self) -> None:
        # Twisted's _doReadOrWrite catches what doRead raises, but not what the
        # selectable's connectionLost then raises: logged, as callWithLogger would.
        reactor = self._reactor()
        dispatch_without_log_context(reactor)
        self._ready_reader(reactor, fail=True)  # ready first: epoll hands it over first
        healthy = self._ready_reader(reactor)
        reactor.doIteration(0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(healthy.systems, ["-"])

    def test_an_event_for_a_descriptor_already_removed_is_dropped(self) -> None:
        reactor = self._reactor()
        dispatch_without_log_context(reactor)
        reader = self._ready_reader(reactor)
        # Ready in the kernel, gone from the reactor's table (removed in the same turn).
        del reactor._selectables[reader.fileno()]
        reactor.doIteration(0)
        self.assertEqual(reader.systems, [])

    def test_the_time_between_two_polls_is_told_from_the_floor_up(self) -> None:
        reactor = self._reactor()
        holds = ReactorHolds()
        now = [100.0]
        dispatch_without_log_context(reactor, holds, clock=lambda: now[0])
        reactor.doIteration(0)  # the first poll: no turn before it to time
        now[0] += 0.0125  # a turn that held the reactor 12.5 ms
        reactor.doIteration(0)
        now[0] += holds.FLOOR / 2  # a short turn: not counted
        reactor.doIteration(0)
        now[0] += 0.003
        reactor.doIteration(0)
        self.assertEqual(holds.holds.count, 2)
        self.assertAlmostEqual(holds.holds.sum, 0.0155)
        self.assertAlmostEqual(holds.longest, 0.0125)

    def test_other_reactors_are_left_alone(self) -> None:
        reactor = MemoryReactorClock()
        self.assertFalse(dispatch_without_log_context(reactor))
        self.assertNotIn("doIteration", vars(reactor))
