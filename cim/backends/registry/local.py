"""The embedded INodeRegistry: a single-process deployment where this node is the cluster."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from cim.interfaces import INodeRegistry, NodeInfo

ViewListener = Callable[[list[NodeInfo]], None]


def tell_listeners(listeners: list[ViewListener], view: list[NodeInfo], log: Logger) -> None:
    """Give every listener the view, even when an earlier one raises.

    A broken listener must not keep the router's ring (another listener) stale.
    """
    for listener in list(listeners):
        try:
            listener(list(view))
        except Exception:
            log.failure("registry view listener {listener!r} failed", listener=listener)


@implementer(INodeRegistry)
class LocalRegistry:
    """Knows only this process's IM node, so the router can only route users here."""

    _log = Logger()

    def __init__(self) -> None:
        self.local_node: NodeInfo | None = None
        self.accepting = False
        self._listeners: list[ViewListener] = []

    def start(self) -> Deferred[None]:
        return defer.succeed(None)

    def stop(self) -> Deferred[None]:
        # Mirrors the distributed registry, where closing the session withdraws the node.
        return self.unregister()

    def register(self, node: NodeInfo) -> Deferred[None]:
        # No other process can hold the id, so there is nothing to refuse.
        self.local_node = node
        self.accepting = True
        tell_listeners(self._listeners, self.live_nodes(), self._log)
        return defer.succeed(None)

    def unregister(self) -> Deferred[None]:
        was_registered = self.local_node is not None
        self.local_node = None
        self.accepting = False
        if was_registered:
            tell_listeners(self._listeners, [], self._log)
        return defer.succeed(None)

    def live_nodes(self) -> list[NodeInfo]:
        return [] if self.local_node is None else [self.local_node]

    def add_listener(self, listener: ViewListener) -> None:
        self._listeners.append(listener)
