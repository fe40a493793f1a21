"""The one thread-pool runner: blocking work on a named pool, stopped only once done.

The database (SQLAlchemy, "cim-db"), the file store ("cim-files"), password hashing
("cim-kdf") and the ZooKeeper registry (kazoo, "cim-zookeeper") all run blocking calls
off the reactor thread. Each gets its own named pool, so a thread dump says who is
busy, and they all start, run and stop the same way, here.

A pool may run below the reactor (``nice``): on Linux each of its threads lowers its own
scheduling priority before its first piece of work. On a core the reactor shares with a
busy pool (the timeline copy's transactions every ``COPY_WAIT``), the kernel otherwise
kept running the pool thread while the reactor waited for the CPU and then for the GIL:
about 5 ms stalls several times a second at 1,000 msg/s with everything on one core
(p99 3-13 ms; with the database pool at nice 10, 1.7-1.8 ms; docs/benchmarks.md).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from cim.reactor import ICimReactor

__all__ = ["BELOW_THE_REACTOR", "PoolNotRunning", "Runner", "ThreadPoolRunner", "lower_this_thread"]

T = TypeVar("T")

BELOW_THE_REACTOR = 10
"""The ``nice`` of pools whose work waits while the reactor answers clients."""


def lower_this_thread(by: int) -> bool:
    """Lower the calling thread's scheduling priority by ``by`` nice steps (Linux: a
    thread's nice is its own; elsewhere it is the process's, so nothing is done).
    False when nothing was changed."""
    if by <= 0 or not sys.platform.startswith("linux"):
        return False
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
    except OSError:
        return False
    return True


_lowered = threading.local()


class Runner(Protocol):
    """Runs a blocking callable somewhere else and reports its result in a Deferred.

    Production uses a thread pool; tests pass ``lambda work: maybeDeferred(work)`` so
    work runs synchronously with no reactor and no threads.
    """

    def __call__(self, work: Callable[[], T], /) -> Deferred[T]: ...


class PoolNotRunning(Exception):
    """Work was handed to a thread pool that is not started or is stopping."""


class ThreadPoolRunner:
    """Runs blocking work on a named thread pool and stops only when the work is done.

    Counting the work in flight here, rather than relying on ``ThreadPool.stop``,
    keeps the reactor thread from blocking in ``join`` while a transaction is still
    running, and lets an injected runner (tests) be waited for the same way.

    A forgotten ``stop`` would leave non-daemon threads keeping the process alive, so
    the pool stops itself at reactor shutdown, unless its owner stops it then itself
    (``stop_at_shutdown=False``: the ZooKeeper registry closes its session on the pool
    first).
    """

    def __init__(
        self,
        name: str,
        threads: int,
        reactor: ICimReactor | None,
        runner: Runner | None = None,
        on_wait: Callable[[float], None] | None = None,
        *,
        stop_at_shutdown: bool = True,
        nice: int = 0,
        lower: Callable[[int], object] = lower_this_thread,
    ) -> None:
        self.name = name
        self.nice = nice
        """How far below the reactor the pool's threads run (``lower_this_thread``)."""
        self._lower = lower
        # Told (on the worker thread) how long each piece of work waited for a thread.
        self.on_wait = on_wait
        self._reactor = reactor
        self._pool: ThreadPool | None = None
        self._threads = threads
        self._runner = runner
        self._stop_at_shutdown_too = stop_at_shutdown
        self._pending = 0
        self._idle_waiters: list[Deferred[None]] = []
        self._stop_waiters: list[Deferred[None]] = []
        self._stopping = False
        self._stopped = False
        self._shutdown_trigger: Any = None

    def start(self) -> None:
        if self._runner is not None or self._pool is not None:
            return
        if self._reactor is None:
            raise ValueError(f"{self.name}: a reactor is needed unless a runner is given")
        self._pool = ThreadPool(minthreads=0, maxthreads=self._threads, name=self.name)
        self._pool.start()
        if self._stop_at_shutdown_too:
            self._shutdown_trigger = self._reactor.addSystemEventTrigger(
                "during", "shutdown", self._stop_at_shutdown
            )

    def run(self, work: Callable[[], T]) -> Deferred[T]:
        if self._stopping:
            return fail(PoolNotRunning(f"{self.name} is stopping"))
        on_wait = self.on_wait
        if on_wait is not None:
            queued = time.monotonic()
            inner = work

            def timed() -> T:
                on_wait(time.monotonic() - queued)
                return inner()

            work = timed
        if self.nice > 0 and self._runner is None:  # an injected runner is the caller's
            work = self._below_the_reactor(work)
        if self._runner is not None:
            d = self._runner(work)
        elif self._pool is not None and self._reactor is not None:
            d = deferToThreadPool(self._reactor, self._pool, work)
        else:
            return fail(PoolNotRunning(f"{self.name} is not started"))
        self._pending += 1
        d.addBoth(self._finished)
        return d

    def _below_the_reactor(self, work: Callable[[], T]) -> Callable[[], T]:
        nice, lower = self.nice, self._lower

        def lowered_first() -> T:
            # Once per thread: a pool's threads live until it stops.
            if not getattr(_lowered, self.name, False):
                setattr(_lowered, self.name, True)
                lower(nice)
            return work()

        return lowered_first

    def _finished(self, result: T) -> T:
        self._pending -= 1
        if self._pending == 0:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)
        return result

    @property
    def pending(self) -> int:
        """Work handed over and not finished: running, or waiting for a thread."""
        return self._pending

    def when_idle(self) -> Deferred[None]:
        if self._pending == 0:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    def stop(self) -> Deferred[None]:
        """Let the work already handed over finish, then stop the threads."""
        if not self._stopping:
            self._stopping = True
            if self._shutdown_trigger is not None and self._reactor is not None:
                self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
                self._shutdown_trigger = None
            self.when_idle().addCallback(self._stop_pool)
        if self._stopped:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._stop_waiters.append(waiter)
        return waiter

    def _stop_pool(self, _: object) -> None:
        if self._pool is not None:
            self._pool.stop()  # the threads are idle, so joining them is quick
            self._pool = None
        self._stopped = True
        waiters, self._stop_waiters = self._stop_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _stop_at_shutdown(self) -> Deferred[None]:
        self._shutdown_trigger = None
        return self.stop()
