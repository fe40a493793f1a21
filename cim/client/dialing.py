"""Reaching a node for a session: login, fast reconnect, backoff, the first deadline.

Reconnecting tries the cached node with the still-valid token first (design: 快速连接,
one round trip); only if that fails does it go back to the router for a new login. A
node that redirects (WRONG_NODE) is followed once. Failed attempts wait the client's
``Backoff`` (the one backoff policy, jittered so the clients of a node that went away
do not all come back at once); a node that asks for a longer wait (RATE_LIMITED
handshake, GOING_AWAY) gets it. The first connection may have a deadline: a router or
node that cannot be reached by then fails the session with ``Unreachable`` naming which
one and why.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from google.protobuf.message import Message as ProtobufMessage
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.backends import backoff
from cim.client.connection import ImClientProtocol, LoginRefused
from cim.client.errors import failure_line
from cim.client.router import LoginTicket, NodeTarget, RouterClient, RouterError
from cim.config import KNOWN_SUITES
from cim.protocols import cim_pb2
from cim.protocols.crypto import fingerprint_of
from cim.protocols.handshake import HandshakeRefused, Resumption
from cim.reactor import ICimReactor

if TYPE_CHECKING:
    from cim.client.session import ChatClient

__all__ = [
    "Backoff",
    "Connector",
    "Dialer",
    "RetryLater",
    "SessionFailed",
    "SessionRefused",
    "Unreachable",
]

_STATUS = cim_pb2.LoginResult

Connector = Callable[[str, int, ImClientProtocol], "Deferred[Any]"]


class SessionFailed(Exception):
    """The session cannot go on without the user (bad password, refused suite, kicked)."""


class SessionRefused(SessionFailed):
    """The router or node said no: wrong password, unknown user, cipher suite, kicked."""


class Unreachable(SessionFailed):
    """The router or the node could not be reached before the first connection's deadline."""


class RetryLater(Exception):
    """The node asked us to come back later (too many handshakes from our address)."""

    def __init__(self, delay: float, why: str) -> None:
        super().__init__(why)
        self.delay = delay


@dataclass(frozen=True)
class Backoff(backoff.Backoff):
    """The client's reconnect wait: the one backoff policy, from 0.5 s up to 30 s, with
    equal jitter (half the step fixed, half random) so that the clients of a node that
    went away do not all come back at once."""

    initial: float = 0.5
    maximum: float = 30.0
    jitter: float = 0.5


