"""A logged-in chat session that stays online: the client library's main object.

It logs in through the router, connects to the node the router picked, and when the
connection drops it reconnects with jittered exponential backoff. Reconnecting tries
the cached node with the still-valid token first (design: 快速连接, one round trip);
only if that fails does it go back to the router for a new login.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from google.protobuf.message import Message as ProtobufMessage
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.client.connection import ImClientProtocol, LoginRefused
from cim.client.router import LoginTicket, NodeTarget, RouterClient, RouterError
from cim.config import KNOWN_SUITES, SUITE_CHACHA
from cim.protocols import cim_pb2
from cim.protocols.handshake import HandshakeRefused

_STATUS = cim_pb2.LoginResult
STATUS_NAMES = {cim_pb2.DELIVERED: "delivered", cim_pb2.STORED: "stored", cim_pb2.FAILED: "failed"}

Connector = Callable[[str, int, ImClientProtocol], "Deferred[Any]"]


class SessionFailed(Exception):
    """The session cannot go on without the user (bad password, refused suite, kicked)."""


@dataclass(frozen=True)
class DeliveryOutcome:
    """The end of one sent message: delivered, stored or failed (with a reason)."""

    client_seq: int
    msg_id: int
    to: str
    status: str
    reason: str = ""


@dataclass(frozen=True)
class Backoff:
    initial: float = 0.5
    maximum: float = 30.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Equal jitter: half the exponential step fixed, half random."""
        step = min(self.maximum, self.initial * (2 ** min(attempt, 16)))
        return step / 2 + rng.uniform(0, step / 2)


