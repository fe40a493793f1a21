"""SIGTERM's promise: the node is gone within ``[node] stop_timeout``, flood or not.

The stop itself is orderly (``OrderedServices``: clients told and drained, then the
bus, the writers' last batches, the database), and each step waits for the work
handed to it. Under a flood that work can be minutes of queued database writes, and
an init system kills a node that overstays (systemd's ``TimeoutStopSec`` is 60 s),
losing even what could have been written. So the stop is bounded twice:

1. on the reactor: at ``stop_timeout`` the stop is declared done, naming the step
   still running, and twistd goes on with its shutdown (drain what can be drained);
2. off the reactor: a watchdog thread ends the process ``grace`` seconds later if it
   is still there (a reactor stuck in a join, or shutdown triggers still waiting for
   work), writing one line to fd 2 and exiting with status 1 (close the rest).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

__all__ = ["STOP_GRACE", "BoundedStop"]

STOP_GRACE = 5.0
"""Seconds between giving up on the orderly stop and ending the process."""


def _hard_exit(message: str) -> None:
    os.write(2, (message + "\n").encode())
    os._exit(1)


def _watchdog(seconds: float, action: Callable[[], None]) -> Callable[[], None]:
    """Run ``action`` on a daemon thread after ``seconds``; returns the cancel."""
    timer = threading.Timer(seconds, action)
    timer.daemon = True
    timer.name = "cim stop watchdog"
    timer.start()
    return timer.cancel


class BoundedStop:
    """Bounds one orderly stop in time (see the module)."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        seconds: float,
        node_id: str,
        grace: float = STOP_GRACE,
        watchdog: Callable[[float, Callable[[], None]], Callable[[], None]] = _watchdog,
        hard_exit: Callable[[str], None] = _hard_exit,
    ) -> None:
        self.clock = clock
        self.seconds = seconds
        self.node_id = node_id
        self.grace = grace
        self._watchdog = watchdog
        self._hard_exit = hard_exit

    def run(self, stopping: Deferred[None], unfinished: Callable[[], str]) -> Deferred[bool]:
        """Fires True when ``stopping`` finished in time, False when it was given up.

        ``unfinished`` names what is still stopping, for the log line.
        """
        result: Deferred[bool] = Deferred()
        message = (
            f"cim: node {self.node_id} did not stop in {self.seconds + self.grace:g} s; exiting now"
        )
        cancel_watchdog = self._watchdog(
            self.seconds + self.grace, lambda: self._hard_exit(message)
        )

        def give_up() -> None:
            if result.called:
                return
            self.log.warn(
                "stop of node {node} took longer than {seconds:g} s: leaving {what} "
                "unfinished and exiting",
                node=self.node_id,
                seconds=self.seconds,
                what=unfinished() or "nothing",
            )
            result.callback(False)

        timer = self.clock.callLater(self.seconds, give_up)

        def finished(outcome: object) -> None:
            if timer.active():
                timer.cancel()
            # Done in time: no watchdog. Given up: the watchdog stays, in case the
            # rest of the shutdown (thread pools, interpreter exit) hangs.
            if not result.called:
                cancel_watchdog()
                result.callback(True)

        stopping.addBoth(finished)
        return result
