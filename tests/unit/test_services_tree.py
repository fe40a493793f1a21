"""The service tree: children start in order, each once the previous is ready, and stop
in reverse; a failed start stops there with the operator's one-line reason."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from cim.config import parse_config
from cim.interfaces import NodeIdTaken
from cim.services import daemon as daemon_module
from cim.services.daemon import CimDaemon
from cim.services.im import DRAIN_POLL, DRAIN_SECONDS, GOING_AWAY_REASON, ImService
from cim.services.tree import (
    Listener,
    OrderedServices,
    StartupError,
    Step,
    cannot_start,
)
from tests.unit.test_crypto import shared_node_key


class Room:
    """Records its start and stop in a shared journal; the test fires them."""

    def __init__(self, name: str, journal: list[str]) -> None:
        self.name = name
        self.journal = journal
        self.starting: Deferred[None] | None = None
        self.stopping: Deferred[None] | None = None

    def start(self) -> Deferred[None]:
        self.journal.append(f"start {self.name}")
        self.starting = Deferred()
        return self.starting

    def stop(self) -> Deferred[None]:
        self.journal.append(f"stop {self.name}")
        self.stopping = Deferred()
        return self.stopping

    def step(self, explain: Any = None) -> Step:
        if explain is None:
            return Step(self.name, self.start, self.stop)
        return Step(self.name, self.start, self.stop, explain)


class OrderedServicesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.journal: list[str] = []
        self.rooms = [Room(name, self.journal) for name in ("db", "state", "bus")]
        self.tree = OrderedServices("node")
        for room in self.rooms:
            self.tree.add(room.step())

    def start_all(self) -> Deferred[None]:
        self.tree.startService()
        ready = self.tree.when_ready()
        for room in self.rooms:
            assert room.starting is not None
            room.starting.callback(None)
        return ready

    def test_each_child_starts_once_the_previous_is_ready(self) -> None:
        self.tree.startService()
        ready = self.tree.when_ready()
        self.assertEqual(self.journal, ["start db"])
        assert self.rooms[0].starting is not None
        self.rooms[0].starting.callback(None)
        self.assertEqual(self.journal, ["start db", "start state"])
        self.assertNoResult(ready)
        for room in self.rooms[1:]:
            assert room.starting is not None
            room.starting.callback(None)
        self.assertIsNone(self.successResultOf(ready))

    def test_children_stop_in_reverse_each_once_the_next_has_stopped(self) -> None:
        self.successResultOf(self.start_all())
        self.journal.clear()
        stopped = self.tree.stopService()
        self.assertEqual(self.journal, ["stop bus"])
        for room in reversed(self.rooms):
            assert room.stopping is not None
            room.stopping.callback(None)
        self.assertEqual(self.journal, ["stop bus", "stop state", "stop db"])
        self.successResultOf(stopped)

    def test_a_failed_start_stops_there_and_only_started_children_stop(self) -> None:
        journal: list[str] = []
        tree = OrderedServices()
        db, state, bus = (Room(name, journal) for name in ("db", "state", "bus"))
        tree.add(db.step())
        tree.add(state.step(cannot_start("state", "redis")))
        tree.add(bus.step())
        tree.startService()
        ready = tree.when_ready()
        assert db.starting is not None
        db.starting.callback(None)
        assert state.starting is not None
        state.starting.errback(ConnectionRefusedError("no Redis at 127.0.0.1:6379"))
        failure = self.failureResultOf(ready, StartupError)
        self.assertEqual(
            failure.getErrorMessage(),
            "[state] backend = 'redis': cannot start: no Redis at 127.0.0.1:6379",
        )
        self.assertEqual(journal, ["start db", "start state"])
        tree.stopService()
        self.assertEqual(journal, ["start db", "start state", "stop db"])

    def test_a_nested_tree_that_failed_half_way_stops_what_started_in_it(self) -> None:
        journal: list[str] = []
        tree = OrderedServices()
        db, pool, port = (Room(name, journal) for name in ("db", "pool", "port"))
        tree.add(db.step())
        inner = tree.add(OrderedServices("files"))
        inner.add(pool.step())
        inner.add(port.step(cannot_start("files", "tcp")))
        tree.startService()
        ready = tree.when_ready()
        for room in (db, pool):
            assert room.starting is not None
            room.starting.callback(None)
        assert port.starting is not None
        port.starting.errback(OSError("address in use"))
        self.failureResultOf(ready, StartupError)
        stopped = tree.stopService()
        for room in (pool, db):
            assert room.stopping is not None
            room.stopping.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(journal, ["start db", "start pool", "start port", "stop pool", "stop db"])

    def test_a_failure_no_step_explains_passes_through(self) -> None:
        tree = OrderedServices()
        tree.add(Step("broken", lambda: 1 / 0))
        tree.startService()
        self.failureResultOf(tree.when_ready(), ZeroDivisionError)

    def test_known_backend_errors_keep_their_own_words(self) -> None:
        explain = cannot_start("registry", "zookeeper")
        self.assertEqual(
            explain(NodeIdTaken("node id 'n1' is already registered")),
            "[registry] backend = 'zookeeper': node id 'n1' is already registered",
        )

    def test_stopping_during_start_cancels_it_and_stops_what_started(self) -> None:
        self.tree.startService()
        ready = self.tree.when_ready()
        assert self.rooms[0].starting is not None
        self.rooms[0].starting.callback(None)
        self.tree.stopService()
        self.failureResultOf(ready)
        self.assertEqual(self.journal, ["start db", "start state", "stop db"])

    def test_a_failing_stop_does_not_keep_the_others_running(self) -> None:
        self.successResultOf(self.start_all())
        stopped = self.tree.stopService()
        assert self.rooms[2].stopping is not None
        self.rooms[2].stopping.errback(RuntimeError("broker gone"))
        for room in reversed(self.rooms[:2]):
            assert room.stopping is not None
            room.stopping.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(self.journal[-3:], ["stop bus", "stop state", "stop db"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_nothing_is_added_once_running(self) -> None:
        self.tree.startService()
        self.assertRaises(RuntimeError, self.tree.add, Step("late", lambda: None))

    def test_nothing_starts_in_privileged_start(self) -> None:
        self.tree.privilegedStartService()
        self.assertEqual(self.journal, [])


class RefusingReactor(MemoryReactorClock):
    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        raise CannotListenError(interface, port, OSError(98, "Address already in use"))


class ListenerTests(SynchronousTestCase):
    def test_ready_once_listening(self) -> None:
        reactor = MemoryReactorClock()
        factory = SimpleNamespace()
        listener = Listener("admin", "tcp:8081:interface=127.0.0.1", reactor, factory)
        listener.startService()
        self.successResultOf(listener.when_ready())
        self.assertEqual(reactor.tcpServers[0][:2], (8081, factory))
        self.assertIsNotNone(listener.port)
        self.successResultOf(listener.stopService())

    def test_a_port_in_use_is_one_line(self) -> None:
        listener = Listener("router", "tcp:8080", RefusingReactor(), SimpleNamespace())
        listener.startService()
        failure = self.failureResultOf(listener.when_ready(), StartupError)
        self.assertEqual(
            failure.getErrorMessage(),
            "[router] listen = 'tcp:8080': cannot listen: Address already in use",
        )
        self.assertIsNone(listener.port)
        self.successResultOf(listener.stopService())
        self.assertEqual(self.flushLoggedErrors(), [])


class FakeRegistry:
    def __init__(self, journal: list[str]) -> None:
        self.journal = journal
        self.node: Any = None

    def register(self, node: Any) -> Deferred[None]:
        self.node = node
        self.journal.append(f"register {node.host}:{node.port}")
        return succeed(None)

    def unregister(self) -> Deferred[None]:
        self.journal.append("unregister")
        return succeed(None)


class FakeConnection:
    def __init__(self, journal: list[str]) -> None:
        self.journal = journal
        self.transport = object()
        self.tcp = SimpleNamespace(abortConnection=lambda: journal.append("abort"))


class ImServiceTests(SynchronousTestCase):
    """The IM room stops in the order clients need: withdrawn, port closed, told, drained."""

    def test_start_and_stop_order(self) -> None:
        journal: list[str] = []
        reactor = MemoryReactorClock()
        factory = SimpleNamespace(
            node_key=SimpleNamespace(public_der=b"key"), protocols={FakeConnection(journal)}
        )
        registry = FakeRegistry(journal)
        config = parse_config("[node]\nid = n1\n[im]\nlisten = tcp:5222:interface=127.0.0.1\n")
        refreshed: list[float] = []
        im = ImService(
            "n1",
            config.im,
            factory,
            registry,
            "local",
            reactor,
            30.0,
            refresh_routes=lambda: refreshed.append(reactor.seconds()),
            going_away=lambda reason, after: journal.append(f"going away: {reason}"),
        )
        im.startService()
        self.successResultOf(im.when_ready())
        self.assertEqual(journal, ["register localhost:5222"])  # [im] advertise
        self.assertEqual(registry.node.public_key_der, b"key")
        reactor.advance(10)
        self.assertEqual(refreshed, [10])
        port = reactor.tcpServers[0]
        self.assertEqual(port[0], 5222)

        stopped = im.stopService()
        self.assertEqual(journal[1:], ["unregister", f"going away: {GOING_AWAY_REASON}"])
        self.assertNoResult(stopped)
        # The client did not leave: it is cut off once the drain time is up.
        reactor.pump([DRAIN_POLL] * int(DRAIN_SECONDS / DRAIN_POLL + 2))
        self.successResultOf(stopped)
        self.assertEqual(journal[-1], "abort")
        reactor.advance(30)
        self.assertEqual(refreshed, [10])


class DaemonTreeTests(SynchronousTestCase):
    def test_rooms_start_in_dependency_order(self) -> None:
        self.patch(daemon_module, "load_node_key", lambda config: shared_node_key())
        data_dir = os.path.abspath(self.mktemp())
        config = parse_config(f"[node]\nid = n1\ndata_dir = {data_dir}\n[admin]\nenabled = true\n")
        daemon = CimDaemon(config, MemoryReactorClock())
        names = [child.name for child in daemon.children()]
        self.assertEqual(
            names,
            [
                "operation log",
                "SIGHUP reopening",
                "database",
                "accounts",
                "limits",
                "state",
                "registry",
                "node number",
                "bus",
                "timelines",
                "push",
                "admin tokens",
                "im",
                "router listener",
                "admin listener",
                "heap trimmer",
            ],
        )
        im_service = next(child for child in daemon.children() if isinstance(child, ImService))
        self.assertEqual(
            [child.name for child in im_service.children()],
            ["im clients", "im listener", "node registration"],
        )
        self.assertFalse(os.path.exists(os.path.join(data_dir, "operations.log")))
        self.assertEqual(daemon.health()["status"], "starting")

    def test_files_and_logic_are_trees_with_their_listeners(self) -> None:
        self.patch(daemon_module, "load_node_key", lambda config: shared_node_key())
        data_dir = os.path.abspath(self.mktemp())
        config = parse_config(
            f"[node]\nid = n1\ndata_dir = {data_dir}\n"
            "[files]\nenabled = true\n[logic]\nenabled = true\n"
        )
        daemon = CimDaemon(config, MemoryReactorClock())
        children = {child.name: child for child in daemon.children()}
        names = list(children)
        self.assertEqual(
            names[names.index("router listener") :],
            [
                "router listener",
                "files",
                "own file URLs",
                "logic",
                "admin listener",
                "heap trimmer",
            ],
        )
        files, logic = children["files"], children["logic"]
        assert isinstance(files, OrderedServices) and isinstance(logic, OrderedServices)
        self.assertEqual(
            [child.name for child in files.children()],
            ["files storage", "files listener", "files housekeeping"],
        )
        self.assertEqual(
            [child.name for child in logic.children()], ["logic listener", "logic housekeeping"]
        )
        self.assertFalse(os.path.exists(os.path.join(data_dir, "files")))

    def test_the_web_app_listens_last_and_must_be_built(self) -> None:
        self.patch(daemon_module, "load_node_key", lambda config: shared_node_key())
        data_dir = os.path.abspath(self.mktemp())
        app = os.path.abspath(self.mktemp())
        os.makedirs(app)
        text = f"[node]\nid = n1\ndata_dir = {data_dir}\n[web]\nenabled = true\nroot = {app}\n"
        with self.assertRaises(StartupError) as caught:
            CimDaemon(parse_config(text), MemoryReactorClock())
        self.assertIn("[web] root", str(caught.exception))
        self.assertIn("make web", str(caught.exception))
        with open(os.path.join(app, "index.html"), "w") as f:
            f.write("<!doctype html>")
        daemon = CimDaemon(parse_config(text), MemoryReactorClock())
        names = [child.name for child in daemon.children()]
        self.assertEqual(names[-3:], ["admin listener", "web listener", "heap trimmer"])


class ScriptedDaemon(CimDaemon):
    """The daemon's start and stop reporting, over rooms the test controls."""

    def __init__(self, rooms: list[Room], reactor: Any) -> None:
        self.rooms = rooms
        config = parse_config("[node]\nid = n1\n")
        super().__init__(config, reactor)
        self.im_node = SimpleNamespace(sessions=SimpleNamespace(connected_count=0))  # type: ignore[assignment]

    def _build(self) -> None:
        for room in self.rooms:
            self.add(room.step(cannot_start("state", "redis")))


