"""The contracts between cim's rooms and the backends that can be swapped under them.

Every backend method returns a Deferred, even where the embedded backend could answer
at once, so that Redis or ZooKeeper can stand in without changing any caller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """One login: what the router issued and the IM node checks.

    The token itself is never stored; backends key sessions by its SHA-256 so a
    dump of the state store holds nothing a client could log in with.
    """

    session_id: str
    user: str
    device: str
    node_id: str
    created_at: float
    expires_at: float
    token_hash: str = ""
    """So a node can rewrite its sessions into a state store that lost them."""


@dataclass(frozen=True)
class NodeInfo:
    """A live IM node as clients should reach it."""

    node_id: str
    host: str
    port: int
    public_key_der: bytes = b""
    """The node's RSA public key (SubjectPublicKeyInfo DER), handed to clients at login."""
    ws_url: str = ""
    """The node's WebSocket gateway (``[ws] advertise``) for browsers; empty: none."""


class MessageReceipt(NamedTuple):
    """What the node answered for one sender message, kept to answer retries the same.

    status is a cim_pb2.DeliveryStatus value; 0 (unspecified) while the outcome is
    still open.
    """

    msg_id: int
    sent_at_ms: int
    status: int = 0
    reason: str = ""


class AlreadyLoggedIn(Exception):
    """duplicate_login = refuse_new and max_devices_per_user devices of the user are
    online."""


class StateUnavailable(Exception):
    """The state backend cannot be reached or did not answer in time."""


class NodeIdTaken(Exception):
    """Another live node is registered under this node id."""


SessionEndedListener = Callable[[SessionRecord, str], None]
"""Called with the ended session and a reason: 'logged in elsewhere', 'logged out'."""


class ISessionStore(Interface):
    """Logins: what the router issued and the IM node checks (the state backend's sessions)."""

    def create_session(
        token_hash: str,
        user: str,
        device: str,
        node_id: str,
        ttl: float,
        policy: str,
        max_devices: int = 1,
    ) -> Deferred[tuple[SessionRecord, SessionRecord | None]]:
        """Atomically decide a login of one device and store the new session.

        A user has one session per device, up to ``max_devices`` ([im]
        max_devices_per_user). The same device's previous session always ends
        (listeners told 'logged in again on this device') and is returned as the second
        element. Otherwise, past the limit:
        policy 'refuse_new': fails with AlreadyLoggedIn when ``max_devices`` other
        devices of the user are online;
        policy 'kick_old': the login is taken (the IM node then ends the device idle
        longest, which only it knows).
        Either way sessions of devices not online give way first, oldest first
        (listeners told 'logged in elsewhere'), so at most ``max_devices`` sessions are
        kept unless all of them are online.
        """

    def session_for_token(token_hash: str) -> Deferred[SessionRecord | None]:
        """The live, unexpired session for a token hash, or None."""

    def redeem_ticket(
        ticket_id: str, token_hash: str, expires_at: float
    ) -> Deferred[SessionRecord | None]:
        """Use a resumption ticket (cim.protocols.resumption) once, atomically.

        The live, unexpired session of ``token_hash`` when ``ticket_id`` was never
        redeemed before; None when it was (a replayed resume hello) or when the session
        ended (the ticket dies with its token). The id is remembered until
        ``expires_at``, after which the node refuses the ticket by its expiry alone.
        """

    def end_session(token_hash: str, reason: str) -> Deferred[SessionRecord | None]:
        """Logout: remove the session and its route; listeners are told."""

    def end_user_sessions(
        user: str, reason: str, device: str = "", keep_device: str = ""
    ) -> Deferred[list[SessionRecord]]:
        """End the user's current sessions whatever their tokens (an administrator's
        kick, an account deleted, a password changed): every device's, only
        ``device``'s, or every device's but ``keep_device``'s (the one that changed the
        password stays logged in); listeners are told with reason. The sessions ended,
        sorted by device (empty: none was live)."""

    def add_session_ended_listener(listener: SessionEndedListener) -> None:
        """Be told whenever a session ends (kick, logout, expiry), on any node."""


class IRouteStore(Interface):
    """Where each online user is connected (uid -> node) and who is online.

    A user is online while any of its devices is; all its devices are on one node (the
    ring places users), so a route names that node."""

    def mark_online(record: SessionRecord) -> Deferred[None]:
        """The session's connection finished its handshake on record.node_id."""

    def mark_offline(record: SessionRecord) -> Deferred[None]:
        """The session's connection closed; a no-op if a newer one of the device took
        over. The user stays online while another of its devices is."""

    def route(user: str) -> Deferred[str | None]:
        """The node id the user is connected to, or None when offline."""

    def routes(users: list[str]) -> Deferred[dict[str, str]]:
        """The node id of each online user among users (offline ones are left out)."""

    def online_devices(users: list[str]) -> Deferred[dict[str, list[str]]]:
        """The devices online of each online user among users, sorted."""

    def online_users(offset: int, limit: int) -> Deferred[tuple[int, list[str]]]:
        """(total online, a page of user names sorted by name)."""

    def online_count_by_node() -> Deferred[dict[str, int]]:
        """Online users per node id."""

    def refresh_sessions(node_id: str, records: list[SessionRecord]) -> Deferred[None]:
        """The node's connected sessions are alive: extend their routes' TTL.

        Also rewrites sessions, routes and online entries the backend lost (a Redis
        restart), so connected users stay reachable without reconnecting. A record
        whose session turns out to be over is not brought back: the session-ended
        listeners are told instead, so the node drops the connection.
        """


