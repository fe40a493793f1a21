"""What the IM rooms are given, in three groups: the node's core, its directory of
people and groups, and the stores messages go to; and what they are handed per frame.

A node can run without groups, timelines or history (the tests do). Each missing one is a null
object with the same interface that answers the way a node without it must answer,
so no room asks whether a collaborator is there.

``Directory`` and ``Stores`` are shared by reference between the rooms, which read
their fields when they use them; swapping a store on the one object (a test that
gives the node real timelines) reaches every room at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from google.protobuf.message import Message as ProtobufMessage
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.content import MediaUrls
from cim.history.timeline import TimelineUnavailable
from cim.im.shares import FileShares, NoFileShares
from cim.interfaces import IStateBackend, SessionRecord
from cim.limits.policy import NoLimits, RateLimits
from cim.message_ids import MessageIdGenerator
from cim.metrics import NodeMetrics
from cim.protocols import cim_pb2
from cim.storage.changes import ChangeAsked, ChangeMade
from cim.storage.read_marks import Readers, ReadMark
from cim.storage.timeline import Appended, ConversationState, TimelinePage

__all__ = [
    "NO_BOUNDS",
    "Bounds",
    "ClientSession",
    "Connected",
    "ContactRules",
    "Directory",
    "FrameEntry",
    "FrameTable",
    "GroupMembership",
    "HistoryAnswers",
    "NoContacts",
    "NoGroups",
    "NoHistory",
    "NoReadMarks",
    "NoTimeline",
    "NodeCore",
    "ReadMarkStore",
    "Stores",
    "TimelineStore",
    "UserExists",
    "in_background",
    "log_failure",
]


# --- what the rooms are handed per frame ----------------------------------------------


class ClientSession(Protocol):
    """What a room needs from an authenticated connection (cim.protocols.im): one
    device of a user (``record.user``, ``record.device``)."""

    record: SessionRecord
    connected_at: float
    """Node time the handshake finished."""
    active_at: float
    """Node time of the client's last frame other than a heartbeat (or connected_at):
    past [im] max_devices_per_user, the device idle longest goes (kick_old)."""
    background: bool
    """The app said it is in the background (APP_STATE_R): it may not show what it
    gets, so push waits a grace for its ack before waking it (cim.push.grace)."""

    def deliver(self, frame_type: int, message: ProtobufMessage) -> None: ...

    def deliver_encoded(self, frames: Sequence[bytes]) -> None:
        """``deliver`` of frames encoded once for many receivers (a group's msg:N:
        cim.protocols.wire.encode_frame), sealed here for this connection only and
        written together, in order."""

    def may_take_live_copy(self) -> bool:
        """Whether a live msg:N may be sent now: False while the client is behind on
        reading (cim.protocols.outbound.OutboundBudget, the one decision). A copy
        refused is kept for the receiver's pull, as for a receiver offline."""

    def kick(self, reason: str) -> None: ...

    def going_away(self, reason: str, reconnect_after_ms: int) -> None: ...


