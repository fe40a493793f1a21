"""The distributed IMessageBus on RabbitMQ.

Topology: one durable direct exchange (``[queue] exchange``); a durable queue per node,
``cim.node.<id>``, bound with the node id as routing key. Messages are persistent and
published ``mandatory`` on a channel in confirm mode, so ``publish`` fires only once
the broker has the message in the node's queue, and fails with BusUnavailable when the
broker refuses it, no queue is bound for the node, no confirm comes in time, or the
broker is unreachable. Consumers acknowledge manually, after the consumer's Deferred
fires, with a prefetch window.

The connection is an ``AmqpLink`` (``cim.backends.bus.amqp_link``), which the offline
and archive pipelines can share: ``RabbitMqBus.link``.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from zope.interface import implementer

from cim.backends.bus import node_queue
from cim.backends.bus.amqp import CONNECT_TIMEOUT
from cim.backends.bus.amqp_link import START_TIMEOUT, AmqpLink
from cim.backends.bus.broker import Binding, Declaration, Exchange, Queue
from cim.interfaces import BusConsumer, IMessageBus
from cim.reactor import ICimReactor

__all__ = ["RabbitMqBus"]


@implementer(IMessageBus)
class RabbitMqBus:
    """Node-to-node delivery through one direct exchange and a durable queue per node."""

    def __init__(
        self,
        reactor: ICimReactor,
        amqp_url: str,
        node_id: str,
        exchange: str,
        confirm_timeout: float,
        *,
        start_timeout: float = START_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        reconnect_delay: float = 0.5,
        max_reconnect_delay: float = 5.0,
    ) -> None:
        self._node_id = node_id
        self._exchange = exchange
        self._start_timeout = start_timeout
        self.link = AmqpLink(
            reactor,
            amqp_url,
            confirm_timeout=confirm_timeout,
            name="bus",
            connection_name=f"cim node {node_id}",
            connect_timeout=connect_timeout,
            reconnect_delay=reconnect_delay,
            max_reconnect_delay=max_reconnect_delay,
        )
        self.link.declare(Exchange(exchange), *self._node_declarations(node_id))

    @property
    def connected(self) -> bool:
        return self.link.connected

    def _node_declarations(self, node_id: str) -> list[Declaration]:
        queue = node_queue(node_id)
        return [Queue(queue), Binding(queue, self._exchange, node_id)]

    def start(self) -> Deferred[None]:
        """Connect and declare this node's queue, so others can forward to it at once."""
        return self.link.start(self._start_timeout)

    def stop(self) -> Deferred[None]:
        """Disconnect; this node's queue (durable) keeps what arrives meanwhile."""
        return self.link.stop()

    def publish(self, node_id: str, payload: bytes) -> Deferred[None]:
        return self.link.publish(self._exchange, node_id, payload, mandatory=True)

    def consume(self, node_id: str, consumer: BusConsumer) -> None:
        self.link.declare(*self._node_declarations(node_id)).addErrback(lambda _: None)
        self.link.consume(node_queue(node_id), consumer)
