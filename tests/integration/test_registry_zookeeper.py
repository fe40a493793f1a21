"""ZooKeeperRegistry against a private ZooKeeper server, on the real reactor.

One server per test class (tests/integration/support/zookeeper.py), each test under its
own path. The session rules on a fake kazoo are in tests/unit/test_registry_zookeeper.py.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from kazoo.client import KazooClient
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from cim.backends.registry.zookeeper import ZooKeeperRegistry, ZooKeeperUnavailable
from cim.interfaces import NodeIdTaken, NodeInfo
from tests.integration.support.zookeeper import shared_zookeeper
from tests.unit.test_registry_zookeeper import NODE_A, NODE_B

# --- against a real ZooKeeper ----------------------------------------------------------

REAL_SESSION_TIMEOUT = 2.0


CRASHING_NODE = """
import sys
from twisted.internet import defer, reactor
from cim.interfaces import NodeInfo
from cim.backends.registry.zookeeper import ZooKeeperRegistry

async def main():
    registry = ZooKeeperRegistry(reactor, sys.argv[1], sys.argv[2], float(sys.argv[3]))
    await registry.start()
    await registry.register(NodeInfo("crasher", "127.0.0.1", 9999, b"k"))
    print("registered", flush=True)

def failed(failure):
    print(failure.getTraceback(), flush=True)
    reactor.stop()