class Connected:
    """Who is connected to this node: user -> {device: session}, the one mapping every
    room reads (``cim.im.sessions`` alone changes it).

    A user may be online on several devices at once (phone, tablet, web: up to
    ``[im] max_devices_per_user``), all on this node (the ring places users, not
    devices). A room that reaches "the user" reaches every device of it::

        for session in connected.devices_of(user):
            session.deliver(frame_type, message)

    ``user in connected`` says whether any device of the user is here.

    A user connected on one device (most users) maps to its session itself, not to a
    dict of one: a dict of one entry is about 0.2 KiB of every idle connection's
    memory (issue #20). From the second device on the user's entry is a dict
    {device: session} in the order they connected, and back to the bare session when
    one device is left (as the memory state store keeps its records).
    """

    __slots__ = ("_by_user", "_count")

    def __init__(self) -> None:
        self._by_user: dict[str, ClientSession | dict[str, ClientSession]] = {}
        self._count = 0

    def devices_of(self, user: str) -> list[ClientSession]:
        """The user's sessions here, one per device, in the order they connected
        ([] when none)."""
        entry = self._by_user.get(user)
        if entry is None:
            return []
        if isinstance(entry, dict):
            return list(entry.values())
        return [entry]

    def other_devices(self, user: str, device: str) -> Sequence[ClientSession]:
        """The user's sessions here but ``device``'s (what a sender's other devices get
        of what it sent): nothing to make when the user has only that one here."""
        entry = self._by_user.get(user)
        if entry is None:
            return ()
        if not isinstance(entry, dict):
            return () if entry.record.device == device else [entry]
        return [session for name, session in entry.items() if name != device]

    def devices_of_all(self, users: Iterable[str]) -> list[ClientSession]:
        """Every device here of each of ``users``, in their order (one list for a slice
        of a group's members, not one per member)."""
        by_user = self._by_user
        sessions: list[ClientSession] = []
        for user in users:
            entry = by_user.get(user)
            if entry is None:
                continue
            if isinstance(entry, dict):
                sessions.extend(entry.values())
            else:
                sessions.append(entry)
        return sessions

    def session_of(self, user: str, device: str) -> ClientSession | None:
        """One device's session here, or None."""
        entry = self._by_user.get(user)
        if entry is None:
            return None
        if isinstance(entry, dict):
            return entry.get(device)
        return entry if entry.record.device == device else None

    def __contains__(self, user: object) -> bool:
        return user in self._by_user

    def users(self) -> list[str]:
        """Users with at least one device here."""
        return list(self._by_user)

    def sessions(self) -> Iterator[ClientSession]:
        """Every session here (a copy: safe to kick while iterating)."""
        every: list[ClientSession] = []
        for entry in self._by_user.values():
            if isinstance(entry, dict):
                every.extend(entry.values())
            else:
                every.append(entry)
        return iter(every)

    @property
    def user_count(self) -> int:
        return len(self._by_user)

    def __len__(self) -> int:
        """Sessions (devices) here."""
        return self._count

    def add(self, session: ClientSession) -> ClientSession | None:
        """``session`` is its device's connection now; returns the one it replaced."""
        record = session.record
        by_user = self._by_user
        entry = by_user.get(record.user)
        previous: ClientSession | None
        if entry is None:
            by_user[record.user] = session
            previous = None
        elif isinstance(entry, dict):
            previous = entry.pop(record.device, None)
            entry[record.device] = session
        elif entry.record.device == record.device:
            by_user[record.user] = session
            previous = entry
        else:
            by_user[record.user] = {entry.record.device: entry, record.device: session}
            previous = None
        if previous is None:
            self._count += 1
        return previous

    def remove(self, session: ClientSession) -> bool:
        """Forget ``session``, if it is still its device's connection."""
        record = session.record
        by_user = self._by_user
        entry = by_user.get(record.user)
        if entry is None:
            return False
        if not isinstance(entry, dict):
            if entry is not session:
                return False
            del by_user[record.user]
        else:
            if entry.get(record.device) is not session:
                return False
            del entry[record.device]
            if len(entry) == 1:
                by_user[record.user] = next(iter(entry.values()))
        self._count -= 1
        return True


FrameEntry = tuple[type[ProtobufMessage], Callable[[Any, Any], None]]
FrameTable = Mapping[int, FrameEntry]
"""Frame type -> (protobuf class, ``answer(session, message)``): what a room answers.

The shape of ``cim.protocols.wire.Inbound``: the connection parses the frame and calls
the room's function with itself and the message, with nothing in between.
"""


# --- the node's core ------------------------------------------------------------------


@dataclass(slots=True)
class NodeCore:
    """What every room shares: who this node is, its clock, counters, ids and state."""

    node_id: str
    state: IStateBackend
    """Reached through its facets: ``state.presence``, ``state.receipts``, ..."""
    clock: IReactorTime
    metrics: NodeMetrics
    message_ids: MessageIdGenerator
    media_urls: MediaUrls = field(default_factory=MediaUrls)
    """Which media URLs a message may carry (cim.content): https, or this node's files."""


# --- people and groups ----------------------------------------------------------------

UserExists = Callable[[str], "Deferred[bool]"]
"""Whether an account of that name exists (cim.accounts.store.AccountStore.exists)."""


class GroupMembership(Protocol):
    """What the rooms need from the group directory (cim.groups.directory)."""

    def is_member(self, group: str, user: str) -> Deferred[bool]: ...

    def member_names(self, group: str) -> Deferred[list[str]]: ...

    def answer(
        self, actor: str, request: cim_pb2.GroupRequest
    ) -> Deferred[cim_pb2.GroupAnswer]: ...


class NoGroups:
    """A node without the group directory: nobody is a member, requests are refused."""

    def is_member(self, group: str, user: str) -> Deferred[bool]:
        return succeed(False)

    def member_names(self, group: str) -> Deferred[list[str]]:
        return succeed([])

    def answer(self, actor: str, request: cim_pb2.GroupRequest) -> Deferred[cim_pb2.GroupAnswer]:
        return succeed(
            cim_pb2.GroupAnswer(
                request_id=request.request_id,
                ok=False,
                error="unavailable",
                message="groups are not available on this node",
            )
        )


