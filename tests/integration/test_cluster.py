"""Three real daemons sharing Redis and ZooKeeper: routing, failover, outages.

Each test runs its own private ZooKeeper and redis-server (so it can stop or kill
them) and three `twistd cim` processes with the `redis` and `zookeeper` backends and
one shared account database. Clients are the real client library on the real reactor.
"""

from __future__ import annotations

import os
import time

from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.trial.unittest import TestCase

from cim.client.router import RouterClient, RouterError
from cim.client.session import ChatClient
from cim.protocols import cim_pb2
from tests.integration.support.cluster import (
    HEARTBEAT,
    ROUTE_TTL,
    SESSION_TIMEOUT,
    USERS,
    Cluster,
    connected_port,
    eventually,
    handshake_status,
    login_body,
    reactor,
    ring_of,
    sleep,
    start_clients,
)
from tests.integration.support.daemons import PASSWORD


class ClusterTests(TestCase):
    timeout = 300

    async def _stop_clients(self, clients: dict[str, ChatClient]) -> None:
        for client in clients.values():
            await client.stop(logout=False)

    def test_users_spread_by_the_ring_and_survive_a_killed_node(self) -> None:
        return ensureDeferred(self._spread_and_kill())

    async def _spread_and_kill(self) -> None:
        cluster = Cluster(self)
        ring = ring_of(cluster.nodes)
        # A user the full ring puts on node3: its logins show when routers drop node3.
        probe = next(
            name
            for name in (f"probe{i}" for i in range(1000))
            if ring.node_for(name).node_id == "node3"  # type: ignore[union-attr]
        )
        users = [f"user{i:03d}" for i in range(USERS)] + [probe]
        cluster.start(users)
        clients = await start_clients(cluster, users[:USERS])
        self.addCleanup(lambda: ensureDeferred(self._stop_clients(clients)))

        # 1. Every user is where the ring puts it, and connected to that node.
        per_node: dict[str, int] = {}
        for user, client in clients.items():
            expected = ring.node_for(user)
            assert expected is not None and client.ticket is not None
            self.assertEqual(client.ticket.node.node_id, expected.node_id, user)
            self.assertEqual(connected_port(client), cluster.by_id(expected.node_id).im_port)
            per_node[expected.node_id] = per_node.get(expected.node_id, 0) + 1
        self.assertEqual(set(per_node), {"node1", "node2", "node3"})
        online = cluster.nodes[0].online()
        self.assertEqual(online["total"], USERS)
        self.assertEqual(online["nodes"], per_node)

        # 2. kill -9 one node: it leaves every router's ring within the session timeout.
        victim = cluster.by_id("node3")
        survivors = [node for node in cluster.nodes if node is not victim]
        victim_users = [
            u for u, c in clients.items() if c.ticket and c.ticket.node.node_id == "node3"
        ]
        self.assertEqual((await login_body(survivors[0], probe))["node"]["id"], "node3")
        victim.kill()
        killed_at = time.monotonic()

        async def routers_forgot_victim() -> bool:
            for router in survivors:
                body = await login_body(router, probe)
                if body["status"] != 200 or body["node"]["id"] == "node3":
                    return False
            return True

        await eventually(routers_forgot_victim, SESSION_TIMEOUT + 2, "routers to drop node3")
        print(f"\nnode3 left the routers' rings {time.monotonic() - killed_at:.2f} s after kill -9")

        # Its users notice the silence, log in again and land on the survivors.
        def all_back() -> bool:
            return all(
                clients[user].state == "online"
                and clients[user].ticket is not None
                and clients[user].ticket.node.node_id != "node3"  # type: ignore[union-attr]
                for user in victim_users
            )

        took = await eventually(all_back, 60, "node3's users to come back online elsewhere")
        print(f"{len(victim_users)} users of node3 were back online elsewhere after {took:.2f} s")
        survivor_ring = ring_of(survivors)
        for user in victim_users:
            expected = survivor_ring.node_for(user)
            assert expected is not None
            self.assertEqual(connected_port(clients[user]), cluster.by_id(expected.node_id).im_port)

        # No route points at the dead node once the route TTL has passed.
        def no_route_to_victim() -> bool:
            counts = survivors[0].online()["nodes"]
            return counts.get("node3", 0) == 0 and sum(counts.values()) == USERS

        await eventually(no_route_to_victim, ROUTE_TTL + 5, "node3's routes to expire")

    def test_a_second_node_with_a_live_id_refuses_to_start(self) -> None:
        cluster = Cluster(self, count=1)
        cluster.start(["alice"])
        twin = cluster.node("node1", os.path.abspath(self.mktemp()))
        result = twin.run_to_exit()
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("node1", result.stderr)
        self.assertIn("already", result.stderr)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertEqual(cluster.nodes[0].health()["status"], "ok")

    def test_simultaneous_logins_leave_one_session_with_redis(self) -> None:
        return ensureDeferred(self._simultaneous(Cluster(self, count=2)))

    def test_simultaneous_logins_leave_one_session_in_memory(self) -> None:
        return ensureDeferred(self._simultaneous(Cluster(self, count=1, state="memory")))

    async def _simultaneous(self, cluster: Cluster) -> None:
        cluster.start(["alice"])
        routers = [cluster.nodes[i % len(cluster.nodes)] for i in range(2)]
        for _ in range(5):
            bodies = await DeferredList(
                [ensureDeferred(login_body(router, "alice")) for router in routers],
                fireOnOneErrback=True,
                consumeErrors=True,
            )
            logins = [body for _, body in bodies]
            self.assertEqual([body["status"] for body in logins], [200, 200])
            statuses = [await handshake_status(body) for body in logins]
            self.assertEqual(
                sorted(statuses), [cim_pb2.LoginResult.OK, cim_pb2.LoginResult.INVALID_TOKEN]
            )

    def test_redis_outage_keeps_users_connected_and_refuses_logins(self) -> None:
        return ensureDeferred(self._redis_outage())

    async def _redis_outage(self) -> None:
        cluster = Cluster(self, count=2)
        users = [f"user{i}" for i in range(20)] + ["late"]
        cluster.start(users)
        clients = await start_clients(cluster, users[:20])
        self.addCleanup(lambda: ensureDeferred(self._stop_clients(clients)))
        router = RouterClient(reactor, cluster.nodes[0].router_url)

        cluster.redis.stop()
        with self.assertRaises(RouterError) as caught:
            await router.login("late", PASSWORD, "phone")
        self.assertEqual(
            (caught.exception.status, caught.exception.code), (503, "state_unavailable")
        )
        await sleep(HEARTBEAT * 4)  # several heartbeat timeouts' worth of silence
        self.assertTrue(all(client.state == "online" for client in clients.values()))
        before = sum(node.health()["online_here"] for node in cluster.nodes)
        self.assertEqual(before, 20)

        cluster.redis.start()

        async def login_works() -> bool:
            try:
                await router.login("late", PASSWORD, "phone")
            except RouterError:
                return False
            return True

        await eventually(login_works, 15, "logins to work again")

        # The nodes rewrite their users' state into the empty Redis.
        def state_restored() -> bool:
            return cluster.nodes[0].online()["total"] >= 20

        await eventually(state_restored, ROUTE_TTL + 5, "the online list to be rewritten")
        self.assertTrue(all(client.state == "online" for client in clients.values()))
        # Two users on one node still chat (delivery across nodes is a later feature).
        by_node: dict[str, list[str]] = {}
        for user, client in clients.items():
            assert client.ticket is not None
            by_node.setdefault(client.ticket.node.node_id, []).append(user)
        sender, receiver = max(by_node.values(), key=len)[:2]
        outcome = await clients[sender].send_text(receiver, "still here")
        self.assertEqual(outcome.status, "delivered")