class AdminTokenStepTests(SynchronousTestCase):
    def daemon(self, config_text: str = "") -> tuple[CimDaemon, str]:
        self.patch(daemon_module, "load_node_key", lambda config: shared_node_key())
        data_dir = os.path.abspath(self.mktemp())
        os.makedirs(data_dir)
        config = parse_config(f"[node]\nid = n1\ndata_dir = {data_dir}\n{config_text}")
        return CimDaemon(config, MemoryReactorClock()), data_dir

    def start_step(self, daemon: CimDaemon, name: str) -> Deferred[None]:
        step = next(child for child in daemon.children() if child.name == name)
        assert isinstance(step, Step)
        step.startService()
        return step.when_ready()

    def test_a_malformed_token_file_stops_the_start_in_one_line(self) -> None:
        daemon, data_dir = self.daemon()
        with open(os.path.join(data_dir, "admin_token"), "w", encoding="utf-8") as handle:
            handle.write("ops1 no-colon-here\n")
        failure = self.failureResultOf(self.start_step(daemon, "admin tokens"), StartupError)
        self.assertEqual(
            failure.getErrorMessage(),
            f"[admin] token_file: {data_dir}/admin_token, line 1: expected NAME:TOKEN, "
            "NAME 1-64 letters, digits, '.', '_' or '-'",
        )

    def test_a_missing_token_file_starts(self) -> None:
        daemon, _ = self.daemon()
        self.successResultOf(self.start_step(daemon, "admin tokens"))

    def test_no_token_step_without_router_or_admin(self) -> None:
        daemon, _ = self.daemon("[router]\nenabled = false\n[admin]\nenabled = false\n")
        self.assertNotIn("admin tokens", [child.name for child in daemon.children()])

    def test_media_urls_trust_the_configured_file_service(self) -> None:
        daemon, _ = self.daemon("[files]\npublic_url = http://files.internal:8082\n")
        self.assertTrue(daemon.media_urls.accepts("http://files.internal:8082/files/f1"))
        self.assertIs(daemon.im_node.core.media_urls, daemon.media_urls)
        self.assertFalse(daemon.media_urls.accepts("http://elsewhere:8082/files/f1"))


class DaemonStartReportTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.journal: list[str] = []
        self.rooms = [Room(name, self.journal) for name in ("db", "state")]
        self.reactor = MemoryReactorClock()
        self.reactor.running = True
        self.stderr: list[bytes] = []
        self.exits: list[bool] = []
        self.patch(daemon_module.os, "write", lambda fd, data: self.stderr.append(data))
        self.patch(daemon_module, "_exit_non_zero_at_exit", lambda: self.exits.append(True))
        self.daemon = ScriptedDaemon(self.rooms, self.reactor)

    def test_healthy_once_every_room_started(self) -> None:
        self.daemon.startService()
        self.assertEqual(self.daemon.health()["status"], "starting")
        for room in self.rooms:
            assert room.starting is not None
            room.starting.callback(None)
        self.assertEqual(self.daemon.health()["status"], "ok")
        self.daemon.stopService()
        self.assertEqual(self.daemon.health()["status"], "starting")

    def test_a_failed_start_is_one_line_on_fd_2_and_exit_status_1(self) -> None:
        self.daemon.startService()
        assert self.rooms[0].starting is not None
        self.rooms[0].starting.errback(ConnectionRefusedError("connection refused"))
        self.assertEqual(
            self.stderr,
            [
                b"cim: could not start node n1: [state] backend = 'redis': cannot start: "
                b"connection refused\n"
            ],
        )
        self.assertEqual(self.exits, [True])
        self.assertTrue(self.reactor.hasStopped)

    def test_stopping_while_starting_is_not_a_failure(self) -> None:
        self.daemon.startService()
        self.daemon.stopService()
        self.assertEqual((self.stderr, self.exits), ([], []))
        self.assertFalse(self.reactor.hasStopped)
