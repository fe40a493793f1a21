"""Which devices a timeline entry pushes, and when: collapsed per device and conversation.

The node that appends an entry decides its pushes, once: ``Timelines.append``
answers ``new`` for exactly one append of each message in the cluster (the timeline's
unique message id), and only that answer reaches ``entry_appended`` (a retry found
again is not new). So each entry is decided on one node, once, for each device of
each receiver (docs/push.md).

For each receiver's registered device, by its presence (``DevicePresence``):

- connected here with its app in the foreground: not pushed (it shows the entry);
- connected here with its app in the background: an urgent entry is pushed at once;
  any other waits ``[push] background_grace`` for the device's ack
  (``cim.push.grace``), and is pushed (collapsed, below) only without one;
- connected to another node (its app state is not known here): an urgent entry is
  pushed (the safe side for an SOS), any other is not;
- not connected: pushed, as below; the state store cannot say: urgent only.

A device pushed:

- an urgent entry (an SOS: a system message whose notice has priority ``high``) is
  queued at once, never collapsed;
- otherwise the first entry of a (device, conversation) pushes at once and opens a
  window of ``[push] collapse_window`` (longer for a group: ``1 / group_rate``);
  entries inside the window only mark it, and when it closes one push goes for the
  newest, with the device's unread count as the badge. So a device gets at most
  one push per conversation per window, and the last one counts everything.

Windows live in this node's memory. A node that starts treats every window as open
since its start, so a node restarted after a crash sends nothing within a window
of what it may have sent before; what it had waiting is lost (the app catches up
from its cursor when opened).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.im.collaborators import TimelineStore, in_background
from cim.im.system import SYSTEM_SENDER
from cim.protocols import cim_pb2
from cim.push.grace import BackgroundGrace, GraceKey, Held
from cim.push.notification import Notification
from cim.push.presence import DevicePresence, Presence
from cim.push.texts import notice_fields, preview, sos_device, title_for
from cim.storage.changes import ChangeAsked, ChangeMade
from cim.storage.push import PushRegistration
from cim.storage.timeline import Appended, ConversationState, TimelinePage

__all__ = ["DecidingTimeline", "DecisionSettings", "PushDecisions", "is_urgent"]

HIGH = "high"


def is_urgent(message: cim_pb2.Message) -> bool:
    """An SOS, or any notice the logic service marked ``priority: high``."""
    if message.type != cim_pb2.SYSTEM or getattr(message, "from") != SYSTEM_SENDER:
        return False
    return notice_fields(message).get("priority") == HIGH


@dataclass(frozen=True)
class DecisionSettings:
    collapse_window: float = 10.0
    group_rate: float = 0.0
    """Pushes per second a group may cause per device; 0: no extra collapsing."""
    show_text: bool = False
    ttl: float = 86400.0
    background_grace: float = 5.0
    """How long a background device has to acknowledge an entry before it is pushed."""
    background_pending: int = 10000
    """Entries held for a background device's ack at once; past it, pushed at once."""

    def window(self, group: bool) -> float:
        if group and self.group_rate > 0:
            return max(self.collapse_window, 1.0 / self.group_rate)
        return self.collapse_window


@dataclass
class _Window:
    """One (user, device, conversation): when its window closes, and what waits."""

    closes_at: float
    call: IDelayedCall | None = None
    waiting: tuple[cim_pb2.Message, Appended, float] | None = None
    registration: PushRegistration | None = None


Enqueue = Callable[[Notification], bool]
Registered = Callable[[Sequence[str]], "Deferred[list[PushRegistration]]"]
Members = Callable[[str], "Deferred[list[str]]"]
Summary = Callable[[str, str], "Deferred[list[ConversationState]]"]


@dataclass
class DecisionCounts:
    """What the decisions did, for /metrics."""

    entries: int = 0
    connected: int = 0
    collapsed: int = 0
    queued: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


