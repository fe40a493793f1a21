"""The client's side of one connection to an IM node.

It performs the one-round-trip handshake (key material and login token together),
keeps the connection alive with heartbeats sent only when it has been quiet, notices a
silent node, and hands decoded frames to a ``ConnectionEvents`` listener. Reconnecting
is the session's business (``cim.client.session``), not this class's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from google.protobuf.message import Message as ProtobufMessage
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.protocols import cim_pb2
from cim.protocols.crypto import FrameAuthenticationError
from cim.protocols.handshake import ClientHandshake, HandshakeRefused, Resumption
from cim.protocols.wire import FrameProtocol, Inbound

_STATUS = cim_pb2.LoginResult
DEFAULT_MAX_FRAME_SIZE = 1 << 20


class LoginRefused(Exception):
    """The node decrypted our hello but refused the login (status says why)."""

    def __init__(self, status: int, message: str, node: cim_pb2.NodeAddress | None) -> None:
        super().__init__(status, message)
        self.status = status
        self.status_name = _STATUS.Status.Name(status)
        self.message = message
        self.node = node

    def __str__(self) -> str:
        return f"login refused: {self.status_name}: {self.message}"


class ConnectionEvents(Protocol):
    """What a connection reports to whoever owns it."""

    def frame_received(self, frame_type: int, message: ProtobufMessage) -> None: ...

    def connection_closed(self, reason: Failure) -> None: ...


class ImClientProtocol(FrameProtocol):
    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        events: ConnectionEvents,
        server_key: bytes,
        token: str,
        device: str,
        suite: str,
        offered: Sequence[str],
        handshake_timeout: float = 10.0,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        resume: Resumption | None = None,
    ) -> None:
        super().__init__(max_frame_size)
        self.clock = clock
        self.events = events
        self._handshake = ClientHandshake(
            server_key,
            token,
            device,
            suite,
            offered,
            int(clock.seconds() * 1000),
            resume=resume,
        )
        self.resumed = resume is not None
        """The hello carried a resumption ticket (no RSA)."""
        self.resumption: Resumption | None = None
        """What the next connection to this node resumes with, once logged in."""
        self.suite = suite
        self._handshake_timeout = handshake_timeout
        self.logged_in: Deferred[cim_pb2.LoginResult] = Deferred()
        self.login_result: cim_pb2.LoginResult | None = None
        self.heartbeat_interval = 30.0
        self.heartbeat_timeout = 90.0
        self._idle_call: IDelayedCall | None = None
        self._silence_call: IDelayedCall | None = None
        self.inbound = {}

    # --- lifecycle --------------------------------------------------------------------

    def connectionMade(self) -> None:
        if ITCPTransport.providedBy(self.transport):
            self.tcp.setTcpNoDelay(True)
        self.send_plaintext(self._handshake.hello_body())
        self._silence_call = self.clock.callLater(self._handshake_timeout, self._silent)

    def connectionLost(self, reason: Failure | None = None) -> None:
        for call in (self._idle_call, self._silence_call):
            if call is not None and call.active():
                call.cancel()
        self._idle_call = self._silence_call = None
        why = reason if reason is not None else Failure(ConnectionDone())
        if not self.logged_in.called:
            self.logged_in.errback(why)
        self.events.connection_closed(why)

    def _silent(self) -> None:
        self._silence_call = None
        self.log.info("the node went silent; closing the connection")
        self.tcp.abortConnection()

    # --- handshake --------------------------------------------------------------------

    def plaintext_frame_received(self, body: bytes) -> None:
        if self.logged_in.called:
            self.frame_rejected("unexpected frame type", "plaintext after the handshake")
            return
        try:
            sealer, opener, first = self._handshake.finish(body)
        except HandshakeRefused as refusal:
            self.lose_connection()
            self.logged_in.errback(refusal)
            return
        except (FrameAuthenticationError, ValueError) as exc:
            self.frame_rejected("authentication", "handshake reply")
            self.logged_in.errback(exc)
            return
        self.start_encryption(sealer, opener)
        result = cim_pb2.LoginResult.FromString(first[1:])
        self.login_result = result
        if result.status != _STATUS.OK:
            self.lose_connection()
            node = result.node if result.HasField("node") else None
            self.logged_in.errback(LoginRefused(result.status, result.message, node))
            return
        self.heartbeat_interval = result.heartbeat_interval_ms / 1000 or self.heartbeat_interval
        self.heartbeat_timeout = result.heartbeat_timeout_ms / 1000 or self.heartbeat_timeout
        self.resumption = self._handshake.resumption_after(result, self.clock.seconds())
        self.inbound = ESTABLISHED_INBOUND
        self._restart_silence_timer()
        self._restart_idle_timer()
        self.logged_in.callback(result)

    # --- heartbeats -------------------------------------------------------------------

    def frame_activity(self) -> None:
        if self.inbound:
            self._restart_silence_timer()

    def _restart_silence_timer(self) -> None:
        call = self._silence_call
        if call is not None and call.active():
            call.reset(self.heartbeat_timeout)
        else:
            self._silence_call = self.clock.callLater(self.heartbeat_timeout, self._silent)

    def _restart_idle_timer(self) -> None:
        call = self._idle_call
        if call is not None and call.active():
            call.reset(self.heartbeat_interval)
        else:
            self._idle_call = self.clock.callLater(self.heartbeat_interval, self._idle)

    def _idle(self) -> None:
        self._idle_call = None
        self.send_heartbeat()
        self._restart_idle_timer()

    def heartbeat_received(self) -> None:
        """The node echoes our heartbeats; frame_activity already noted it is alive."""

    def set_heartbeat(self, interval: float, timeout: float) -> None:
        """Another pace from now on (the node's APP_STATE_A for the app's state): both
        timers start again with the new values."""
        self.heartbeat_interval = interval
        self.heartbeat_timeout = timeout
        if self.inbound:
            self._restart_silence_timer()
            self._restart_idle_timer()

    # --- sending ----------------------------------------------------------------------

    def send(self, frame_type: int, message: ProtobufMessage) -> None:
        """Send an established-state frame; it also counts as activity for heartbeats."""
        self.send_frame(frame_type, message)
        self._restart_idle_timer()

    def _forward(self, frame_type: int, message: ProtobufMessage) -> None:
        self.events.frame_received(frame_type, message)


def _forwarder(frame_type: int) -> Any:
    def forward(protocol: ImClientProtocol, message: ProtobufMessage) -> None:
        protocol._forward(frame_type, message)

    return forward


ESTABLISHED_INBOUND: Inbound = {
    frame_type: (message_class, _forwarder(frame_type))
    for frame_type, message_class in (
        (cim_pb2.MSG_A, cim_pb2.MsgA),
        (cim_pb2.MSG_N, cim_pb2.Message),
        (cim_pb2.ACK_A, cim_pb2.AckA),
        (cim_pb2.ACK_N, cim_pb2.AckN),
        (cim_pb2.ONLINE_A, cim_pb2.OnlineA),
        (cim_pb2.GROUP_A, cim_pb2.GroupAnswer),
        (cim_pb2.CONTACTS_A, cim_pb2.ContactsAnswer),
        (cim_pb2.PUSH_A, cim_pb2.PushAnswer),
        (cim_pb2.OFFLINE_A, cim_pb2.OfflineA),
        (cim_pb2.OFFLINE_ACK_A, cim_pb2.OfflineAckA),
        (cim_pb2.OFFLINE_SUMMARY_A, cim_pb2.OfflineSummaryA),
        (cim_pb2.OFFLINE_NOTICE, cim_pb2.OfflineNotice),
        (cim_pb2.HISTORY_A, cim_pb2.HistoryA),
        (cim_pb2.CHANGE_A, cim_pb2.ChangeA),
        (cim_pb2.READ_A, cim_pb2.ReadA),
        (cim_pb2.READ_N, cim_pb2.ReadNotice),
        (cim_pb2.READERS_A, cim_pb2.ReadersA),
        (cim_pb2.DEVICES_A, cim_pb2.DevicesA),
        (cim_pb2.KICKED, cim_pb2.Kicked),
        (cim_pb2.GOING_AWAY, cim_pb2.GoingAway),
        (cim_pb2.ERROR, cim_pb2.Error),
        (cim_pb2.APP_STATE_A, cim_pb2.AppStateA),
        (cim_pb2.TYPING_A, cim_pb2.TypingA),
        (cim_pb2.TYPING_N, cim_pb2.TypingN),
    )
}
"""What a logged-in client accepts; each goes to ConnectionEvents.frame_received."""
