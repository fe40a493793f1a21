"""HISTORY_R: a page of one of the reader's conversations (cim.history.service)."""

from __future__ import annotations

from twisted.logger import Logger

from cim.im.collaborators import ClientSession, FrameTable, Stores, log_failure
from cim.protocols import cim_pb2

__all__ = ["HistoryRequests"]

HISTORY_A = cim_pb2.HISTORY_A


class HistoryRequests:
    """Answers HISTORY_R from the node's history service (or its refusal when off)."""

    log = Logger()

    def __init__(self, stores: Stores) -> None:
        self._stores = stores

    def frame_table(self) -> FrameTable:
        return {cim_pb2.HISTORY_R: (cim_pb2.HistoryR, self.history_requested)}

    def history_requested(self, session: ClientSession, request: cim_pb2.HistoryR) -> None:
        d = self._stores.history.answer(session.record.user, request)
        d.addCallback(lambda answer: session.deliver(HISTORY_A, answer))
        d.addErrback(log_failure, self.log, "answer a history request")