class PushDecisions:
    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        registered: Registered,
        presence: DevicePresence,
        members: Members,
        summary: Summary,
        enqueue: Enqueue,
        settings: DecisionSettings,
        unregistered: Callable[[str], bool] = lambda user: False,
    ) -> None:
        self._clock = clock
        self._registered = registered
        self._unregistered = unregistered
        """True when a user is known (fresh in the registrations' cache) to have no
        registration: most 1:1 receivers, decided without a Deferred."""
        self._presence = presence
        self._members = members
        self._summary = summary
        self._enqueue = enqueue
        self.settings = settings
        self.counts = DecisionCounts()
        self._windows: dict[tuple[str, str, str], _Window] = {}
        self._started_at = float(clock.seconds())
        self._stopped = False
        self.grace = BackgroundGrace(clock, settings.background_grace, settings.background_pending)

    @property
    def open_windows(self) -> int:
        return len(self._windows)

    def entry_appended(self, message: cim_pb2.Message, appended: Appended) -> None:
        """A timeline entry was written for the first time: decide its pushes in the
        background. Never raises and never delays the message."""
        if not appended.new or self._stopped:
            return
        self.counts.entries += 1
        if not message.group and self._unregistered(message.to):
            return  # the hot path: a 1:1 receiver with no device to push
        in_background(
            Deferred.fromCoroutine(self._decide(message, appended)),
            self.log,
            "decide the pushes of a message",
        )

    async def _receivers(self, message: cim_pb2.Message) -> list[str]:
        sender = getattr(message, "from")
        if message.group:
            return [m for m in await self._members(message.group) if m != sender]
        return [message.to] if message.to and message.to != sender else []

    async def _decide(self, message: cim_pb2.Message, appended: Appended) -> None:
        receivers = await self._receivers(message)
        if not receivers:
            return
        urgent = is_urgent(message)
        appended_at = float(self._clock.seconds())
        for registration in await self._registered(receivers):
            presence = await self._presence.state(registration.user, registration.device)
            if presence is Presence.FOREGROUND or (
                presence in (Presence.ELSEWHERE, Presence.UNKNOWN) and not urgent
            ):
                self.counts.connected += 1
            elif urgent:
                await self._push(registration, message, appended, appended_at)
            elif presence is Presence.BACKGROUND:
                self._hold(registration, message, appended, appended_at)
            else:
                self._collapse(registration, message, appended, appended_at)

    # --- a background device's grace -------------------------------------------------

    def _hold(
        self,
        registration: PushRegistration,
        message: cim_pb2.Message,
        appended: Appended,
        appended_at: float,
    ) -> None:
        """Wait for the background device's ack; without one, push (collapsed)."""
        key: GraceKey = (registration.user, registration.device, appended.conversation)

        def expired() -> None:
            if self._stopped:
                return
            now = self._presence.here(registration.user, registration.device)
            if now is Presence.FOREGROUND:
                self.counts.connected += 1  # back in front: it shows what it has
                return
            self._collapse(registration, message, appended, appended_at)

        held = self.grace.wait(key, appended.seq, expired)
        if held is Held.FULL:
            self._collapse(registration, message, appended, appended_at)
        elif held is Held.ACKNOWLEDGED:
            self.counts.connected += 1

    def cursor_moved(self, user: str, device: str, conversation: str, seq: int) -> None:
        """The device acknowledged the conversation through ``seq`` (ack:R's
        ``through_seq``, OFFLINE_R's acks, OFFLINE_ACK_R): what it held is not pushed."""
        self.grace.cursor_moved((user, device, conversation), seq)

    # --- collapsing -------------------------------------------------------------------

    def _collapse(
        self,
        registration: PushRegistration,
        message: cim_pb2.Message,
        appended: Appended,
        appended_at: float,
    ) -> None:
        key = (registration.user, registration.device, appended.conversation)
        now = float(self._clock.seconds())
        window = self._windows.get(key)
        length = self.settings.window(bool(message.group))
        if window is None and now - self._started_at < length:
            # Just started: what this node (or its previous life) sent is unknown.
            window = self._open(key, self._started_at + length)
        if window is None:
            self._open(key, now + length)
            self._send(registration, message, appended, appended_at)
            return
        self.counts.collapsed += 1
        window.waiting = (message, appended, appended_at)
        window.registration = registration

    def _open(self, key: tuple[str, str, str], closes_at: float) -> _Window:
        window = _Window(closes_at)
        delay = max(0.0, closes_at - float(self._clock.seconds()))
        window.call = self._clock.callLater(delay, self._closed, key)
        self._windows[key] = window
        return window

    def _closed(self, key: tuple[str, str, str]) -> None:
        """The window is over: push the newest entry that waited, which opens the next."""
        window = self._windows.pop(key)
        if window.waiting is None or window.registration is None:
            return
        message, appended, appended_at = window.waiting
        length = self.settings.window(bool(message.group))
        self._open(key, float(self._clock.seconds()) + length)
        self._send(window.registration, message, appended, appended_at)

    def stop(self) -> None:
        """Cancel every window: what waited is not pushed (docs/push.md); entries
        appended from now on (the node's last writes while it stops) push nothing."""
        self._stopped = True
        self.grace.stop()
        for window in self._windows.values():
            if window.call is not None and window.call.active():
                window.call.cancel()
        self._windows.clear()

    # --- the push itself --------------------------------------------------------------

    def _send(
        self,
        registration: PushRegistration,
        message: cim_pb2.Message,
        appended: Appended,
        appended_at: float,
    ) -> None:
        in_background(
            Deferred.fromCoroutine(self._push(registration, message, appended, appended_at)),
            self.log,
            "queue a push",
        )

    async def _badge(self, registration: PushRegistration) -> int:
        try:
            states = await self._summary(registration.user, registration.device)
        except Exception:
            self.log.failure("could not count unread messages for a push's badge")
            return 0
        return sum(state.unread for state in states)

    async def _push(
        self,
        registration: PushRegistration,
        message: cim_pb2.Message,
        appended: Appended,
        appended_at: float,
    ) -> None:
        kind, title = self._title(message, registration.locale)
        alarm = notice_fields(message).get("sos") if kind == "sos" else None
        notification = Notification(
            registration=registration,
            conversation=appended.conversation,
            seq=appended.seq,
            msg_id=appended.msg_id,
            badge=await self._badge(registration),
            title=title,
            body=preview(message, self.settings.show_text),
            urgent=kind == "sos",
            kind=kind,
            appended_at=appended_at,
            ttl=self.settings.ttl,
            alarm=alarm if isinstance(alarm, int) else None,
        )
        self.counts.by_kind[kind] = self.counts.by_kind.get(kind, 0) + 1
        if self._enqueue(notification):
            self.counts.queued += 1

    def _title(self, message: cim_pb2.Message, locale: str | None) -> tuple[str, str]:
        sender = getattr(message, "from")
        if message.type == cim_pb2.SYSTEM and sender == SYSTEM_SENDER:
            fields: dict[str, Any] = notice_fields(message)
            if is_urgent(message):
                return "sos", title_for("sos", sos_device(fields), locale)
            return "system", title_for("system", sender, locale)
        kind = "group" if message.group else "message"
        return kind, title_for(kind, sender, locale)


