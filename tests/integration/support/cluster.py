"""A cluster of real daemons for integration tests: private ZooKeeper and Redis, an
optional bus, one shared account database, and helpers for clients on the real reactor.
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import treq
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.trial.unittest import TestCase

from cim.client.connection import ImClientProtocol, LoginRefused
from cim.client.router import parse_ticket
from cim.client.session import Backoff, ChatClient
from cim.config import AccountsConfig
from cim.interfaces import NodeInfo
from cim.protocols import cim_pb2
from cim.ring import HashRing
from cim.storage.database import open_engine, upgrade
from tests.integration.support.daemons import PASSWORD, DaemonProcess, free_port
from tests.integration.support.services import PrivateRedis
from tests.integration.support.zookeeper import private_zookeeper

reactor: Any = global_reactor
SESSION_TIMEOUT = 4.0
ROUTE_TTL = 6.0
HEARTBEAT = 1.0
USERS = 300


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], timeout: float, what: str
) -> float:
    """Poll until check() holds; return how long it took; fail after timeout."""
    started = time.monotonic()
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"gave up after {timeout:g} s waiting for {what}")
        await sleep(0.1)


def sleep(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


def add_users(database_url: str, names: list[str]) -> None:
    """Straight into the shared database, with the cheap scrypt the daemons use."""
    from cim.accounts.store import BlockingAccountStore

    upgrade(database_url)
    engine = open_engine(database_url)
    try:
        accounts = BlockingAccountStore(engine, AccountsConfig(scrypt_n=4096), clock=time.time)
        for name in names:
            accounts.add_user(name, PASSWORD)
    finally:
        engine.dispose()


def own_prefix(letter: str = "n") -> str:
    """A node-id prefix no other cluster has (``n3f9a1c-`` makes n3f9a1c-1, -2, ...).

    A node's bus queue is named by its node id alone (``cim.node.<id>``), whatever the
    exchange: clusters of the same ids running at once on the shared broker
    (``trial -j2``) consumed each other's live copies and pull notices, and one test's
    cleanup deleted the queues another was reading (ConsumerCancelled)."""
    return f"{letter}{uuid.uuid4().hex[:6]}-"


def node_ids(prefix: str, count: int) -> list[str]:
    """The ids of a cluster of ``count`` nodes made with ``prefix``."""
    return [f"{prefix}{i + 1}" for i in range(count)]


def own_prefix_where(
    letter: str, count: int, fits: Callable[[HashRing], bool], tries: int = 1000
) -> str:
    """A prefix of one's own whose nodes' ring ``fits``, for a test that needs its
    users placed a certain way: placement follows the node ids (the ring is built from
    them alone), so a test either picks users from the ring or ids for its users."""
    for _ in range(tries):
        prefix = own_prefix(letter)
        if fits(ring_of_ids(node_ids(prefix, count))):
            return prefix
    raise AssertionError(f"no {count}-node ring in {tries} tries fits")


class Cluster:
    def __init__(
        self,
        test: TestCase,
        count: int = 3,
        state: str = "redis",
        amqp_url: str | None = None,
        prefix: str | None = None,
        session_timeout: float = SESSION_TIMEOUT,
        logic: bool = False,
        database_url: str | None = None,
        extra: str = "",
        websocket: bool = False,
    ) -> None:
        self.test = test
        self.logic = logic
        # More config for every node (sections of their own, e.g. [push]).
        self.extra = extra
        self.websocket = websocket
        # Each node's [ws] port when the WebSocket gateway runs on every node.
        self.ws_ports: dict[str, int] = {}
        # Each node's [logic] port when the logic service runs on every node.
        self.logic_ports: dict[str, int] = {}
        self.session_timeout = session_timeout
        self.zookeeper = private_zookeeper(test)
        self.redis = PrivateRedis(test)
        self.redis.start()
        self.amqp_url = amqp_url
        # A broker shared with other tests gets an exchange of this cluster's own. That
        # is not enough for the node queues, named by node id alone (cim.node.<id>): on
        # a broker the nodes get ids of their own too (own_prefix) unless the test
        # names a prefix; without one, node1, node2, ...
        if prefix is None:
            prefix = own_prefix() if amqp_url is not None else "node"
        self.exchange = f"cim.test.{uuid.uuid4().hex[:12]}"
        base = os.path.abspath(test.mktemp())
        os.makedirs(base)
        self.base = base
        # One shared account database: SQLite in the test's directory unless given.
        self.database_url = database_url or f"sqlite:///{base}/shared.db"
        self.nodes = [
            self.node(node_id, os.path.join(base, f"n{i + 1}"), state)
            for i, node_id in enumerate(node_ids(prefix, count))
        ]
        if amqp_url is not None:
            test.addCleanup(delete_queues, amqp_url, self.exchange, [n.node_id for n in self.nodes])

    def node(self, node_id: str, workdir: str, state: str = "redis") -> DaemonProcess:
        logic_section = ""
        if self.logic:
            port = self.logic_ports[node_id] = free_port()
            logic_section = f"[logic]\nenabled = true\nlisten = tcp:{port}:interface=127.0.0.1\n"
        if self.websocket:
            port = self.ws_ports[node_id] = free_port()
            logic_section += f"[ws]\nenabled = true\nlisten = tcp:{port}:interface=127.0.0.1\n"
        state_section = (
            f"[state]\nbackend = redis\nredis_url = {self.redis.url}\nredis_timeout = 1s\n"
            f"route_ttl = {ROUTE_TTL:g}s\n"
            if state == "redis"
            else "[state]\nbackend = memory\n"
        )
        return DaemonProcess(
            workdir,
            node_id,
            extra=state_section
            + f"[registry]\nbackend = zookeeper\nzookeeper_hosts = {self.zookeeper.hosts}\n"
            f"session_timeout = {self.session_timeout:g}s\n"
            f"[database]\nurl = {self.database_url}\n"
            f"[im]\nheartbeat_interval = {HEARTBEAT:g}s\n"
            + self._queue_section()
            + logic_section
            + self.extra,
        )

    def _queue_section(self) -> str:
        if self.amqp_url is None:
            return ""
        # A broker shared with other tests: queues of this cluster's own.
        return (
            f"[queue]\nbackend = rabbitmq\namqp_url = {self.amqp_url}\n"
            f"exchange = {self.exchange}\nconfirm_timeout = 10s\n"
            f"[offline]\nqueue = {self.exchange}.offline\n"
            f"[archive]\nqueue = {self.exchange}.archive\n"
        )

    def start(self, users: list[str]) -> None:
        add_users(self.database_url, users)
        for node in self.nodes:
            node.spawn()
            self.test.addCleanup(node.stop)
        for node in self.nodes:
            node.wait_healthy()

    def by_id(self, node_id: str) -> DaemonProcess:
        return next(node for node in self.nodes if node.node_id == node_id)


def delete_queues(amqp_url: str, exchange: str, node_ids: list[str]) -> None:
    """Leave the shared broker as it was: the cluster's queues and exchange go."""
    import pika

    from cim.backends.bus import node_queue

    try:
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    except Exception:
        return  # the broker is gone (a private one already stopped): nothing to clean
    try:
        channel = connection.channel()
        for node_id in node_ids:
            channel.queue_delete(node_queue(node_id))
        channel.queue_delete(f"{exchange}.offline")
        channel.queue_delete(f"{exchange}.archive")
        channel.exchange_delete(exchange)
    finally:
        connection.close()


