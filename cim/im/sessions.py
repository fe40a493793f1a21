"""Who is connected to this node: arrivals, departures, kicks, route refresh, shutdown.

The router has already decided duplicate logins (only the newest session's token is
valid), so when a user connects again here the older connection is either a
replaced session (kicked as "logged in elsewhere") or a stale connection of the same
session that the client abandoned when it reconnected (kicked as "replaced").
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from cim.im.collaborators import ClientSession, Connected, NodeCore, in_background, log_failure
from cim.im.routing import Routing
from cim.interfaces import SessionRecord, StateUnavailable
from cim.protocols import cim_pb2

__all__ = ["REASON_LOGGED_IN_ELSEWHERE", "REASON_REPLACED", "Sessions", "kick_code"]

REASON_LOGGED_IN_ELSEWHERE = "logged in elsewhere"
REASON_REPLACED = "replaced by a newer connection of the same session"
_KICK_CODES = {
    REASON_LOGGED_IN_ELSEWHERE: cim_pb2.Kicked.LOGGED_IN_ELSEWHERE,
    REASON_REPLACED: cim_pb2.Kicked.REPLACED,
    "logged out": cim_pb2.Kicked.LOGGED_OUT,
    "expired": cim_pb2.Kicked.SESSION_EXPIRED,
    "kicked by an administrator": cim_pb2.Kicked.BY_ADMIN,
}


def kick_code(reason: str) -> cim_pb2.Kicked.Code:
    """The machine-readable code a client acts on (reconnect or not) for a reason."""
    return _KICK_CODES.get(reason, cim_pb2.Kicked.CODE_UNSPECIFIED)


class Sessions:
    """The connections of this node, one per user, and their routes in the state store.

    What a connection held unacknowledged is the routing's (``Routing.hand_over``,
    ``Routing.receiver_left``); the mapping itself is shared with every room.
    """

    log = Logger()

    def __init__(self, core: NodeCore, connected: Connected, routing: Routing) -> None:
        self._node_id = core.node_id
        self._presence = core.state.presence
        self._connected = connected
        self._routing = routing
        core.state.sessions.add_session_ended_listener(self._session_ended)

    def session_for(self, user: str) -> ClientSession | None:
        return self._connected.get(user)

    @property
    def connected_count(self) -> int:
        return len(self._connected)

    def opened(self, session: ClientSession) -> None:
        """A connection finished its handshake; an older connection of the user goes."""
        user = session.record.user
        previous = self._connected.get(user)
        self._connected[user] = session
        if previous is not None and previous is not session:
            same = previous.record.session_id == session.record.session_id
            previous.kick(REASON_REPLACED if same else REASON_LOGGED_IN_ELSEWHERE)
            self._routing.hand_over(user, session)
        in_background(self._presence.mark_online(session.record), self.log, "mark online")

    def closed(self, session: ClientSession) -> None:
        """The connection is over (a no-op if a newer one of the user took its place)."""
        user = session.record.user
        if self._connected.get(user) is not session:
            return
        del self._connected[user]
        self._routing.receiver_left(user)
        in_background(self._presence.mark_offline(session.record), self.log, "mark offline")

    def _session_ended(self, record: SessionRecord, reason: str) -> None:
        """The state store ended a session (login elsewhere, logout): drop its connection."""
        session = self._connected.get(record.user)
        if session is not None and session.record.session_id == record.session_id:
            session.kick(reason)

    def refresh_routes(self) -> Deferred[None]:
        """Tell the state store this node's users are still here (extends route TTLs).

        Runs periodically; it also rewrites what a restarted state store lost, so
        connected users stay reachable without reconnecting. Messages held past their
        deadline are failed first.
        """
        self._routing.expire_pending()
        records = [session.record for session in self._connected.values()]
        d = self._presence.refresh_sessions(self._node_id, records)
        # The store already logged the outage once; retrying next period is enough.
        d.addErrback(lambda failure: failure.trap(StateUnavailable))
        d.addErrback(log_failure, self.log, "refresh routes")
        return d

    def shutdown(self, reason: str, reconnect_after_ms: int) -> None:
        """Tell every client the node is going away; their connections then close."""
        for session in list(self._connected.values()):
            session.going_away(reason, reconnect_after_ms)