class DecidingTimeline:
    """The node's timelines as the rooms see them, with every new entry handed to the
    push decisions once durable: 1:1 (cim.im.direct), group (cim.im.groups) and
    system messages (cim.im.system) all append through here, so push sees each entry
    in one place. The append's own Deferred is untouched: push never delays or fails
    a message."""

    def __init__(self, timeline: TimelineStore, decisions: PushDecisions) -> None:
        self.inner = timeline
        self._decisions = decisions

    def append(self, message: cim_pb2.Message, sender_device: str) -> Deferred[Appended]:
        return self.inner.append(message, sender_device).addCallback(self._decide, message)

    def append_then(
        self,
        message: cim_pb2.Message,
        sender_device: str,
        done: Callable[..., object],
        failed: Callable[..., object],
        *args: Any,
    ) -> None:
        self.inner.append_then(
            message, sender_device, self._decided, self._refused, message, done, failed, args
        )

    def _decided(
        self,
        appended: Appended,
        message: cim_pb2.Message,
        done: Callable[..., object],
        failed: Callable[..., object],
        args: tuple[Any, ...],
    ) -> None:
        self._decide(appended, message)
        done(appended, *args)

    @staticmethod
    def _refused(
        failure: Failure,
        message: cim_pb2.Message,
        done: Callable[..., object],
        failed: Callable[..., object],
        args: tuple[Any, ...],
    ) -> None:
        failed(failure, *args)

    def _decide(self, appended: Appended, message: cim_pb2.Message) -> Appended:
        try:
            self._decisions.entry_appended(message, appended)
        except Exception:
            self._decisions.log.failure("could not decide the pushes of a message")
        return appended

    def behind(self) -> float:
        return self.inner.behind()

    def enrol_device(self, user: str, device: str) -> Deferred[None]:
        return self.inner.enrol_device(user, device)

    def change(self, asked: ChangeAsked) -> Deferred[ChangeMade]:
        """A recall or edit: an entry that wakes nobody (it changes a message already
        pushed for)."""
        return self.inner.change(asked)

    def move_cursor(self, user: str, device: str, conversation: str, seq: int) -> None:
        """ack:R with ``through_seq``: also the ack a background device's grace waits for."""
        self._cursor_moved(user, device, conversation, seq)
        self.inner.move_cursor(user, device, conversation, seq)

    def move_cursors(
        self, user: str, device: str, marks: Sequence[cim_pb2.Cursor]
    ) -> Deferred[int]:
        for mark in marks:
            self._cursor_moved(user, device, mark.conversation, mark.seq)
        return self.inner.move_cursors(user, device, marks)

    def _cursor_moved(self, user: str, device: str, conversation: str, seq: int) -> None:
        try:
            self._decisions.cursor_moved(user, device, conversation, seq)
        except Exception:
            self._decisions.log.failure("could not tell the push decisions of an ack")

    def summary(self, user: str, device: str) -> Deferred[list[ConversationState]]:
        return self.inner.summary(user, device)

    def unread_page(
        self,
        user: str,
        device: str,
        conversation: str,
        before: int | None,
        limit: int,
        max_bytes: int,
    ) -> Deferred[TimelinePage]:
        return self.inner.unread_page(user, device, conversation, before, limit, max_bytes)
