"""ZooKeeperRegistry: session rules on a fake kazoo, then the real thing on a private server.

The fake tests drive kazoo's state changes and the session-timeout timer with a
``task.Clock``. The integration tests run the real reactor against a private ZooKeeper
(tests/integration/support/zookeeper.py), one per test class, each test under its own path.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kazoo.client import KazooState
from kazoo.exceptions import ConnectionLoss, NodeExistsError, NoNodeError
from kazoo.handlers.threading import KazooTimeoutError
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from cim.backends.registry.znodes import decode_node, encode_node
from cim.backends.registry.zookeeper import ZooKeeperRegistry, ZooKeeperUnavailable
from cim.interfaces import INodeRegistry, NodeIdTaken, NodeInfo

NODE_A = NodeInfo("node-a", "10.0.0.1", 9000, b"key-a")
NODE_B = NodeInfo("node-b", "10.0.0.2", 9001, b"key-b")
SESSION_TIMEOUT = 10.0


# --- a fake kazoo ---------------------------------------------------------------------


@dataclass
class FakeStat:
    ephemeralOwner: int
    version: int = 0


class FakeKazoo:
    """The part of KazooClient the registry uses, with one shared in-memory tree.

    Callbacks run inline; the fake reactor's callFromThread does too, so a test sees
    the registry react as soon as it calls a control method.
    """

    def __init__(self, tree: dict[str, tuple[bytes, int]] | None = None) -> None:
        self.tree: dict[str, tuple[bytes, int]] = {} if tree is None else tree
        self.session = 1
        self.connected = True
        self.reachable = True
        self.listeners: list[Callable[[str], Any]] = []
        self.watches: list[tuple[str, Callable[[list[str]], Any]]] = []
        self.stopped = False
        self.closed = False

    @property
    def client_id(self) -> tuple[int, bytes]:
        return (self.session, b"password")

    def add_listener(self, listener: Callable[[str], Any]) -> None:
        self.listeners.append(listener)

    def remove_listener(self, listener: Callable[[str], Any]) -> None:
        if listener in self.listeners:
            self.listeners.remove(listener)

    def start(self, timeout: float) -> None:
        if not self.reachable:
            raise KazooTimeoutError("Connection time-out")

    def stop(self) -> None:
        self.stopped = True
        self.connected = False
        self.drop_session_nodes()

    def close(self) -> None:
        self.closed = True

    def _require_connection(self) -> None:
        if not self.connected:
            raise ConnectionLoss()

    def ensure_path(self, path: str) -> None:
        self._require_connection()

    def ChildrenWatch(self, path: str, func: Callable[[list[str]], Any]) -> None:
        self.watches.append((path, func))
        func(self.get_children(path))

    def get_children(self, path: str) -> list[str]:
        self._require_connection()
        prefix = path + "/"
        return [key[len(prefix) :] for key in self.tree if key.startswith(prefix)]

    def get(self, path: str) -> tuple[bytes, FakeStat]:
        self._require_connection()
        if path not in self.tree:
            raise NoNodeError()
        data, owner = self.tree[path]
        return data, FakeStat(owner)

    def create(self, path: str, data: bytes, ephemeral: bool = False) -> str:
        self._require_connection()
        if path in self.tree:
            raise NodeExistsError()
        self.tree[path] = (data, self.session if ephemeral else 0)
        self.fire_watches()
        return path

    def set(self, path: str, data: bytes, version: int = -1) -> None:
        self.tree[path] = (data, self.tree[path][1])

    def delete(self, path: str, version: int = -1) -> None:
        self._require_connection()
        del self.tree[path]
        self.fire_watches()

    # test controls

    def fire_watches(self) -> None:
        if not self.connected:
            return  # a disconnected client hears nothing; CONNECTED makes it re-read
        for path, func in list(self.watches):
            if func(self.get_children(path)) is False:
                self.watches.remove((path, func))

    def drop_session_nodes(self) -> None:
        for key, (_, owner) in list(self.tree.items()):
            if owner == self.session:
                del self.tree[key]

    def change_state(self, state: str) -> None:
        self.connected = state == KazooState.CONNECTED
        for listener in list(self.listeners):
            listener(state)

    def expire_session(self) -> None:
        """The server expired the session: its znodes go, kazoo reports LOST."""
        self.drop_session_nodes()
        self.session += 1
        self.change_state(KazooState.LOST)


class FakeReactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.triggers: list[tuple[str, str, Callable[[], Any]]] = []

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        f(*args)

    def addSystemEventTrigger(self, phase: str, event: str, f: Callable[[], Any]) -> object:
        entry = (phase, event, f)
        self.triggers.append(entry)
        return entry

    def removeSystemEventTrigger(self, entry: Any) -> None:
        self.triggers.remove(entry)


def inline(work: Callable[[], Any]) -> Deferred[Any]:
    return maybeDeferred(work)


class FakeKazooTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.kazoo = FakeKazoo()
        self.registry = self.make(self.kazoo)

    def make(
        self, kazoo: FakeKazoo, run: Callable[..., Deferred[Any]] = inline
    ) -> ZooKeeperRegistry:
        return ZooKeeperRegistry(
            self.reactor,
            "zk.example:2181",
            "/cim/nodes",
            SESSION_TIMEOUT,
            client=kazoo,
            run_blocking=run,
        )

    def started(self) -> ZooKeeperRegistry:
        self.successResultOf(self.registry.start())
        return self.registry

    def other_node(self, node: NodeInfo = NODE_B, session: int = 99) -> None:
        """Another process's registration appears in the shared tree."""
        self.kazoo.tree[f"/cim/nodes/{node.node_id}"] = (encode_node(node), session)
        self.kazoo.fire_watches()

    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(INodeRegistry, self.registry))

    def test_start_reads_the_view_and_watches_it(self) -> None:
        self.other_node()
        registry = self.started()
        self.assertEqual(registry.live_nodes(), [NODE_B])
        views: list[list[NodeInfo]] = []
        registry.add_listener(views.append)
        self.successResultOf(registry.register(NODE_A))
        self.assertEqual(views, [[NODE_A, NODE_B]])
        del self.kazoo.tree["/cim/nodes/node-b"]
        self.kazoo.fire_watches()
        self.assertEqual(views[-1], [NODE_A])

    def test_register_writes_json_and_accepts(self) -> None:
        registry = self.started()
        self.assertFalse(registry.accepting)
        self.successResultOf(registry.register(NODE_A))
        self.assertTrue(registry.accepting)
        self.assertEqual(registry.local_node, NODE_A)
        data, owner = self.kazoo.tree["/cim/nodes/node-a"]
        self.assertEqual(owner, self.kazoo.session)
        self.assertEqual(
            json.loads(data),
            {
                "id": "node-a",
                "host": "10.0.0.1",
                "port": 9000,
                "public_key": base64.b64encode(b"key-a").decode(),
            },
        )

    def test_taken_id_is_refused_naming_it(self) -> None:
        self.other_node(NodeInfo("node-a", "10.9.9.9", 7000))
        registry = self.started()
        failure = self.failureResultOf(registry.register(NODE_A), NodeIdTaken)
        self.assertIn("'node-a'", str(failure.value))
        self.assertIn("10.9.9.9:7000", str(failure.value))
        self.assertFalse(registry.accepting)
        self.assertIsNone(registry.local_node)

    def test_a_znode_our_session_already_holds_is_ours(self) -> None:
        # A create whose reply was lost, then retried, finds its own znode.
        self.kazoo.tree["/cim/nodes/node-a"] = (b"{}", self.kazoo.session)
        registry = self.started()
        self.successResultOf(registry.register(NODE_A))
        self.assertTrue(registry.accepting)
        self.assertEqual(decode_node("node-a", self.kazoo.tree["/cim/nodes/node-a"][0]), NODE_A)

    def test_unreachable_zookeeper_fails_start_clearly(self) -> None:
        self.kazoo.reachable = False
        failure = self.failureResultOf(self.registry.start(), ZooKeeperUnavailable)
        self.assertIn("zk.example:2181", str(failure.value))
        self.assertTrue(self.kazoo.stopped)

    def test_suspended_keeps_serving_until_the_session_must_have_expired(self) -> None:
        registry = self.started()
        self.successResultOf(registry.register(NODE_A))
        with capturedLogs() as events:
            self.kazoo.change_state(KazooState.SUSPENDED)
        self.assertTrue(any(event["log_level"] == LogLevel.warn for event in events))
        self.reactor.advance(SESSION_TIMEOUT - 0.5)
        self.assertTrue(registry.accepting)
        self.kazoo.change_state(KazooState.CONNECTED)  # same session: nothing was lost
        self.reactor.advance(SESSION_TIMEOUT)
        self.assertTrue(registry.accepting)

        self.kazoo.change_state(KazooState.SUSPENDED)
        self.reactor.advance(SESSION_TIMEOUT)
        self.assertFalse(registry.accepting)
        self.kazoo.change_state(KazooState.CONNECTED)
        self.assertTrue(registry.accepting)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_lost_session_stops_accepting_then_registers_again(self) -> None:
        registry = self.started()
        self.successResultOf(registry.register(NODE_A))
        self.kazoo.expire_session()
        self.assertFalse(registry.accepting)
        self.assertNotIn("/cim/nodes/node-a", self.kazoo.tree)
        self.kazoo.change_state(KazooState.CONNECTED)
        self.assertTrue(registry.accepting)
        self.assertEqual(self.kazoo.tree["/cim/nodes/node-a"][1], self.kazoo.session)
        self.assertEqual(registry.live_nodes(), [NODE_A])

    def test_id_taken_while_the_session_was_lost(self) -> None:
        registry = self.started()
        self.successResultOf(registry.register(NODE_A))
        self.kazoo.expire_session()
        self.other_node(NodeInfo("node-a", "10.9.9.9", 7000))
        with capturedLogs() as events:
            self.kazoo.change_state(KazooState.CONNECTED)
        self.assertFalse(registry.accepting)
        critical = [event for event in events if event["log_level"] == LogLevel.critical]
        self.assertEqual(len(critical), 1)
        self.assertIn("'node-a'", critical[0]["error"])
        self.assertEqual(self.reactor.getDelayedCalls(), [])  # no retry loop against a rival

    def test_failed_reclaim_is_retried_while_connected(self) -> None:
        registry = self.started()
        self.successResultOf(registry.register(NODE_A))
        self.kazoo.expire_session()
        calls = {"create": 0}
        real_create = self.kazoo.create

        def flaky_create(path: str, data: bytes, ephemeral: bool = False) -> str:
            calls["create"] += 1
            if calls["create"] == 1:
                raise RuntimeError("flaky")
            return real_create(path, data, ephemeral)

        self.kazoo.create = flaky_create  # type: ignore[method-assign]
        self.kazoo.change_state(KazooState.CONNECTED)
        self.assertFalse(registry.accepting)
        self.reactor.advance(1.0)
        self.assertTrue(registry.accepting)
        self.assertEqual(calls["create"], 2)

    def test_newest_view_wins_when_reads_finish_out_of_order(self) -> None:
        pending: list[tuple[Deferred[Any], Callable[[], Any]]] = []

        def held(work: Callable[[], Any]) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            pending.append((d, work))
            return d

        def finish(index: int) -> None:
            d, work = pending.pop(index)
            d.callback(work())

        registry = self.make(self.kazoo, held)
        started = registry.start()
        finish(0)  # connect
        finish(0)  # first read
        self.successResultOf(started)
        # Two changes: the first read is computed after the second node appeared, so
        # compute each read's result when it is started, as a real thread would.
        self.other_node(NODE_A, session=50)
        first_d, first_work = pending.pop(0)
        first_result = first_work()
        self.other_node(NODE_B, session=51)
        finish(0)  # the second read finishes first and publishes both nodes
        self.assertEqual(registry.live_nodes(), [NODE_A, NODE_B])
        first_d.callback(first_result)  # an older read must not roll the view back
        self.assertEqual(registry.live_nodes(), [NODE_A, NODE_B])

    def test_unregister_deletes_only_our_own_znode(self) -> None:
        registry = self.started()
        self.successResultOf(registry.register(NODE_A))
        self.successResultOf(registry.unregister())
        self.assertNotIn("/cim/nodes/node-a", self.kazoo.tree)
        self.assertFalse(registry.accepting)

        self.successResultOf(registry.register(NODE_A))
        # Our session expired and someone else took the id: it is not ours to delete.
        self.kazoo.drop_session_nodes()
        self.other_node(NodeInfo("node-a", "10.9.9.9", 7000))
        self.successResultOf(registry.unregister())
        self.assertIn("/cim/nodes/node-a", self.kazoo.tree)

    def test_stop_closes_kazoo_and_drops_the_watch(self) -> None:
        registry = self.started()
        self.successResultOf(registry.register(NODE_A))
        self.assertEqual(len(self.reactor.triggers), 1)
        views: list[list[NodeInfo]] = []
        registry.add_listener(views.append)
        self.successResultOf(registry.stop())
        self.successResultOf(registry.stop())  # idempotent
        self.assertTrue(self.kazoo.stopped)
        self.assertTrue(self.kazoo.closed)
        self.assertFalse(registry.accepting)
        self.assertEqual(self.kazoo.listeners, [])
        self.assertEqual(self.reactor.triggers, [])
        # A watch event already on its way when kazoo closed is refused, and tells
        # kazoo to drop the watch.
        [(_, watch)] = self.kazoo.watches
        self.assertIs(watch(["node-b"]), False)
        self.assertEqual(views, [])

    def test_stop_without_start(self) -> None:
        self.successResultOf(self.make(FakeKazoo()).stop())

    def test_broken_znodes_are_skipped(self) -> None:
        self.kazoo.tree["/cim/nodes/junk"] = (b"not json", 7)
        self.other_node()
        with capturedLogs() as events:
            registry = self.started()
        self.assertEqual(registry.live_nodes(), [NODE_B])
        self.assertTrue(any(event.get("name") == "junk" for event in events))


class NodeCodecTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        self.assertEqual(decode_node("node-a", encode_node(NODE_A)), NODE_A)

    def test_rejects_bad_data(self) -> None:
        good = json.loads(encode_node(NODE_A))
        for change in (
            {"id": "other"},
            {"host": ""},
            {"port": 0},
            {"port": "9000"},
            {"port": True},
            {"public_key": "%%%"},
        ):
            with self.subTest(change=change):
                self.assertRaises(
                    ValueError, decode_node, "node-a", json.dumps({**good, **change}).encode()
                )
        self.assertRaises(ValueError, decode_node, "node-a", b"\xff")
        self.assertRaises(ValueError, decode_node, "node-a", b"[1]")
