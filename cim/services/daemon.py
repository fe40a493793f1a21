"""The whole daemon as one twistd service: start-up in dependency order, stop in reverse.

Start-up is asynchronous (the database migrates, listeners bind). If any step fails
the daemon logs one line saying what and why, stops the reactor and exits non-zero,
rather than running half-started.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure

from cim.accounts.store import AccountStore
from cim.backends.bus import make_bus
from cim.backends.registry import make_registry
from cim.backends.state import make_state_store
from cim.config import CimConfig
from cim.files.signing import UrlKeyError
from cim.groups.directory import GroupDirectory
from cim.heap import HeapTrimmer
from cim.history.archive import HistoryService, archive_from_config
from cim.history.store import HistoryStore
from cim.im.collaborators import Directory, NoArchive, NodeCore, Stores
from cim.im.node import ImNode
from cim.im.peers import BusPeers, LiveNodes
from cim.interfaces import (
    BusUnavailable,
    IMessageBus,
    INodeRegistry,
    IStateBackend,
    NodeIdTaken,
    StateUnavailable,
)
from cim.logs import DaemonLog
from cim.message_ids import MessageIdGenerator
from cim.metrics import NodeMetrics
from cim.offline.pipeline import make_offline_pipeline
from cim.oplog import OperationLog
from cim.protocols.crypto import NodeKey
from cim.protocols.im import ImServerFactory
from cim.services.admin import admin_site
from cim.services.files import FilesListener
from cim.services.im import ImListener
from cim.services.router import router_site
from cim.storage.database import Database

if TYPE_CHECKING:
    from cim.services.logic import LogicListener


class StartupError(Exception):
    """A start-up step failed; the message is what the operator needs to read."""


class CimDaemon(Service):
    log = Logger()

    def __init__(
        self, config: CimConfig, reactor: Any, daemon_log: DaemonLog | None = None
    ) -> None:
        self.config = config
        self.daemon_log = daemon_log
        self.reactor = reactor
        self.metrics = NodeMetrics()
        self.started: Deferred[None] | None = None
        self.database: Database | None = None
        self.accounts: AccountStore | None = None
        self.state: IStateBackend | None = None
        self.registry: INodeRegistry | None = None
        self.bus: IMessageBus | None = None
        self.groups: GroupDirectory | None = None
        self.im_node: ImNode | None = None
        self.im: ImListener | None = None
        self.files: FilesListener | None = None
        self.logic: LogicListener | None = None
        self.http_ports: dict[str, IListeningPort] = {}
        self._stoppers: list[Callable[[], Any]] = []
        self.oplog: OperationLog | None = None

    def setServiceParent(self, parent: Any) -> None:
        """Under twistd the parent is the application: its ILogObserver component is
        the observer twistd starts logging to, so ``[log]`` needs no twistd flag."""
        super().setServiceParent(parent)
        if self.daemon_log is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.daemon_log.observer)

    def startService(self) -> None:
        super().startService()
        self.started = self._start()
        self.started.addErrback(self._start_failed)

    @inlineCallbacks
    def _start(self) -> Any:
        config = self.config
        node_id = config.node.id
        os.makedirs(config.node.data_dir, exist_ok=True)
        node_key = NodeKey.load_or_create(config.rsa_key_path, config.im.rsa_key_bits)
        self.oplog = OperationLog(
            config.operation_log_path, node=node_id, clock=self.reactor.seconds
        )
        self._stoppers.append(self.oplog.close)
        reopen = [self.oplog.reopen]
        if self.daemon_log is not None:
            reopen.append(self.daemon_log.reopen)
        _reopen_on_sighup(self.reactor, reopen)

        self.database = Database(
            config.database_url,
            self.reactor,
            config.database.threads,
            on_wait=self.metrics.db_wait.observe,
        )
        yield self.database.start()
        self._stoppers.append(self.database.stop)

        self.accounts = AccountStore(self.database, config.accounts, reactor=self.reactor)
        self.accounts.start()
        self._stoppers.append(self.accounts.stop)

        state = self.state = make_state_store(config.state, self.reactor)
        yield self._backend_step("state", config.state.backend, state.start)
        self._stoppers.append(state.stop)

        registry = self.registry = make_registry(config.registry, self.reactor)
        yield self._backend_step("registry", config.registry.backend, self.registry.start)
        self._stoppers.append(self.registry.stop)

        # Message ids embed a node number the state store hands out, unique in a cluster.
        node_number = yield self._backend_step(
            "state", config.state.backend, lambda: state.sequences.node_number(node_id)
        )
        self.bus = make_bus(config.queue, node_id, self.reactor)
        # Each node caches group members; changes made on another node reach this
        # cache after its TTL, so a cluster keeps it short.
        member_cache_ttl = 60.0 if config.registry.backend == "local" else 5.0
        self.groups = GroupDirectory(self.database, self.reactor, cache_ttl=member_cache_ttl)
        offline = make_offline_pipeline(config, self.database, self.reactor)
        history = HistoryStore(
            self.database,
            config.retention_days,
            self.reactor,
            purge_batch=config.archive.purge_batch,
        )
        # The archive rides the node bus's broker connection when there is one.
        archive = archive_from_config(
            config, history, getattr(self.bus, "link", None), self.reactor
        )
        im_node = self.im_node = ImNode(
            NodeCore(
                node_id,
                state,
                self.reactor,
                self.metrics,
                MessageIdGenerator(self.reactor, node_number),
            ),
            Directory(self.accounts.exists, self.groups),
            Stores(
                offline,
                config.offline.page_size,
                archive if archive is not None else NoArchive(),
                HistoryService(history, self.groups.is_member),
            ),
            BusPeers(node_id, self.bus, state.presence, LiveNodes(registry)),
        )
        # The offline writer tells connected receivers to pull once it has committed.
        offline.on_stored = im_node.catchup.stored_for
        self.metrics.connections_established = lambda: im_node.sessions.connected_count
        self.metrics.offline_pending = lambda: offline.pending
        # Started after the node registered its bus consumer, so nothing queued for
        # this node while it was down is handed to nobody.
        yield self._backend_step("queue", config.queue.backend, self.bus.start)
        self._stoppers.append(self.bus.stop)
        yield self._backend_step("queue", config.queue.backend, offline.start)
        self._stoppers.append(offline.stop)
        if archive is not None:
            yield self._backend_step("queue", config.queue.backend, archive.start)
            self._stoppers.append(archive.stop)

        if config.im.enabled:
            factory = ImServerFactory(
                node_id,
                config.im,
                node_key,
                im_node,
                self.state,
                self.registry,
                self.reactor,
                self.metrics,
            )
            factory.oplog = self.oplog
            self.im = ImListener(
                node_id, config.im, factory, self.registry, self.reactor, config.state.route_ttl
            )
            yield self._listen_step("im", config.im.listen, self.im.start)
            self._stoppers.append(self.im.stop)

        if config.router.enabled:
            site = router_site(
                config.router,
                config.im,
                self.accounts,
                self.state.sessions,
                self.state.presence,
                self.registry,
                self.reactor,
                self.metrics,
                oplog=self.oplog,
            )
            yield self._listen_http("router", config.router.listen, site)

        if config.files.enabled:
            yield self._start_files()

        if config.logic.enabled:
            yield self._start_logic()

        if config.admin.enabled:
            yield self._listen_http(
                "admin",
                config.admin.listen,
                admin_site(node_id, self.metrics, self.health, self.reactor),
            )

        trimmer = HeapTrimmer(self.reactor, config.node.heap_trim_interval)
        trimmer.start()
        self._stoppers.append(trimmer.stop)

        self.log.info("cim node {node} started", node=node_id)

    def _start_logic(self) -> Any:
        # Imported here: the logic service brings shapely and numpy (about 30 MiB of
        # RSS), which a node without it should not carry.
        from cim.logic.context import LogicContext
        from cim.logic.notices import Notices
        from cim.services.logic import LogicListener

        config = self.config
        assert self.database is not None and self.state is not None
        assert self.accounts is not None and self.im_node is not None
        assert self.groups is not None
        logic = LogicListener(
            LogicContext(
                config.logic,
                config.accounts,
                self.database,
                self.accounts,
                self.state.sessions,
                Notices(self.im_node.system, self.reactor),
                self.reactor,
                self.groups,
            )
        )
        self.logic = logic

        async def start() -> None:
            await logic.start()
            self._stoppers.append(logic.stop)
            if logic.port is not None:
                self.http_ports["logic"] = logic.port

        return self._listen_step("logic", config.logic.listen, start)

    def _start_files(self) -> Any:
        """Storage, signing key and listener of the file service, one start-up step."""
        config = self.config
        assert self.database is not None and self.state is not None
        files = FilesListener(
            config.files, config.node.data_dir, self.database, self.state.sessions, self.reactor
        )
        try:
            files.prepare()
        except UrlKeyError as exc:
            raise StartupError(f"[files] url_key: {exc}") from None
        except OSError as exc:
            raise StartupError(
                f"[files] storage_dir = {files.storage_dir!r}: cannot use it: {exc.strerror}"
            ) from None
        self.files = files

        async def start() -> None:
            await files.start()
            self._stoppers.append(files.stop)

        return self._listen_step("files", config.files.listen, start)

    async def _backend_step_async(
        self, section: str, backend: str, start: Callable[[], Any]
    ) -> Any:
        try:
            return await maybeDeferred(start)
        except (StateUnavailable, NodeIdTaken, BusUnavailable) as exc:
            raise StartupError(f"[{section}] backend = {backend!r}: {exc}") from None
        except Exception as exc:
            raise StartupError(f"[{section}] backend = {backend!r}: cannot start: {exc}") from None

    def _backend_step(self, section: str, backend: str, start: Callable[[], Any]) -> Any:
        return Deferred.fromCoroutine(self._backend_step_async(section, backend, start))

    def _listen_step(self, section: str, description: str, start: Callable[[], Any]) -> Any:
        d: Deferred[Any] = Deferred.fromCoroutine(self._guard_listen(section, description, start))
        return d

    async def _guard_listen(self, section: str, description: str, start: Callable[[], Any]) -> Any:
        try:
            return await start()
        except CannotListenError as exc:
            why = exc.socketError.strerror if exc.socketError is not None else str(exc)
            raise StartupError(
                f"[{section}] listen = {description!r}: cannot listen: {why}"
            ) from None

    def _listen_http(self, section: str, description: str, site: Any) -> Any:
        async def listen() -> None:
            port = await serverFromString(self.reactor, description).listen(site)
            self.http_ports[section] = port
            self._stoppers.append(port.stopListening)
            self.log.info("{section} listening on {listen}", section=section, listen=description)

        return self._listen_step(section, description, listen)

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.running and self.started and self.started.called else "starting",
            "node": self.config.node.id,
            "connections": self.metrics.connections_open,
            "online_here": self.im_node.sessions.connected_count if self.im_node else 0,
            **self._files_health(),
        }

    def _files_health(self) -> dict[str, Any]:
        if self.files is None or self.files.store is None:
            return {}
        return {"files": self.files.store.metrics.snapshot()}

    def _start_failed(self, failure: Failure) -> None:
        if failure.check(StartupError):
            why = failure.getErrorMessage()
        else:
            kind = failure.type.__name__ if failure.type is not None else "error"
            why = f"{kind}: {failure.getErrorMessage()}"
            self.log.failure("start-up failed", failure)
        message = f"cim: could not start node {self.config.node.id}: {why}"
        self.log.critical("{message}", message=message)
        # twistd has redirected sys.stderr into the log; fd 2 is still the terminal
        # (or /dev/null when daemonised), where the operator looks first.
        os.write(2, (message + "\n").encode())
        _exit_non_zero_at_exit()
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    @inlineCallbacks
    def stopService(self) -> Any:
        """Reverse order: listeners first (clients told), then state, then the database."""
        super().stopService()
        if self.started is not None and not self.started.called:
            self.started.cancel()
        while self._stoppers:
            stop = self._stoppers.pop()
            try:
                yield stop()
            except Exception:
                self.log.failure("error while stopping")
        self.log.info("cim node {node} stopped", node=self.config.node.id)


def _reopen_on_sighup(reactor: Any, reopeners: list[Callable[[], None]]) -> None:
    """SIGHUP reopens the operation log and the log file (after logrotate moved them)."""
    import signal

    if not hasattr(signal, "SIGHUP"):
        return
    previous = signal.getsignal(signal.SIGHUP)

    def reopen(signum: int, frame: Any) -> None:
        for reopener in reopeners:
            reactor.callFromThread(reopener)
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGHUP, reopen)


def _exit_non_zero_at_exit() -> None:
    """twistd has no way to set the exit status; make the interpreter's last act do it."""

    def leave() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    atexit.register(leave)