def ring_of(nodes: list[DaemonProcess]) -> HashRing:
    return HashRing([NodeInfo(n.node_id, "127.0.0.1", n.im_port) for n in nodes], 160)


def ring_of_ids(ids: list[str]) -> HashRing:
    """The ring nodes of these ids make (where a user goes does not depend on ports)."""
    return HashRing([NodeInfo(node_id, "127.0.0.1", 0) for node_id in ids], 160)


def chat_client(cluster: Cluster, first: DaemonProcess, user: str) -> ChatClient:
    """A client that knows every router, starting with `first`."""
    routers = [first.router_url] + [n.router_url for n in cluster.nodes if n is not first]
    client = ChatClient(
        reactor,
        routers,
        user,
        PASSWORD,
        device="test",
        backoff=Backoff(initial=0.2, maximum=2.0),
        rng=random.Random(user),
    )
    # The library's default takes nothing (no cursor moves for unseen messages); these
    # users' application takes whatever comes, so their senders hear "delivered".
    client.on_message = lambda message: True
    return client


async def start_clients(cluster: Cluster, users: list[str]) -> dict[str, ChatClient]:
    clients = {}
    waits = []
    for number, user in enumerate(users):
        client = chat_client(cluster, cluster.nodes[number % len(cluster.nodes)], user)
        clients[user] = client
        waits.append(client.start())
        if number % 25 == 24:
            await DeferredList(waits, fireOnOneErrback=True, consumeErrors=True)
            waits = []
    await DeferredList(waits, fireOnOneErrback=True, consumeErrors=True)
    return clients


def connected_port(client: ChatClient) -> int:
    assert client.protocol is not None and client.protocol.transport is not None
    peer: Any = client.protocol.transport.getPeer()  # an IPv4Address
    return int(peer.port)


async def handshake_status(ticket_body: dict[str, Any]) -> int:
    """Connect with a login's token; the node's LoginResult status (OK = 0)."""
    ticket = parse_ticket(ticket_body)

    class Events:
        def frame_received(self, frame_type: int, message: Any) -> None:
            pass

        def connection_closed(self, reason: Any) -> None:
            pass

    protocol = ImClientProtocol(
        reactor,
        Events(),
        ticket.server_key,
        ticket.token,
        "probe",
        "chacha20-poly1305",
        ("chacha20-poly1305",),
    )
    await connectProtocol(HostnameEndpoint(reactor, ticket.node.host, ticket.node.port), protocol)
    try:
        await protocol.logged_in
        status: int = cim_pb2.LoginResult.OK
    except LoginRefused as refusal:
        status = refusal.status
    finally:
        if protocol.transport is not None:
            protocol.transport.loseConnection()
    return status


async def login_body(node: DaemonProcess, user: str) -> dict[str, Any]:

    headers: dict[bytes | str, bytes | str] = {"Content-Type": "application/json"}
    response = await treq.post(
        f"{node.router_url}/api/v1/login",
        data=json.dumps({"user": user, "password": PASSWORD}).encode(),
        headers=headers,
        persistent=False,
    )
    body: dict[str, Any] = await treq.json_content(response)
    body["status"] = response.code
    return body