class Dialer:
    """Gets ``session`` a logged-in connection, again and again until it stops."""

    log = Logger()

    def __init__(
        self,
        session: ChatClient,
        reactor: ICimReactor,
        router: RouterClient,
        password: str,
        suite: str | None,
        connector: Connector | None,
        backoff: Backoff,
        rng: random.Random,
        transport: str = "tcp",
    ) -> None:
        self.session = session
        self.transport = transport
        """tcp, or websocket: the node's gateway (``ws_url`` of the login), as a browser."""
        self.reactor = reactor
        self.router = router
        self._password = password
        # An explicit suite is the only one offered; otherwise every known suite is
        # offered and the node's preferred one (the router lists them) is chosen.
        self.requested_suite = suite
        self.offered: tuple[str, ...] = (suite,) if suite else KNOWN_SUITES
        self._connect = connector or self._tcp_connect
        self.backoff = backoff
        self.rng = rng
        self._reconnect_call: IDelayedCall | None = None
        self._connecting: Deferred[Any] | None = None
        self._attempting: Deferred[None] | None = None
        self._attempt = 0
        # The first connection's deadline, and what was being reached when it passed.
        self._first_contact: IDelayedCall | None = None
        self._reaching = "the router"
        self._last_failure = ""
        self.going_away = 0.0
        """The node's GOING_AWAY wait before the next connection, once."""
        self.resumption: Resumption | None = None
        """The last session's resumption ticket: the next connection to the same node
        within its window skips RSA (and the router); refused, a full hello follows."""

    def first_deadline(self, deadline: float) -> None:
        if self._first_contact is None:
            self._first_contact = self.reactor.callLater(deadline, self._unreachable, deadline)

    def end_first_contact(self) -> None:
        if self._first_contact is not None and self._first_contact.active():
            self._first_contact.cancel()
        self._first_contact = None

    def _unreachable(self, deadline: float) -> None:
        self._first_contact = None
        why = self._last_failure or f"cannot reach {self._reaching}: no answer"
        self.cancel()
        self.session._give_up(f"{why} (gave up after {deadline:g} s)", Unreachable)
        if self._attempting is not None:
            self._attempting.cancel()

    def cancel(self) -> None:
        """Stop any wait or connection attempt in progress."""
        if self._reconnect_call is not None and self._reconnect_call.active():
            self._reconnect_call.cancel()
        if self._connecting is not None:
            self._connecting.cancel()

    def connect_soon(self, delay: float) -> None:
        if self.session.stopping:
            return
        if delay:
            self.session._set_state("reconnecting", f"in {delay:.1f} s")
        self._reconnect_call = self.reactor.callLater(delay, self._attempt_now)

    def reconnect(self) -> None:
        """The connection dropped: again after GOING_AWAY's wait or the first backoff."""
        delay = self.going_away or self.backoff.delay(0, self.rng)
        self.going_away = 0.0
        self.connect_soon(delay)

    def _attempt_now(self) -> None:
        self._attempting = ensureDeferred(self._establish())

    async def _establish(self) -> None:
        self._reconnect_call = None
        self.session._set_state("connecting")
        try:
            await self._connect_once()
        except SessionFailed as failure:
            self.session._give_up(str(failure))
        except CancelledError:
            pass
        except Exception as exc:
            self._attempt += 1
            delay = self.backoff.delay(self._attempt, self.rng)
            if isinstance(exc, RetryLater):
                delay = max(delay, exc.delay)
            self.log.info(
                "connecting failed ({why}); retrying in {delay:.1f} s", why=exc, delay=delay
            )
            self.connect_soon(delay)

    async def _connect_once(self) -> None:
        try:
            await self._reach_a_node()
        except Exception as exc:
            if not isinstance(exc, CancelledError | SessionFailed):
                self._last_failure = failure_line(self._reaching, exc)
            raise

    async def _reach_a_node(self) -> None:
        cached = self.session.ticket
        if cached is not None and cached.expires_at > self.reactor.seconds():
            try:
                await self._open(cached)
                return
            except LoginRefused as refusal:
                if refusal.status == _STATUS.WRONG_NODE and refusal.node is not None:
                    moved = NodeTarget(
                        refusal.node.id, refusal.node.host, refusal.node.port, refusal.node.ws_url
                    )
                    self.session.ticket = replace(cached, node=moved)
                    await self._open(self.session.ticket)
                    return
                self.log.info("cached login no longer valid: {why}", why=refusal)
            except (ConnectError, OSError) as exc:
                self.log.info("fast reconnect to the cached node failed: {why}", why=exc)
        self.resumption = None
        self.session.ticket = await self._login()
        await self._open(self.session.ticket)

    async def _login(self) -> LoginTicket:
        self._reaching = "the router"
        session = self.session
        try:
            ticket = await self.router.login(session.user, self._password, session.device)
        except RouterError as error:
            if error.status in (400, 401, 403, 409):
                raise SessionRefused(str(error)) from None
            raise
        usable = [suite for suite in ticket.cipher_suites if suite in self.offered]
        if not usable:
            raise SessionRefused(
                f"the node does not allow cipher suite {self.offered[0]!r}; "
                f"it allows: {', '.join(ticket.cipher_suites)}"
            )
        self.session.suite = usable[0]
        return ticket

    def _resumable(self, ticket: LoginTicket) -> Resumption | None:
        """The resumption to offer this node, if one is still good for it."""
        resumption = self.resumption
        if resumption is None:
            return None
        if (
            resumption.expires_at <= self.reactor.seconds()
            or resumption.fingerprint != fingerprint_of(ticket.server_key)
            or resumption.device != self.session.device
        ):
            self.resumption = None
            return None
        return resumption

    async def _open(self, ticket: LoginTicket) -> None:
        resume = self._resumable(ticket)
        # Single use whatever happens: the node may have redeemed it before failing.
        self.resumption = None
        try:
            await self._open_with(ticket, resume)
        except SessionFailed as failure:
            # RESUME_REFUSED, or any refusal of the resume hello (a node of an older
            # release answers it BAD_HELLO): the full hello decides.
            if resume is None or not isinstance(failure.__cause__, HandshakeRefused):
                raise
            self.log.info("resumption refused ({why}); full login", why=failure.__cause__)
            await self._open_with(ticket, None)

    async def _open_with(self, ticket: LoginTicket, resume: Resumption | None) -> None:
        events = _CurrentConnectionOnly(self.session)
        protocol = ImClientProtocol(
            self.reactor,
            events,
            ticket.server_key,
            ticket.token,
            self.session.device,
            self.session.suite,
            self.offered,
            max_frame_size=self.session.max_frame_size,
            resume=resume,
        )
        events.protocol = protocol
        node = ticket.node
        where = f"{node.host}:{node.port}"
        if self.transport == "websocket":
            if not node.ws_url:
                raise SessionRefused(f"the node {node.node_id} runs no WebSocket gateway")
            where = node.ws_url
        self._reaching = f"the node {node.node_id} at {where}".replace("  ", " ")
        if self.transport == "websocket":
            # Imported here: a client on TCP does not load autobahn.
            from cim.client.websocket import connect_websocket

            self._connecting = connect_websocket(self.reactor, node.ws_url, protocol)
        else:
            self._connecting = self._connect(node.host, node.port, protocol)
        try:
            await self._connecting
        finally:
            self._connecting = None
        try:
            await protocol.logged_in
        except HandshakeRefused as refusal:
            if refusal.reason == cim_pb2.HandshakeError.RATE_LIMITED:
                raise RetryLater(refusal.retry_after_ms / 1000, str(refusal)) from None
            raise SessionRefused(f"the node refused the handshake: {refusal.message}") from refusal
        self.resumption = protocol.resumption
        self._attempt = 0
        self.end_first_contact()
        self.session._online(protocol, where)

    def _tcp_connect(self, host: str, port: int, protocol: ImClientProtocol) -> Deferred[Any]:
        return connectProtocol(HostnameEndpoint(self.reactor, host, port, timeout=10), protocol)

    async def logout(self) -> None:
        """End the session at the router (best effort: a failure is only logged)."""
        if self.session.ticket is not None:
            try:
                await self.router.logout(self.session.ticket.token)
            except RouterError as error:
                self.log.info("logout failed: {why}", why=error)
        self.session.ticket = None
        self.resumption = None


class _CurrentConnectionOnly:
    """Passes a connection's events on only while it is the session's current one.

    After a fast reconnect the abandoned connection may still say something (such as
    "replaced by a newer connection"); that must not stop the new one.
    """

    def __init__(self, session: ChatClient) -> None:
        self.session = session
        self.protocol: ImClientProtocol | None = None

    def frame_received(self, frame_type: int, message: ProtobufMessage) -> None:
        if self.session.protocol is self.protocol:
            self.session.frame_received(frame_type, message)

    def connection_closed(self, reason: Failure) -> None:
        if self.session.protocol is self.protocol:
            self.session.connection_closed(reason)
