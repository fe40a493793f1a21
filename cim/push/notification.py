"""What travels from the decision to a provider, and what a provider answers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred

from cim.storage.push import PushRegistration

__all__ = [
    "ACCEPTED",
    "DEAD",
    "FAILED",
    "RETRY",
    "Notification",
    "Outcome",
    "PushProvider",
]

ACCEPTED = "accepted"
DEAD = "dead"
RETRY = "retry"
FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Notification:
    """One push to one device. ``title`` is a built-in text and ``body`` empty unless
    ``[push] show_text`` (cim.push.texts): nothing else here comes from a message."""

    registration: PushRegistration
    conversation: str
    seq: int
    msg_id: int
    badge: int
    """The device's unread messages, all conversations."""
    title: str
    body: str
    urgent: bool
    kind: str
    """"message" (1:1), "group", "system" or "sos"."""
    appended_at: float
    """When the entry was appended: latency runs from here to the provider's answer."""
    ttl: float
    """Seconds the provider may keep it for a device that is off."""
    alarm: int | None = None
    """The SOS alarm's id (its notice's ``sos``): its retries stop once acknowledged."""

    @property
    def collapse_key(self) -> str:
        """Pushes of one conversation replace each other on the device (not an SOS)."""
        return self.conversation


@dataclass(frozen=True, slots=True)
class Outcome:
    """A provider's answer, as the queue acts on it.

    ``accepted``; ``dead`` (the token is gone: the registration is removed);
    ``retry`` (429, 5xx, a network failure: again after ``retry_after`` if the
    provider said, else after the backoff); ``failed`` (refused for good: a bad
    request, wrong credentials).
    """

    kind: str
    status: int = 0
    reason: str = ""
    retry_after: float | None = None


class PushProvider(Protocol):
    """One provider (FCM, APNs, the webhook): sends one notification, never raises
    synchronously; the Deferred fires with an Outcome (a failure counts as retry)."""

    name: str

    def send(self, notification: Notification) -> Deferred[Outcome]: ...

    def close(self) -> Deferred[None]: ...