class ContactRules(Protocol):
    """Who may reach whom, and CONTACTS_R (cim.im.contacts.ContactDirectory)."""

    def known(self, sender: str, receiver: str) -> bool | None:
        """The remembered answer to ``may_message`` (no Deferred), or None."""

    def account_known(self, sender: str, receiver: str) -> bool:
        """Whether a remembered answer for this pair read the receiver's account (an
        allowed message: ``may_message`` is False without one), so the receiver is
        known to exist without a read of its own."""

    def may_message(self, sender: str, receiver: str) -> Deferred[bool]:
        """Whether ``sender`` may send ``receiver`` a 1:1 message. False for a name
        without an account too, by the same path as any other refusal."""

    def circle(self, user: str) -> Deferred[list[str]]:
        """Whose presence ``user`` may see."""

    def answer(
        self, actor: str, request: cim_pb2.ContactsRequest
    ) -> Deferred[cim_pb2.ContactsAnswer]: ...


class NoContacts:
    """A node that keeps no contacts (only tests build one): it has no rules to apply,
    so every message goes on (routing still says when a receiver has no account),
    nobody's presence is known to be anyone's business, and requests are refused."""

    def known(self, sender: str, receiver: str) -> bool | None:
        return True

    def account_known(self, sender: str, receiver: str) -> bool:
        return False  # no rules read no account

    def may_message(self, sender: str, receiver: str) -> Deferred[bool]:
        return succeed(True)

    def circle(self, user: str) -> Deferred[list[str]]:
        return succeed([])

    def answer(
        self, actor: str, request: cim_pb2.ContactsRequest
    ) -> Deferred[cim_pb2.ContactsAnswer]:
        return succeed(
            cim_pb2.ContactsAnswer(
                request_id=request.request_id,
                ok=False,
                error="unavailable",
                message="contacts are not available on this node",
            )
        )


@dataclass(slots=True)
class Directory:
    """Who exists, who belongs to which group, and who may reach whom."""

    user_exists: UserExists
    groups: GroupMembership = field(default_factory=NoGroups)
    contacts: ContactRules = field(default_factory=NoContacts)


# --- where messages are kept ----------------------------------------------------------


class TimelineStore(Protocol):
    """What the rooms need from the timelines (cim.history.timeline.Timelines)."""

    def behind(self) -> float:
        """Seconds new messages should wait before they are taken (the writer cannot
        keep up, or the database fails); 0.0 while it keeps up."""

    def append(self, message: cim_pb2.Message, sender_device: str) -> Deferred[Appended]:
        """Fires once the message is durable, with its conversation and seq."""

    def append_then(
        self,
        message: cim_pb2.Message,
        sender_device: str,
        done: Callable[..., object],
        failed: Callable[..., object],
        *args: Any,
    ) -> None:
        """``append``, answered by ``done(appended, *args)`` or ``failed(failure,
        *args)`` instead of a Deferred (the 1:1 hot path)."""

    def enrol_device(self, user: str, device: str) -> Deferred[None]:
        """A device connected: one new to the account starts at the present (its
        cursors at each conversation's end, once another device has read); fires once
        that is written (batched with the cursor moves)."""

    def move_cursor(self, user: str, device: str, conversation: str, seq: int) -> None: ...

    def change(self, asked: ChangeAsked) -> Deferred[ChangeMade]:
        """A recall or edit (cim.storage.changes): fires once its entry is durable."""

    def move_cursors(
        self, user: str, device: str, marks: Sequence[cim_pb2.Cursor]
    ) -> Deferred[int]: ...

    def summary(self, user: str, device: str) -> Deferred[list[ConversationState]]: ...

    def unread_page(
        self,
        user: str,
        device: str,
        conversation: str,
        before: int | None,
        limit: int,
        max_bytes: int,
    ) -> Deferred[TimelinePage]: ...


