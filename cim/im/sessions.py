"""Who is connected to this node: arrivals, departures, kicks, route refresh, shutdown.

A user may be connected on several devices at once, up to ``[im] max_devices_per_user``
(``Connected``: user -> {device: session}). The router has already decided each login
(one session per device; past the limit ``[router] duplicate_login``: refuse_new
refused it, kick_old let it in), so here:

- a device connecting again replaces its older connection: a stale one of the same
  session the client abandoned when it reconnected (kicked as "replaced"), or an older
  login of the same device (kicked as "logged in again on this device");
- a device past the limit (kick_old) ends the device idle longest, the one whose last
  frame other than a heartbeat is oldest (KICKED ``TOO_MANY_DEVICES``), and its session
  in the state store, so its token is dead too.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from cim.backends.state import (
    REASON_LOGGED_IN_AGAIN,
    REASON_MOVED,
    REASON_PASSWORD_CHANGED,
    REASON_TOO_MANY_DEVICES,
)
from cim.history.timeline import TimelineUnavailable
from cim.im.collaborators import (
    ClientSession,
    Connected,
    FrameTable,
    NodeCore,
    Stores,
    in_background,
    log_failure,
)
from cim.im.routing import Routing
from cim.interfaces import SessionRecord, StateUnavailable
from cim.protocols import cim_pb2

__all__ = [
    "REASON_LOGGED_IN_ELSEWHERE",
    "REASON_REPLACED",
    "Sessions",
    "kick_code",
]

REASON_LOGGED_IN_ELSEWHERE = "logged in elsewhere"
REASON_REPLACED = "replaced by a newer connection of the same session"
_KICK_CODES = {
    REASON_LOGGED_IN_ELSEWHERE: cim_pb2.Kicked.LOGGED_IN_ELSEWHERE,
    REASON_REPLACED: cim_pb2.Kicked.REPLACED,
    REASON_LOGGED_IN_AGAIN: cim_pb2.Kicked.REPLACED,
    REASON_TOO_MANY_DEVICES: cim_pb2.Kicked.TOO_MANY_DEVICES,
    REASON_MOVED: cim_pb2.Kicked.SESSION_EXPIRED,  # log in again: lands with the others
    "logged out": cim_pb2.Kicked.LOGGED_OUT,
    "expired": cim_pb2.Kicked.SESSION_EXPIRED,
    "kicked by an administrator": cim_pb2.Kicked.BY_ADMIN,
    REASON_PASSWORD_CHANGED: cim_pb2.Kicked.LOGGED_OUT,  # the old token is no good
}


def kick_code(reason: str) -> cim_pb2.Kicked.Code:
    """The machine-readable code a client acts on (reconnect or not) for a reason."""
    return _KICK_CODES.get(reason, cim_pb2.Kicked.CODE_UNSPECIFIED)


class Sessions:
    """The connections of this node, one per device of a user, and their routes in the
    state store.

    What a connection held unacknowledged is the routing's (``Routing.hand_over``,
    ``Routing.receiver_left``); the mapping itself is shared with every room.
    """

    log = Logger()

    def __init__(
        self,
        core: NodeCore,
        connected: Connected,
        routing: Routing,
        stores: Stores,
        max_devices: int = 5,
    ) -> None:
        self._node_id = core.node_id
        self._state = core.state
        self._presence = core.state.presence
        self._connected = connected
        self._routing = routing
        self._stores = stores
        self._max_devices = max_devices
        core.state.sessions.add_session_ended_listener(self._session_ended)

    def frame_table(self) -> FrameTable:
        return {cim_pb2.DEVICES_R: (cim_pb2.DevicesR, self.devices_requested)}

    def devices_requested(self, session: ClientSession, request: cim_pb2.DevicesR) -> None:
        """DEVICES_R: the caller's own devices online (all on this node)."""
        devices = sorted(
            self._connected.devices_of(session.record.user), key=lambda s: s.record.device
        )
        session.deliver(
            cim_pb2.DEVICES_A,
            cim_pb2.DevicesA(
                request_id=request.request_id,
                devices=[
                    cim_pb2.DeviceOnline(
                        device=each.record.device,
                        connected_at_ms=int(each.connected_at * 1000),
                        active_at_ms=int(each.active_at * 1000),
                        this_device=each is session,
                    )
                    for each in devices
                ],
            ),
        )

    def session_for(self, user: str, device: str | None = None) -> ClientSession | None:
        """The device's session here; without a device, the user's newest here."""
        if device is not None:
            return self._connected.session_of(user, device)
        devices = self._connected.devices_of(user)
        return devices[-1] if devices else None

    def devices_of(self, user: str) -> list[ClientSession]:
        return self._connected.devices_of(user)

    @property
    def connected_count(self) -> int:
        """Connections (devices) established here."""
        return len(self._connected)

    def opened(self, session: ClientSession, enrolled: bool = False) -> None:
        """A connection finished its handshake: an older connection of the same device
        goes, and past the limit the device idle longest.

        ``enrolled``: the device is known to the account already, so the enrolment
        transaction is skipped. A resumed session (cim.protocols.resumption) is: the
        full login that issued its ticket enrolled it (and should that have failed,
        the device's catch-up reads enrol it)."""
        record = session.record
        previous = self._connected.add(session)
        if previous is not None and previous is not session:
            same = previous.record.session_id == record.session_id
            previous.kick(REASON_REPLACED if same else REASON_LOGGED_IN_AGAIN)
            self._routing.hand_over(record.user, record.device, session)
        in_background(self._presence.mark_online(record), self.log, "mark online")
        # Queued before anything it could acknowledge: a device new to the account
        # starts at the present (its catch-up reads enrol it too, should this fail).
        if not enrolled:
            enrolling = self._stores.timeline.enrol_device(record.user, record.device)
            enrolling.addErrback(lambda failure: failure.trap(TimelineUnavailable))
            in_background(enrolling, self.log, "enrol a device")
        devices = self._connected.devices_of(record.user)
        if len(devices) > self._max_devices:
            others = [s for s in devices if s is not session]
            idle = min(others, key=lambda s: (s.active_at, s.connected_at))
            self.log.info(
                "{user} has {count} devices online here: {device} (idle longest) goes",
                user=record.user,
                count=len(devices),
                device=idle.record.device,
            )
            idle.kick(REASON_TOO_MANY_DEVICES)
            if idle.record.token_hash:
                ended = self._state.sessions.end_session(
                    idle.record.token_hash, REASON_TOO_MANY_DEVICES
                )
                ended.addErrback(lambda failure: failure.trap(StateUnavailable))
                in_background(ended, self.log, "end the session of a device idle longest")

    def closed(self, session: ClientSession) -> None:
        """The connection is over (a no-op if a newer one of the device took its place)."""
        record = session.record
        if not self._connected.remove(session):
            return
        self._routing.receiver_left(record.user, record.device)
        in_background(self._presence.mark_offline(record), self.log, "mark offline")

    def _session_ended(self, record: SessionRecord, reason: str) -> None:
        """The state store ended a session (a newer login of the device, logout, kick):
        drop its connection."""
        session = self._connected.session_of(record.user, record.device)
        if session is not None and session.record.session_id == record.session_id:
            session.kick(reason)

    def refresh_routes(self) -> Deferred[None]:
        """Tell the state store this node's users are still here (extends route TTLs).

        Runs periodically; it also rewrites what a restarted state store lost, so
        connected users stay reachable without reconnecting. Messages held past their
        deadline are failed first.
        """
        self._routing.expire_pending()
        records = [session.record for session in self._connected.sessions()]
        d = self._presence.refresh_sessions(self._node_id, records)
        # The store already logged the outage once; retrying next period is enough.
        d.addErrback(lambda failure: failure.trap(StateUnavailable))
        d.addErrback(log_failure, self.log, "refresh routes")
        return d

    def shutdown(self, reason: str, reconnect_after_ms: int) -> None:
        """Tell every client the node is going away; their connections then close."""
        for session in self._connected.sessions():
            session.going_away(reason, reconnect_after_ms)
