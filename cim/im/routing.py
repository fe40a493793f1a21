"""How a taken message's live copy travels: to a receiver here or over the bus to its
node; and how its sender hears the outcome, wherever the sender is.

Every message routed here is already durable in its conversation's timeline (the
receiver reads it from its cursor at its next catch-up), so a live copy is best
effort. Every device of a receiver connected here gets msg:N at once, and the message
waits here until the first ack:R of any of them (a pending ack): the sender then hears
"delivered", once. The sender's other devices here get the same msg:N (same id), so
each device of a user shows what it sent from another. A receiver
connected to another node is reached over the bus (its route says which node); its ack
comes back the same way to whichever node the sender is on. A receiver nowhere, a node
that cannot be reached, a receiver that leaves holding the message or never
acknowledges it: the sender hears "stored" (design: 伪造ack:N), and a receiver
connected somewhere is told to pull (OFFLINE_NOTICE).

Other nodes talk to this one through ``bus_message_received``: live copies for users
connected here, "pull" notices, and outcomes for senders connected here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.im.catchup import Catchup
from cim.im.collaborators import (
    ClientSession,
    Connected,
    Directory,
    NodeCore,
    in_background,
    log_failure,
)
from cim.im.peers import Peers
from cim.interfaces import BusUnavailable, IImmediateReceipts, StateUnavailable
from cim.message_ids import MessageIdGenerator
from cim.protocols import cim_pb2
from cim.protocols.held_writes import Later, no_read
from cim.protocols.wire import encode_frame

__all__ = [
    "PENDING_TIMEOUT",
    "REASON_FORWARD_FAILED",
    "REASON_NODE_GONE",
    "REASON_NO_SUCH_USER",
    "Routing",
]

MSG_N = cim_pb2.MSG_N
ACK_N = cim_pb2.ACK_N
DELIVERED = cim_pb2.DELIVERED
STORED = cim_pb2.STORED
FAILED = cim_pb2.FAILED

REASON_NO_SUCH_USER = "no such user"
REASON_FORWARD_FAILED = "the receiver's node could not be reached"
REASON_NODE_GONE = "the receiver's node is gone"

PENDING_TIMEOUT = 30.0
"""A receiver that holds a msg:N this long without ack:R: the sender hears "stored"
(the message is in the timeline and the receiver catches up from its cursor), so a
client that never acks cannot grow the node, and a receiver's library holding a
message (a gap being filled, a catch-up retried under load) never keeps its sender
waiting until the sender's own library gives up at 160 s."""


@dataclass(slots=True)
class _Pending:
    """A 1:1 msg:N sent here and not yet acknowledged by its receiver."""

    sender: str
    sender_device: str
    client_seq: int
    receiver: str
    message: cim_pb2.Message
    deadline: float
    devices: set[str]
    """The receiver's devices holding it unacknowledged: the first ack settles it."""


