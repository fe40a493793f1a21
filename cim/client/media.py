"""Media messages: the image, voice or file message pointing at an uploaded file, and
how a console shows one."""

from __future__ import annotations

from cim.client.files import StoredFile
from cim.protocols import cim_pb2

__all__ = ["human_size", "media_message", "media_summary", "message_type_for"]


def message_type_for(mime: str) -> cim_pb2.MessageType:
    if mime.startswith("image/"):
        return cim_pb2.IMAGE
    if mime.startswith("audio/"):
        return cim_pb2.VOICE
    return cim_pb2.FILE


def media_message(
    to: str, stored: StoredFile, name: str, group: bool = False, duration_ms: int = 0
) -> cim_pb2.Message:
    """The image, voice or file message that points at an uploaded file."""
    media = cim_pb2.Media(
        url=stored.url,
        size=stored.size,
        mime=stored.mime,
        name=name,
        thumbnail_url=stored.thumbnail_url,
        duration_ms=duration_ms,
        width=stored.width,
        height=stored.height,
        file_id=stored.file_id,
    )
    message = cim_pb2.Message(type=message_type_for(stored.mime), media=media)
    if group:
        message.group = to
    else:
        message.to = to
    return message


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def media_summary(message: cim_pb2.Message) -> str:
    """How a console shows a media message: ``[image] name (1.2 MiB)``."""
    kind = cim_pb2.MessageType.Name(message.type).lower()
    media = message.media
    name = media.name or media.file_id or "file"
    detail = human_size(media.size)
    if message.type == cim_pb2.VOICE and media.duration_ms:
        detail += f", {media.duration_ms / 1000:.1f} s"
    return f"[{kind}] {name} ({detail})"
