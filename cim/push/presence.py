"""The one question push asks of presence: is device D of user U connected anywhere?

Everything else in cim.push asks through ``DevicePresence.connected``. The node's own
sessions answer for the users it holds (one session per online device); for a user
held elsewhere, the route store names the devices online (``online_devices``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from cim.im.collaborators import ClientSession
from cim.interfaces import IRouteStore, StateUnavailable

__all__ = ["DevicePresence", "DevicesHere"]

DevicesHere = Callable[[str], Sequence[ClientSession]]
"""The user's sessions on this node, one per online device (``Connected.devices_of``)."""


class DevicePresence:
    def __init__(self, node_id: str, devices_here: DevicesHere, routes: IRouteStore) -> None:
        self._node_id = node_id
        self._devices_here = devices_here
        self._routes = routes

    async def connected(self, user: str, device: str) -> bool | None:
        """True: the device is connected (it gets the entry over IM); False: it is
        not; None: unknown (the state store cannot say). The caller pushes an urgent
        entry when unknown, not a normal one.
        """
        here = self._devices_here(user)
        if any(session.record.device == device for session in here):
            return True
        if here:
            return False  # the user is held here, and that device is not among them
        try:
            online = await self._routes.online_devices([user])
        except StateUnavailable:
            return None
        return device in online.get(user, ())