class ChatClient:
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        router_url: str | Sequence[str],
        user: str,
        password: str,
        device: str = "cli",
        suite: str | None = None,
        connector: Connector | None = None,
        router: RouterClient | None = None,
        backoff: Backoff = Backoff(),
        rng: random.Random | None = None,
    ) -> None:
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.user = user
        self._password = password
        self.device = device
        # An explicit suite is the only one offered; otherwise every known suite is
        # offered and the node's preferred one (the router lists them) is chosen.
        self.requested_suite = suite
        self.offered: tuple[str, ...] = (suite,) if suite else KNOWN_SUITES
        self.suite = suite or SUITE_CHACHA
        self._router = router or RouterClient(reactor, router_url)
        self._connect = connector or self._tcp_connect
        self._backoff = backoff
        self._rng = rng or random.Random()
        self.ticket: LoginTicket | None = None
        self.protocol: ImClientProtocol | None = None
        self.state = "offline"
        self._stopping = False
        self._online_waiters: list[Deferred[None]] = []
        self._next_seq = int(time.time() * 1_000_000)
        self._pending: dict[int, tuple[Deferred[DeliveryOutcome], str]] = {}
        self._msg_ids: dict[int, int] = {}
        self._online_requests: list[Deferred[cim_pb2.OnlineA]] = []
        self._reconnect_call: Any = None
        self._connecting: Deferred[Any] | None = None
        self._attempt = 0
        # Application callbacks.
        self.on_message: Callable[[cim_pb2.Message], None] = lambda message: None
        self.on_state: Callable[[str, str], None] = lambda state, detail: None
        self.on_outcome: Callable[[DeliveryOutcome], None] = lambda outcome: None

    # --- connecting -------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Fires when the session is online for the first time, or fails for good."""
        waiter: Deferred[None] = Deferred()
        self._online_waiters.append(waiter)
        self._connect_soon(0)
        return waiter

    def _set_state(self, state: str, detail: str = "") -> None:
        self.state = state
        self.on_state(state, detail)

    def _connect_soon(self, delay: float) -> None:
        if self._stopping:
            return
        if delay:
            self._set_state("reconnecting", f"in {delay:.1f} s")
        self._reconnect_call = self.clock.callLater(
            delay, lambda: ensureDeferred(self._establish())
        )

    async def _establish(self) -> None:
        self._reconnect_call = None
        self._set_state("connecting")
        try:
            await self._connect_once()
        except SessionFailed as failure:
            self._give_up(str(failure))
        except CancelledError:
            pass
        except Exception as exc:
            self._attempt += 1
            delay = self._backoff.delay(self._attempt, self._rng)
            self.log.info(
                "connecting failed ({why}); retrying in {delay:.1f} s", why=exc, delay=delay
            )
            self._connect_soon(delay)

    async def _connect_once(self) -> None:
        cached = self.ticket
        if cached is not None and cached.expires_at > self.clock.seconds():
            try:
                await self._open(cached)
                return
            except LoginRefused as refusal:
                if refusal.status == _STATUS.WRONG_NODE and refusal.node is not None:
                    moved = NodeTarget(refusal.node.id, refusal.node.host, refusal.node.port)
                    self.ticket = replace(cached, node=moved)
                    await self._open(self.ticket)
                    return
                self.log.info("cached login no longer valid: {why}", why=refusal)
            except (ConnectError, OSError) as exc:
                self.log.info("fast reconnect to the cached node failed: {why}", why=exc)
        self.ticket = await self._login()
        await self._open(self.ticket)

    async def _login(self) -> LoginTicket:
        try:
            ticket = await self._router.login(self.user, self._password, self.device)
        except RouterError as error:
            if error.status in (400, 401, 403, 409):
                raise SessionFailed(str(error)) from None
            raise
        usable = [suite for suite in ticket.cipher_suites if suite in self.offered]
        if not usable:
            raise SessionFailed(
                f"the node does not allow cipher suite {self.offered[0]!r}; "
                f"it allows: {', '.join(ticket.cipher_suites)}"
            )
        self.suite = usable[0]
        return ticket

    async def _open(self, ticket: LoginTicket) -> None:
        events = _CurrentConnectionOnly(self)
        protocol = ImClientProtocol(
            self.clock,
            events,
            ticket.server_key,
            ticket.token,
            self.device,
            self.suite,
            self.offered,
        )
        events.protocol = protocol
        self._connecting = self._connect(ticket.node.host, ticket.node.port, protocol)
        try:
            await self._connecting
        finally:
            self._connecting = None
        try:
            await protocol.logged_in
        except HandshakeRefused as refusal:
            raise SessionFailed(f"the node refused the handshake: {refusal.message}") from None
        self.protocol = protocol
        self._attempt = 0
        self._set_state("online", f"{ticket.node.host}:{ticket.node.port}")
        waiters, self._online_waiters = self._online_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _tcp_connect(self, host: str, port: int, protocol: ImClientProtocol) -> Deferred[Any]:
        return connectProtocol(HostnameEndpoint(self.reactor, host, port, timeout=10), protocol)

    def _give_up(self, why: str) -> None:
        self._stopping = True
        self._set_state("stopped", why)
        waiters, self._online_waiters = self._online_waiters, []
        for waiter in waiters:
            waiter.errback(SessionFailed(why))

    # --- ConnectionEvents -------------------------------------------------------------

    def frame_received(self, frame_type: int, message: ProtobufMessage) -> None:
        if frame_type == cim_pb2.MSG_N:
            self._message_arrived(message)  # type: ignore[arg-type]
        elif frame_type == cim_pb2.MSG_A:
            self._msg_ids[message.client_seq] = message.msg_id  # type: ignore[attr-defined]
        elif frame_type == cim_pb2.ACK_N:
            self._ack_arrived(message)  # type: ignore[arg-type]
        elif frame_type == cim_pb2.ONLINE_A:
            if self._online_requests:
                self._online_requests.pop(0).callback(message)  # type: ignore[arg-type]
        elif frame_type == cim_pb2.KICKED:
            self._kicked(message)  # type: ignore[arg-type]
        elif frame_type == cim_pb2.GOING_AWAY:
            self._going_away = message.reconnect_after_ms / 1000  # type: ignore[attr-defined]
        elif frame_type == cim_pb2.ERROR:
            self._request_refused(message)  # type: ignore[arg-type]

    def _kicked(self, kicked: cim_pb2.Kicked) -> None:
        if self._stopping:
            return  # our own logout, or we already gave up
        if kicked.code == cim_pb2.Kicked.SESSION_EXPIRED:
            self.ticket = None  # log in again through the router, then reconnect
            return
        self._give_up(f"kicked: {kicked.reason}")

    def connection_closed(self, reason: Failure) -> None:
        protocol, self.protocol = self.protocol, None
        if protocol is None:
            return  # never got online; _establish handles it
        self._fail_all_pending("the connection closed before the receiver acknowledged")
        for request in self._online_requests:
            request.errback(reason)
        self._online_requests = []
        if self._stopping:
            if self.state != "stopped":
                self._set_state("offline")
            return
        delay = getattr(self, "_going_away", 0.0) or self._backoff.delay(0, self._rng)
        self._going_away = 0.0
        self._connect_soon(delay)

    # --- messages ---------------------------------------------------------------------

    def _message_arrived(self, message: cim_pb2.Message) -> None:
        try:
            self.on_message(message)
        finally:
            if self.protocol is not None:
                self.protocol.send(cim_pb2.ACK_R, cim_pb2.AckR(msg_id=message.id))

    def _ack_arrived(self, ack: cim_pb2.AckN) -> None:
        entry = self._pending.pop(ack.client_seq, None)
        self._msg_ids.pop(ack.client_seq, None)
        outcome = DeliveryOutcome(
            ack.client_seq, ack.msg_id, ack.to, STATUS_NAMES.get(ack.status, "failed"), ack.reason
        )
        self.on_outcome(outcome)
        if entry is not None:
            entry[0].callback(outcome)

    def _request_refused(self, error: cim_pb2.Error) -> None:
        entry = self._pending.pop(error.client_seq, None)
        if entry is not None:
            outcome = DeliveryOutcome(error.client_seq, 0, entry[1], "failed", error.message)
            self.on_outcome(outcome)
            entry[0].callback(outcome)

    def _fail_all_pending(self, reason: str) -> None:
        pending, self._pending = self._pending, {}
        for client_seq, (waiter, to) in pending.items():
            outcome = DeliveryOutcome(
                client_seq, self._msg_ids.pop(client_seq, 0), to, "failed", reason
            )
            self.on_outcome(outcome)
            waiter.callback(outcome)

    def send_text(self, to: str, text: str) -> Deferred[DeliveryOutcome]:
        """Send a text; fires with its outcome once the node says delivered or failed."""
        return self.send_message(cim_pb2.Message(to=to, text=text))

    def send_message(self, message: cim_pb2.Message) -> Deferred[DeliveryOutcome]:
        """Send any user message (text, media, location); the library numbers it.

        Fires with the outcome once the node reports it: the Deferred never fails, a
        message that could not go out ends as a "failed" outcome with a reason.
        """
        client_seq = self._next_seq
        self._next_seq += 1
        message.client_seq = client_seq
        message.client_time_ms = int(self.clock.seconds() * 1000)
        waiter: Deferred[DeliveryOutcome] = Deferred()
        to = message.to or message.group
        if self.protocol is None:
            outcome = DeliveryOutcome(client_seq, 0, to, "failed", f"not connected ({self.state})")
            self.on_outcome(outcome)
            waiter.callback(outcome)
            return waiter
        self._pending[client_seq] = (waiter, to)
        self.protocol.send(cim_pb2.MSG_R, message)
        return waiter

    def online(self, offset: int = 0, limit: int = 100) -> Deferred[cim_pb2.OnlineA]:
        waiter: Deferred[cim_pb2.OnlineA] = Deferred()
        if self.protocol is None:
            waiter.errback(SessionFailed(f"not connected ({self.state})"))
            return waiter
        self._online_requests.append(waiter)
        self.protocol.send(cim_pb2.ONLINE_R, cim_pb2.OnlineR(offset=offset, limit=limit))
        return waiter

    # --- stopping ---------------------------------------------------------------------

    async def stop(self, logout: bool = True) -> None:
        """Close the connection; with logout, also end the session at the router."""
        self._stopping = True
        if self._reconnect_call is not None and self._reconnect_call.active():
            self._reconnect_call.cancel()
        if self._connecting is not None:
            self._connecting.cancel()
        protocol = self.protocol
        if protocol is not None and protocol.transport is not None:
            protocol.transport.loseConnection()
        if logout and self.ticket is not None:
            try:
                await self._router.logout(self.ticket.token)
            except RouterError as error:
                self.log.info("logout failed: {why}", why=error)
        self.ticket = None


class _CurrentConnectionOnly:
    """Passes a connection's events on only while it is the session's current one.

    After a fast reconnect the abandoned connection may still say something (such as
    "replaced by a newer connection"); that must not stop the new one.
    """

    def __init__(self, client: ChatClient) -> None:
        self.client = client
        self.protocol: ImClientProtocol | None = None

    def frame_received(self, frame_type: int, message: ProtobufMessage) -> None:
        if self.client.protocol is self.protocol:
            self.client.frame_received(frame_type, message)

    def connection_closed(self, reason: Failure) -> None:
        if self.client.protocol is self.protocol:
            self.client.connection_closed(reason)