class Routing:
    """Routes 1:1 messages, holds their pending acks, tells senders, reads the bus."""

    log = Logger()

    def __init__(
        self,
        core: NodeCore,
        directory: Directory,
        peers: Peers,
        connected: Connected,
        catchup: Catchup,
    ) -> None:
        self._node_id = core.node_id
        self._clock = core.clock
        self._metrics = core.metrics
        self._receipts = core.state.receipts
        self._record_now = (
            self._receipts.record_outcome_now
            if IImmediateReceipts.providedBy(self._receipts)
            else None
        )
        """Outcomes recorded without a Deferred, in a store in this process."""
        self._directory = directory
        self._peers = peers
        self._connected = connected
        self._catchup = catchup
        # (msg_id, receiver) -> who to tell when a device of the receiver acknowledges.
        self._pending: dict[tuple[int, str], _Pending] = {}
        # (receiver, device) -> the msg ids the device holds unacknowledged, to hand
        # them to its next connection or settle them when the last device leaves.
        self._pending_by_device: dict[tuple[str, str], set[int]] = {}
        self.after_live_copies: Later = no_read
        """Runs work once the live copies the read under way made have left, or says
        no read is under way (``HeldWrites.after_flush``): what their acks need."""
        self.bus_bodies: dict[str, Callable[[Any], None]] = {}
        """Other rooms' envelope bodies (BusEnvelope's oneof name -> receiver of the
        body): live notices that are not messages, such as typing and read notices."""

    # --- one-to-one routing -----------------------------------------------------------

    def route(self, message: cim_pb2.Message, sender_device: str) -> None:
        """A taken 1:1 message to its receiver, wherever that is, and to the sender's
        other devices here."""
        if self.route_live_here(message, sender_device):
            return
        self.copy_to_own_devices(message, sender_device)
        receiver = message.to
        if receiver in self._connected:
            self._deliver_here(message, sender_device, receiver)
            return
        d = self._peers.node_of(receiver)
        d.addCallback(self._routed, message, sender_device)
        d.addErrback(self._forward_failed, message, sender_device)

    def route_live_here(self, message: cim_pb2.Message, sender_device: str) -> bool:
        """``route``, when routing it tells the sender nothing: the receiver is
        connected here and one of its devices takes the live copy (or holds it
        already). False, with nothing done, otherwise (``route`` then may answer the
        sender: ack:N stored or failed).

        So the sender's msg:A can follow the receiver's msg:N: the frames of a read
        leave in the order their connections were first written to, and the live copy
        need not wait for the sender's answer to be built, sealed and sent. A note to
        oneself is left to ``route``: the sending device is a receiver there, and its
        msg:A comes before the copy.
        """
        receiver = message.to
        if receiver not in self._connected or receiver == getattr(message, "from"):
            return False
        return self._live_copy(message, sender_device, receiver, own_devices=True)

    def _routed(self, node: str | None, message: cim_pb2.Message, sender_device: str) -> Any:
        if node is None or node == self._node_id:
            self._receiver_not_here(message, sender_device)
            return None
        if not self._peers.is_alive(node):
            # Its node died and the route has not expired yet: the receiver is not
            # reachable until it logs in again elsewhere; it finds the message then.
            self._left_for_catchup(message, sender_device)
            return None
        return self.forward(node, message, [message.to], sender_device)

    def forward(
        self, node: str, message: cim_pb2.Message, receivers: list[str], sender_device: str
    ) -> Deferred[None]:
        """The message to ``receivers`` connected to ``node``, over the bus."""
        envelope = cim_pb2.BusEnvelope(
            origin_node=self._node_id,
            deliver=cim_pb2.BusDelivery(
                message=message, receivers=receivers, sender_device=sender_device
            ),
        )
        self._metrics.messages["forwarded"] += 1
        return self._peers.publish(node, envelope)

    def _forward_failed(
        self, failure: Failure, message: cim_pb2.Message, sender_device: str
    ) -> None:
        if not failure.check(BusUnavailable, StateUnavailable):
            log_failure(failure, self.log, "forward a message")
        self.log.warn(
            "could not forward message {id} to {to}: {why}",
            id=message.id,
            to=message.to,
            why=failure.getErrorMessage(),
        )
        self._left_for_catchup(message, sender_device)

    def copy_to_own_devices(self, message: cim_pb2.Message, sender_device: str) -> None:
        """The sender's other devices here get what it sent from ``sender_device`` (the
        same msg:N, same id: a client drops a copy it has). Best effort, as every live
        copy: a device behind or offline reads it from its cursor."""
        sender = getattr(message, "from")
        if message.to == sender:
            return  # a note to self: its receiver's copies are these
        for session in self._connected.other_devices(sender, sender_device):
            if session.may_take_live_copy():
                session.deliver(MSG_N, message)

    def _deliver_here(self, message: cim_pb2.Message, sender_device: str, receiver: str) -> None:
        if not self._live_copy(message, sender_device, receiver):
            self._left_for_catchup(message, sender_device)

    def _live_copy(
        self,
        message: cim_pb2.Message,
        sender_device: str,
        receiver: str,
        own_devices: bool = False,
    ) -> bool:
        """msg:N to each of the receiver's devices here that takes a live copy; its
        ack:R (any device's) settles the message. True too for a retry the receiver
        still holds unacknowledged here (nothing is sent again); False when no device
        takes it: the live-copy decision (cim.protocols.outbound.OutboundBudget) sends a
        device too far behind on reading to the pull it is told to make once its queue
        drains, and the message is in its timeline already. ``own_devices``: then the
        sender's other devices here get it too (``copy_to_own_devices``).

        What the ack:R will need is recorded once the read's frames have left (no ack
        can arrive before the read ends), so the copy does not wait for it. A retry in
        the same read as its first copy is sent again (the receiver drops it by seq).
        """
        key = (message.id, receiver)
        if key in self._pending:
            if own_devices:
                self.copy_to_own_devices(message, sender_device)
            return True
        taking = [s for s in self._connected.devices_of(receiver) if s.may_take_live_copy()]
        if not taking:
            return False
        for session in taking:
            session.deliver(MSG_N, message)
        held = partial(self._held_by, key, message, sender_device, taking, own_devices)
        if not self.after_live_copies(held):
            held()
        return True

    def _held_by(
        self,
        key: tuple[int, str],
        message: cim_pb2.Message,
        sender_device: str,
        taking: list[ClientSession],
        own_devices: bool,
    ) -> None:
        """The live copy ``key`` is held unacknowledged by the devices ``taking``."""
        receiver = key[1]
        devices: set[str] = set()
        self._pending[key] = _Pending(
            getattr(message, "from"),
            sender_device,
            message.client_seq,
            receiver,
            message,
            self._clock.seconds() + PENDING_TIMEOUT,
            devices,
        )
        by_device = self._pending_by_device
        for session in taking:
            device = session.record.device
            devices.add(device)
            held = by_device.get((receiver, device))
            if held is None:
                by_device[(receiver, device)] = {message.id}
            else:
                held.add(message.id)
        if own_devices:
            self.copy_to_own_devices(message, sender_device)

    def _receiver_not_here(self, message: cim_pb2.Message, sender_device: str) -> None:
        if self._directory.contacts.account_known(getattr(message, "from"), message.to):
            # The consent decision that let it in read the receiver's account (at most
            # the decision's TTL ago, dropped when the account changes on this node):
            # no second read per message for a receiver who is offline.
            self._left_for_catchup(message, sender_device)
            return

        def decided(exists: bool) -> None:
            if not exists:
                self._settle(message, sender_device, FAILED, REASON_NO_SUCH_USER)
            else:
                self._left_for_catchup(message, sender_device)

        def unknown(failure: Failure) -> None:
            # The account lookup failed: the receiver is not here either way.
            log_failure(failure, self.log, "look up the receiver")
            decided(True)

        d = self._directory.user_exists(message.to)
        d.addCallbacks(decided, unknown)

    def _left_for_catchup(self, message: cim_pb2.Message, sender_device: str) -> None:
        """No live copy reached the receiver: the message waits in its timeline, the
        sender hears "stored" (design: 伪造ack:N), and a receiver connected anywhere
        (it moved while the copy travelled) is told to pull."""
        self._settle(message, sender_device, STORED, "")
        self._catchup.stored_for([message.to], message.conversation, message.seq)

    def _settle(
        self, message: cim_pb2.Message, sender_device: str, status: Any, reason: str
    ) -> None:
        """A 1:1 message's final outcome: remember it and tell the sender."""
        outcome = {DELIVERED: "delivered", STORED: "stored"}.get(status, "failed")
        self._metrics.messages[outcome] += 1
        self.tell_sender(
            getattr(message, "from"),
            sender_device,
            cim_pb2.AckN(
                msg_id=message.id,
                client_seq=message.client_seq,
                status=status,
                reason=reason,
                to=message.to,
            ),
        )

    # --- the sender -------------------------------------------------------------------

    def tell_sender(self, sender: str, sender_device: str, ack: cim_pb2.AckN) -> None:
        """Record the outcome for retries, then reach the sender wherever it is."""
        if self._record_now is not None:
            self._record_now(sender, sender_device, ack.client_seq, ack.status, ack.reason)
        else:
            in_background(
                self._receipts.record_outcome(
                    sender, sender_device, ack.client_seq, ack.status, ack.reason
                ),
                self.log,
                "record an outcome",
            )
        session = self._connected.session_of(sender, sender_device)
        if session is not None:
            session.deliver(ACK_N, ack)
            return
        if sender in self._connected:
            return  # its user is here, that device is not: its retry reads the outcome
        envelope = cim_pb2.BusEnvelope(
            origin_node=self._node_id,
            outcome=cim_pb2.BusOutcome(sender=sender, sender_device=sender_device, ack=ack),
        )

        def routed(node: str | None) -> Any:
            if node is None or node == self._node_id:
                return None  # offline: a retry finds the outcome in the state store
            return self._peers.publish(node, envelope)

        d = self._peers.node_of(sender)
        d.addCallback(routed)
        # Not reaching the sender is not fatal: its retry reads the recorded outcome.
        d.addErrback(lambda failure: failure.trap(BusUnavailable, StateUnavailable))
        in_background(d, self.log, "tell a sender on another node")

    # --- pending acks -----------------------------------------------------------------

    def acknowledged(
        self, receiver: str, device: str, msg_id: int, conversation: str, through_seq: int
    ) -> None:
        """ack:R from a device of the receiver: the msg:N ``msg_id`` held here, and,
        the ack being cumulative, every one this device holds in ``conversation`` up to
        ``through_seq``: each one's sender hears "delivered" (once: the other devices'
        acks only move their cursors).

        Anything else (a group message, a duplicate ack, a copy of the user's own
        message, someone else's message) is ignored.
        """
        self._settle_delivered(receiver, msg_id)
        if not (conversation and through_seq):
            return
        held = self._pending_by_device.get((receiver, device))
        if not held:
            return
        covered = []
        for held_id in held:
            pending = self._pending.get((held_id, receiver))
            if (
                pending is not None
                and pending.message.conversation == conversation
                and pending.message.seq <= through_seq
            ):
                covered.append(held_id)
        for held_id in sorted(covered):
            self._settle_delivered(receiver, held_id)

    def _settle_delivered(self, receiver: str, msg_id: int) -> None:
        pending = self._pending.pop((msg_id, receiver), None)
        if pending is None:
            return
        for device in pending.devices:
            self._forget_pending(receiver, device, msg_id)
        self._metrics.messages["delivered"] += 1
        self._metrics.delivery_latency.observe(
            self._clock.seconds() - MessageIdGenerator.timestamp_ms(msg_id) / 1000
        )
        self.tell_sender(
            pending.sender,
            pending.sender_device,
            cim_pb2.AckN(
                msg_id=msg_id, client_seq=pending.client_seq, status=DELIVERED, to=receiver
            ),
        )

    def hand_over(self, receiver: str, device: str, session: ClientSession) -> None:
        """What the device's old connection held unacknowledged goes to its new one at
        once (the client drops what it already showed)."""
        for msg_id in sorted(self._pending_by_device.get((receiver, device), ())):
            pending = self._pending.get((msg_id, receiver))
            if pending is not None:
                session.deliver(MSG_N, pending.message)

    def receiver_left(self, receiver: str, device: str) -> None:
        """A device left holding unacknowledged messages: they wait past its cursor for
        its next catch-up (it drops any it did show). A message no other device of the
        receiver holds now is settled: its sender hears "stored", and if the receiver
        is connected to another node already (it moved), it is told to pull."""
        newest: cim_pb2.Message | None = None
        for msg_id in sorted(self._pending_by_device.pop((receiver, device), ())):
            key = (msg_id, receiver)
            pending = self._pending.get(key)
            if pending is None:
                continue
            pending.devices.discard(device)
            if not pending.devices:
                del self._pending[key]
                self._settle(pending.message, pending.sender_device, STORED, "")
                newest = pending.message
        if newest is not None:
            # It may have moved: connected to another node already, it pulls there.
            self._catchup.stored_for([receiver], newest.conversation, newest.seq)

    def expire_pending(self) -> int:
        """Settle every msg:N held unacknowledged past its deadline as "stored" (it is
        in the receiver's timeline, past its cursor); returns how many."""
        now = self._clock.seconds()
        expired = [key for key, pending in self._pending.items() if pending.deadline <= now]
        for msg_id, receiver in expired:
            pending = self._pending.pop((msg_id, receiver))
            for device in pending.devices:
                self._forget_pending(receiver, device, msg_id)
            self._settle(pending.message, pending.sender_device, STORED, "")
        return len(expired)

    def _forget_pending(self, receiver: str, device: str, msg_id: int) -> None:
        key = (receiver, device)
        waiting = self._pending_by_device.get(key)
        if waiting is not None:
            waiting.discard(msg_id)
            if not waiting:
                del self._pending_by_device[key]

    # --- the bus: other nodes talking to this one -------------------------------------

    def bus_message_received(self, payload: bytes) -> None:
        envelope = cim_pb2.BusEnvelope.FromString(payload)
        kind = envelope.WhichOneof("body")
        if kind == "deliver":
            self._delivery_from_bus(envelope.deliver)
        elif kind == "stored":
            stored = envelope.stored
            self._catchup.notify_stored(list(stored.receivers), stored.conversation, stored.seq)
        elif kind == "outcome":
            outcome = envelope.outcome
            session = self._connected.session_of(outcome.sender, outcome.sender_device)
            if session is not None:
                session.deliver(ACK_N, outcome.ack)
        elif kind is not None and kind in self.bus_bodies:
            self.bus_bodies[kind](getattr(envelope, kind))

    def _delivery_from_bus(self, delivery: cim_pb2.BusDelivery) -> None:
        message = delivery.message
        if message.group or message.change:
            # A group post, or a change entry (cim.im.changes): copies held for no ack.
            moved: list[str] = []
            sender = getattr(message, "from")
            frame = encode_frame(MSG_N, message)  # serialized once, sealed per connection
            for member in delivery.receivers:
                sessions = self._connected.devices_of(member)
                if not sessions:
                    # It moved or left since the route was read: the copy is dropped
                    # (the member catches up from its cursor); if it is connected
                    # elsewhere now, it is told to pull.
                    self._metrics.messages["group_missed"] += 1
                    moved.append(member)
                for session in sessions:
                    if member == sender and session.record.device == message.device:
                        continue  # the post's own device has it (msg:A)
                    if session.may_take_live_copy():
                        session.deliver_encoded((frame,))
                        self._metrics.messages["group_delivered"] += 1
                    else:
                        # Too far behind on reading for a live copy: it is told to pull
                        # once its queue drains (the session owes it that notice).
                        self._metrics.messages["group_behind"] += 1
            if moved:
                self._catchup.stored_for(moved, message.conversation, message.seq)
            return
        for receiver in delivery.receivers:
            if receiver in self._connected:
                self._deliver_here(message, delivery.sender_device, receiver)
            else:
                # It moved or left since the sender's node looked up its route.
                self._left_for_catchup(message, delivery.sender_device)
