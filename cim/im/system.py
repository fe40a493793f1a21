"""Messages the server itself sends: the logic service's notices (cim.logic.notices).

A system message goes into its receiver's timeline, the conversation with
``@system``, before anyone is told about it; connected receivers are then told to pull
(OFFLINE_NOTICE with the conversation and seq). So a notice is durable before it is
announced: a connection that drops, a node that dies or restarts, or a receiver who is
offline all end the same way, with the notice read at the next catch-up, once per
device (its cursor), in order.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from cim.im.catchup import Catchup
from cim.im.collaborators import NodeCore, Stores, in_background
from cim.message_ids import MessageIdGenerator
from cim.protocols import cim_pb2
from cim.storage.timeline import Appended

__all__ = ["SYSTEM_DEVICE", "SYSTEM_SENDER", "SystemMessages"]

SYSTEM = cim_pb2.SYSTEM
SYSTEM_SENDER = "@system"
"""The sender of server-made messages: no account can have it (names start with a
letter or digit), so a client can trust a message from it came from the server."""
SYSTEM_DEVICE = "server"


class SystemMessages:
    """Appends server-made messages to their receivers' timelines, then announces them."""

    log = Logger()

    def __init__(self, core: NodeCore, stores: Stores, catchup: Catchup) -> None:
        self._ids = core.message_ids
        self._metrics = core.metrics
        self._stores = stores
        self._catchup = catchup

    def send_system(
        self, receivers: Iterable[str], text: str, urgent: bool = False
    ) -> Deferred[list[str]]:
        """A message the server itself sends (the logic service's notices) to users.

        Fires with the receivers it was written for, once it is durable for all of
        them; fails (``TimelineUnavailable``) when the timelines cannot take it, for
        the caller to log. ``urgent`` (an SOS) is kept in the text's priority by the
        caller; every system message is kept whatever the receiver's backlog.
        """
        unique = sorted(set(receivers))
        timeline = self._stores.timeline

        def message_for(receiver: str) -> cim_pb2.Message:
            msg_id = self._ids.next_id()
            message = cim_pb2.Message(
                id=msg_id,
                to=receiver,
                type=SYSTEM,
                text=text,
                sent_at_ms=MessageIdGenerator.timestamp_ms(msg_id),
                device=SYSTEM_DEVICE,
            )
            setattr(message, "from", SYSTEM_SENDER)
            return message

        async def write() -> list[str]:
            messages = [message_for(user) for user in unique]
            try:
                placed: list[Appended] = await defer.gatherResults(
                    [timeline.append(message, SYSTEM_DEVICE) for message in messages],
                    consumeErrors=True,
                )
            except defer.FirstError as error:
                error.subFailure.raiseException()
            self._metrics.messages["system"] += len(unique)
            for user, where in zip(unique, placed, strict=True):
                in_background(
                    self._catchup.stored_for([user], where.conversation, where.seq),
                    self.log,
                    "announce a system message",
                )
            return unique

        return Deferred.fromCoroutine(write())
