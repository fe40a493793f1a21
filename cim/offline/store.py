"""Offline messages: what the pipeline stores and reads back (design: 离线消息).

``OfflineStore`` keeps messages for receivers who are offline until they pull and
acknowledge them. It takes ``cim_pb2.Message`` objects and keeps them serialized, so
what is delivered later is exactly what was sent; ``message_of`` turns the rows of
``cim.storage.offline`` (offline and history alike) back into messages. The history
archive, which stores messages the same way, is ``cim.history.store``.

Checks that need no database (ids in range, names, limits) happen here, before any
work is handed to the pool; every refusal comes as a failed Deferred. The history
store makes the same checks with the same functions.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeAlias

from twisted.internet.defer import Deferred, fail

from cim.message_ids import MessageIdGenerator
from cim.protocols import cim_pb2
from cim.storage.database import Database
from cim.storage.offline import (
    HistoryRecord,
    OfflineFull,
    OfflinePage,
    OfflineRecord,
    SenderCount,
    count_offline_txn,
    delete_offline_txn,
    offline_page_txn,
    offline_summary_txn,
    store_offline_txn,
)

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "PAGE_FRAME_RESERVE",
    "OfflineFull",
    "OfflineItem",
    "OfflinePage",
    "OfflineRecord",
    "OfflineStore",
    "SenderCount",
    "check_msg_id",
    "check_page_limit",
    "message_of",
    "page_budget",
    "sent_at",
]

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
"""The most a page may ask for: one answer frame must stay a reasonable size."""

PAGE_FRAME_RESERVE = 256
"""Bytes of a page's frame that are not its messages: the type byte, the cipher's
tag, the page's own fields (more, next_before, acknowledged, error)."""


def page_budget(frame_limit: int, announced: int = 0) -> int:
    """Bytes of messages a page may carry: below the node's frame limit and, if the
    client announced a smaller one (``max_bytes``), below that. A message larger than
    the budget still travels, alone in its page."""
    limit = min(frame_limit, announced) if announced else frame_limit
    return max(1, limit - PAGE_FRAME_RESERVE)


_MAX_MSG_ID = (1 << 63) - 1  # the column is a signed BIGINT

OfflineItem: TypeAlias = "cim_pb2.Message | tuple[str, cim_pb2.Message]"
"""A message for its ``to``, or ``(receiver, message)`` for a group member's copy."""


def message_of(record: OfflineRecord | HistoryRecord) -> cim_pb2.Message:
    return cim_pb2.Message.FromString(record.payload)


# --- checks ---------------------------------------------------------------------------


def check_msg_id(message: cim_pb2.Message) -> int:
    if not 0 < message.id <= _MAX_MSG_ID:
        raise ValueError(f"message id {message.id} is not a server message id")
    return int(message.id)


def sent_at(message: cim_pb2.Message) -> float:
    """The node's time; a message without one is dated by its time-ordered id."""
    millis = message.sent_at_ms or MessageIdGenerator.timestamp_ms(message.id)
    return millis / 1000.0


def check_page_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise ValueError(f"a page holds 1 to {MAX_PAGE_SIZE} messages")


def _offline_record(item: OfflineItem) -> OfflineRecord:
    if isinstance(item, tuple):
        receiver, message = item
    else:
        receiver, message = item.to, item
    sender = getattr(message, "from")
    if not receiver or not sender:
        raise ValueError(f"message {message.id} has no receiver or no sender")
    return OfflineRecord(
        receiver=receiver,
        msg_id=check_msg_id(message),
        send_time=sent_at(message),
        sender=sender,
        msg_type=int(message.type),
        # Only for people reading the table (the payload is what gets delivered), and
        # PostgreSQL text cannot hold NUL, which a protobuf string may.
        content=message.text.replace("\x00", "\ufffd"),
        group_id=message.group or None,
        payload=message.SerializeToString(deterministic=True),
    )


# --- the store -----------------------------------------------------------------------


class OfflineStore:
    """Messages waiting for their receivers, at most ``max_per_user`` each.

    ``max_per_user`` of None means no cap. The cap is checked in the transaction that
    stores, so it holds however many consumers write at once.
    """

    def __init__(self, db: Database, max_per_user: int | None) -> None:
        if max_per_user is not None and max_per_user < 1:
            raise ValueError("max_per_user must be at least 1")
        self._db = db
        self.max_per_user = max_per_user

    def store(self, messages: Iterable[OfflineItem], *, capped: bool = True) -> Deferred[int]:
        """Store a batch in one transaction; fires with how many rows are new.

        Storing a message again is harmless (it is not counted). Fails with
        ``OfflineFull`` when a receiver would hold more than ``max_per_user``: then
        nothing of the batch is stored, and ``OfflineFull.receivers`` says whom to
        leave out to store the rest. ``capped=False`` stores whatever the cap, for
        the few messages that must never be dropped (an SOS alarm).
        """
        try:
            records = [_offline_record(item) for item in messages]
        except ValueError as exc:
            return fail(exc)
        return self._db.run(store_offline_txn, records, self.max_per_user if capped else None)

    def count(self, receiver: str) -> Deferred[int]:
        return self._db.run(count_offline_txn, receiver)

    def page(
        self,
        receiver: str,
        before: int | None = None,
        limit: int = DEFAULT_PAGE_SIZE,
        max_bytes: int | None = None,
    ) -> Deferred[OfflinePage]:
        """The newest ``limit`` messages below ``before``, at most ``max_bytes`` of
        them (but at least one); nothing is deleted.

        Deleting is ``acknowledge``'s job: a client that crashes before acknowledging
        gets the same messages again on its next pull.
        """
        try:
            check_page_limit(limit)
        except ValueError as exc:
            return fail(exc)
        return self._db.run(offline_page_txn, receiver, before, limit, max_bytes)

    def acknowledge(self, receiver: str, msg_ids: Iterable[int]) -> Deferred[int]:
        """Delete receiver's acknowledged messages; fires with how many went."""
        return self._db.run(delete_offline_txn, receiver, list(msg_ids))

    def summary(self, receiver: str) -> Deferred[list[SenderCount]]:
        return self._db.run(offline_summary_txn, receiver)
