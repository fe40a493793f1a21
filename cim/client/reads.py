"""Read marks as one device sees them: unread counts per conversation, the user's own
mark (moved by any of its devices), and how far a 1:1 peer has read (✓✓).

A conversation's unread count is the messages from others past the user's read point:
the newest seq this device knows of minus the highest of the user's mark (this
device's ``mark_read``, another device's READ_N) and what the catch-up summary said
was already read there (its count is past max(device cursor, read mark)). A message
this device sends moves its read point too: nobody has unread messages of their own.

Nothing here talks to the node; ``ChatClient`` feeds it frames and asks it numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from cim.history.store import direct_conversation, group_conversation
from cim.protocols import cim_pb2

__all__ = ["ReadEvent", "ReadState", "conversation_key"]


@dataclass(frozen=True, slots=True)
class ReadEvent:
    """A READ_N as the application hears it."""

    conversation: str
    reader: str
    seq: int
    own: bool
    """The user itself read it on another device (else: the peer read the user's)."""
    unread: int
    """This device's unread count in the conversation after it."""
    peer: str
    group: str

    def json_record(self) -> dict[str, object]:
        """The line ``cim-client listen`` prints (docs/protocol.md, JSON convention)."""
        line: dict[str, object] = {
            "event": "read",
            "conversation": self.conversation,
            "reader": self.reader,
            "seq": self.seq,
            "own": self.own,
            "unread": self.unread,
        }
        if self.peer:
            line["peer"] = self.peer
        if self.group:
            line["group"] = self.group
        return line


def conversation_key(user: str, name: str, group: bool = False) -> str:
    """The timeline key for what a person types: a key as it is ("d:..." or "g:..."),
    a group id with ``group``, else the 1:1 with that user."""
    if group:
        return group_conversation(name)
    if name.startswith(("d:", "g:")):
        return name
    return direct_conversation(user, name)


class ReadState:
    """Per conversation: the newest seq known, the user's read point, the peer's mark."""

    def __init__(self, user: str) -> None:
        self.user = user
        self._newest: dict[str, int] = {}
        self._read: dict[str, int] = {}
        self._peer_read: dict[str, int] = {}
        self._where: dict[str, tuple[str, str]] = {}
        """conversation -> (peer, group), for the console's names."""

    # --- what the node said -------------------------------------------------------------

    def summary(self, summary: cim_pb2.OfflineSummaryA) -> None:
        for entry in summary.conversations:
            self._where[entry.conversation] = (entry.peer, entry.group)
            self._raise(self._newest, entry.conversation, entry.last_seq)
            self._raise(self._read, entry.conversation, entry.last_seq - entry.count)
            self._raise(self._peer_read, entry.conversation, entry.peer_read_seq)
        for mark in summary.caught_up:
            self._raise(self._newest, mark.conversation, mark.seq)
            self._raise(self._read, mark.conversation, mark.seq)
        for mark in summary.peer_reads:
            self._raise(self._peer_read, mark.conversation, mark.seq)

    def received(self, message: cim_pb2.Message) -> None:
        """A message handed to the application (live or caught up)."""
        if not message.conversation or not message.seq:
            return
        sender = getattr(message, "from")
        if message.group:
            self._where.setdefault(message.conversation, ("", message.group))
        else:
            peer = message.to if sender == self.user else sender
            self._where.setdefault(message.conversation, (peer, ""))
        self._raise(self._newest, message.conversation, message.seq)
        if sender == self.user:
            self._raise(self._read, message.conversation, message.seq)

    def sent(self, conversation: str, seq: int) -> None:
        """msg:A: this device's own message took ``seq``."""
        if conversation and seq:
            self._raise(self._newest, conversation, seq)
            self._raise(self._read, conversation, seq)

    def marked(self, answer: cim_pb2.ReadA) -> None:
        """READ_A: the user's mark in effect."""
        self._raise(self._newest, answer.conversation, answer.last_seq)
        self._raise(self._read, answer.conversation, answer.seq)

    def notice(self, notice: cim_pb2.ReadNotice) -> ReadEvent:
        """READ_N: the user's other device, or the peer, read up to a seq."""
        own = notice.reader == self.user
        if own:
            self._raise(self._newest, notice.conversation, notice.last_seq)
            self._raise(self._read, notice.conversation, notice.seq)
        else:
            self._raise(self._peer_read, notice.conversation, notice.seq)
        if notice.peer or notice.group:
            self._where.setdefault(notice.conversation, (notice.peer, notice.group))
        peer, group = self._where.get(notice.conversation, (notice.peer, notice.group))
        return ReadEvent(
            notice.conversation,
            notice.reader,
            notice.seq,
            own,
            self.unread(notice.conversation),
            peer,
            group,
        )

    # --- what the application asks ------------------------------------------------------

    def newest(self, conversation: str) -> int:
        """The newest seq this device knows of in the conversation (0: none)."""
        return self._newest.get(conversation, 0)

    def unread(self, conversation: str) -> int:
        return max(0, self._newest.get(conversation, 0) - self._read.get(conversation, 0))

    def unread_counts(self) -> dict[str, int]:
        """Every conversation with unread messages, and how many."""
        counts = {key: self.unread(key) for key in self._newest}
        return {key: count for key, count in counts.items() if count}

    def peer_read(self, conversation: str) -> int:
        """How far the 1:1 peer has read (0: nothing shown)."""
        return self._peer_read.get(conversation, 0)

    def where(self, conversation: str) -> tuple[str, str]:
        """(peer, group) of a conversation this device has seen, else ("", "")."""
        return self._where.get(conversation, ("", ""))

    @staticmethod
    def _raise(marks: dict[str, int], conversation: str, seq: int) -> None:
        if seq > marks.get(conversation, 0):
            marks[conversation] = seq
