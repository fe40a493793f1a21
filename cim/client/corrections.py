"""Recall and edit as the client library sees them (#15).

A change reaches a device as a timeline entry (a Message with ``change`` set: live as
msg:N, or in a catch-up page), in its conversation's order like any message; the
inbox hands it over in that order, and the session turns it into a ``Change`` for the
application (``ChatClient.on_change``). A change the device made itself comes back
as CHANGE_A and is told the same way.

``Corrections`` remembers the last messages handed to the application (bounded) and
applies each change to the one it names: a recalled message loses its text, media
and location and is marked ``recalled``; an edited one takes the new text and is
marked ``edited``. The application gets the message as it now reads (or None when
the message is older than what is remembered: the change's fields say what to do).
Messages that come after their change (a catch-up page brings the stored message,
already rewritten by the node) need nothing: they read as changed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from cim.protocols import cim_pb2

__all__ = ["EVENTS", "Change", "Corrections", "change_of"]

EVENTS = {cim_pb2.RECALL: "recall", cim_pb2.EDIT: "edit"}
"""The ``event`` name of each kind, as ``cim-client listen`` prints it."""

REMEMBERED = 2000
"""Messages kept to apply changes to; older ones are the application's to find."""


@dataclass(frozen=True, slots=True)
class Change:
    """A recall or an edit of message ``msg_id``, made by ``by``."""

    event: str
    """"recall" or "edit"."""
    msg_id: int
    conversation: str
    seq: int
    """The changed message's place in the conversation."""
    by: str
    text: str
    """An edit's new text ("" for a recall)."""
    at_ms: int
    entry_id: int
    """The change entry's own id (its place: ``entry_seq``)."""
    entry_seq: int
    message: cim_pb2.Message | None = None
    """The changed message as it now reads, when this device remembers it."""


def change_of(entry: cim_pb2.Message) -> Change | None:
    """The change a timeline entry carries, or None for a message."""
    event = EVENTS.get(entry.change)
    if event is None:
        return None
    return Change(
        event=event,
        msg_id=entry.replaces,
        conversation=entry.conversation,
        seq=entry.replaces_seq,
        by=getattr(entry, "from"),
        text=entry.text if entry.change == cim_pb2.EDIT else "",
        at_ms=entry.changed_at_ms or entry.sent_at_ms,
        entry_id=entry.id,
        entry_seq=entry.seq,
    )


class Corrections:
    """The last messages handed over, by id, with the changes applied to them."""

    def __init__(self, size: int = REMEMBERED) -> None:
        self._size = size
        self._messages: OrderedDict[int, cim_pb2.Message] = OrderedDict()

    def __len__(self) -> int:
        return len(self._messages)

    def get(self, msg_id: int) -> cim_pb2.Message | None:
        return self._messages.get(msg_id)

    def remember(self, message: cim_pb2.Message) -> None:
        self._messages[message.id] = message
        self._messages.move_to_end(message.id)
        while len(self._messages) > self._size:
            self._messages.popitem(last=False)

    def apply(self, change: Change) -> Change:
        """Apply ``change`` to the message it names, if remembered; returns the change
        with that message as it now reads."""
        message = self._messages.get(change.msg_id)
        if message is None or message.conversation != change.conversation:
            return change  # (a change names a message of its own conversation only)
        if change.event == "recall":
            message.text = ""
            message.ClearField("media")
            message.ClearField("location")
            message.edited = False
            message.recalled = True
            message.changed_by = change.by
        elif not message.recalled:
            message.text = change.text
            message.edited = True
        message.changed_at_ms = change.at_ms
        return Change(
            change.event,
            change.msg_id,
            change.conversation,
            change.seq,
            change.by,
            change.text,
            change.at_ms,
            change.entry_id,
            change.entry_seq,
            message,
        )
