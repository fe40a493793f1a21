"""The whole node as one twistd service: a tree of its rooms, started in dependency order.

``CimDaemon`` makes every room from the config and adds one child per room that has a
lifetime, in the order they depend on each other::

    operation log, SIGHUP reopening, database, accounts (the KDF pool), limits, state,
    registry, node number, bus, timelines, push,
    im (client drain, listener, registry entry), router listener, files, logic,
    admin listener, web listener, heap trimmer

``OrderedServices`` (cim.services.tree) starts them in that order, each once the one
before is ready, and stops them in reverse, each once the one after has stopped.
Making the tree connects to nothing, opens no port, log or pool and starts no thread;
only the node's identity (its data directory and RSA key) is read then, like the
config, so a bad key stops twistd with one line as a bad config does.

If a child fails to start, the daemon writes one line saying what and why
(``cim: could not start node X: [section] key = 'value': why``) to fd 2, stops the
reactor and exits 1, rather than running half-started.
"""

from __future__ import annotations

import atexit
import functools
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure

from cim.accounts.store import AccountStore
from cim.backends.bus import make_bus
from cim.backends.registry import make_registry
from cim.backends.state import make_state_store
from cim.config import CimConfig
from cim.content import MediaUrls
from cim.groups.directory import GroupDirectory
from cim.heap import HeapTrimmer
from cim.history.journal import journal_directory
from cim.history.read_marks import ReadMarks
from cim.history.service import HistoryService
from cim.history.timeline import Timelines, timeline_settings
from cim.http.limits import HttpConnections
from cim.http.operators import OperatorTokens, TokenFileError
from cim.http.telemetry import SiteTelemetry
from cim.im.collaborators import Bounds, Directory, NodeCore, Stores
from cim.im.contacts import ContactDirectory
from cim.im.node import ImNode
from cim.im.peers import BusPeers, LiveNodes
from cim.im.shares import RecordedShares
from cim.interfaces import IStateBackend
from cim.limits.overrides import StoredOverrides
from cim.limits.policy import Limits
from cim.logic.contacts import DEFAULT_DECISION_TTL, ContactBook
from cim.logic.notices import Notices
from cim.logs import DaemonLog
from cim.message_ids import MessageIdGenerator
from cim.metrics import CollectorPauses, NodeMetrics, ReactorHolds, ReactorLag
from cim.oplog import OperationLog
from cim.protocols.crypto import KeyFileError, NodeKey
from cim.protocols.im_listener import ImServerFactory
from cim.push.frames import PushRequests
from cim.push.service import PushService
from cim.reactor import ICimReactor
from cim.services.admin import admin_site
from cim.services.files import FilesService
from cim.services.im import ImService
from cim.services.router import router_site
from cim.services.stopping import BoundedStop
from cim.services.tree import (
    AsyncService,
    Listener,
    OrderedServices,
    StartupError,
    Step,
    cannot_start,
)
from cim.storage.contacts import PrivacyDefaults
from cim.storage.database import Database
from cim.version import RELEASE, Build
from cim.webapp.site import PACKAGED_ROOT, MissingApp, web_site

__all__ = ["CimDaemon", "StartupError"]


