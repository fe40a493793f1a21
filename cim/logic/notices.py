"""What the logic service tells people, as IM system messages.

Every notification (a binding request, an SOS, a fence crossed, a like) is an
ordinary message of type SYSTEM from ``@system``, whose text is a JSON object:

    {"event": "sos.raised", "priority": "high", "at": "2027-01-15T08:00:00.000Z", ...fields}

so it inherits what every message has: storage until the receiver has it, dedup by
id, and order. ``priority`` is ``"high"`` for alarms a client should show at once,
even in a do-not-disturb mode, and ``"normal"`` otherwise. docs/logic.md lists the
events and their fields.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from cim.json_convention import iso_time, present

__all__ = ["Notices", "SystemMessages", "notice_text"]

HIGH = "high"
NORMAL = "normal"


class SystemMessages(Protocol):
    """The IM node's ``send_system`` (cim.im.system.SystemMessages)."""

    def send_system(
        self, receivers: Iterable[str], text: str, urgent: bool = False
    ) -> Deferred[list[str]]: ...


def notice_text(event: str, at: float, fields: Mapping[str, Any], urgent: bool) -> str:
    """The notice as JSON in the convention of the HTTP APIs: times (``at``, ``*_at``,
    given as epoch seconds) as ISO 8601 strings, fields that are not there left out."""
    body: dict[str, Any] = {"event": event, "priority": HIGH if urgent else NORMAL}
    for key, value in {"at": at, **fields}.items():
        if (key == "at" or key.endswith("_at")) and isinstance(value, int | float):
            value = iso_time(value)
        body[key] = value
    return json.dumps(present(body), separators=(",", ":"), sort_keys=True)


class Notices:
    """Sends the logic service's events to users; a failure is logged, never raised.

    A notice follows a change that has already been committed (a binding, an SOS
    row): failing the HTTP call afterwards would invite a retry that repeats the
    change, so the caller waits for the notice to be stored (it is on disk when the
    answer goes out) but is not failed by it.
    """

    log = Logger()

    def __init__(self, messages: SystemMessages, clock: IReactorTime) -> None:
        self._messages = messages
        self._clock = clock

    async def send(
        self,
        receivers: Iterable[str],
        event: str,
        urgent: bool = False,
        **fields: Any,
    ) -> list[str]:
        """Store the notice for each receiver; returns whom it was stored for.

        An ``urgent`` notice is high priority and is stored even for a receiver whose
        offline store is full (a normal one is then left out for that receiver).
        """
        unique = sorted(set(receivers))
        if not unique:
            return []
        text = notice_text(event, self._clock.seconds(), fields, urgent)
        try:
            return await self._messages.send_system(unique, text, urgent)
        except Exception:
            self.log.failure("could not send the {event} notice", event=event)
            return []
