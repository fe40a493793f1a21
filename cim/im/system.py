"""Messages the server itself sends: the logic service's notices (cim.logic.notices).

A system message is stored first and connected receivers are then told to pull, the
path an offline message takes: a notice is on disk before anyone is told about it,
so a connection that drops before acknowledging, a node that dies, or a receiver who
is offline all end the same way, with the notice delivered at the next pull and
dropped by id if it ever arrives twice.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from cim.im.catchup import Catchup
from cim.im.collaborators import NodeCore, Stores, in_background
from cim.message_ids import MessageIdGenerator
from cim.protocols import cim_pb2
from cim.storage.offline import OfflineFull

__all__ = ["SYSTEM_SENDER", "SystemMessages"]

SYSTEM = cim_pb2.SYSTEM
SYSTEM_SENDER = "@system"
"""The sender of server-made messages: no account can have it (names start with a
letter or digit), so a client can trust a message from it came from the server."""


class SystemMessages:
    """Stores server-made messages for their receivers and tells them to pull."""

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

        Fires with the receivers it was stored for; a receiver whose store is full is
        logged and left out, the others still get it. An ``urgent`` message (an SOS)
        ignores the cap: a full box of chat must not cost anyone an alarm. Fails
        (``OfflineStorageOff``) on a node without offline storage.
        """
        offline = self._stores.offline
        msg_id = self._ids.next_id()
        unique = sorted(set(receivers))

        def copy_for(receiver: str) -> tuple[str, cim_pb2.Message]:
            message = cim_pb2.Message(
                id=msg_id,
                to=receiver,
                type=SYSTEM,
                text=text,
                sent_at_ms=MessageIdGenerator.timestamp_ms(msg_id),
            )
            setattr(message, "from", SYSTEM_SENDER)
            return receiver, message

        async def store() -> list[str]:
            # One batch; the store names the full boxes when it refuses, as for groups.
            stored = unique
            while stored:
                try:
                    await offline.store([copy_for(user) for user in stored], capped=not urgent)
                    break
                except OfflineFull as full:
                    self.log.warn(
                        "system message {id} not stored for {users}: offline store full",
                        id=msg_id,
                        users=", ".join(full.receivers),
                    )
                    rest = [user for user in stored if user not in set(full.receivers)]
                    if len(rest) == len(stored):
                        raise
                    stored = rest
            self._metrics.messages["system"] += len(stored)
            in_background(self._catchup.stored_for(stored), self.log, "announce system messages")
            return stored

        return Deferred.fromCoroutine(store())