class CimDaemon(OrderedServices):
    log = Logger()

    def __init__(
        self,
        config: CimConfig,
        reactor: ICimReactor,
        daemon_log: DaemonLog | None = None,
        build: Build = RELEASE,
        when_started: Callable[[], None] = lambda: None,
        reactor_holds: ReactorHolds | None = None,
    ) -> None:
        super().__init__("cim")
        self._when_started = when_started
        """Told once the node has started: the process's own tuning (cim.tap)."""
        self.config = config
        self.reactor = reactor
        self.daemon_log = daemon_log
        self.build = build
        self.metrics = NodeMetrics()
        # The reactor's turns, timed at its polls (cim.tap sets that up, before us).
        self.metrics.reactor_holds = reactor_holds
        self.ready = False
        self._health_parts: list[Callable[[], dict[str, Any]]] = []
        self._build()

    # --- the tree ---------------------------------------------------------------------

    def _build(self) -> None:
        """Every room, made and added in the order it starts (and the reverse it stops)."""
        config, reactor, metrics = self.config, self.reactor, self.metrics
        node_id = config.node.id
        node_key = load_node_key(config)
        oplog = OperationLog(config.operation_log_path, node=node_id, clock=reactor.seconds)
        self.add(Step("operation log", oplog.open, oplog.close))
        reopeners = [oplog.reopen]
        if self.daemon_log is not None:
            reopeners.append(self.daemon_log.reopen)
        self.add(ReopenOnSighup(reactor, reopeners))

        # --- the backends, and the rooms made from them
        database = Database(
            config.database_url, reactor, config.database.threads, on_wait=metrics.db_wait.observe
        )
        self.add(Step("database", database.start, database.stop))
        accounts = AccountStore(database, config.accounts, reactor)
        self.add(Step("accounts", accounts.start, accounts.stop))
        # One set of rate limits for every service; the users' own from the database.
        overrides = StoredOverrides(database, reactor, config.limits.override_refresh)
        limits = self.limits = Limits(reactor, config.limits, overrides)
        self.add(Step("limits", overrides.start, overrides.stop))
        state = make_state_store(config.state, reactor)
        state_failure = cannot_start("state", config.state.backend)
        self.add(Step("state", state.start, state.stop, state_failure))
        registry = make_registry(config.registry, reactor)
        self.add(
            Step(
                "registry",
                registry.start,
                registry.stop,
                cannot_start("registry", config.registry.backend),
            )
        )
        # Message ids embed a node number the state store hands out, unique in a cluster.
        ids = MessageIdGenerator(reactor, 0)
        self.add(
            Step("node number", lambda: claim_node_number(state, node_id, ids), None, state_failure)
        )

        bus = make_bus(config.queue, node_id, reactor)
        # Each node caches group members; changes made on another node reach this
        # cache after its TTL, so a cluster keeps it short.
        alone = config.registry.backend == "local"
        member_cache_ttl = 60.0 if alone else 5.0
        privacy = PrivacyDefaults(config.im.default_message_policy, config.im.default_group_adds)
        groups = GroupDirectory(database, reactor, cache_ttl=member_cache_ttl, defaults=privacy)
        # The same for who may message whom: another node's change is seen after this.
        contacts = ContactBook(
            database, reactor, privacy, cache_ttl=DEFAULT_DECISION_TTL if alone else 5.0
        )
        # Every message once, numbered in its durable write (cim.history.timeline).
        # A node alone on SQLite is its database's only writer: it numbers in memory and
        # journals beside the file (cim.history.journal). Nodes of a cluster, even on
        # one shared SQLite file, number in the transaction.
        timelines = Timelines(
            database,
            reactor,
            timeline_settings(config),
            journal=journal_directory(config.database_url) if alone else None,
        )
        groups.settled = timelines.settled
        # What media URLs messages, posts and avatars may carry: https, or this node's
        # file service's (its public_url, or the URL it derives once it listens).
        self.media_urls = MediaUrls([config.files.public_url] if config.files.public_url else [])
        # Pushes for devices that are away (cim.push); registrations are served always.
        push = self.push = PushService(config.push, reactor, database, metrics.push, oplog)
        im_node = self.im_node = ImNode(
            NodeCore(node_id, state, reactor, metrics, ids, self.media_urls),
            Directory(accounts.exists, groups, ContactDirectory(contacts)),
            Stores(
                timelines,
                config.offline.page_size,
                HistoryService(timelines, groups.is_member, config.im.max_frame_size),
                RecordedShares(database, reactor, config.files.public_url),
                max_page_bytes=config.im.max_frame_size,
                read_marks=ReadMarks(database, reactor, timelines.settled),
            ),
            BusPeers(node_id, bus, state.presence, LiveNodes(registry)),
            Bounds(
                limits,
                config.im.max_text_length,
                config.limits.group_backlog,
                config.limits.fanout_backlog,
                config.limits.fanout_backlog_bytes,
                config.im.recall_window,
                config.im.edit_window,
                config.im.max_devices_per_user,
            ),
            more_rooms=[PushRequests(push.registrations)],
        )
        # Every new timeline entry is handed to the push decisions (when enabled).
        push.watch(
            im_node.stores,
            node_id,
            im_node.connected.devices_of,
            state.presence,
            groups.member_names,
        )
        # Invitations and contact requests are told as system notices, which the node
        # (made from the directory that holds both) stores.
        groups.notices = contacts.notices = Notices(im_node.system, reactor)
        metrics.connections_established = lambda: im_node.sessions.connected_count
        metrics.offline_pending = lambda: timelines.pending

        # Started after the node registered its bus consumer, so nothing queued for
        # this node while it was down is handed to nobody.
        queue_failure = cannot_start("queue", config.queue.backend)
        self.add(Step("bus", bus.start, bus.stop, queue_failure))
        self.add(Step("timelines", timelines.start, timelines.stop))
        self.add(push)

        # --- the listeners; every HTTP one behind the [http] limits
        http = self.http = HttpConnections(config.http, reactor)
        self._health_parts.append(lambda: {"http": http.snapshot()})
        operators = OperatorTokens(config.admin_token_path)
        if config.router.enabled or config.admin.enabled:
            self.add(Step("admin tokens", operators.load, None, admin_tokens_failure))
        if config.im.enabled:
            factory = ImServerFactory(
                node_id, config.im, node_key, im_node, state, registry, reactor, metrics, limits
            )
            factory.oplog = oplog
            held = factory.held_writes
            timelines.answer_in(held.around, held.at_read_end, held.after_flush)
            # Messages waiting for their timeline append, and transactions waiting for
            # the database, count in the node's backpressure.
            factory.node_queue.database_backlog = lambda: max(database.backlog, timelines.waiting)
            self.add(
                ImService(
                    node_id,
                    config.im,
                    factory,
                    registry,
                    config.registry.backend,
                    reactor,
                    config.state.route_ttl,
                    refresh_routes=im_node.sessions.refresh_routes,
                    going_away=im_node.sessions.shutdown,
                    ws_config=config.ws,
                )
            )
        if config.router.enabled:
            site = router_site(
                config.router,
                config.im,
                accounts,
                state.sessions,
                state.presence,
                registry,
                reactor,
                metrics,
                oplog=oplog,
                operators=operators,
                limits=limits,
                telemetry=self._telemetry("router"),
                # A device's logout ends its push registration (docs/push.md).
                signed_out=push.registrations.signed_out,
            )
            self.add(Listener("router", config.router.listen, reactor, http.guard("router", site)))
        if config.files.enabled:
            self._add_files(database, state)
        if config.logic.enabled:
            self._add_logic(database, accounts, state, groups, contacts)
        if config.admin.enabled:
            site = admin_site(
                node_id,
                metrics,
                self.health,
                reactor,
                operators,
                metrics_open=config.admin.metrics_open == "loopback",
                build=self.build,
                telemetry=self._telemetry("admin"),
            )
            self.add(Listener("admin", config.admin.listen, reactor, http.guard("admin", site)))
        if config.web.enabled:
            try:
                site = web_site(
                    config.web.root or PACKAGED_ROOT,
                    reactor,
                    config.web.connect_src,
                    telemetry=self._telemetry("web"),
                )
            except MissingApp as error:
                raise StartupError(f"[web] root: {error}") from None
            self.add(Listener("web", config.web.listen, reactor, http.guard("web", site)))

        trimmer = HeapTrimmer(reactor, config.node.heap_trim_interval)
        self.add(Step("heap trimmer", trimmer.start, trimmer.stop))
        if config.node.lag_probe_interval > 0:
            lag = metrics.reactor_lag = ReactorLag(reactor, config.node.lag_probe_interval)
            self.add(Step("reactor lag probe", lag.start, lag.stop))
            # Counted from the end of start-up (``_started``): the collection that
            # freezes the start-up heap is not a pause any client waited for.
            metrics.collector_pauses = CollectorPauses()

    def _add_files(self, database: Database, state: IStateBackend) -> None:
        """The file service (storage and key, port, housekeeping), then its URL as media."""
        config = self.config
        files = self.add(
            FilesService(
                config.files,
                config.node.data_dir,
                database,
                state.sessions,
                self.reactor,
                limits=self.limits,
                telemetry=self._telemetry("files"),
                guard=functools.partial(self.http.guard, "files"),
            )
        )
        store = files.store
        # Known once the service listens: [files] public_url, or the URL it derived.
        self.add(Step("own file URLs", lambda: self.media_urls.trust(store.public_url)))

        def health() -> dict[str, Any]:
            return {
                "files": {
                    **store.metrics.snapshot(),
                    "thumbnails": store.thumbnails.snapshot(),
                }
            }

        self._health_parts.append(health)

    def _add_logic(
        self,
        database: Database,
        accounts: AccountStore,
        state: IStateBackend,
        groups: GroupDirectory,
        contacts: ContactBook,
    ) -> None:
        # Imported here: the logic service brings shapely and numpy (about 30 MiB of
        # RSS), which a node without it should not carry.
        from cim.logic.context import LogicContext
        from cim.logic.notices import Notices
        from cim.push.http import push_endpoints
        from cim.services.logic import LogicService

        config = self.config
        logic = LogicService(
            LogicContext(
                config.logic,
                config.accounts,
                database,
                accounts,
                state.sessions,
                Notices(self.im_node.system, self.reactor),
                self.reactor,
                groups,
                contacts,
                self.media_urls,
                self.limits,
                settled=groups.settled,
            ),
            self.reactor,
            self._telemetry("logic"),
            guard=functools.partial(self.http.guard, "logic"),
            more_endpoints=push_endpoints(self.push.registrations),
        )
        self.add(logic)

    def _telemetry(self, service: str) -> SiteTelemetry:
        """How an HTTP service's Site reports its requests: in /metrics, and the access log."""
        return SiteTelemetry(service, self.metrics.http, self.config.log.access_log)

    # --- twistd ----------------------------------------------------------------------

    def setServiceParent(self, parent: Any) -> None:
        """Under twistd the parent is the application: its ILogObserver component is
        the observer twistd starts logging to, so ``[log]`` needs no twistd flag."""
        super().setServiceParent(parent)
        if self.daemon_log is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.daemon_log.observer)

    def startService(self) -> None:
        super().startService()
        Deferred.fromCoroutine(self._report_start())

    async def _report_start(self) -> None:
        try:
            await self.when_ready()
        except CancelledError:
            if self.running:
                self._start_failed(Failure())
            else:
                # stopService cut the start short: the node is stopping, not failing.
                self.log.info("cim node {node} stopped while starting", node=self.config.node.id)
            return
        except Exception:
            self._start_failed(Failure())
            return
        self.ready = True
        self.log.info("cim node {node} started", node=self.config.node.id)
        self._when_started()
        if self.metrics.collector_pauses is not None:
            self.metrics.collector_pauses.install()

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

    def stopService(self) -> Deferred[None]:
        """Reverse order: listeners first (clients told), then the backends, the database."""
        self.ready = False
        if self.metrics.collector_pauses is not None:
            self.metrics.collector_pauses.uninstall()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        node = self.config.node
        bound = BoundedStop(self.reactor, node.stop_timeout, node.id)
        if await bound.run(super().stopService(), lambda: self.stopping_child):
            self.log.info("cim node {node} stopped", node=node.id)

    def health(self) -> dict[str, Any]:
        report = {
            "status": "ok" if self.running and self.ready else "starting",
            "node": self.config.node.id,
            "connections": self.metrics.connections_open,
            "online_here": self.im_node.sessions.connected_count,
        }
        for part in self._health_parts:
            report.update(part())
        return report


