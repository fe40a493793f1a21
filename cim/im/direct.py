"""msg:R and ack:R: the design's six packets, and the claim every client message takes.

msg:R from the sender is answered with msg:A once the message is durable in its
conversation's timeline (``cim.history.timeline``: it carries the conversation and the
seq); then msg:N goes to the receiver (``cim.im.routing``); the receiver's ack:R is
answered with ack:A, moves the device's cursor, and the sender is told with ack:N. A
timeline that cannot take the message: ERROR ``UNAVAILABLE`` with ``retry_after_ms``,
never msg:A.

Every msg:R, 1:1 or group, is first checked, stamped with the connection's user and a
server id, and claimed in the state store under (sender, device, client sequence), so
a retry, even one arriving on another node or after a restart, gets the same msg:A
and is not delivered as a second message. A message naming a file is taken only if
its sender may read the file, and the share is recorded first (``cim.im.shares``).
A group post is then handed to ``cim.im.groups``; a 1:1 message is routed.

Before any of that, the limits (``cim.limits.messages``: the sender's rate, the
group's, the fan-out backlog, the archive) may refuse it: ERROR ``RATE_LIMITED`` or
``UNAVAILABLE`` with ``retry_after_ms``; such a message was never taken.

Before its claim a 1:1 message needs the receiver's consent (docs/privacy.md: its
policy, its blocks, a device's guardians), asked of the directory's contact rules.
A refusal and a receiver without an account get one answer, ERROR ``FORBIDDEN``
with ``REASON_NOT_ACCEPTED``, after one path: the same remembered answer or the same
single read, so neither the answer nor its timing tells whether the name exists.
"""

from __future__ import annotations

from functools import partial
from typing import Any, TypeGuard

from twisted.internet.defer import fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.content import MediaUrls, control_characters_in
from cim.history.timeline import TimelineUnavailable
from cim.im.collaborators import (
    ClientSession,
    Directory,
    FrameTable,
    NodeCore,
    Stores,
    log_failure,
)
from cim.im.groups import GroupMessages
from cim.im.routing import Routing
from cim.interfaces import IImmediateReceipts, MessageReceipt, StateUnavailable
from cim.limits.messages import MessageGate
from cim.message_ids import MessageIdGenerator
from cim.protocols import cim_pb2
from cim.protocols.held_writes import Later, no_read
from cim.storage.timeline import Appended

__all__ = ["MAX_TEXT_LENGTH", "REASON_NOT_ACCEPTED", "DirectMessages", "message_problem"]

MSG_A = cim_pb2.MSG_A
ACK_A = cim_pb2.ACK_A
ERROR = cim_pb2.ERROR
FAILED = cim_pb2.FAILED
SYSTEM = cim_pb2.SYSTEM
BAD_REQUEST = cim_pb2.Error.BAD_REQUEST
UNAVAILABLE = cim_pb2.Error.UNAVAILABLE
FORBIDDEN = cim_pb2.Error.FORBIDDEN

REASON_NOT_ACCEPTED = (
    "not accepted: the receiver does not exist or does not accept messages from you"
)

UNAVAILABLE_RETRY_MS = 500
"""How soon a sender refused for a store that cannot take messages sends again."""

MAX_TEXT_LENGTH = 16384
"""The default of ``[im] max_text_length``."""

_MEDIA_TYPES = frozenset((cim_pb2.IMAGE, cim_pb2.VOICE, cim_pb2.FILE))


