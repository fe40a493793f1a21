"""The one question push asks of presence: is device D of user U connected anywhere?

Everything else in cim.push asks through ``DevicePresence.connected``, so the change
from one session per user to several devices per user (``Connected`` becoming a
class with ``devices_of(user)``, presence per device in the state store) changes
this module only.

Today a user has at most one session: it is connected on this node (the node's own
sessions say with which device), or on another node (the route store names the
node, not the device: unknown), or nowhere.
"""

from __future__ import annotations

from collections.abc import Callable

from cim.im.collaborators import ClientSession
from cim.interfaces import IRouteStore, StateUnavailable

__all__ = ["DevicePresence"]


class DevicePresence:
    def __init__(
        self,
        node_id: str,
        session_for: Callable[[str], ClientSession | None],
        routes: IRouteStore,
    ) -> None:
        self._node_id = node_id
        self._session_for = session_for
        self._routes = routes

    async def connected(self, user: str, device: str) -> bool | None:
        """True: the device is connected (it gets the entry over IM); False: it is
        not; None: unknown (the user is online on another node, or the state store
        cannot say). The caller pushes an urgent entry when unknown, not a normal one.
        """
        here = self._session_for(user)
        if here is not None:
            return here.record.device == device
        try:
            node = await self._routes.route(user)
        except StateUnavailable:
            return None
        if node is None or node == self._node_id:
            return False  # online nowhere, or a route this node no longer holds
        return None
