"""What code hosted on a broker connection sees of it, without importing pika.

The offline pipeline and the archive keep their queues on the node's connection to
RabbitMQ (``cim.backends.bus.amqp_link.AmqpLink``). They name what they need here, so
that importing them (and the daemon) never imports pika, whose Twisted adapter
installs the default reactor when imported (see ``cim.backends.bus.make_bus``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred

from cim.interfaces import BusConsumer

__all__ = ["Binding", "BrokerLink", "Declaration", "Exchange", "Queue"]


@dataclass(frozen=True)
class Exchange:
    name: str
    kind: str = "direct"
    durable: bool = True


@dataclass(frozen=True)
class Queue:
    name: str
    durable: bool = True
    arguments: tuple[tuple[str, Any], ...] = ()
    """x-arguments (``x-max-length``, ``x-overflow``...), as pairs to stay hashable."""


@dataclass(frozen=True)
class Binding:
    queue: str
    exchange: str
    routing_key: str


Declaration = Exchange | Queue | Binding


class BrokerLink(Protocol):
    """The part of ``AmqpLink`` the pipelines use: declarations kept on every
    connection, confirmed publishes, and consumers acknowledged after their Deferred;
    ``start`` and ``stop`` are for whoever owns the link."""

    def start(self, timeout: float = ...) -> Deferred[None]: ...

    def stop(self) -> Deferred[None]: ...

    def declare(self, *declarations: Declaration) -> Deferred[None]: ...

    def publish(
        self, exchange: str, routing_key: str, body: bytes, *, mandatory: bool = True
    ) -> Deferred[None]: ...

    def consume(self, queue: str, consumer: BusConsumer, prefetch: int = ...) -> None: ...
