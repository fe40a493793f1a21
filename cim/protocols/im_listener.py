"""The IM listener: what every connection of one IM port shares (``ImServerFactory``),
and the frame table those connections answer, each receiver behind the edge's number
checks (cim.im.edge). The connection itself is ``cim.protocols.im.ImServerProtocol``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from google.protobuf.message import Message as ProtobufMessage
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory

from cim.config import ImConfig
from cim.im import edge
from cim.im.collaborators import FrameTable
from cim.interfaces import INodeRegistry, IStateBackend
from cim.limits.policy import NO_LIMITS, RateLimits
from cim.loglimit import LogLimit
from cim.metrics import NodeMetrics
from cim.oplog import OperationLog
from cim.protocols import cim_pb2
from cim.protocols.crypto import NodeKey
from cim.protocols.handshake import ReplayGuard
from cim.protocols.held_writes import HeldWrites
from cim.protocols.im import ConnectionState, ImServerProtocol
from cim.protocols.outbound import NodeQueue, OutboundRules
from cim.protocols.resumption import TICKET_KEY_LABEL, Tickets
from cim.protocols.timeouts import DeadlineSweeper

if TYPE_CHECKING:
    from cim.im.node import ImNode

__all__ = ["CONNECTION_FRAMES", "ImServerFactory", "checked_at_the_edge"]


class ImServerFactory(Factory):
    """Shared by every connection of one IM listener."""

    def __init__(
        self,
        node_id: str,
        config: ImConfig,
        node_key: NodeKey,
        node: ImNode,
        state: IStateBackend,
        registry: INodeRegistry,
        clock: IReactorTime,
        metrics: NodeMetrics,
        limits: RateLimits = NO_LIMITS,
    ) -> None:
        self.node_id = node_id
        self.config = config
        self.limits = limits
        """Hellos per address ([limits] hellos), checked before the RSA decryption."""
        self.node_key = node_key
        self.node = node
        self.state = state
        self.registry = registry
        self.clock = clock
        self.metrics = metrics
        self.replay_guard = ReplayGuard(clock, config.handshake_replay_window)
        self.tickets = Tickets(
            node_key.derived_key(TICKET_KEY_LABEL), node_id, config.resume_window
        )
        """Resumption tickets ([im] resume_window; cim.protocols.resumption)."""
        self.inbound = checked_at_the_edge({**node.inbound, **CONNECTION_FRAMES})
        """The rooms' frame table and the connection's own, behind the edge's number
        checks (cim.im.edge)."""
        self.log_limit = LogLimit(clock)
        """One line per connection and reason per minute for what a client gets wrong."""
        # Deadlines are checked at a quarter of the shortest timeout, at most each second.
        shortest = min(config.handshake_timeout, config.effective_heartbeat_timeout)
        self.deadlines = DeadlineSweeper(clock, min(1.0, shortest / 4))
        self._per_address: dict[str, int] = {}
        self.protocols: set[ImServerProtocol] = set()
        # Bytes queued for all connections; past [im] max_queued_bytes the heaviest
        # senders are paused.
        self.node_queue = NodeQueue(
            clock, config.max_queued_bytes, self._established, config.max_pending_work
        )
        self.outbound_rules = OutboundRules(
            config.outbound_budget, config.slow_reader_timeout, clock, self.node_queue
        )
        # Frames a read produces for any connection leave when the read ends; a 1:1
        # sender's msg:A after them (the receiver's copy does not wait for it).
        self.held_writes = HeldWrites()
        self.read_at = clock.seconds()
        """When the read under way began (``ImServerProtocol.frame_activity``): its
        frames are stamped with it, one clock read per read."""
        node.direct.after_live_copies = self.held_writes.after_flush
        node.routing.after_live_copies = self.held_writes.after_flush
        self.oplog: OperationLog | None = None

    def record(self, event: str, **fields: Any) -> None:
        """An operation-log event (design: 用户的操作日志), when the log is on."""
        if self.oplog is not None:
            self.oplog.emit(event, **fields)

    def buildProtocol(self, addr: IAddress | None) -> ImServerProtocol:
        protocol = ImServerProtocol(self, addr)
        self.protocols.add(protocol)
        return protocol

    def connections_from(self, host: str) -> int:
        """Connections admitted from ``host`` and still open (the gateway counts with it)."""
        return self._per_address.get(host, 0)

    def admit(self, host: str) -> bool:
        count = self._per_address.get(host, 0)
        if count >= self.config.max_connections_per_address:
            return False
        self._per_address[host] = count + 1
        return True

    def _established(self) -> list[ImServerProtocol]:
        return [p for p in self.protocols if p.state is ConnectionState.ESTABLISHED]

    def release(self, protocol: ImServerProtocol) -> None:
        self.protocols.discard(protocol)
        self.node_queue.forget(protocol)
        if not protocol.admitted:
            return
        host = protocol.peer_host
        count = self._per_address.get(host, 0) - 1
        if count > 0:
            self._per_address[host] = count
        else:
            self._per_address.pop(host, None)

    def address_of(self, node_id: str) -> cim_pb2.NodeAddress:
        for node in self.registry.live_nodes():
            if node.node_id == node_id:
                return cim_pb2.NodeAddress(
                    id=node.node_id, host=node.host, port=node.port, ws_url=node.ws_url
                )
        return cim_pb2.NodeAddress(id=node_id)


CONNECTION_FRAMES: FrameTable = {
    cim_pb2.APP_STATE_R: (cim_pb2.AppStateR, ImServerProtocol.app_state_received),
}
"""Frames about the connection itself, answered by the protocol, not by a room."""


def checked_at_the_edge(table: FrameTable) -> FrameTable:
    """The same table, each receiver behind the edge: out-of-range numbers never pass."""
    return {
        frame_type: (message_class, _behind_the_edge(frame_type, message_class, receive))
        for frame_type, (message_class, receive) in table.items()
    }


def _behind_the_edge(
    frame_type: int, message_class: type[ProtobufMessage], receive: Callable[[Any, Any], None]
) -> Callable[[ImServerProtocol, ProtobufMessage], None]:
    out_of_range = edge.checker_for(message_class)

    def receive_checked(protocol: ImServerProtocol, message: ProtobufMessage) -> None:
        protocol.active_at = protocol.factory.read_at
        problem = out_of_range(message)
        if problem is None:
            receive(protocol, message)
        else:
            protocol.refuse_at_edge(frame_type, message, problem)

    return receive_checked
