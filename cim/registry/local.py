"""The embedded INodeRegistry: a single-process deployment where this node is the cluster."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

from cim.interfaces import INodeRegistry, NodeInfo


@implementer(INodeRegistry)
class LocalRegistry:
    """Knows only this process's IM node, so the router can only route users here."""

    def __init__(self) -> None:
        self.local_node: NodeInfo | None = None

    def register(self, node: NodeInfo) -> Deferred[None]:
        # No other process can hold the id, so there is nothing to refuse.
        self.local_node = node
        return defer.succeed(None)

    def unregister(self) -> Deferred[None]:
        self.local_node = None
        return defer.succeed(None)

    def live_nodes(self) -> list[NodeInfo]:
        return [] if self.local_node is None else [self.local_node]