class NoTimeline:
    """A node without a database keeps no timeline, so it can promise nothing: every
    message is refused (UNAVAILABLE) and every catch-up answered the same way."""

    def behind(self) -> float:
        return 0.0

    def append(self, message: cim_pb2.Message, sender_device: str) -> Deferred[Appended]:
        return fail(TimelineUnavailable("this node keeps no timelines"))

    def append_then(
        self,
        message: cim_pb2.Message,
        sender_device: str,
        done: Callable[..., object],
        failed: Callable[..., object],
        *args: Any,
    ) -> None:
        failed(Failure(TimelineUnavailable("this node keeps no timelines")), *args)

    def enrol_device(self, user: str, device: str) -> Deferred[None]:
        return succeed(None)

    def move_cursor(self, user: str, device: str, conversation: str, seq: int) -> None:
        pass

    def change(self, asked: ChangeAsked) -> Deferred[ChangeMade]:
        return fail(TimelineUnavailable("this node keeps no timelines"))

    def move_cursors(
        self, user: str, device: str, marks: Sequence[cim_pb2.Cursor]
    ) -> Deferred[int]:
        return fail(TimelineUnavailable("this node keeps no timelines"))

    def summary(self, user: str, device: str) -> Deferred[list[ConversationState]]:
        return fail(TimelineUnavailable("this node keeps no timelines"))

    def unread_page(
        self,
        user: str,
        device: str,
        conversation: str,
        before: int | None,
        limit: int,
        max_bytes: int,
    ) -> Deferred[TimelinePage]:
        return fail(TimelineUnavailable("this node keeps no timelines"))


class ReadMarkStore(Protocol):
    """Users' read marks (cim.history.read_marks.ReadMarks); both fail with
    ``ReadRefused`` (nothing changed) or ``TimelineUnavailable``."""

    def mark(self, user: str, conversation: str, seq: int) -> Deferred[ReadMark]: ...

    def readers(self, asker: str, conversation: str, seq: int) -> Deferred[Readers]: ...


class NoReadMarks:
    """A node without a database keeps no read marks: every request is UNAVAILABLE."""

    def mark(self, user: str, conversation: str, seq: int) -> Deferred[ReadMark]:
        return fail(TimelineUnavailable("this node keeps no read marks"))

    def readers(self, asker: str, conversation: str, seq: int) -> Deferred[Readers]:
        return fail(TimelineUnavailable("this node keeps no read marks"))


class HistoryAnswers(Protocol):
    """Answers HISTORY_R (cim.history.service.HistoryService)."""

    def answer(self, user: str, request: cim_pb2.HistoryR) -> Deferred[cim_pb2.HistoryA]: ...


class NoHistory:
    """A node that keeps no history says so in every answer."""

    def answer(self, user: str, request: cim_pb2.HistoryR) -> Deferred[cim_pb2.HistoryA]:
        return succeed(
            cim_pb2.HistoryA(error="unavailable", message="history is not kept on this node")
        )


@dataclass(slots=True)
class Stores:
    """Where messages are kept and read back; each a null object when not kept."""

    timeline: TimelineStore = field(default_factory=NoTimeline)
    offline_page_size: int = 100
    """Messages in a catch-up page when the client does not say."""
    history: HistoryAnswers = field(default_factory=NoHistory)
    file_shares: FileShares = field(default_factory=NoFileShares)
    """Which conversations each file was sent in (cim.im.shares)."""
    max_page_bytes: int = 65536
    """The largest frame a page may fill ([im] max_frame_size; less if the client says)."""
    read_marks: ReadMarkStore = field(default_factory=NoReadMarks)
    """Users' read marks in their conversations (read receipts, cim.im.receipts)."""


# --- bounds ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bounds:
    """What the rooms refuse past (cim.limits): rates, text length, fan-out backlog.

    The default is a node without rate limits (the unit tests'); the daemon makes one
    from ``[limits]`` and ``[im]``.
    """

    limits: RateLimits = field(default_factory=NoLimits)
    max_text_length: int = 16384
    """Characters of a message's text ([im] max_text_length)."""
    group_backlog: int = 1000
    """Messages of one group waiting for their fan-out here ([limits] group_backlog)."""
    fanout_backlog: int = 200_000
    """Deliveries (messages times members) waiting for fan-out here, all groups."""
    fanout_backlog_bytes: int = 64 << 20
    """Bytes of the group messages waiting for fan-out here, all groups."""
    recall_window: float = 120.0
    """Seconds after sending that its sender may recall a message ([im] recall_window)."""
    edit_window: float = 900.0
    """Seconds after sending that its sender may edit a text ([im] edit_window)."""
    max_devices_per_user: int = 5
    """Devices of one user connected at once ([im] max_devices_per_user)."""


NO_BOUNDS = Bounds()
"""A node without rate limits, with the default bounds."""


# --- failures of work nobody waits for ------------------------------------------------


def log_failure(failure: Failure, log: Logger, what: str) -> None:
    """The one line a room writes when work it does not wait for fails."""
    log.failure("could not {what}", failure, what=what)


def in_background(d: Deferred[Any], log: Logger, what: str) -> None:
    """Let ``d`` run; a failure is logged, never left unhandled."""
    d.addErrback(log_failure, log, what)
