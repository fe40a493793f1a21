"""The IM listener: accepts client connections and registers this node while it listens."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from cim.config import ImConfig
from cim.interfaces import INodeRegistry, NodeInfo
from cim.protocols.im import ImServerFactory

GOING_AWAY_REASON = "the node is shutting down"
RECONNECT_AFTER_MS = 1000
DRAIN_SECONDS = 3.0
DRAIN_POLL = 0.05


class ImListener:
    """Owns the IM listening port and the node's entry in the registry."""

    log = Logger()

    def __init__(
        self,
        node_id: str,
        config: ImConfig,
        factory: ImServerFactory,
        registry: INodeRegistry,
        reactor: Any,
        route_ttl: float = 60.0,
    ) -> None:
        self.node_id = node_id
        self.route_ttl = route_ttl
        self.config = config
        self.factory = factory
        self.registry = registry
        self.reactor = reactor
        self.port: IListeningPort | None = None
        self.node: NodeInfo | None = None
        self._refresh = LoopingCall(factory.node.sessions.refresh_routes)
        self._refresh.clock = reactor

    @inlineCallbacks
    def start(self) -> Any:
        endpoint = serverFromString(self.reactor, self.config.listen)
        self.port = yield endpoint.listen(self.factory)
        host, port = self._advertised_address()
        self.node = NodeInfo(self.node_id, host, port, self.factory.node_key.public_der)
        yield self.registry.register(self.node)
        # Three refreshes per TTL: a route survives two missed refreshes, and the
        # routes of a crashed node expire within one TTL.
        self._refresh.start(self.route_ttl / 3, now=False)
        self.log.info(
            "IM node {node} listening on {listen}, advertised as {host}:{port}",
            node=self.node_id,
            listen=self.config.listen,
            host=host,
            port=port,
        )

    def _advertised_address(self) -> tuple[str, int]:
        if self.config.advertise:
            host, _, port = self.config.advertise.rpartition(":")
            return host.strip("[]"), int(port)
        assert self.port is not None
        address = self.port.getHost()
        host = getattr(address, "host", "127.0.0.1")
        if host in ("0.0.0.0", "::", ""):
            host = socket.getfqdn()
            self.log.warn(
                "[im] listens on every interface; advertising {host}: set [im] advertise "
                "to the address clients should use",
                host=host,
            )
        return host, int(getattr(address, "port", 0))

    @inlineCallbacks
    def stop(self) -> Any:
        """Withdraw from the registry, tell clients, let them go, stop listening."""
        if self._refresh.running:
            self._refresh.stop()
        if self.node is not None:
            yield self.registry.unregister()
        if self.port is not None:
            yield self.port.stopListening()
        self.factory.node.sessions.shutdown(GOING_AWAY_REASON, RECONNECT_AFTER_MS)
        waited = 0.0
        while self.factory.protocols and waited < DRAIN_SECONDS:
            yield deferLater(self.reactor, DRAIN_POLL, lambda: None)
            waited += DRAIN_POLL
        for protocol in list(self.factory.protocols):
            if protocol.transport is not None:
                protocol.tcp.abortConnection()

    def listening_port(self) -> int:
        assert self.port is not None
        return int(getattr(self.port.getHost(), "port", 0))