# --- start-up steps ------------------------------------------------------------------


def load_node_key(config: CimConfig) -> NodeKey:
    """The node's data directory and RSA key, created on first start."""
    data_dir = config.node.data_dir
    try:
        os.makedirs(data_dir, exist_ok=True)
    except OSError as exc:
        raise StartupError(
            f"[node] data_dir = {data_dir!r}: cannot create it: {exc.strerror}"
        ) from None
    try:
        return NodeKey.load_or_create(config.rsa_key_path, config.im.rsa_key_bits)
    except KeyFileError as exc:
        raise StartupError(f"[im] rsa_key = {config.rsa_key_path!r}: {exc}") from None


async def claim_node_number(state: IStateBackend, node_id: str, ids: MessageIdGenerator) -> None:
    ids.claim(await state.sequences.node_number(node_id))


def admin_tokens_failure(exc: Exception) -> str | None:
    if isinstance(exc, TokenFileError):
        return f"[admin] token_file: {exc}"
    return None


class ReopenOnSighup(AsyncService):
    """SIGHUP reopens the operation log and the log file (after logrotate moved them).

    The handler stays for the life of the process: a SIGHUP while the node stops must
    not end it half-way (SIGHUP's default action).
    """

    def __init__(self, reactor: IReactorFromThreads, reopeners: list[Callable[[], None]]) -> None:
        super().__init__("SIGHUP reopening")
        self.reactor = reactor
        self.reopeners = reopeners
        self._previous: Any = None

    def start(self) -> None:
        if not hasattr(signal, "SIGHUP"):
            return
        self._previous = signal.getsignal(signal.SIGHUP)
        signal.signal(signal.SIGHUP, self._received)

    def _received(self, signum: int, frame: FrameType | None) -> None:
        for reopener in self.reopeners:
            self.reactor.callFromThread(reopener)
        if callable(self._previous):
            self._previous(signum, frame)


def _exit_non_zero_at_exit() -> None:
    """twistd has no way to set the exit status; make the interpreter's last act do it."""

    def leave() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    atexit.register(leave)