def message_problem(
    message: cim_pb2.Message, media_urls: MediaUrls, max_text_length: int = MAX_TEXT_LENGTH
) -> str | None:
    """Why a client's msg:R is refused, or None when it is acceptable.

    Whatever a receiver will show or open is checked here, once, for everyone: text
    without control characters but newline and tab and at most ``[im] max_text_length``
    characters, media URLs that are https or this node's file service's (cim.content).
    """
    if message.group and message.to:
        return "a message goes to a user ('to') or a group ('group'), not both"
    if not message.to and not message.group:
        return "a message needs a receiver ('to') or a group ('group')"
    if message.type == SYSTEM:
        return "system messages come from the server only"
    if message.change or message.replaces or message.replaces_seq:
        return "a recall or an edit is asked with CHANGE_R, not sent as a message"
    if message.recalled or message.edited or message.changed_at_ms or message.changed_by:
        return "recalled, edited and changed_* are set by the node only"
    if len(message.text) > max_text_length:
        return f"a message text holds at most {max_text_length} characters"
    has_media = message.HasField("media")
    if message.type in _MEDIA_TYPES and not (has_media and message.media.url):
        return "an image, voice or file message needs media.url"
    has_location = message.HasField("location")
    if message.type == cim_pb2.LOCATION and not has_location:
        return "a location message needs location"
    if control_characters_in(message.text):
        return _CONTROL_CHARACTERS.format(field="text")
    # Most messages are text: media and location are read only when they are there.
    if has_media:
        media = message.media
        for field, value in (
            ("media.name", media.name),
            ("media.mime", media.mime),
            ("media.file_id", media.file_id),
        ):
            if control_characters_in(value):
                return _CONTROL_CHARACTERS.format(field=field)
        for field, value in (
            ("media.url", media.url),
            ("media.thumbnail_url", media.thumbnail_url),
        ):
            if value and not media_urls.accepts(value):
                return f"{field} must be an https URL, or one of this node's file service"
    if has_location and control_characters_in(message.location.name):
        return _CONTROL_CHARACTERS.format(field="location.name")
    return None


_CONTROL_CHARACTERS = "{field} may not contain control characters (newline and tab are fine)"


def _settled(receipt: MessageReceipt | None) -> TypeGuard[MessageReceipt]:
    """The claim found a retry whose outcome is known: answered again, not routed. A
    FAILED one is routed again (a user's resend), under the same id."""
    return receipt is not None and bool(receipt.status) and receipt.status != FAILED


