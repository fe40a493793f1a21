"""The one question push asks of presence: is device D of user U connected anywhere?

Everything else in cim.push asks through ``DevicePresence.connected``, so the change
from one session per user to several devices per user changes this module (and the
one line of the daemon that passes ``devices_here``) only. Once the route store
answers per device (``IRouteStore.online_devices``), ``connected`` becomes::

    online = await self._routes.online_devices([user])
    return device in online.get(user, ())

Today a user has at most one session: it is connected on this node (the node's own
sessions say with which device), or on another node (the route store names the node,
not the device: unknown), or nowhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from cim.im.collaborators import ClientSession
from cim.interfaces import IRouteStore, StateUnavailable

__all__ = ["DevicePresence", "one_session"]

DevicesHere = Callable[[str], Sequence[ClientSession]]
"""The user's sessions on this node (``Connected.devices_of`` once devices land)."""


def one_session(session_for: Callable[[str], ClientSession | None]) -> DevicesHere:
    """``DevicesHere`` from today's one session per user (``Sessions.session_for``)."""

    def devices_here(user: str) -> Sequence[ClientSession]:
        session = session_for(user)
        return [] if session is None else [session]

    return devices_here


class DevicePresence:
    def __init__(self, node_id: str, devices_here: DevicesHere, routes: IRouteStore) -> None:
        self._node_id = node_id
        self._devices_here = devices_here
        self._routes = routes

    async def connected(self, user: str, device: str) -> bool | None:
        """True: the device is connected (it gets the entry over IM); False: it is
        not; None: unknown (the user is online on another node, or the state store
        cannot say). The caller pushes an urgent entry when unknown, not a normal one.
        """
        here = self._devices_here(user)
        if any(session.record.device == device for session in here):
            return True
        if here:
            return False  # one session per user: it is another device's
        try:
            node = await self._routes.route(user)
        except StateUnavailable:
            return None
        if node is None or node == self._node_id:
            return False  # online nowhere, or a route this node no longer holds
        return None
