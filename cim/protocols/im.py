"""The IM node's side of a client connection.

States: waiting for the hello (only a plaintext ClientHello is allowed, under the
handshake deadline), authenticating (the token is being looked up; nothing is
allowed), established (the frame table of the node's rooms, ``ImNode.inbound``;
silence longer than the heartbeat timeout closes the connection). Each state's
allow-list is the whole of what the client may send then: anything else closes the
connection. An established connection's frames go to the room that answers them,
with the connection as the session, once the edge (cim.im.edge) found every number
in them within the stores' range; a frame that is not is answered BAD_REQUEST, and
a connection that sends ``[im] max_bad_frames`` of them is closed.

APP_STATE_R is the connection's own frame (not a room's): a device whose app is in
the background heartbeats every ``[im] background_heartbeat_interval``, and the
silence the node waits for before closing follows.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import TYPE_CHECKING, Any

from google.protobuf.message import Message as ProtobufMessage
from twisted.internet.interfaces import IAddress, ITCPTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim import oplog as oplog_events
from cim.im import edge
from cim.im.sessions import kick_code
from cim.interfaces import SessionRecord
from cim.limits.messages import retry_after_ms
from cim.limits.policy import HELLOS
from cim.protocols import cim_pb2
from cim.protocols.handshake import (
    ClientHelloAccepted,
    HandshakeRefused,
    accept_client_hello,
)
from cim.protocols.outbound import OutboundBudget
from cim.protocols.resumption import RESUME_USED_BODY, session_of
from cim.protocols.timeouts import NEVER, SweptTimeoutMixin
from cim.protocols.wire import TYPE_BYTES, FrameProtocol

if TYPE_CHECKING:
    from cim.protocols.im_listener import ImServerFactory

LOGIN_RESULT = cim_pb2.LOGIN_RESULT
KICKED = cim_pb2.KICKED
GOING_AWAY = cim_pb2.GOING_AWAY
OFFLINE_NOTICE = cim_pb2.OFFLINE_NOTICE
APP_STATE_A = cim_pb2.APP_STATE_A
ERROR = cim_pb2.ERROR
APP_BACKGROUND = cim_pb2.APP_BACKGROUND
APP_FOREGROUND = cim_pb2.APP_FOREGROUND
_NODE_PAUSE = 1
"""Reading paused because the node has too much queued (NodeQueue)."""
_BUDGET_PAUSE = 2
"""Reading paused because this connection is over its own outbound budget."""
_STATUS = cim_pb2.LoginResult


class ConnectionState(Enum):
    AWAITING_HELLO = "awaiting hello"
    AUTHENTICATING = "authenticating"
    ESTABLISHED = "established"
    CLOSING = "closing"


class ImServerProtocol(FrameProtocol, SweptTimeoutMixin):
    # Slots, like FrameProtocol's: an idle connection's memory (issue #20).
    __slots__ = (
        "active_at",
        "admitted",
        "background",
        "bad_frames",
        "connected_at",
        "deadline",
        "deadlines",
        "factory",
        "peer_host",
        "reading_held",
        "record",
        "state",
        "timeOut",
    )

    log = Logger()

    def __init__(self, factory: ImServerFactory, address: IAddress | None) -> None:
        super().__init__(factory.config.max_frame_size, factory.metrics, factory.held_writes)
        self.factory = factory
        # The handshake deadline, then the heartbeat timeout, on the node's one timer.
        self.deadlines = factory.deadlines
        self.peer_host = getattr(address, "host", str(address))
        self.state = ConnectionState.AWAITING_HELLO
        self.record: SessionRecord | None = None
        # When the handshake finished, and the last frame other than a heartbeat: past
        # [im] max_devices_per_user the device idle longest goes (cim.im.sessions).
        self.connected_at = 0.0
        self.active_at = 0.0
        self.admitted = False
        self.bad_frames = 0
        """Frames refused at the edge so far; ``[im] max_bad_frames`` closes."""
        self.inbound = {}
        # Set by setTimeout later; a slot has no class-level default to fall back on.
        self.timeOut = None
        self.deadline = NEVER
        # What this connection has queued, against [im] outbound_budget.
        self.outbound: OutboundBudget = OutboundBudget(factory.outbound_rules, self)
        # Why reading is paused: _NODE_PAUSE and/or _BUDGET_PAUSE (0: reading).
        self.reading_held = 0
        self.background = False
        """The app said it is in the background (APP_STATE_R): the longer timeout."""

    # --- connection lifecycle ---------------------------------------------------------

    def connectionMade(self) -> None:
        factory = self.factory
        factory.metrics.connections_open += 1
        factory.metrics.connections_total += 1
        if ITCPTransport.providedBy(self.transport):
            self.tcp.setTcpNoDelay(True)
        self.admitted = factory.admit(self.peer_host)
        if not self.admitted:
            factory.metrics.connections_refused["per_address_limit"] += 1
            refusal = HandshakeRefused(
                cim_pb2.HandshakeError.TOO_MANY_CONNECTIONS,
                "too many connections from your address",
                (),
            )
            self.state = ConnectionState.CLOSING
            self.send_plaintext(refusal.to_body())
            self.lose_connection()
            return
        self.setTimeout(factory.config.handshake_timeout)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.setTimeout(None)
        self.deadlines.gone(self)
        factory = self.factory
        factory.metrics.connections_open -= 1
        factory.release(self)
        self.outbound.closed()
        if self.record is not None:
            factory.node.sessions.closed(self)  # a no-op if it already left
        self.state = ConnectionState.CLOSING

    def timeoutConnection(self) -> None:
        if self.state is ConnectionState.ESTABLISHED:
            self.factory.metrics.heartbeat_timeouts += 1
            self.log.info(
                "closing silent connection of {user} on {node} from {peer}",
                user=self.record.user if self.record else "?",
                node=self.factory.node_id,
                peer=self.peer_host,
            )
        else:
            self.factory.metrics.handshake_failures["timeout"] += 1
            self.log.info(
                "handshake deadline passed for {peer} on {node} (user {user})",
                peer=self.peer_host,
                node=self.factory.node_id,
                user="-",
            )
        self.state = ConnectionState.CLOSING
        self.tcp.abortConnection()

    # --- backpressure (cim.protocols.outbound) ----------------------------------------

    def dataReceived(self, data: bytes) -> None:
        # Counted for the node's choice of whom to stop reading from.
        self.outbound.received += len(data)
        super().dataReceived(data)

    def pause_reading(self) -> None:
        """The node has too much queued: no frame of ours is read until resumed."""
        self.factory.metrics.senders_paused += 1
        self._hold_reading(_NODE_PAUSE)

    def resume_reading(self) -> None:
        self._release_reading(_NODE_PAUSE)

    def behind(self, over: bool) -> None:
        """Over its own budget, the client's requests wait until it reads its answers."""
        if over and self.state is ConnectionState.ESTABLISHED:
            self._hold_reading(_BUDGET_PAUSE)
        else:
            self._release_reading(_BUDGET_PAUSE)

    def _hold_reading(self, why: int) -> None:
        # The heartbeat deadline waits too: the silence is the node's doing.
        if not self.reading_held:
            self.setTimeout(None)
            self.pauseProducing()
        self.reading_held |= why

    def _release_reading(self, why: int) -> None:
        if not self.reading_held & why:
            return
        self.reading_held &= ~why
        if self.reading_held or self.state is not ConnectionState.ESTABLISHED:
            return
        self.setTimeout(self.heartbeat_timeout())
        self.resumeProducing()

    def may_take_live_copy(self) -> bool:
        """Whether a live msg:N may be queued for this receiver (see OutboundBudget)."""
        return self.outbound.may_take_live_copy()

    def pull_notice(self) -> None:
        """The queue drained after live copies were refused: pull what was missed."""
        self.deliver(OFFLINE_NOTICE, cim_pb2.OfflineNotice())

    def cut_slow_reader(self) -> None:
        """Over its outbound budget for [im] slow_reader_timeout: the connection is cut.

        No GOING_AWAY: it would wait behind everything the client is not reading. What
        it held unacknowledged is kept for its next login (``Sessions.closed``).
        """
        if self.state is not ConnectionState.ESTABLISHED:
            return
        factory = self.factory
        factory.metrics.slow_readers_cut += 1
        self.log.info(
            "cutting {user} on {node}: {queued} bytes unread for {seconds:g} s",
            user=self.record.user if self.record else "?",
            node=factory.node_id,
            queued=self.outbound.queued_bytes,
            seconds=factory.config.slow_reader_timeout,
        )
        factory.node.sessions.closed(self)
        self.state = ConnectionState.CLOSING
        self.inbound = {}
        self.tcp.abortConnection()

    # --- frames -----------------------------------------------------------------------

    def frame_activity(self) -> None:
        # The read's time, once: its frames are stamped with it (``active_at``).
        factory = self.factory
        factory.read_at = now = factory.clock.seconds()
        # Before the handshake only the deadline counts: heartbeats cannot stretch it.
        if self.state is ConnectionState.ESTABLISHED:
            self.active_until(now)
            # Before the read's frames are handled (and every ACTIVITY_EVERY of a long
            # read): a pause stops the rest (they wait in the buffer until resumed).
            factory.node_queue.check()

    def ciphers_used(self) -> None:
        # The node's sweep frees them again if the connection stays quiet (timeouts.py).
        self.deadlines.used(self)

    def release_idle(self) -> None:
        self.release_ciphers()

    def heartbeat_received(self) -> None:
        if self.state is not ConnectionState.ESTABLISHED:
            self.frame_rejected("unexpected heartbeat", "before the handshake")
            return
        self.send_heartbeat()

    # --- the app's state (foreground, background) -------------------------------------

    def heartbeat_timeout(self) -> float:
        """The silence after which this connection is closed, for its app's state."""
        config = self.factory.config
        if self.background:
            return config.background_heartbeat_timeout
        return config.effective_heartbeat_timeout

    def app_state_received(self, request: cim_pb2.AppStateR) -> None:
        """APP_STATE_R: the idle timeout follows the app's state at once; the answer
        says which heartbeat interval the node expects from now on."""
        if request.state not in (APP_FOREGROUND, APP_BACKGROUND):
            self.deliver(
                ERROR,
                cim_pb2.Error(
                    code=cim_pb2.Error.BAD_REQUEST,
                    message="state must be APP_FOREGROUND or APP_BACKGROUND",
                    request_type=cim_pb2.APP_STATE_R,
                    request_id=request.request_id,
                ),
            )
            return
        self.background = request.state == APP_BACKGROUND
        config = self.factory.config
        interval = (
            config.background_heartbeat_interval if self.background else config.heartbeat_interval
        )
        timeout = self.heartbeat_timeout()
        if not self.reading_held:  # held: the deadline waits, and is set on release
            self.setTimeout(timeout)
        self.deliver(
            APP_STATE_A,
            cim_pb2.AppStateA(
                state=request.state,
                heartbeat_interval_ms=int(interval * 1000),
                heartbeat_timeout_ms=int(timeout * 1000),
                request_id=request.request_id,
            ),
        )

    def plaintext_frame_received(self, body: bytes) -> None:
        if self.state is not ConnectionState.AWAITING_HELLO:
            self.frame_rejected("unexpected frame type", "plaintext after the hello")
            return
        self.state = ConnectionState.AUTHENTICATING
        factory = self.factory
        # Before the RSA decryption: a flood of hellos costs the flooder, not the node.
        # Counted, not logged: a flood must not become a flood of log lines.
        wait = factory.limits.take(HELLOS, self.peer_host)
        if wait > 0:
            factory.metrics.handshake_failures["rate_limited"] += 1
            refusal = HandshakeRefused(
                cim_pb2.HandshakeError.RATE_LIMITED,
                "too many handshakes from your address; try again later",
                retry_after_ms=retry_after_ms(wait),
            )
            self.state = ConnectionState.CLOSING
            self.send_plaintext(refusal.to_body())
            self.lose_connection()
            return
        try:
            accepted = accept_client_hello(
                body,
                factory.node_key,
                factory.config.cipher_suites,
                tickets=factory.tickets,
                now=factory.clock.seconds(),
            )
        except HandshakeRefused as refusal:
            reason = cim_pb2.HandshakeError.Reason.Name(refusal.reason).lower()
            factory.metrics.handshake_failures[reason] += 1
            factory.record(oplog_events.HANDSHAKE_FAILED, peer=self.peer_host, reason=reason)
            self.log.info(
                "handshake from {peer} on {node} (user {user}) refused: {reason}",
                peer=self.peer_host,
                node=factory.node_id,
                user="-",
                reason=reason,
            )
            self.state = ConnectionState.CLOSING
            self.send_plaintext(refusal.to_body())
            self.lose_connection()
            return
        d = session_of(factory.state.sessions, accepted)
        d.addCallback(self._token_checked, accepted)
        d.addErrback(self._token_check_failed)

    def _token_checked(self, record: SessionRecord | None, accepted: ClientHelloAccepted) -> None:
        if self.state is not ConnectionState.AUTHENTICATING:
            return  # the connection went away while we looked
        factory = self.factory
        if record is None and accepted.ticket is not None:
            self._refuse_resumption()
            return
        if record is None:
            self._refuse_login(
                accepted, _STATUS.INVALID_TOKEN, "unknown or expired token", "invalid_token"
            )
            return
        if not factory.registry.accepting:
            # Our registry session is lost: routers no longer send users here, and a
            # session taken now could not be found by other nodes.
            self._refuse_login(
                accepted,
                _STATUS.WRONG_NODE,
                "this node is not taking new logins; log in again through the router",
                "not_accepting",
                user=record.user,
            )
            return
        # Checked after the token so a flood of junk hellos cannot fill the guard.
        # A resume hello is single use by its ticket (redeemed in the state store).
        if accepted.ticket is None and not factory.replay_guard.fresh(
            accepted.client_nonce, accepted.timestamp_ms
        ):
            self._refuse_login(
                accepted,
                _STATUS.REPLAYED_HELLO,
                "hello replayed or too old: check the device clock",
                "replayed",
                user=record.user,
            )
            return
        if record.node_id != factory.node_id:
            self._refuse_login(
                accepted,
                _STATUS.WRONG_NODE,
                f"this session belongs to node {record.node_id}",
                "wrong_node",
                node=factory.address_of(record.node_id),
                user=record.user,
            )
            return
        self.record = record
        self.state = ConnectionState.ESTABLISHED
        self.connected_at = self.active_at = factory.clock.seconds()
        config = factory.config
        result = cim_pb2.LoginResult(
            status=_STATUS.OK,
            user=record.user,
            device=accepted.device or record.device,
            heartbeat_interval_ms=int(config.heartbeat_interval * 1000),
            heartbeat_timeout_ms=int(config.effective_heartbeat_timeout * 1000),
            server_time_ms=int(factory.clock.seconds() * 1000),
        )
        factory.tickets.issue_into(result, record, accepted, self.connected_at)
        self._send_login_result(accepted, result)
        self.inbound = factory.inbound
        self.setTimeout(config.effective_heartbeat_timeout)
        factory.metrics.handshakes_ok += 1
        # Debug: the router's login line is the one info line per session.
        self.log.debug(
            "{user} connected to {node} from {peer} with {suite}",
            user=record.user,
            node=factory.node_id,
            peer=self.peer_host,
            suite=accepted.suite,
        )
        factory.node.sessions.opened(self, enrolled=accepted.ticket is not None)

    def _refuse_resumption(self) -> None:
        """The ticket was used before or its session ended: plaintext, so the client
        knows to log in again with a full hello."""
        self.factory.metrics.handshake_failures["resume_refused"] += 1
        self.factory.record(
            oplog_events.HANDSHAKE_FAILED, peer=self.peer_host, reason="resume_refused"
        )
        self.state = ConnectionState.CLOSING
        self.send_plaintext(RESUME_USED_BODY)
        self.lose_connection()

    def _token_check_failed(self, failure: Failure) -> None:
        self.log.failure(
            "token lookup failed for {peer} on {node} (user {user})",
            failure,
            peer=self.peer_host,
            node=self.factory.node_id,
            user="-",
        )
        self.factory.metrics.handshake_failures["state_unavailable"] += 1
        if self.state is ConnectionState.AUTHENTICATING:
            self.state = ConnectionState.CLOSING
            self.tcp.abortConnection()

    def _refuse_login(
        self,
        accepted: ClientHelloAccepted,
        status: cim_pb2.LoginResult.Status,
        message: str,
        metric: str,
        node: cim_pb2.NodeAddress | None = None,
        user: str = "-",
    ) -> None:
        self.factory.metrics.handshake_failures[metric] += 1
        self.factory.record(oplog_events.HANDSHAKE_FAILED, peer=self.peer_host, reason=metric)
        self.log.info(
            "login of {user} from {peer} on {node} refused: {why}",
            user=user,
            peer=self.peer_host,
            node=self.factory.node_id,
            why=metric,
        )
        result = cim_pb2.LoginResult(status=status, message=message)
        if node is not None:
            result.node.CopyFrom(node)
        self.state = ConnectionState.CLOSING
        self._send_login_result(accepted, result)
        self.lose_connection()

    def _send_login_result(self, accepted: ClientHelloAccepted, result: Any) -> None:
        plaintext = bytes((LOGIN_RESULT,)) + result.SerializeToString()
        self.send_plaintext(accepted.reply_body(plaintext))
        self.start_encryption(accepted.sealer, accepted.opener)
        # Freed at once, not at the next sweep: during a login storm the next
        # handshake reuses the memory instead of each holding a context for a second.
        self.release_ciphers()

    def refuse_at_edge(self, frame_type: int, message: ProtobufMessage, problem: str) -> None:
        """A frame with a number out of range: answered BAD_REQUEST, never dispatched.

        One log line per connection and minute (cim.loglimit), however many come; the
        ``max_bad_frames``-th closes the connection.
        """
        factory = self.factory
        factory.metrics.frames_refused["out_of_range"] += 1
        answer_type, answer = edge.refusal(frame_type, message, problem)
        self.deliver(answer_type, answer)
        self.bad_frames += 1
        key = (id(self), "out_of_range")
        if factory.log_limit.allow(key):
            held_back = factory.log_limit.held_back(key)
            self.log.info(
                "refused a frame of {user} from {peer} on {node}: {problem}{more}",
                user=self.record.user if self.record else "-",
                peer=self.peer_host,
                node=factory.node_id,
                problem=problem,
                more=f" ({held_back} more since the last line)" if held_back else "",
            )
        if self.bad_frames >= factory.config.max_bad_frames:
            self.frame_rejected("too many bad frames", f"{self.bad_frames} refused")

    # --- ClientSession (what the rooms call) ------------------------------------------

    def deliver(self, frame_type: int, message: ProtobufMessage) -> None:
        if self.state is not ConnectionState.ESTABLISHED:
            return
        # A notice to pull would only queue behind what the client is not reading:
        # it is sent once the queue drains.
        if frame_type == OFFLINE_NOTICE and self.outbound.hold_notice():
            return
        # ``send_frame``, one call fewer: every frame the rooms send comes this way.
        self._send_one(TYPE_BYTES[frame_type] + message.SerializeToString())

    def deliver_encoded(self, frames: Sequence[bytes]) -> None:
        """``deliver`` of frames serialized once for many (cim.protocols.wire.encode_frame)."""
        if self.state is ConnectionState.ESTABLISHED:
            self.send_encoded(*frames)

    def kick(self, reason: str) -> None:
        self._close_with(KICKED, cim_pb2.Kicked(reason=reason, code=kick_code(reason)))
        user = self.record.user if self.record else None
        self.factory.record(oplog_events.KICK, user=user, peer=self.peer_host, reason=reason)
        self.log.info(
            "kicked {user} on {node}: {reason}",
            user=user,
            node=self.factory.node_id,
            reason=reason,
        )

    def going_away(self, reason: str, reconnect_after_ms: int) -> None:
        self._close_with(
            GOING_AWAY, cim_pb2.GoingAway(reason=reason, reconnect_after_ms=reconnect_after_ms)
        )

    def _close_with(self, frame_type: int, message: ProtobufMessage) -> None:
        if self.state is not ConnectionState.ESTABLISHED:
            return
        self.send_frame(frame_type, message)
        # The session is over for the node now, not when TCP finishes closing.
        self.factory.node.sessions.closed(self)
        self.state = ConnectionState.CLOSING
        self.inbound = {}
        self.lose_connection()
