"""INodeRegistry on ZooKeeper: the design's 注册中心.

Each IM node holds an ephemeral znode ``<path>/<node id>`` carrying how clients reach
it; the znode lives exactly as long as the node's ZooKeeper session, so a node killed
with kill -9 disappears once the server expires its session. Routers keep a children
watch on ``<path>`` and re-read the view whenever ZooKeeper says it changed, so they
never poll.

kazoo runs its own threads. Its callbacks here do nothing but hand the event to the
reactor with ``callFromThread``; kazoo's blocking calls run on the small
"cim-zookeeper" thread pool; every Twisted object (Deferreds, timers, listeners) is
touched on the reactor thread only.

Session rules (what ``accepting`` means):

- SUSPENDED (connection lost, session maybe alive): keep serving, because the server
  keeps the znode until the session times out and a reconnect within that time resumes
  the same session. After a whole session timeout without a reconnect the session has
  certainly expired on the server, so ``accepting`` turns False.
- LOST (the server expired the session, so the znode is gone): ``accepting`` turns
  False at once. When kazoo establishes a new session the znode is created again and
  ``accepting`` turns True; if another node has taken the id meanwhile, this node stays
  not accepting and says so at critical level.
"""

from __future__ import annotations

import logging
from typing import Any

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import KazooException
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.retry import KazooRetry
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from cim.backends.registry.local import ViewListener, tell_listeners
from cim.backends.registry.znodes import ZNodes
from cim.backends.threads import PoolNotRunning, Runner, ThreadPoolRunner
from cim.interfaces import INodeRegistry, NodeIdTaken, NodeInfo
from cim.reactor import ICimReactor

THREAD_POOL_NAME = "cim-zookeeper"
RETRY_DELAY = 1.0
"""Seconds before retrying a failed re-registration or view read while connected."""


class ZooKeeperUnavailable(Exception):
    """ZooKeeper could not be reached when the registry started."""


class _ToTwistedLog(logging.Handler):
    """kazoo logs with the stdlib from its own threads; this moves its records onto
    the reactor thread and into Twisted's log, where the daemon's other lines go.
    """

    _log = Logger(namespace="cim.registry.kazoo")
    _levels = (
        (logging.ERROR, LogLevel.error),
        (logging.WARNING, LogLevel.warn),
        (logging.INFO, LogLevel.info),
    )

    def __init__(self, reactor: ICimReactor) -> None:
        super().__init__()
        self._reactor = reactor

    def emit(self, record: logging.LogRecord) -> None:
        level = next((ours for at, ours in self._levels if record.levelno >= at), LogLevel.debug)
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
        self._reactor.callFromThread(self._log.emit, level, "kazoo: {message}", message=message)


def _kazoo_logger(reactor: ICimReactor) -> logging.Logger:
    # A private Logger object, not logging.getLogger: each registry gets its own
    # handler without piling handlers onto one global logger.
    logger = logging.Logger("kazoo", logging.INFO)
    logger.propagate = False
    logger.addHandler(_ToTwistedLog(reactor))
    return logger


