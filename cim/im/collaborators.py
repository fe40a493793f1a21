"""What the IM rooms are given, in three groups: the node's core, its directory of
people and groups, and the stores messages go to; and what they are handed per frame.

A node can run without groups, offline storage, an archive or history (the tests
do, and ``[archive] enabled = false`` is a configuration). Each missing one is a null
object with the same interface that answers the way a node without it must answer,
so no room asks whether a collaborator is there.

``Directory`` and ``Stores`` are shared by reference between the rooms, which read
their fields when they use them; swapping a store on the one object (a test that
gives the node a real offline store) reaches every room at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from google.protobuf.message import Message as ProtobufMessage
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.content import MediaUrls
from cim.im.shares import FileShares, NoFileShares
from cim.interfaces import IStateBackend, SessionRecord
from cim.limits.policy import NoLimits, RateLimits
from cim.message_ids import MessageIdGenerator
from cim.metrics import NodeMetrics
from cim.offline.store import OfflineItem, OfflinePage, SenderCount
from cim.protocols import cim_pb2

__all__ = [
    "NO_BOUNDS",
    "Archive",
    "Bounds",
    "ClientSession",
    "Connected",
    "ContactRules",
    "Directory",
    "FrameEntry",
    "FrameTable",
    "GroupMembership",
    "HistoryAnswers",
    "NoArchive",
    "NoContacts",
    "NoGroups",
    "NoHistory",
    "NoOfflineBox",
    "NodeCore",
    "OfflineBox",
    "OfflineStorageOff",
    "Stores",
    "UserExists",
    "in_background",
    "log_failure",
]


# --- what the rooms are handed per frame ----------------------------------------------


class ClientSession(Protocol):
    """What a room needs from an authenticated connection (cim.protocols.im)."""

    record: SessionRecord

    def deliver(self, frame_type: int, message: ProtobufMessage) -> None: ...

    def may_take_live_copy(self) -> bool:
        """Whether a live msg:N may be sent now: False while the client is behind on
        reading (cim.protocols.outbound.OutboundBudget, the one decision). A copy
        refused is kept for the receiver's pull, as for a receiver offline."""

    def kick(self, reason: str) -> None: ...

    def going_away(self, reason: str, reconnect_after_ms: int) -> None: ...


Connected = dict[str, ClientSession]
"""user -> its connection to this node: the one mapping every room reads."""

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


class OfflineStorageOff(Exception):
    """The node keeps no offline storage, so nothing can be stored for a receiver.

    Rooms answer it as a node without storage always has: a 1:1 message fails with the
    reason the receiver could not be reached, a group member's copy is missed.
    """


class OfflineBox(Protocol):
    """What the rooms need from offline storage (cim.offline.pipeline.OfflinePipeline)."""

    def store(self, messages: Iterable[OfflineItem], *, capped: bool = True) -> Deferred[int]: ...

    def page(
        self,
        receiver: str,
        before: int | None = None,
        limit: int = ...,
        max_bytes: int | None = None,
    ) -> Deferred[OfflinePage]: ...

    def acknowledge(self, receiver: str, msg_ids: Iterable[int]) -> Deferred[int]: ...

    def summary(self, receiver: str) -> Deferred[list[SenderCount]]: ...


class NoOfflineBox:
    """A node without offline storage: storing fails, every box reads empty."""

    def store(self, messages: Iterable[OfflineItem], *, capped: bool = True) -> Deferred[int]:
        return fail(OfflineStorageOff("this node keeps no offline storage"))

    def page(
        self,
        receiver: str,
        before: int | None = None,
        limit: int = 100,
        max_bytes: int | None = None,
    ) -> Deferred[OfflinePage]:
        return succeed(OfflinePage(records=(), more=False))

    def acknowledge(self, receiver: str, msg_ids: Iterable[int]) -> Deferred[int]:
        return succeed(0)

    def summary(self, receiver: str) -> Deferred[list[SenderCount]]:
        return succeed([])


class Archive(Protocol):
    """Takes every message that reached its receiver or the store (cim.history.archive)."""

    def archive(self, message: cim_pb2.Message) -> None: ...

    def behind(self) -> float:
        """Seconds new messages should wait before they are taken (the archive cannot
        keep up and never drops one); 0.0 while it keeps up."""


class NoArchive:
    """The archive is off (``[archive] enabled = false``): nothing is kept."""

    def archive(self, message: cim_pb2.Message) -> None:
        pass

    def behind(self) -> float:
        return 0.0


class HistoryAnswers(Protocol):
    """Answers HISTORY_R (cim.history.archive.HistoryService)."""

    def answer(self, user: str, request: cim_pb2.HistoryR) -> Deferred[cim_pb2.HistoryA]: ...


class NoHistory:
    """A node that keeps no history says so in every answer."""

    def answer(self, user: str, request: cim_pb2.HistoryR) -> Deferred[cim_pb2.HistoryA]:
        return succeed(
            cim_pb2.HistoryA(error="unavailable", message="history is not kept on this node")
        )


@dataclass(slots=True)
class Stores:
    """Where messages go besides their receivers; each a null object when not kept."""

    offline: OfflineBox = field(default_factory=NoOfflineBox)
    offline_page_size: int = 100
    """Messages in an offline page when the client does not say."""
    archive: Archive = field(default_factory=NoArchive)
    history: HistoryAnswers = field(default_factory=NoHistory)
    file_shares: FileShares = field(default_factory=NoFileShares)
    """Which conversations each file was sent in (cim.im.shares)."""
    max_page_bytes: int = 65536
    """The largest frame a page may fill ([im] max_frame_size; less if the client says)."""


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


NO_BOUNDS = Bounds()
"""A node without rate limits, with the default bounds."""


# --- failures of work nobody waits for ------------------------------------------------


def log_failure(failure: Failure, log: Logger, what: str) -> None:
    """The one line a room writes when work it does not wait for fails."""
    log.failure("could not {what}", failure, what=what)


def in_background(d: Deferred[Any], log: Logger, what: str) -> None:
    """Let ``d`` run; a failure is logged, never left unhandled."""
    d.addErrback(log_failure, log, what)