class IReceiptStore(Interface):
    """What the node answered for each sender message, within the dedup window."""

    def remember_message(
        sender: str, device: str, client_seq: int, msg_id: int, sent_at_ms: int
    ) -> Deferred[MessageReceipt | None]:
        """Atomically claim (sender, device, client_seq) for msg_id.

        None: the first time; the caller delivers. A receipt: a retry of a message
        already taken; the caller answers with the receipt's id (and outcome, once
        known) and does not deliver again. Kept for the dedup window, on every node.
        """

    def record_outcome(
        sender: str, device: str, client_seq: int, status: int, reason: str
    ) -> Deferred[None]:
        """The final outcome of a remembered message, for answering later retries."""


class IImmediateReceipts(Interface):
    """A receipt store that answers in this process (the memory store), offering the
    claim without a Deferred: the message path takes every msg:R through it, and a
    fired Deferred there costs a callback chain per message for nothing."""

    def remember_message_now(
        sender: str, device: str, client_seq: int, msg_id: int, sent_at_ms: int
    ) -> MessageReceipt | None:
        """``IReceiptStore.remember_message``'s answer, returned at once."""

    def record_outcome_now(
        sender: str, device: str, client_seq: int, status: int, reason: str
    ) -> None:
        """``IReceiptStore.record_outcome``, done at once (every ack:N records one)."""


class ISequenceStore(Interface):
    """Numbers shared by every node: node numbers for message ids. (Messages are
    numbered in their conversation's timeline, in the database: cim.history.timeline.)"""

    def node_number(node_id: str) -> Deferred[int]:
        """This node's number for message ids (0-1023), the same for the same id and
        unique among the nodes sharing this store."""


class IStateBackend(Interface):
    """The state backend as the daemon holds it: four facets, started and stopped together.

    A room depends on the facet it uses (``state.presence.route(user)``), not on the
    whole backend. The facets of one backend share their data (a session's route goes
    when the session ends), which is why they come, start and stop as one.
    """

    sessions: ISessionStore = Attribute("ISessionStore: logins")
    presence: IRouteStore = Attribute("IRouteStore: routes (uid -> node) and who is online")
    receipts: IReceiptStore = Attribute("IReceiptStore: answers to sender messages, for retries")
    sequences: ISequenceStore = Attribute("ISequenceStore: node numbers")

    def start() -> Deferred[None]:
        """Connect and begin housekeeping; fails with StateUnavailable when the backend
        cannot be reached at start (once started, it survives outages)."""

    def stop() -> Deferred[None]:
        """End housekeeping and disconnect."""


class INodeRegistry(Interface):
    """Which IM nodes are alive."""

    local_node = Attribute("NodeInfo of this process's IM node, or None before it listens.")
    accepting = Attribute(
        "True while this node's registration is live; while False (the registry session "
        "was lost) the node takes no new logins."
    )

    def start() -> Deferred[None]:
        """Connect and learn the live nodes."""

    def stop() -> Deferred[None]:
        """Disconnect (which also withdraws this node)."""

    def register(node: NodeInfo) -> Deferred[None]:
        """Announce this node; fails if the id is already live elsewhere."""

    def unregister() -> Deferred[None]:
        """Withdraw this node (clean shutdown)."""

    def live_nodes() -> list[NodeInfo]:
        """The current view, answered from memory without I/O."""

    def add_listener(listener: Callable[[list[NodeInfo]], None]) -> None:
        """Called on the reactor thread with the new view whenever it changes."""


class BusUnavailable(Exception):
    """The bus did not take a message (broker down, or no confirm in time)."""


BusConsumer = Callable[[bytes], "Deferred[None] | None"]
"""Receives one message; the bus acknowledges it when the result fires (or at once)."""


class IMessageBus(Interface):
    """Node-to-node delivery: each node consumes its own queue, keyed by node id."""

    def start() -> Deferred[None]:
        """Connect; fails (BusUnavailable) if the broker cannot be reached at start."""

    def stop() -> Deferred[None]:
        """Stop consuming and disconnect."""

    def publish(node_id: str, payload: bytes) -> Deferred[None]:
        """Queue payload for node_id; fires once the bus holds it durably.

        Fails with BusUnavailable when the broker is unreachable or does not confirm
        within the configured time: the caller then treats the message as not
        forwarded (never as silently sent).
        """

    def consume(node_id: str, consumer: BusConsumer) -> None:
        """Deliver the messages queued for node_id to consumer, surviving reconnects.

        A message is acknowledged to the broker only after consumer's Deferred
        fires; if it fails or the node dies first, the broker delivers it again.
        """
