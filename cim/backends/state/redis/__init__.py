"""The shared state backend: sessions, routes, receipts and sequences in Redis, for a cluster.

One module per facet (sessions, routes, receipts, sequences), all on one RedisCore
(core.py: the key space, the connection, the session-ended notifications); the
connections are in connection.py, and every decision that reads and then writes is a
Lua script of its own (the .lua files next to scripts.py), so it runs atomically.
Importing this package imports txredisapi: only cim.backends.state.make_state_store
does, and only when [state] backend = redis.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cim.backends.state import REASON_EXPIRED
from cim.backends.state.redis import scripts
from cim.backends.state.redis.address import parse_redis_url
from cim.backends.state.redis.core import RedisCore, record_from_reply
from cim.backends.state.redis.receipts import RedisReceiptStore
from cim.backends.state.redis.routes import RedisRouteStore
from cim.backends.state.redis.sequences import RedisSequenceStore
from cim.backends.state.redis.sessions import RedisSessionStore
from cim.interfaces import IStateBackend, StateUnavailable
from cim.reactor import ICimReactor

DEFAULT_PREFIX = "cim:"
SWEEP_BATCH = 1000

_log = Logger(namespace="cim.state.redis")


@implementer(IStateBackend)
class RedisState:
    """The four Redis facets, the connection they share, and the housekeeping.

    ``reactor`` does the networking and the timeouts; ``clock`` (the reactor unless
    given) supplies session times, so tests can expire sessions without waiting.
    """

    def __init__(
        self,
        reactor: ICimReactor,
        redis_url: str,
        reply_timeout: float,
        route_ttl: float,
        *,
        clock: IReactorTime | None = None,
        key_prefix: str = DEFAULT_PREFIX,
        sweep_interval: float | None = None,
        reconnect_delay: float = 0.2,
        max_reconnect_delay: float = 5.0,
        dedup_window: float = 600.0,
    ) -> None:
        self._core = RedisCore(
            reactor,
            clock if clock is not None else reactor,
            parse_redis_url(redis_url),
            reply_timeout,
            route_ttl,
            key_prefix,
            reconnect_delay,
            max_reconnect_delay,
        )
        self.sessions = RedisSessionStore(self._core)
        self.presence = RedisRouteStore(self._core)
        self.receipts = RedisReceiptStore(self._core, dedup_window)
        self.sequences = RedisSequenceStore(self._core)
        self._sweep_interval = (
            sweep_interval if sweep_interval is not None else max(1.0, min(60.0, route_ttl / 3))
        )
        self._housekeeping = LoopingCall(self._keep_house)
        self._housekeeping.clock = reactor
        self._started: Deferred[None] | None = None

    @property
    def connected(self) -> bool:
        """Whether calls can reach Redis right now (both connections are up)."""
        return self._core.connection.connected

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Connect; fails with StateUnavailable if Redis is not reached in time.

        Only start-up insists on Redis: once started, the store survives outages.
        """
        if self._started is not None:
            return self._started

        def started(_: object) -> None:
            self._housekeeping.start(self._sweep_interval, now=False)

        def failed(failure: Failure) -> Failure:
            self._started = None
            return failure

        outcome = self._core.connection.open().addCallbacks(started, failed)
        self._started = outcome
        return outcome

    def stop(self) -> Deferred[None]:
        if self._housekeeping.running:
            self._housekeeping.stop()
        self._started = None
        return self._core.connection.close()

    # --- housekeeping -----------------------------------------------------------------

    def sweep(self) -> Deferred[int]:
        """End sessions past their expiry and drop online entries of dead routes.

        Every node sweeps; the script is atomic, so each expired session is ended
        (and announced) exactly once across the cluster.
        """
        core = self._core
        d = core.eval(scripts.SWEEP, core.now(), str(SWEEP_BATCH), core.tombstone_ms)

        def expired(reply: list[Any]) -> int:
            for item in reply:
                core.tell(record_from_reply(item), REASON_EXPIRED)
            return len(reply)

        return d.addCallback(expired)

    def _keep_house(self) -> Deferred[None]:
        d = self.sweep()
        d.addCallback(lambda _: self._core.connection.ping_notifications())

        def failed(failure: Failure) -> None:
            # An outage is already logged by the link, once; don't repeat it per run.
            if not failure.check(StateUnavailable):
                _log.failure("state store housekeeping failed", failure)

        return d.addCallbacks(lambda _: None, failed)
