"""IM messages and send outcomes as the JSON records cim-client prints.

Built field by field rather than with protobuf's JSON mapping, which writes 64-bit
integers (a file's size) as strings and empty fields as "": the convention
(cim.json_convention) wants numbers as numbers and absent values left out. Only the
message id stays a string (it can pass 2^53).
"""

from __future__ import annotations

import json
from typing import Any

from cim.json_convention import iso_time, present

MEDIA_FIELDS: tuple[str, ...] = ("url", "mime", "name", "thumbnail_url", "duration_ms")
MEDIA_FIELDS += ("width", "height", "file_id")


def message_record(message: Any) -> dict[str, Any]:
    """One received (or archived) message."""
    from cim.protocols import cim_pb2

    record: dict[str, Any] = {
        "msg_id": str(message.id),
        "from": getattr(message, "from"),
        "to": message.to,
        "group": message.group,
        "type": cim_pb2.MessageType.Name(message.type).lower(),
        "text": message.text,
        "sent_at": iso_time(message.sent_at_ms / 1000),
        "device": message.device,
        "conversation": message.conversation,
        "seq": message.seq or None,
    }
    if message.change:  # a change entry (history prints them; listen prints change_record)
        record["change"] = cim_pb2.ChangeKind.Name(message.change).lower()
        record["replaces"] = str(message.replaces)
    if message.recalled:
        record["recalled"] = True
        record["changed_by"] = message.changed_by
    if message.edited:
        record["edited"] = True
    if message.changed_at_ms:
        record["changed_at"] = iso_time(message.changed_at_ms / 1000)
    if message.HasField("media"):
        media = message.media
        fields = {name: getattr(media, name) or None for name in MEDIA_FIELDS}
        record["media"] = present(fields) | {"size": media.size}  # 0 bytes is a size
    if message.HasField("location"):
        location = message.location
        record["location"] = {"lat": location.lat, "lon": location.lon}  # 0 is a place
        if location.accuracy_m:
            record["location"]["accuracy_m"] = location.accuracy_m
        if location.name:
            record["location"]["name"] = location.name
    return present(record)


def message_json(message: Any) -> str:
    """One received message as the JSON line ``listen`` and ``history`` print."""
    return json.dumps(message_record(message), ensure_ascii=False)


def change_record(change: Any) -> dict[str, Any]:
    """A recall or an edit (``cim.client.corrections.Change``) as ``listen`` prints it
    and ``recall``/``edit`` answer: ``event`` says which."""
    record: dict[str, Any] = {
        "event": change.event,
        "msg_id": str(change.msg_id),
        "conversation": change.conversation,
        "seq": change.seq or None,
        "by": change.by,
        "text": change.text if change.event == "edit" else None,
        "at": iso_time(change.at_ms / 1000) if change.at_ms else None,
        "entry_seq": change.entry_seq or None,
    }
    return present(record)


def summary_record(entry: Any) -> dict[str, Any]:
    """One conversation of the catch-up summary (``cim-client sync``)."""
    record: dict[str, Any] = {
        "conversation": entry.conversation,
        "peer": entry.peer,
        "group": entry.group,
        "count": entry.count,  # 0 is a count
        "last_seq": entry.last_seq,
        "cursor": entry.cursor,
    }
    if entry.read_seq:
        record["read_seq"] = entry.read_seq  # the user's read mark (any device)
    if entry.peer_read_seq:
        record["peer_read_seq"] = entry.peer_read_seq  # a 1:1: how far the peer read
    if entry.HasField("newest"):
        record["newest"] = message_record(entry.newest)
        record["newest_cut"] = entry.newest_cut
    return present(record)


def outcome_record(outcome: Any) -> dict[str, Any]:
    """A sent message's outcome: msg_id, status, to, and the reason when it failed."""
    record = {
        "msg_id": str(outcome.msg_id) if outcome.msg_id else None,
        "status": outcome.status,
        "to": outcome.to,
        "reason": outcome.reason,
    }
    return present(record)


def typing_record(notice: Any) -> dict[str, Any]:
    """A typing notice, as ``listen`` prints it among the messages: ``event`` says it
    is not a message; ``state`` is "typing" or "stopped"."""
    from cim.protocols import cim_pb2

    record = {
        "event": "typing",
        "state": "stopped" if notice.state == cim_pb2.TYPING_STOPPED else "typing",
        "from": getattr(notice, "from"),
        "device": notice.device,
        "to": notice.to,
        "group": notice.group,
        "conversation": notice.conversation,
    }
    return present(record)


def typing_json(notice: Any) -> str:
    return json.dumps(typing_record(notice), ensure_ascii=False)
