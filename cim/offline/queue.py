"""The offline queue on the broker: its name, its declaration and its message bodies.

Shared by the publishing side (``cim.offline.pipeline``) and the writer that consumes
the queue (``cim.offline.writer``). Nothing here imports pika.
"""

from __future__ import annotations

import struct

from cim.backends.bus.broker import Queue
from cim.offline.store import OfflineItem, check_msg_id
from cim.protocols import cim_pb2

__all__ = ["DEFAULT_QUEUE", "check_item", "decode", "encode", "queue_declaration"]

DEFAULT_QUEUE = "cim.offline"

_VERSION = 1
_HEADER = struct.Struct(">BH")  # framing version, receiver length


def check_item(item: OfflineItem) -> tuple[str, cim_pb2.Message]:
    """Checked before publishing: a message the database would refuse must be refused
    to its sender, not discovered by the writer after the confirm."""
    if isinstance(item, tuple):
        receiver, message = item
    else:
        receiver, message = item.to, item
    if not receiver or not getattr(message, "from"):
        raise ValueError(f"message {message.id} has no receiver or no sender")
    check_msg_id(message)
    return receiver, message


def encode(receiver: str, message: cim_pb2.Message) -> bytes:
    """The queue's message body: a version byte, the receiver, the Message.

    The receiver travels outside the Message because a group member's copy is the
    group message itself (its ``to`` is empty).
    """
    name = receiver.encode()
    if len(name) > 0xFFFF:
        raise ValueError("receiver name too long")
    return _HEADER.pack(_VERSION, len(name)) + name + message.SerializeToString(deterministic=True)


def decode(body: bytes) -> tuple[str, cim_pb2.Message]:
    """Raises ValueError for a body ``encode`` did not make."""
    if len(body) < _HEADER.size:
        raise ValueError("offline queue message too short")
    version, length = _HEADER.unpack_from(body)
    if version != _VERSION:
        raise ValueError(f"offline queue message of unknown version {version}")
    end = _HEADER.size + length
    if len(body) < end:
        raise ValueError("offline queue message truncated")
    try:
        receiver = body[_HEADER.size : end].decode()
        message = cim_pb2.Message.FromString(body[end:])
    except Exception as exc:
        raise ValueError(f"undecodable offline queue message: {exc}") from None
    return check_item((receiver, message))


def queue_declaration(name: str, max_queued: int) -> Queue:
    """Durable, and bounded: beyond ``max_queued`` the broker refuses publishes (nack)."""
    return Queue(name, arguments=(("x-max-length", max_queued), ("x-overflow", "reject-publish")))
