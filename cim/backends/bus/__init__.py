"""Node-to-node delivery behind IMessageBus; the embedded backend is an in-process broker.

Both backends share one redelivery policy, so a consumer that fails behaves the same
on a laptop and in a cluster: the message comes again after a growing pause, and after
``MAX_DELIVERIES`` failed deliveries it is dropped with an error naming the queue
(a poison message must not spin a node forever, and must never vanish silently).
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.defer import Deferred

from cim.backends.backoff import Backoff
from cim.backends.link import describe
from cim.config import QueueConfig
from cim.interfaces import BusConsumer, IMessageBus
from cim.reactor import ICimReactor

__all__ = [
    "FIRST_REDELIVERY_DELAY",
    "MAX_DELIVERIES",
    "MAX_REDELIVERY_DELAY",
    "PREFETCH",
    "REDELIVERY",
    "call_consumer",
    "describe",
    "make_bus",
    "node_queue",
    "redelivery_delay",
]

MAX_DELIVERIES = 8
"""Deliveries of one message before a consumer that keeps failing it gives up."""
FIRST_REDELIVERY_DELAY = 0.25
MAX_REDELIVERY_DELAY = 5.0
PREFETCH = 256
"""Messages handed to one consumer before it acknowledges any: bounds its memory."""
REDELIVERY = Backoff(FIRST_REDELIVERY_DELAY, MAX_REDELIVERY_DELAY)
"""No jitter: one consumer's own message, nothing to spread."""


def redelivery_delay(failures: int) -> float:
    """Seconds before a message that failed ``failures`` times is offered again.

    The pause grows because the usual cause of a failing consumer (its state store
    or database is down) takes a while to mend, and retrying at once only burns CPU.
    """
    return REDELIVERY.after(failures)


def call_consumer(consumer: BusConsumer, payload: bytes) -> Deferred[None]:
    """The consumer's outcome as a Deferred, whether it returned one, None or raised."""
    try:
        result = consumer(payload)
    except Exception:
        return defer.fail()
    if isinstance(result, Deferred):
        return result
    return defer.succeed(None)


def node_queue(node_id: str) -> str:
    """The broker queue holding what other nodes forward to ``node_id``."""
    return f"cim.node.{node_id}"


def make_bus(config: QueueConfig, node_id: str, reactor: ICimReactor) -> IMessageBus:
    """The backend ``[queue] backend`` names, for this node, not yet started.

    pika is imported only when configured: its Twisted adapter imports (and so
    installs) the default reactor, which must not happen before twistd has installed
    the one it was asked for.
    """
    if config.backend == "rabbitmq":
        from cim.backends.bus.rabbitmq import RabbitMqBus

        return RabbitMqBus(
            reactor,
            config.amqp_url,
            node_id,
            exchange=config.exchange,
            confirm_timeout=config.confirm_timeout,
        )
    from cim.backends.bus.memory import MemoryBus

    return MemoryBus(reactor, node_id)
