"""What the chat console prints, and how it reads a typed line.

Plain functions of a message, a time or a line, apart from the console's state, so
each is tested on its own: the conversation plain lines go to, a command line split
into command and argument, a message's body and time as shown, the snippet that
names a message in an outcome line, and the offline summary's one line.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass

from cim.client.media import media_summary
from cim.protocols import cim_pb2


@dataclass(frozen=True)
class Conversation:
    """Where plain lines go: a user, or a group (by id, shown by name)."""

    target: str
    label: str
    group: bool = False

    def __str__(self) -> str:
        return f"#{self.label}" if self.group else self.label


def parse_command(line: str) -> tuple[str, str]:
    """Split an input line into (command, argument); a plain line is ("", text).

    A leading "//" escapes the slash, so a message may start with one.
    """
    line = line.strip()
    if line.startswith("//"):
        return "", line[1:]
    if not line.startswith("/"):
        return "", line
    name, _, rest = line.partition(" ")
    return name.lower(), rest.strip()


def snippet(text: str, words: int = 5, width: int = 32) -> str:
    """The first words of a message, so an outcome line says which message it is."""
    parts = text.split()
    short = " ".join(parts[:words])
    if len(short) > width:
        short = short[: width - 1].rstrip() + "…"
    elif len(parts) > words:
        short += " …"
    return f'"{short}"'


def clock(ms: int, now: float | None = None) -> str:
    """Time of day for today's messages; older ones (stored, history) get the date."""
    when = datetime.datetime.fromtimestamp(ms / 1000)
    today = datetime.datetime.fromtimestamp(time.time() if now is None else now).date()
    if when.date() == today:
        return when.strftime("%H:%M:%S")
    return when.strftime("%Y-%m-%d %H:%M")


def body(message: cim_pb2.Message) -> str:
    if message.change == cim_pb2.RECALL:  # a change entry, as history pages carry them
        return "(recalled a message)"
    if message.change == cim_pb2.EDIT:
        return f"(edited a message: {message.text})"
    if message.recalled:
        return "message recalled"
    if message.edited:
        return f"{message.text} (edited)"
    if message.HasField("media"):
        text = media_summary(message)
        return f"{text} {message.text}" if message.text else text
    if message.type == cim_pb2.LOCATION and message.HasField("location"):
        place = message.location
        name = f"{place.name} " if place.name else ""
        return f"[location] {name}({place.lat:.5f}, {place.lon:.5f})"
    return message.text


def offline_summary_line(
    summary: cim_pb2.OfflineSummaryA, group_names: dict[str, str] | None = None
) -> str:
    """ "3 unread messages with alice, 1 in #friends" (newest activity first, as the
    summary lists them)."""
    names = group_names or {}
    parts: list[str] = []
    for entry in summary.conversations:
        if not entry.count:
            continue
        if entry.group:
            where = f"in #{names.get(entry.group, entry.group)}"
        else:
            where = f"with {entry.peer or entry.conversation}"
        if not parts:
            noun = "message" if entry.count == 1 else "messages"
            parts.append(f"{entry.count} unread {noun} {where}")
        else:
            parts.append(f"{entry.count} {where}")
    return ", ".join(parts)
