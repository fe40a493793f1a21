"""A whole IM node in memory, on a fake clock, and clients connected to it through iosim.

Like Synapse's tests/server.py: real protocol objects, real crypto, fake time and fake
transports, so a test can advance the clock past a heartbeat timeout in microseconds
and read every byte that crossed the "network".
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message as ProtobufMessage
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim

from cim.backends.registry.local import LocalRegistry
from cim.backends.state.memory import MemoryState
from cim.client.connection import ImClientProtocol
from cim.config import KNOWN_SUITES, ImConfig, parse_config
from cim.history.read_marks import ReadMarks
from cim.history.service import HistoryService
from cim.im.collaborators import (
    NO_BOUNDS,
    Bounds,
    Directory,
    GroupMembership,
    NodeCore,
    NoGroups,
    Stores,
    UserExists,
)
from cim.im.node import ImNode, Room
from cim.im.peers import BusPeers, NoPeers, Peers
from cim.interfaces import IMessageBus, NodeInfo, SessionRecord
from cim.message_ids import MessageIdGenerator
from cim.metrics import NodeMetrics
from cim.protocols.crypto import NodeKey
from cim.protocols.handshake import Resumption
from cim.protocols.im import ImServerProtocol
from cim.protocols.im_listener import ImServerFactory
from cim.storage.database import Database
from tests.fakes.timelines import fresh_database, inline_timelines

_NODE_KEY: NodeKey | None = None


def node_key() -> NodeKey:
    """One RSA key for the whole test run: generating one costs ~100 ms."""
    global _NODE_KEY
    if _NODE_KEY is None:
        _NODE_KEY = NodeKey.generate(2048)
    return _NODE_KEY


def im_config(extra: str = "") -> ImConfig:
    return parse_config("[node]\nid = node1\n[im]\n" + extra).im


class KnownUsers:
    """Stands in for AccountStore.exists."""

    def __init__(self, *names: str) -> None:
        self.names = set(names)

    def __call__(self, name: str) -> Deferred[bool]:
        return succeed(name in self.names)


@dataclass
class RecordingEvents:
    """A ConnectionEvents that remembers everything it was told."""

    frames: list[tuple[int, ProtobufMessage]] = field(default_factory=list)
    closed: list[Failure] = field(default_factory=list)
    auto_ack: bool = False
    protocol: ImClientProtocol | None = None

    def frame_received(self, frame_type: int, message: ProtobufMessage) -> None:
        from cim.protocols import cim_pb2

        self.frames.append((frame_type, message))
        if self.auto_ack and frame_type == cim_pb2.MSG_N and self.protocol is not None:
            self.protocol.send(cim_pb2.ACK_R, cim_pb2.AckR(msg_id=message.id))  # type: ignore[attr-defined]

    def connection_closed(self, reason: Failure) -> None:
        self.closed.append(reason)

    def of_type(self, frame_type: int) -> list[Any]:
        return [message for kind, message in self.frames if kind == frame_type]


@dataclass
class ConnectedClient:
    protocol: ImClientProtocol
    server: ImServerProtocol
    events: RecordingEvents
    pump: iosim.IOPump
    client_transport: iosim.FakeTransport
    server_transport: iosim.FakeTransport
    token: str
    recorded: list[bytes]

    @property
    def wire_bytes(self) -> bytes:
        return b"".join(self.recorded)

    def flush(self) -> None:
        self.pump.flush()


class NodeHarness:
    """A node (its rooms + factory + memory state) driven by a MemoryReactorClock."""

    def __init__(
        self,
        config_extra: str = "",
        policy: str = "kick_old",
        users: tuple[str, ...] = (),
        node_id: str = "node1",
        clock: MemoryReactorClock | None = None,
        state: MemoryState | None = None,
        bus: IMessageBus | None = None,
        groups: GroupMembership | None = None,
        known: KnownUsers | None = None,
        stores: Stores | None = None,
        accounts: UserExists | None = None,
        bounds: Bounds = NO_BOUNDS,
        database: Database | None = None,
        more_rooms: Sequence[Room] = (),
    ) -> None:
        """One node; pass clock, state, bus and known users of another to make a cluster.

        Without a bus the node is alone (``NoPeers``), without groups it has none
        (``NoGroups``), without ``accounts`` (e.g. ``AccountStore.exists``) the users
        it knows are ``users`` and whoever logs in. Without ``stores`` the node has real
        timelines and history on a fresh SQLite database run inline (``database`` to
        share one: a cluster's nodes share theirs), reached as ``timelines``;
        ``Stores()`` is a node that keeps nothing. ``im`` is the node's rooms; its
        ``directory`` and ``stores`` can be swapped after the fact. ``bounds`` brings
        rate limits (also the hellos per address) and the fan-out bounds; without, the
        node has none.
        """
        if clock is None:
            clock = MemoryReactorClock()
            clock.advance(1_800_000_000)  # a realistic wall-clock time for timestamps
        self.clock = clock
        self.node_id = node_id
        self.config = im_config(config_extra)
        self.policy = policy
        self.bounds = bounds
        self.metrics = NodeMetrics()
        self.state = state if state is not None else MemoryState(self.clock)
        self.registry = LocalRegistry()
        self.key = node_key()
        self.registry.register(NodeInfo(node_id, "127.0.0.1", 9000, self.key.public_der))
        self.users = known if known is not None else KnownUsers()
        self.users.names.update(users)
        self.bus = bus
        membership = groups if groups is not None else NoGroups()
        self.database = database
        if stores is None:
            self.database = database if database is not None else fresh_database()
            self.timelines = inline_timelines(self.clock, self.database)
            stores = Stores(
                self.timelines,
                history=HistoryService(self.timelines, membership.is_member),
                read_marks=ReadMarks(self.database, self.clock),
            )
        self.peers: Peers = (
            BusPeers(node_id, bus, self.state.presence) if bus is not None else NoPeers()
        )
        self.im = ImNode(
            NodeCore(
                node_id,
                self.state,
                self.clock,
                self.metrics,
                MessageIdGenerator(self.clock, int(node_id[-1]) if node_id[-1].isdigit() else 1),
            ),
            Directory(accounts if accounts is not None else self.users, membership),
            stores,
            self.peers,
            bounds,
            more_rooms,
        )
        self.factory = ImServerFactory(
            node_id,
            self.config,
            self.key,
            self.im,
            self.state,
            self.registry,
            self.clock,
            self.metrics,
            bounds.limits,
        )
        self._next_port = 40000
        self.pumps: list[iosim.IOPump] = []

    def login(
        self, user: str, device: str = "phone", node_id: str | None = None
    ) -> tuple[str, SessionRecord]:
        """What the router does: a token and a session in the state store."""
        node_id = node_id or self.node_id
        self.users.names.add(user)
        token = secrets.token_urlsafe(32)
        d = self.state.sessions.create_session(
            hashlib.sha256(token.encode()).hexdigest(),
            user,
            device,
            node_id,
            3600.0,
            self.policy,
            self.bounds.max_devices_per_user,
        )
        results: list[Any] = []
        d.addBoth(results.append)
        result = results[0]
        if isinstance(result, Failure):
            result.raiseException()
        record, _previous = result
        return token, record

    def connect(
        self,
        user: str | None = None,
        token: str | None = None,
        suite: str = "chacha20-poly1305",
        offered: tuple[str, ...] | None = None,
        device: str = "phone",
        auto_ack: bool = False,
        host: str = "10.0.0.1",
        server_key: bytes | None = None,
        resume: Resumption | None = None,
    ) -> ConnectedClient:
        if token is None:
            assert user is not None
            token, _ = self.login(user, device)
        events = RecordingEvents(auto_ack=auto_ack)
        client = ImClientProtocol(
            self.clock,
            events,
            server_key if server_key is not None else self.key.public_der,
            token,
            device,
            suite,
            offered if offered is not None else KNOWN_SUITES,
            resume=resume,
        )
        events.protocol = client
        server, server_transport, client_transport, pump, recorded = self.attach(client, host)
        return ConnectedClient(
            client, server, events, pump, client_transport, server_transport, token, recorded
        )

    def attach(
        self, client: Any, host: str = "10.0.0.1"
    ) -> tuple[
        ImServerProtocol, iosim.FakeTransport, iosim.FakeTransport, iosim.IOPump, list[bytes]
    ]:
        """Wire a client protocol to a new server protocol of this node."""
        self._next_port += 1
        server_address = IPv4Address("TCP", "127.0.0.1", 9000)
        client_address = IPv4Address("TCP", host, self._next_port)
        server = self.factory.buildProtocol(client_address)
        server_transport = iosim.FakeTransport(
            server, isServer=True, hostAddress=server_address, peerAddress=client_address
        )
        client_transport = iosim.FakeTransport(
            client, isServer=False, hostAddress=client_address, peerAddress=server_address
        )
        recorded: list[bytes] = []
        for transport in (server_transport, client_transport):
            original = transport.write

            def recording_write(data: bytes, original: Any = original) -> None:
                recorded.append(bytes(data))
                original(data)

            transport.write = recording_write  # type: ignore[method-assign]
        pump = iosim.connect(
            server, server_transport, client, client_transport, greet=True, clock=self.clock
        )
        self.pumps.append(pump)
        return server, server_transport, client_transport, pump, recorded

    def flush_all(self) -> None:
        """Pump every connection until nothing moves."""
        for _ in range(100):
            if not any(pump.pump() for pump in self.pumps):
                return
