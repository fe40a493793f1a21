"""ONLINE_R: who is online, on a need-to-know basis (docs/privacy.md).

A user sees the presence of its contacts and of the accounts bound to it (a
guardian's devices, a device's guardians): the directory's contact rules name them,
the route store says which of them are online, in the whole cluster. Nobody else's
comings and goings are anyone's business; the operator's full list is the admin
API's (the route store's ``online_users``).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from cim.im.collaborators import ClientSession, Directory, FrameTable, log_failure
from cim.interfaces import IRouteStore
from cim.protocols import cim_pb2

__all__ = ["DEFAULT_ONLINE_PAGE", "MAX_ONLINE_PAGE", "PresenceRequests"]

ONLINE_A = cim_pb2.ONLINE_A
MAX_ONLINE_PAGE = 1000
DEFAULT_ONLINE_PAGE = 100


class PresenceRequests:
    """Answers ONLINE_R with how many of the caller's circle are online, and a page of
    their names, sorted."""

    log = Logger()

    def __init__(self, presence: IRouteStore, directory: Directory) -> None:
        self._presence = presence
        self._directory = directory

    def frame_table(self) -> FrameTable:
        return {cim_pb2.ONLINE_R: (cim_pb2.OnlineR, self.online_requested)}

    def online_requested(self, session: ClientSession, request: cim_pb2.OnlineR) -> None:
        limit = min(request.limit or DEFAULT_ONLINE_PAGE, MAX_ONLINE_PAGE)

        async def answer() -> None:
            circle = await self._directory.contacts.circle(session.record.user)
            online = sorted(await self._presence.routes(circle))
            page = online[request.offset : request.offset + limit]
            session.deliver(ONLINE_A, cim_pb2.OnlineA(total=len(online), users=page))

        d = Deferred.fromCoroutine(answer())
        d.addErrback(log_failure, self.log, "list online contacts")
