"""Conversations: their keys (the timelines' names, ``cim.history.timeline``) and who
takes part in which (design: 用户的行为数据收集).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

from twisted.internet.defer import Deferred, maybeDeferred, succeed

from cim.protocols import cim_pb2

__all__ = [
    "Conversation",
    "HistoryForbidden",
    "IsGroupMember",
    "conversation_of",
    "direct_conversation",
    "group_conversation",
    "parse_conversation",
    "participates",
]

_DIRECT = "d:"
_GROUP = "g:"
_ESCAPED = re.compile("%(25|3A)")

IsGroupMember: TypeAlias = Callable[[str, str], "Deferred[bool] | bool"]
"""``(group_id, user)``: whether user is in the group, e.g. ``GroupDirectory.is_member``."""


class HistoryForbidden(Exception):
    """The reader takes no part in the conversation (or it is no conversation at all)."""

    code: ClassVar[str] = "forbidden"

    def __init__(self, reader: str, conversation: str) -> None:
        super().__init__(f"{reader} may not read conversation {conversation!r}")
        self.reader = reader
        self.conversation = conversation


# --- conversations --------------------------------------------------------------------


def _escape(name: str) -> str:
    # '%' first, or the '%' of "%3A" would be escaped again.
    return name.replace("%", "%25").replace(":", "%3A")


def _unescape(text: str) -> str:
    return _ESCAPED.sub(lambda match: "%" if match.group(1) == "25" else ":", text)


@functools.lru_cache(maxsize=65536)
def direct_conversation(a: str, b: str) -> str:
    """The key of a 1:1 conversation: the same whoever sent, never another pair's.

    The names are sorted so both directions share one key, and escaped so that a ':'
    inside a name cannot make "a:b" + "c" collide with "a" + "b:c". Remembered for the
    pairs that talk most (every 1:1 message asks; about 200 bytes a pair).
    """
    first, second = sorted((a, b))
    return f"{_DIRECT}{_escape(first)}:{_escape(second)}"


def group_conversation(group_id: str) -> str:
    return f"{_GROUP}{group_id}"


@dataclass(frozen=True)
class Conversation:
    """A parsed key: either the two users of a 1:1 conversation or a group id."""

    users: tuple[str, str] | None = None
    group_id: str | None = None


def parse_conversation(key: str) -> Conversation:
    """Raises ValueError for a key that neither ``*_conversation`` function makes."""
    if key.startswith(_GROUP) and len(key) > len(_GROUP):
        return Conversation(group_id=key[len(_GROUP) :])
    if key.startswith(_DIRECT):
        parts = key[len(_DIRECT) :].split(":")
        if len(parts) == 2 and all(parts):
            first, second = (_unescape(part) for part in parts)
            if direct_conversation(first, second) == key:
                return Conversation(users=(first, second))
    raise ValueError(f"not a conversation key: {key!r}")


def conversation_of(message: cim_pb2.Message) -> str:
    if message.group:
        return group_conversation(message.group)
    return direct_conversation(getattr(message, "from"), message.to)


def participates(
    user: str, conversation: str, is_group_member: IsGroupMember | None = None
) -> Deferred[bool]:
    """Whether user takes part: one of a 1:1 pair, or a member of the group now.
    False for a malformed key: it names no conversation anyone takes part in."""
    try:
        parsed = parse_conversation(conversation)
    except ValueError:
        return succeed(False)
    if parsed.users is not None:
        return succeed(user in parsed.users)
    if parsed.group_id is None or is_group_member is None:
        return succeed(False)
    return maybeDeferred(is_group_member, parsed.group_id, user).addCallback(bool)
