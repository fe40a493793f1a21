"""The one thread-pool runner: blocking work on a named pool, stopped only once done.

The database (SQLAlchemy, "cim-db"), the file store ("cim-files"), password hashing
("cim-kdf") and the ZooKeeper registry (kazoo, "cim-zookeeper") all run blocking calls
off the reactor thread. Each gets its own named pool, so a thread dump says who is
busy, and they all start, run and stop the same way, here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from cim.reactor import ICimReactor

__all__ = ["PoolNotRunning", "Runner", "ThreadPoolRunner"]

T = TypeVar("T")


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
    ) -> None:
        self.name = name
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
        if self._runner is not None:
            d = self._runner(work)
        elif self._pool is not None and self._reactor is not None:
            d = deferToThreadPool(self._reactor, self._pool, work)
        else:
            return fail(PoolNotRunning(f"{self.name} is not started"))
        self._pending += 1
        d.addBoth(self._finished)
        return d

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