reactor.callWhenRunning(lambda: defer.ensureDeferred(main()).addErrback(failed))
reactor.run()
"""


class _ChildProcess(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.registered: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if b"registered" in self.output and not self.registered.called:
            self.registered.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        if not self.registered.called:
            self.registered.errback(RuntimeError(self.output.decode(errors="replace")))
        self.ended.callback(None)


def sees(registry: ZooKeeperRegistry, nodes: list[NodeInfo]) -> bool:
    return registry.live_nodes() == nodes


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll on the reactor (never sleeping it) until true; the seconds it took."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await deferLater(global_reactor, 0.02, lambda: None)
    return time.monotonic() - started


class RealZooKeeperTests(TestCase):
    def setUp(self) -> None:
        self.server = shared_zookeeper(self)
        self.hosts = self.server.hosts
        self.path = f"/cim-tests/{self._testMethodName}/nodes"

    def registry(self, session_timeout: float = REAL_SESSION_TIMEOUT) -> ZooKeeperRegistry:
        registry = ZooKeeperRegistry(
            global_reactor, self.hosts, self.path, session_timeout, connect_timeout=10.0
        )
        self.addCleanup(registry.stop)
        return registry

    def kazoo(self, **options: Any) -> KazooClient:
        client = KazooClient(hosts=self.hosts, **options)

        def close() -> None:
            client.stop()
            client.close()

        self.addCleanup(deferToThread, close)  # stop() joins kazoo's threads: not here
        return client

    async def test_two_nodes_see_each_other(self) -> None:
        first, second = self.registry(), self.registry()
        await first.start()
        await second.start()
        await first.register(NODE_A)
        await second.register(NODE_B)
        for registry in (first, second):
            await wait_until(partial(sees, registry, [NODE_A, NODE_B]), 5, "both in the view")
        self.assertTrue(first.accepting and second.accepting)

    async def test_second_node_with_a_live_id_is_refused(self) -> None:
        first, second = self.registry(), self.registry()
        await first.start()
        await second.start()
        await first.register(NODE_A)
        impostor = NodeInfo("node-a", "10.0.0.9", 9009)
        with self.assertRaises(NodeIdTaken) as caught:
            await second.register(impostor)
        self.assertIn("'node-a'", str(caught.exception))
        self.assertIn("10.0.0.1:9000", str(caught.exception))
        self.assertFalse(second.accepting)
        await wait_until(lambda: second.live_nodes() == [NODE_A], 5, "the first node only")

    async def test_stop_withdraws_at_once(self) -> None:
        # A long session timeout proves the znode goes with the close, not the expiry.
        leaving, watching = self.registry(session_timeout=30.0), self.registry()
        await leaving.start()
        await watching.start()
        await leaving.register(NODE_A)
        await wait_until(lambda: watching.live_nodes() == [NODE_A], 5, "node-a seen")
        await leaving.stop()
        took = await wait_until(lambda: watching.live_nodes() == [], 2, "node-a gone")
        print(f"\n    stopped node gone from the other view after {took:.2f} s", end=" ")

    async def test_killed_node_disappears_within_the_session_timeout(self) -> None:
        watching = self.registry()
        await watching.start()
        child = _ChildProcess()
        process = global_reactor.spawnProcess(
            child,
            sys.executable,
            [sys.executable, "-c", CRASHING_NODE, self.hosts, self.path, str(REAL_SESSION_TIMEOUT)],
            env=dict(os.environ),
        )
        self.addCleanup(lambda: child.ended)
        try:
            await child.registered
        except BaseException:
            if not child.ended.called:
                process.signalProcess("KILL")
            raise
        await wait_until(
            lambda: [node.node_id for node in watching.live_nodes()] == ["crasher"],
            5,
            "the child's node seen",
        )
        process.signalProcess("KILL")  # no close: the server must expire the session
        took = await wait_until(
            lambda: watching.live_nodes() == [], REAL_SESSION_TIMEOUT + 2, "crasher gone"
        )
        print(
            f"\n    killed node gone after {took:.2f} s (session timeout "
            f"{REAL_SESSION_TIMEOUT:g} s)",
            end=" ",
        )

    async def test_expired_session_stops_accepting_then_registers_again(self) -> None:
        node, watching = self.registry(), self.registry()
        history: list[bool] = []
        await node.start()
        await watching.start()
        await node.register(NODE_A)
        self.assertTrue(node.accepting)
        await wait_until(lambda: watching.live_nodes() == [NODE_A], 5, "node-a seen")

        # The standard trick: a second client joins the session and closes it, which
        # the server treats exactly like an expiry.
        old_session = node._client.client_id
        original_state_changed = node._state_changed

        def record(state: str) -> None:
            original_state_changed(state)
            history.append(node.accepting)

        node._state_changed = record  # type: ignore[method-assign]
        thief = self.kazoo(client_id=old_session)
        await deferToThread(lambda: (thief.start(timeout=10), thief.stop()))

        await wait_until(lambda: False in history, 10, "accepting False on LOST")
        await wait_until(lambda: node.accepting, 10, "accepting again")
        self.assertNotEqual(node._client.client_id[0], old_session[0])
        await wait_until(lambda: watching.live_nodes() == [NODE_A], 5, "node-a back")
        # The znode belongs to the new session, so it is ephemeral again.
        checker = self.kazoo()
        await deferToThread(lambda: checker.start(timeout=10))
        _, stat = await deferToThread(lambda: checker.get(f"{self.path}/node-a"))
        self.assertEqual(stat.ephemeralOwner, node._client.client_id[0])

    async def test_listeners_run_on_the_reactor_thread(self) -> None:
        first, second = self.registry(), self.registry()
        threads: list[threading.Thread] = []
        first.add_listener(lambda view: threads.append(threading.current_thread()))
        await first.start()
        await second.start()
        await second.register(NODE_B)
        await first.register(NODE_A)
        await wait_until(lambda: first.live_nodes() == [NODE_A, NODE_B], 5, "both seen")
        await second.unregister()
        await wait_until(lambda: first.live_nodes() == [NODE_A], 5, "node-b gone")
        self.assertGreaterEqual(len(threads), 2)
        self.assertEqual(set(threads), {threading.main_thread()})


class UnreachableZooKeeperTests(TestCase):
    async def test_start_times_out_with_a_clear_error(self) -> None:
        # Bound but not listening: the port stays ours and every connect is refused.
        with socket.socket() as reserved:
            reserved.bind(("127.0.0.1", 0))
            hosts = f"127.0.0.1:{reserved.getsockname()[1]}"
            registry = ZooKeeperRegistry(
                global_reactor, hosts, "/cim/nodes", 2.0, connect_timeout=1.0
            )
            with self.assertRaises(ZooKeeperUnavailable) as caught:
                await registry.start()
        self.assertIn(hosts, str(caught.exception))
        self.assertIn("within 1 s", str(caught.exception))
        await registry.stop()
