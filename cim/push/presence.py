"""The one question push asks of presence: where is device D of user U, and is its
app in front?

Everything else in cim.push asks through ``DevicePresence``. The node's own sessions
answer for the users it holds (one session per online device, with the app state it
told the node, APP_STATE_R); for a user held elsewhere, the route store names the
devices online (``online_devices``) but not their app state: ``ELSEWHERE``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import Enum

from cim.im.collaborators import ClientSession
from cim.interfaces import IRouteStore, StateUnavailable

__all__ = ["DevicePresence", "DevicesHere", "Presence"]

DevicesHere = Callable[[str], Sequence[ClientSession]]
"""The user's sessions on this node, one per online device (``Connected.devices_of``)."""


class Presence(Enum):
    FOREGROUND = "foreground"
    """Connected here, app in front: it gets the entry over IM and shows it."""
    BACKGROUND = "background"
    """Connected here, app in the background: it gets the entry over IM but may not
    show it; pushed unless it acknowledges within ``[push] background_grace``."""
    ELSEWHERE = "elsewhere"
    """Connected to another node, app state unknown from here."""
    AWAY = "away"
    """Not connected anywhere."""
    UNKNOWN = "unknown"
    """The state store cannot say."""


class DevicePresence:
    def __init__(self, node_id: str, devices_here: DevicesHere, routes: IRouteStore) -> None:
        self._node_id = node_id
        self._devices_here = devices_here
        self._routes = routes

    def here(self, user: str, device: str) -> Presence | None:
        """The device's state from this node's sessions alone; None when the user has
        no device here (then only the route store can say)."""
        sessions = self._devices_here(user)
        if not sessions:
            return None
        for session in sessions:
            if session.record.device == device:
                return Presence.BACKGROUND if session.background else Presence.FOREGROUND
        return Presence.AWAY  # the user is held here, and that device is not among them

    async def state(self, user: str, device: str) -> Presence:
        local = self.here(user, device)
        if local is not None:
            return local
        try:
            online = await self._routes.online_devices([user])
        except StateUnavailable:
            return Presence.UNKNOWN
        return Presence.ELSEWHERE if device in online.get(user, ()) else Presence.AWAY