class DirectMessages:
    """Takes msg:R (claims it, answers msg:A and retries) and ack:R."""

    log = Logger()

    def __init__(
        self,
        core: NodeCore,
        directory: Directory,
        routing: Routing,
        groups: GroupMessages,
        stores: Stores,
        gate: MessageGate,
        max_text_length: int = MAX_TEXT_LENGTH,
    ) -> None:
        self._ids = core.message_ids
        self._media_urls = core.media_urls
        self._receipts = core.state.receipts
        self._remember_now = (
            self._receipts.remember_message_now
            if IImmediateReceipts.providedBy(self._receipts)
            else None
        )
        """The claim without a Deferred, from a store in this process."""
        self._metrics = core.metrics
        self._directory = directory
        self._routing = routing
        self._groups = groups
        self._gate = gate
        self._max_text_length = max_text_length
        self._stores = stores
        # Bound once: every message's append answers through these two, and a bound
        # method made per message is one more object for each garbage collection to
        # walk while the message waits for its journal write.
        self._answer_appended = self._appended
        self._answer_failed = self._append_failed
        self.after_live_copies: Later = no_read
        """Runs work once the live copies the read under way made have left, or says
        no read is under way (``HeldWrites.after_flush``): a 1:1 sender's msg:A."""
        self._answers_waiting: set[str] = set()
        """Conversations with a msg:A waiting for the read's frames to leave."""

    def frame_table(self) -> FrameTable:
        return {
            cim_pb2.MSG_R: (cim_pb2.Message, self.message_received),
            cim_pb2.ACK_R: (cim_pb2.AckR, self.ack_received),
        }

    # --- msg:R ------------------------------------------------------------------------

    def message_received(self, session: ClientSession, message: cim_pb2.Message) -> None:
        """msg:R. The sender is the connection's user, whatever the frame claims."""
        problem = message_problem(message, self._media_urls, self._max_text_length)
        if problem is not None:
            self._refuse(session, message.client_seq, BAD_REQUEST, problem)
            return
        record = session.record
        refusal = self._gate.check(record.user, record.device, message)
        if refusal is not None:
            self._metrics.messages["rate_limited"] += 1
            session.deliver(ERROR, refusal.error(message.client_seq))
            return
        msg_id = self._ids.next_id()
        sent_at_ms = MessageIdGenerator.timestamp_ms(msg_id)
        message.id = msg_id
        setattr(message, "from", record.user)
        message.device = record.device
        message.sent_at_ms = sent_at_ms
        if message.group:
            d = self._groups.may_post(message.group, record.user)
            d.addCallback(self._claim, session, message)
        else:
            d = self._consented(session, message)
        if d is not None:  # None: taken at once, answered through the timeline's call
            d.addErrback(self._claim_failed, session, message.client_seq)

    # --- consent (docs/privacy.md) ------------------------------------------------------

    def _consented(self, session: ClientSession, message: cim_pb2.Message) -> Any:
        """Claim a 1:1 message only if its receiver accepts it from the sender.

        The hot path: a remembered answer adds no Deferred. A refusal and a receiver
        without an account take the same path to the same answer.
        """
        contacts = self._directory.contacts
        sender = session.record.user
        allowed = contacts.known(sender, message.to)
        if allowed is None:
            return contacts.may_message(sender, message.to).addCallback(
                self._decided, session, message
            )
        if allowed:
            return self._claim(True, session, message)
        return self._decided(False, session, message)

    def _decided(self, allowed: bool, session: ClientSession, message: cim_pb2.Message) -> Any:
        if not allowed:
            self._refuse(session, message.client_seq, FORBIDDEN, REASON_NOT_ACCEPTED)
            return succeed(None)
        return self._claim(True, session, message)

    def _claim(self, member: bool, session: ClientSession, message: cim_pb2.Message) -> Any:
        if not member:
            self._refuse(
                session, message.client_seq, BAD_REQUEST, "only members can post to a group"
            )
            return succeed(None)
        if message.HasField("media"):
            d = self._stores.file_shares.share(session.record.user, message)
            d.addCallback(self._shared, session, message)
            return d
        return self._remember(session, message)

    def _shared(self, readable: bool, session: ClientSession, message: cim_pb2.Message) -> Any:
        """The files it names are shared now, or the sender may not send one of them."""
        if not readable:
            self._refuse(
                session,
                message.client_seq,
                BAD_REQUEST,
                "media names a file you may not send: upload it (or prove you have it) first",
            )
            return succeed(None)
        return self._remember(session, message)

    def _remember(self, session: ClientSession, message: cim_pb2.Message) -> Any:
        record = session.record
        if self._remember_now is not None:
            try:
                receipt = self._remember_now(
                    record.user, record.device, message.client_seq, message.id, message.sent_at_ms
                )
            except Exception:
                return fail()
            return self._claimed(receipt, session, message)
        d = self._receipts.remember_message(
            record.user, record.device, message.client_seq, message.id, message.sent_at_ms
        )
        d.addCallback(self._claimed, session, message)
        return d

    def _claimed(
        self, receipt: MessageReceipt | None, session: ClientSession, message: cim_pb2.Message
    ) -> Any:
        if receipt is not None:
            # A retry: the same id as the first time, and never a second message.
            message.id = receipt.msg_id
            message.sent_at_ms = receipt.sent_at_ms
        # Durable before promised: msg:A (and any ack:N) only once the timeline has it.
        # A retry is found again there (by id or client sequence), never appended twice.
        self._stores.timeline.append_then(
            message,
            session.record.device,
            self._answer_appended,
            self._answer_failed,
            receipt,
            session,
            message,
        )
        return None

    def _append_failed(
        self,
        failure: Failure,
        receipt: MessageReceipt | None,
        session: ClientSession,
        message: cim_pb2.Message,
    ) -> None:
        self._claim_failed(failure, session, message.client_seq)

    def _appended(
        self,
        appended: Appended,
        receipt: MessageReceipt | None,
        session: ClientSession,
        message: cim_pb2.Message,
    ) -> None:
        message.id = appended.msg_id
        message.conversation = appended.conversation
        message.seq = appended.seq
        if message.group:
            message.group_seq = appended.seq
        else:
            # (A receipt is nearly always None: a first send, not a retry.)
            live = (receipt is None or not _settled(receipt)) and self._routing.route_live_here(
                message, session.record.device
            )
            # The live copy to a receiver connected here (first time, or a retry still
            # open) went at once; the sender's msg:A waits until it has left (the read's
            # frames), so the copy never waits for the answer. So does everything after
            # an answer that waits in the same conversation: its msg:A, its outcome or
            # its way on, so the sender's frames of a conversation keep their order.
            conversation = message.conversation
            if live or conversation in self._answers_waiting:
                answer = partial(self._answer_later, receipt, session, message, live)
                if self.after_live_copies(answer):
                    self._answers_waiting.add(conversation)
                    return
                answer()
                return
        self._answer(receipt, session, message, False)

    def _answer_later(
        self,
        receipt: MessageReceipt | None,
        session: ClientSession,
        message: cim_pb2.Message,
        routed: bool,
    ) -> None:
        self._answers_waiting.discard(message.conversation)
        self._answer(receipt, session, message, routed)

    def _answer(
        self,
        receipt: MessageReceipt | None,
        session: ClientSession,
        message: cim_pb2.Message,
        routed: bool,
    ) -> None:
        """msg:A, then a settled retry's outcome again, or the message's way on (a
        group's fan-out, a 1:1 message's route unless its live copy went already)."""
        # msg:A: the message is in its timeline, at ``seq``.
        session.deliver(
            MSG_A,
            cim_pb2.MsgA(
                client_seq=message.client_seq,
                msg_id=message.id,
                sent_at_ms=message.sent_at_ms,
                conversation=message.conversation,
                seq=message.seq,
            ),
        )
        if receipt is not None and _settled(receipt):
            # The retry gets the same outcome again; nothing is delivered again.
            self._routing.tell_sender(
                session.record.user,
                session.record.device,
                cim_pb2.AckN(
                    msg_id=message.id,
                    client_seq=message.client_seq,
                    status=receipt.status,  # type: ignore[arg-type]
                    reason=receipt.reason,
                    to=message.to or message.group,
                ),
            )
            return
        if message.group:
            # Accepted, then live copies to the members online; the rest catch up.
            self._groups.accepted(session, message)
            return
        # First time, or a retry whose outcome is still open (the node that held it may
        # have died): a live copy (again), unless it went already. The receiver drops a
        # duplicate by seq.
        if not routed:
            self._routing.route(message, session.record.device)

    def _claim_failed(self, failure: Failure, session: ClientSession, client_seq: int) -> None:
        if failure.check(StateUnavailable, TimelineUnavailable):
            self._refuse(
                session,
                client_seq,
                UNAVAILABLE,
                "the node cannot take messages right now; retry",
                UNAVAILABLE_RETRY_MS,
            )
            return
        if failure.check(ValueError):
            self._refuse(session, client_seq, BAD_REQUEST, failure.getErrorMessage())
            return
        log_failure(failure, self.log, "take a message")
        self._refuse(session, client_seq, cim_pb2.Error.INTERNAL, "the node failed to take it")

    def _refuse(
        self, session: ClientSession, client_seq: int, code: Any, text: str, retry_ms: int = 0
    ) -> None:
        session.deliver(
            ERROR,
            cim_pb2.Error(
                code=code,
                message=text,
                request_type=cim_pb2.MSG_R,
                client_seq=client_seq,
                retry_after_ms=retry_ms,
            ),
        )

    # --- ack:R ------------------------------------------------------------------------

    def ack_received(self, session: ClientSession, ack: cim_pb2.AckR) -> None:
        """ack:R, cumulative per conversation: ``conversation`` + ``through_seq`` say
        this device has every message there up to ``through_seq`` (its cursor moves,
        batched, never back), so one ack:R stands for all of them; ``msg_id`` names one
        message (0: none). Only the receiver can acknowledge a 1:1 message (any of its
        devices: the first settles it, and settles every earlier one of the same
        conversation that device holds). Answered with one ack:A."""
        session.deliver(ACK_A, cim_pb2.AckA(msg_id=ack.msg_id))
        record = session.record
        self._routing.acknowledged(
            record.user, record.device, ack.msg_id, ack.conversation, ack.through_seq
        )
        if ack.through_seq and ack.conversation:
            self._stores.timeline.move_cursor(
                record.user, record.device, ack.conversation, ack.through_seq
            )
