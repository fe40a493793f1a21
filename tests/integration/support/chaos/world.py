"""The chaos run's world: three real cim nodes on private Redis, ZooKeeper, RabbitMQ and
PostgreSQL, and the faults done to them.

Every service here is the run's own (free loopback ports, its own directories); the
machine's shared services are never touched. Each is closed by the scope's cleanup
(a trial TestCase, or ``Scope`` for ``make chaos``), so nothing outlives the run.
Blocking steps (a broker's 12 s boot) run on a thread, so the clients' reactor keeps
its heartbeats while a service starts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.threads import deferToThread

from cim.ring import HashRing
from tests.integration.support.cluster import Cluster, reactor, ring_of, sleep
from tests.integration.support.daemons import DaemonProcess
from tests.integration.support.postgresql import PrivatePostgreSQL, private_postgresql
from tests.integration.support.rabbitmq import PrivateRabbitMQ, private_rabbitmq

ZOOKEEPER_SESSION = 8.0
"""Long enough that two loaded cores do not expire a healthy node's session, short
enough that a stopped node leaves the routers' ring during its 15 s pause."""


class Scope:
    """What the helpers need of a trial TestCase, for a run outside trial (make chaos):
    cleanups run last-in first-out by ``close``, temporary directories (removed by
    ``close`` unless CIM_CHAOS_KEEP is set: the nodes' logs are there), failing."""

    def __init__(self) -> None:
        self._cleanups: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self._base = tempfile.mkdtemp(prefix="cim-chaos-")
        self._made = 0

    def addCleanup(self, function: Callable[..., Any], *args: Any) -> None:
        self._cleanups.append((function, args))

    def mktemp(self) -> str:
        self._made += 1
        return os.path.join(self._base, f"t{self._made}")

    def fail(self, message: str) -> None:
        raise AssertionError(message)

    async def close(self) -> None:
        while self._cleanups:
            function, args = self._cleanups.pop()
            try:
                result = function(*args)
                if isinstance(result, Deferred):
                    await result
            except Exception as error:  # one cleanup failing must not leave the others
                print(f"cleanup {function!r} failed: {error}")
        if os.environ.get("CIM_CHAOS_KEEP"):
            print(f"the nodes' logs are kept in {self._base}")
        else:
            shutil.rmtree(self._base, ignore_errors=True)


async def until(
    check: Callable[[], Awaitable[bool] | bool], deadline: float, what: str, interval: float = 0.25
) -> float:
    """Poll ``check`` until it holds; how long it took. AssertionError at the deadline."""
    started = reactor.seconds()
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return float(reactor.seconds() - started)
        if reactor.seconds() - started > deadline:
            raise AssertionError(f"gave up after {deadline:g} s waiting for {what}")
        await sleep(interval)


def _healthy(node: DaemonProcess) -> bool:
    try:
        return node.health().get("status") == "ok"
    except (OSError, ValueError):
        return False


class ChaosWorld:
    """Three nodes and their private services; each fault is one method."""

    def __init__(self, scope: Any, prefix: str = "n") -> None:
        self.scope = scope
        self.database: PrivatePostgreSQL = private_postgresql(scope)
        self.broker: PrivateRabbitMQ = private_rabbitmq(scope)
        self.cluster = Cluster(
            scope,
            count=3,
            amqp_url=self.broker.url,
            prefix=prefix,
            session_timeout=ZOOKEEPER_SESSION,
            database_url=self.database.url,
        )

    @property
    def nodes(self) -> list[DaemonProcess]:
        return self.cluster.nodes

    @property
    def routers(self) -> list[str]:
        return [node.router_url for node in self.nodes]

    def ring(self) -> HashRing:
        return ring_of(self.nodes)

    def start(self, users: list[str]) -> None:
        self.cluster.start(users)
        # Registered after the nodes' own stops, so it runs before them: a node left
        # stopped by a failed run must be able to act on its SIGTERM.
        self.scope.addCleanup(self._continue_all)

    def _continue_all(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    node.process.send_signal(signal.SIGCONT)

    async def all_healthy(self) -> bool:
        answers = await DeferredList(
            [deferToThread(_healthy, node) for node in self.nodes], consumeErrors=True
        )
        return all(ok and healthy for ok, healthy in answers)

    # --- the faults -------------------------------------------------------------------

    async def kill_node(self, node: DaemonProcess, down: float) -> None:
        """kill -9, down for a while (its clients go elsewhere), then started again."""
        node.kill()
        await sleep(down)
        node.spawn()

    async def kill_redis(self) -> None:
        """kill -9 Redis and start it again empty (no persistence): sessions, routes,
        receipts and group sequences are gone."""
        redis = self.cluster.redis
        await deferToThread(redis.kill)
        await deferToThread(redis.start)

    async def stop_broker(self, down: float) -> None:
        """RabbitMQ stops cleanly, stays away, then boots again (its queues are durable)."""
        await deferToThread(self.broker.stop)
        await sleep(down)
        await deferToThread(self.broker.start)

    async def kill_database(self, down: float) -> None:
        """kill -9 the postmaster and every backend, then start it again (crash recovery)."""
        await deferToThread(self.database.kill)
        await sleep(down)
        await deferToThread(self.database.start)

    async def pause_node(self, node: DaemonProcess, paused: float) -> None:
        """SIGSTOP (connections stay open, nothing answers), then SIGCONT."""
        assert node.process is not None
        node.process.send_signal(signal.SIGSTOP)
        try:
            await sleep(paused)
        finally:
            node.process.send_signal(signal.SIGCONT)
