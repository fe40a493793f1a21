"""HISTORY_R: a page of one of the reader's conversations, read from its timeline by
seq whatever the reader's cursors say (design: 用户的行为数据收集; a device fills a gap
with ``after`` = its watermark and ``before`` = the seq it is missing up to).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.history.store import (
    HistoryForbidden,
    IsGroupMember,
    direct_conversation,
    group_conversation,
    participates,
)
from cim.history.timeline import Timelines
from cim.offline.store import page_budget
from cim.protocols import cim_pb2
from cim.storage.timeline import TimelinePage, TimelineRecord

__all__ = [
    "DEFAULT_HISTORY_LIMIT",
    "MAX_HISTORY_LIMIT",
    "HistoryService",
    "message_of",
    "page_messages",
]

DEFAULT_HISTORY_LIMIT = 50
MAX_HISTORY_LIMIT = 200
"""Messages per HISTORY_A; the page is also bounded in bytes (``page_budget``)."""

_MAX_SEQ = (1 << 63) - 1
_log = Logger(namespace="cim.history")


def message_of(record: TimelineRecord) -> cim_pb2.Message:
    """The message as sent, with its place in the timeline (the payload is written
    before the seq is known, so the seq is the row's)."""
    message = cim_pb2.Message.FromString(record.payload)
    message.conversation = record.conversation
    message.seq = record.seq
    if message.group:
        message.group_seq = record.seq
    return message


def page_messages(page: TimelinePage) -> list[cim_pb2.Message]:
    return [message_of(record) for record in page.records]


class HistoryService:
    """Answers HISTORY_R, newest first, for participants only.

    The 1:1 conversation is always the reader's own with ``peer``; a group's needs
    ``is_group_member`` (current membership) to agree. A group the reader is not in and
    a group that does not exist get the same "forbidden". A page stays below
    ``max_page_bytes`` (the node's frame limit) and the reader's ``max_bytes``.
    """

    def __init__(
        self,
        timelines: Timelines,
        is_group_member: IsGroupMember | None,
        max_page_bytes: int = 65536,
    ) -> None:
        self._timelines = timelines
        self._is_group_member = is_group_member
        self._max_page_bytes = max_page_bytes

    def answer(self, user: str, request: cim_pb2.HistoryR) -> Deferred[cim_pb2.HistoryA]:
        """Never fails: every refusal and error is an answer with ``error`` set."""
        if bool(request.peer) == bool(request.group):
            return succeed(_refusal(request, "bad_request", "name exactly one of peer and group"))
        if request.group:
            conversation = group_conversation(request.group)
        else:
            conversation = direct_conversation(user, request.peer)
        limit = min(request.limit or DEFAULT_HISTORY_LIMIT, MAX_HISTORY_LIMIT)
        before = request.before if 0 < request.before <= _MAX_SEQ else None
        after = min(request.after, _MAX_SEQ)
        budget = page_budget(self._max_page_bytes, request.max_bytes)
        timelines = self._timelines

        async def read() -> cim_pb2.HistoryA:
            if not await participates(user, conversation, self._is_group_member):
                raise HistoryForbidden(user, conversation)
            page = await timelines.conversation_page(conversation, before, after, limit, budget)
            return cim_pb2.HistoryA(
                messages=page_messages(page),
                more=page.more,
                next_before=page.next_before,
                request_id=request.request_id,
            )

        d = Deferred.fromCoroutine(read())
        return d.addErrback(self._failed, user, request)

    def _failed(self, failure: Failure, user: str, request: cim_pb2.HistoryR) -> cim_pb2.HistoryA:
        if failure.check(HistoryForbidden):
            what = f"group {request.group}" if request.group else "this conversation"
            return _refusal(request, "forbidden", f"you are not a participant of {what}")
        _log.warn(
            "history: could not answer {user}'s request ({why})",
            user=user,
            why=failure.getErrorMessage(),
        )
        return _refusal(request, "unavailable", "history is unavailable right now; try again later")


def _refusal(request: cim_pb2.HistoryR, error: str, message: str) -> cim_pb2.HistoryA:
    return cim_pb2.HistoryA(error=error, message=message, request_id=request.request_id)