@implementer(INodeRegistry)
class ZooKeeperRegistry:
    """The live IM nodes as ZooKeeper sees them, and this node's place among them."""

    _log = Logger()

    def __init__(
        self,
        reactor: ICimReactor,
        hosts: str,
        path: str,
        session_timeout: float,
        connect_timeout: float = 15.0,
        client: Any = None,
        run_blocking: Runner | None = None,
    ) -> None:
        """``client`` and ``run_blocking`` replace kazoo and the thread pool in tests."""
        self.local_node: NodeInfo | None = None
        self.accepting = False
        self.hosts = hosts
        self.path = path.rstrip("/") or "/"
        self.session_timeout = session_timeout
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        if client is None:
            client = KazooClient(
                hosts=hosts,
                timeout=session_timeout,
                # Never give up reconnecting, and do not back off so far that a
                # restarted ZooKeeper goes unnoticed for long.
                connection_retry=KazooRetry(max_tries=-1, delay=0.1, max_delay=2.0),
                command_retry=KazooRetry(max_tries=5, delay=0.1, max_delay=2.0),
                logger=_kazoo_logger(reactor),
            )
        self._client = client
        self._znodes = ZNodes(client, hosts, self.path, session_timeout, connect_timeout)
        # Stopped by stop(), at shutdown too, once the session is closed on it.
        self._blocking = ThreadPoolRunner(
            THREAD_POOL_NAME, 2, reactor, run_blocking, stop_at_shutdown=False
        )
        self._listeners: list[ViewListener] = []
        self._view: list[NodeInfo] = []
        self._watching = False
        self._stopping = False
        self._stopped: Deferred[None] | None = None
        self._shutdown_trigger: Any = None
        self._view_generation = 0
        self._published_generation = 0
        self._session_epoch = 0
        """Bumped on every LOST, so a claim that finished on an old session counts for nothing."""
        self._expiry_call: IDelayedCall | None = None
        self._reclaim_call: IDelayedCall | None = None
        self._refresh_call: IDelayedCall | None = None

    def __repr__(self) -> str:
        return f"<ZooKeeperRegistry {self.hosts}{self.path}>"

    # --- INodeRegistry ---------------------------------------------------------------

    def start(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        self._blocking.start()
        self._shutdown_trigger = self._reactor.addSystemEventTrigger(
            "during", "shutdown", self._stop_at_shutdown
        )
        try:
            try:
                await self._blocking.run(
                    lambda: self._znodes.connect_txn(
                        self._state_from_kazoo, self._children_from_kazoo
                    )
                )
            except KazooTimeoutError:
                raise ZooKeeperUnavailable(
                    f"could not connect to ZooKeeper at {self.hosts} within "
                    f"{self._connect_timeout:g} s"
                ) from None
            self._watching = True
            await self._refresh()
        except BaseException:
            await self.stop()
            raise
        self._log.info(
            "registry: watching {path} on ZooKeeper {hosts}; {count} live node(s)",
            path=self.path,
            hosts=self.hosts,
            count=len(self._view),
        )

    def stop(self) -> Deferred[None]:
        if self._stopped is None:
            self._stopped = Deferred.fromCoroutine(self._stop())
        # Every caller gets its own Deferred, so one caller's callbacks cannot alter
        # what another receives.
        mine: Deferred[None] = Deferred()
        self._stopped.addBoth(_chain_to, mine)
        return mine

    async def _stop(self) -> None:
        self._stopping = True
        self.accepting = False
        self.local_node = None
        self._watching = False
        for call in (self._expiry_call, self._reclaim_call, self._refresh_call):
            if call is not None and call.active():
                call.cancel()
        self._expiry_call = self._reclaim_call = self._refresh_call = None
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        try:
            # Closing the session deletes this node's znode at once, so routers drop
            # it now rather than after the session timeout.
            await self._blocking.run(lambda: self._znodes.close_txn(self._state_from_kazoo))
        except PoolNotRunning:
            pass  # never started: there is no session to close
        except Exception:
            self._log.failure("registry: closing the ZooKeeper session failed")
        await self._blocking.stop()

    def _stop_at_shutdown(self) -> Deferred[None]:
        # A forgotten stop() would leave the pool's threads keeping the process alive.
        self._shutdown_trigger = None
        return self.stop()

    def register(self, node: NodeInfo) -> Deferred[None]:
        return Deferred.fromCoroutine(self._register(node))

    async def _register(self, node: NodeInfo) -> None:
        epoch = self._session_epoch
        self.local_node = node
        try:
            await self._blocking.run(lambda: self._znodes.claim_txn(node))
        except BaseException:
            if self.local_node is node:
                self.local_node = None
            raise
        if self.local_node is node and epoch == self._session_epoch:
            self.accepting = True
        self._log.info(
            "registry: node {node_id} registered as {host}:{port}",
            node_id=node.node_id,
            host=node.host,
            port=node.port,
        )

    def unregister(self) -> Deferred[None]:
        node = self.local_node
        if node is None:
            return succeed(None)
        self.local_node = None
        self.accepting = False
        d = self._blocking.run(lambda: self._znodes.withdraw_txn(node.node_id))
        d.addErrback(self._withdraw_failed, node)
        return d

    def _withdraw_failed(self, failure: Failure, node: NodeInfo) -> None:
        failure.trap(KazooException)
        self._log.warn(
            "registry: could not delete the znode of {node_id} ({error}); it goes when "
            "the ZooKeeper session closes or expires",
            node_id=node.node_id,
            error=failure.getErrorMessage(),
        )

    def live_nodes(self) -> list[NodeInfo]:
        return list(self._view)

    def add_listener(self, listener: ViewListener) -> None:
        self._listeners.append(listener)

    # --- on kazoo's threads: hand over to the reactor, touch nothing else -------------

    def _state_from_kazoo(self, state: str) -> None:
        self._reactor.callFromThread(self._state_changed, state)

    def _children_from_kazoo(self, children: list[str]) -> bool | None:
        if self._stopping:
            return False  # tells kazoo to drop the watch
        self._reactor.callFromThread(self._children_changed)
        return None

    # --- on the reactor thread --------------------------------------------------------

    def _children_changed(self) -> None:
        if not self._stopping:
            self._refresh().addErrback(self._refresh_failed)

    def _refresh(self) -> Deferred[None]:
        """Re-read the whole view; a read never replaces one that started after it."""
        if not self._watching or self._stopping:
            return succeed(None)
        if self._refresh_call is not None and self._refresh_call.active():
            self._refresh_call.cancel()
        self._refresh_call = None
        self._view_generation += 1
        generation = self._view_generation
        d = self._blocking.run(self._znodes.read_view_txn)

        def publish(result: tuple[list[NodeInfo], list[tuple[str, str]]]) -> None:
            if generation <= self._published_generation or self._stopping:
                return  # a read that started later has already published
            self._published_generation = generation
            nodes, broken = result
            for name, error in broken:
                self._log.warn(
                    "registry: ignoring znode {path}/{name}: {error}",
                    path=self.path,
                    name=name,
                    error=error,
                )
            if nodes != self._view:
                self._view = nodes
                tell_listeners(self._listeners, nodes, self._log)

        def stale(failure: Failure) -> Failure | None:
            if generation < self._view_generation or self._stopping:
                return None  # a read that started later will publish instead
            return failure

        return d.addCallbacks(publish, stale)

    def _refresh_failed(self, failure: Failure) -> None:
        self._log.warn(
            "registry: could not read the live nodes ({error}); retrying",
            error=failure.getErrorMessage(),
        )
        # While disconnected, the CONNECTED state change reads the view again.
        if not self._stopping and self._refresh_call is None and self._client.connected:
            self._refresh_call = self._reactor.callLater(RETRY_DELAY, self._children_changed)

    def _state_changed(self, state: str) -> None:
        if self._stopping:
            return
        if state == KazooState.SUSPENDED:
            self._log.warn(
                "registry: connection to ZooKeeper lost; still serving while the session "
                "may be alive (up to {timeout:g} s)",
                timeout=self.session_timeout,
            )
            if self._expiry_call is None:
                self._expiry_call = self._reactor.callLater(
                    self.session_timeout, self._presume_expired
                )
        elif state == KazooState.LOST:
            self._cancel_expiry()
            self._session_epoch += 1
            if self.local_node is not None:
                self.accepting = False
                self._log.error(
                    "registry: ZooKeeper session expired; node {node_id} is withdrawn and "
                    "takes no new logins until it registers again",
                    node_id=self.local_node.node_id,
                )
        elif state == KazooState.CONNECTED:
            self._cancel_expiry()
            self._log.info("registry: connected to ZooKeeper")
            self._children_changed()  # changes made while we were away fire no watch
            if self.local_node is not None:
                self._reclaim()

    def _cancel_expiry(self) -> None:
        if self._expiry_call is not None and self._expiry_call.active():
            self._expiry_call.cancel()
        self._expiry_call = None

    def _presume_expired(self) -> None:
        self._expiry_call = None
        if self.local_node is not None and self.accepting:
            self.accepting = False
            self._log.error(
                "registry: no contact with ZooKeeper for {timeout:g} s, so its session has "
                "expired; node {node_id} takes no new logins until it registers again",
                timeout=self.session_timeout,
                node_id=self.local_node.node_id,
            )

    def _reclaim(self) -> None:
        """Make sure our znode exists on the current session (it is gone after LOST)."""
        if self._reclaim_call is not None and self._reclaim_call.active():
            self._reclaim_call.cancel()
        self._reclaim_call = None
        node = self.local_node
        if node is None or self._stopping:
            return
        epoch = self._session_epoch
        d = self._blocking.run(lambda: self._znodes.claim_txn(node))

        def claimed(_: None) -> None:
            if self.local_node is not node or epoch != self._session_epoch:
                return  # withdrawn or lost again meanwhile; the next CONNECTED retries
            if not self.accepting:
                self._log.info(
                    "registry: node {node_id} registered again; taking logins",
                    node_id=node.node_id,
                )
            self.accepting = True

        def failed(failure: Failure) -> None:
            if self.local_node is not node or self._stopping:
                return
            if failure.check(NodeIdTaken):
                self.accepting = False
                self._log.critical(
                    "registry: cannot register again: {error}; this node takes no new logins",
                    error=failure.getErrorMessage(),
                )
                return
            self._log.warn(
                "registry: registering node {node_id} again failed ({error}); retrying",
                node_id=node.node_id,
                error=failure.getErrorMessage(),
            )
            # A lost connection is left to LOST / the expiry timer to judge, and the
            # next CONNECTED claims again; a failure while connected is retried here.
            if self._client.connected:
                self._reclaim_call = self._reactor.callLater(RETRY_DELAY, self._reclaim)

        d.addCallbacks(claimed, failed)


def _chain_to(result: object, target: Deferred[None]) -> object:
    if isinstance(result, Failure):
        target.errback(result)
        return None
    target.callback(None)
    return result
