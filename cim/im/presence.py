"""ONLINE_R: who is online in the whole cluster, a page at a time (the route store)."""

from __future__ import annotations

from twisted.logger import Logger

from cim.im.collaborators import ClientSession, FrameTable, log_failure
from cim.interfaces import IRouteStore
from cim.protocols import cim_pb2

__all__ = ["DEFAULT_ONLINE_PAGE", "MAX_ONLINE_PAGE", "PresenceRequests"]

ONLINE_A = cim_pb2.ONLINE_A
MAX_ONLINE_PAGE = 1000
DEFAULT_ONLINE_PAGE = 100


class PresenceRequests:
    """Answers ONLINE_R with the total online and a page of names, sorted."""

    log = Logger()

    def __init__(self, presence: IRouteStore) -> None:
        self._presence = presence

    def frame_table(self) -> FrameTable:
        return {cim_pb2.ONLINE_R: (cim_pb2.OnlineR, self.online_requested)}

    def online_requested(self, session: ClientSession, request: cim_pb2.OnlineR) -> None:
        limit = min(request.limit or DEFAULT_ONLINE_PAGE, MAX_ONLINE_PAGE)
        d = self._presence.online_users(request.offset, limit)

        def answer(page: tuple[int, list[str]]) -> None:
            total, users = page
            session.deliver(ONLINE_A, cim_pb2.OnlineA(total=total, users=users))

        d.addCallback(answer)
        d.addErrback(log_failure, self.log, "list online users")
