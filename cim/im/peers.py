"""The other IM nodes, as this node reaches them: routes in the state store, the bus.

A user connected elsewhere is found through its route (user -> node) and reached by
publishing to that node's bus queue. A node without a bus is alone: ``NoPeers`` finds
nobody elsewhere without asking the state store, so such a node treats every user
who is not connected here as offline.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Protocol

from twisted.internet.defer import Deferred, fail, succeed

from cim.interfaces import BusConsumer, BusUnavailable, IMessageBus, INodeRegistry, IRouteStore
from cim.protocols import cim_pb2

__all__ = ["EVERY_NODE", "BusPeers", "LiveNodes", "NoPeers", "Peers"]


class Peers(Protocol):
    """Where users connected to other nodes are, and how to send those nodes frames."""

    def listen(self, consumer: BusConsumer) -> None:
        """Hand what other nodes send this one to ``consumer``."""

    def node_of(self, user: str) -> Deferred[str | None]:
        """The node the user's route names (maybe this one, maybe a dead one), or None."""

    def nodes_of(self, users: list[str]) -> Deferred[dict[str, str]]:
        """The node of each user that has a route; users without one are left out."""

    def is_alive(self, node: str) -> bool:
        """Whether the registry sees the node; a route to any other one is stale."""

    def publish(self, node: str, envelope: cim_pb2.BusEnvelope) -> Deferred[None]:
        """Queue the envelope for the node; fails with BusUnavailable when not taken."""


class _EveryNode:
    def __contains__(self, node: object) -> bool:
        return True


EVERY_NODE: Container[str] = _EveryNode()
"""No registry to ask: every node a route names is taken to be alive."""


class LiveNodes:
    """The node ids the registry sees alive, read from its memory at each question."""

    def __init__(self, registry: INodeRegistry) -> None:
        self._registry = registry

    def __contains__(self, node: object) -> bool:
        return any(info.node_id == node for info in self._registry.live_nodes())


class BusPeers:
    """Other nodes found through the route store and reached over the bus."""

    def __init__(
        self,
        node_id: str,
        bus: IMessageBus,
        presence: IRouteStore,
        alive: Container[str] = EVERY_NODE,
    ) -> None:
        self._node_id = node_id
        self.bus = bus
        self._presence = presence
        self.alive = alive

    def listen(self, consumer: BusConsumer) -> None:
        self.bus.consume(self._node_id, consumer)

    def node_of(self, user: str) -> Deferred[str | None]:
        return self._presence.route(user)

    def nodes_of(self, users: list[str]) -> Deferred[dict[str, str]]:
        return self._presence.routes(users)

    def is_alive(self, node: str) -> bool:
        return node in self.alive

    def publish(self, node: str, envelope: cim_pb2.BusEnvelope) -> Deferred[None]:
        return self.bus.publish(node, envelope.SerializeToString())


class NoPeers:
    """A node alone: nobody is connected anywhere else and nothing can be sent there."""

    def listen(self, consumer: BusConsumer) -> None:
        pass

    def node_of(self, user: str) -> Deferred[str | None]:
        return succeed(None)

    def nodes_of(self, users: list[str]) -> Deferred[dict[str, str]]:
        return succeed({})

    def is_alive(self, node: str) -> bool:
        return False

    def publish(self, node: str, envelope: cim_pb2.BusEnvelope) -> Deferred[None]:
        return fail(BusUnavailable("this node has no bus"))
