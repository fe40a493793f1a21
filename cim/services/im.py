"""The IM room in the service tree: its port, its registry entry, its clients at stop.

Three children, started in this order and stopped in reverse:

1. ``ClientDrain``: nothing at start; at stop, the last thing the room does: tell every
   client GOING_AWAY, give them ``DRAIN_SECONDS`` to leave, abort the rest.
2. the IM ``Listener`` (a ``StreamServerEndpointService``): the port.
3. with ``[ws] enabled``, the WebSocket gateway's ``Listener`` (cim.protocols.gateway):
   its connections are this factory's connections, drained with the others;
4. ``NodeRegistration``: once the ports listen, this node's entry in the registry
   (with the address, and the WebSocket URL, clients should use) and the route
   refresh; at stop, the first thing: withdraw, so no new client is sent here while
   the others are told to go.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from cim.config import ImConfig, WsConfig
from cim.interfaces import INodeRegistry, NodeInfo
from cim.protocols.compact import CompactServer
from cim.protocols.im_listener import ImServerFactory
from cim.reactor import ICimReactor
from cim.services.tree import AsyncService, Listener, OrderedServices, backend_failure

__all__ = [
    "ClientDrain",
    "ImService",
    "NodeRegistration",
    "advertised_address",
    "advertised_ws_url",
]

GOING_AWAY_REASON = "the node is shutting down"
RECONNECT_AFTER_MS = 1000
DRAIN_SECONDS = 3.0
DRAIN_POLL = 0.05


class ImService(OrderedServices):
    """The IM listener, the node's registry entry, and the goodbye to its clients."""

    def __init__(
        self,
        node_id: str,
        config: ImConfig,
        factory: ImServerFactory,
        registry: INodeRegistry,
        registry_backend: str,
        reactor: ICimReactor,
        route_ttl: float,
        refresh_routes: Callable[[], object],
        going_away: Callable[[str, int], None],
        ws_config: WsConfig | None = None,
    ) -> None:
        super().__init__("im")
        self.factory = factory
        self.add(ClientDrain(factory, reactor, going_away))
        # Tens of thousands of mostly idle connections: Twisted's TCP connection
        # without the strings it formats for each up front (issue #20).
        self.listener = self.add(
            Listener("im", config.listen, reactor, factory, connections=CompactServer)
        )
        self.ws_listener: Listener | None = None
        if ws_config is not None and ws_config.enabled:
            # Imported here: a node without the gateway does not load autobahn.
            from cim.protocols.gateway import GatewayFactory

            gateway = GatewayFactory(ws_config, factory, reactor)
            self.ws_listener = self.add(Listener("ws", ws_config.listen, reactor, gateway))
        self.registration = self.add(
            NodeRegistration(
                node_id,
                config,
                self.listener,
                factory.node_key.public_der,
                registry,
                registry_backend,
                reactor,
                route_ttl,
                refresh_routes,
                ws_config,
                self.ws_listener,
            )
        )


class ClientDrain(AsyncService):
    """At stop: GOING_AWAY to every client, a few seconds to leave, then abort."""

    def __init__(
        self,
        factory: ImServerFactory,
        clock: IReactorTime,
        going_away: Callable[[str, int], None],
    ) -> None:
        super().__init__("im clients")
        self.factory = factory
        self.clock = clock
        self.going_away = going_away

    async def stop(self) -> None:
        self.going_away(GOING_AWAY_REASON, RECONNECT_AFTER_MS)
        waited = 0.0
        while self.factory.protocols and waited < DRAIN_SECONDS:
            await deferLater(self.clock, DRAIN_POLL, lambda: None)
            waited += DRAIN_POLL
        for protocol in list(self.factory.protocols):
            if protocol.transport is not None:
                protocol.tcp.abortConnection()


class NodeRegistration(AsyncService):
    """This node in the registry while it listens, and its users' routes kept fresh."""

    log = Logger()

    def __init__(
        self,
        node_id: str,
        config: ImConfig,
        listener: Listener,
        public_der: bytes,
        registry: INodeRegistry,
        registry_backend: str,
        clock: IReactorTime,
        route_ttl: float,
        refresh_routes: Callable[[], object],
        ws_config: WsConfig | None = None,
        ws_listener: Listener | None = None,
    ) -> None:
        super().__init__("node registration")
        self.ws_config = ws_config
        self.ws_listener = ws_listener
        self.node_id = node_id
        self.config = config
        self.listener = listener
        self.public_der = public_der
        self.registry = registry
        self.registry_backend = registry_backend
        self.route_ttl = route_ttl
        self.node: NodeInfo | None = None
        self._refresh = LoopingCall(refresh_routes)
        self._refresh.clock = clock

    async def start(self) -> None:
        port = self.listener.port
        assert port is not None, "registered before the IM port listens"
        host, number = advertised_address(self.config, port)
        ws_url = ""
        if self.ws_config is not None and self.ws_listener is not None:
            assert self.ws_listener.port is not None, "registered before the ws port listens"
            ws_url = advertised_ws_url(self.ws_config, self.ws_listener.port)
        node = NodeInfo(self.node_id, host, number, self.public_der, ws_url)
        await self.registry.register(node)
        self.node = node
        # Three refreshes per TTL: a route survives two missed refreshes, and the
        # routes of a crashed node expire within one TTL.
        self._refresh.start(self.route_ttl / 3, now=False)
        self.log.info(
            "IM node {node} listening on {listen}, advertised as {host}:{port}{ws}",
            node=self.node_id,
            listen=self.config.listen,
            host=host,
            port=number,
            ws=f", WebSocket gateway {ws_url}" if ws_url else "",
        )

    def explain(self, exc: Exception) -> str | None:
        return backend_failure("registry", self.registry_backend, exc)

    async def stop(self) -> None:
        if self._refresh.running:
            self._refresh.stop()
        if self.node is not None:
            self.node = None
            await self.registry.unregister()


def advertised_address(config: ImConfig, port: IListeningPort) -> tuple[str, int]:
    """The address clients are sent to: ``[im] advertise``, else the port's own."""
    if config.advertise:
        host, _, number = config.advertise.rpartition(":")
        return host.strip("[]"), int(number)
    return _listening_address("im", port)


def advertised_ws_url(config: WsConfig, port: IListeningPort) -> str:
    """The gateway's URL for clients: ``[ws] advertise``, else the port's own."""
    if config.advertise:
        return config.advertise
    host, number = _listening_address("ws", port)
    if ":" in host:
        host = f"[{host}]"
    scheme = "wss" if config.listen.startswith("ssl:") else "ws"
    return f"{scheme}://{host}:{number}/"


def _listening_address(section: str, port: IListeningPort) -> tuple[str, int]:
    address = port.getHost()
    host = getattr(address, "host", "127.0.0.1")
    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()
        NodeRegistration.log.warn(
            "[{section}] listens on every interface; advertising {host}: set [{section}] "
            "advertise to the address clients should use",
            section=section,
            host=host,
        )
    return host, int(getattr(address, "port", 0))
