"""What a push says: built-in texts in the registration's language, or a preview.

With ``[push] show_text = false`` (the default) no message text leaves the server:
the title names who wrote ("New message from alice", "SOS from watch1") and the body
is empty. With ``show_text = true`` the body is the message's text cut to
``PREVIEW_LENGTH`` characters (a media message says what it is, never its URL). A
system message (the logic service's notices) is never previewed: its text is JSON
meant for the app, which fetches it when it opens.
"""

from __future__ import annotations

import json
from typing import Any

from cim.protocols import cim_pb2

__all__ = ["PREVIEW_LENGTH", "notice_fields", "preview", "sos_device", "title_for"]

PREVIEW_LENGTH = 100

_TITLES: dict[str, dict[str, str]] = {
    "en": {
        "message": "New message from {sender}",
        "group": "New message from {sender} in a group",
        "system": "New notification",
        "sos": "SOS from {sender}",
    },
    "zh": {
        "message": "来自{sender}的新消息",
        "group": "{sender}在群聊中发来新消息",
        "system": "新通知",
        "sos": "{sender}发出紧急求助",
    },
}
_MEDIA = {
    cim_pb2.IMAGE: "[image]",
    cim_pb2.VOICE: "[voice]",
    cim_pb2.FILE: "[file]",
    cim_pb2.LOCATION: "[location]",
}


def _language(locale: str | None) -> str:
    """``zh``, ``zh-Hans-CN``, ``zh_TW`` -> zh; anything unknown -> en."""
    if not locale:
        return "en"
    language = locale.replace("_", "-").split("-")[0].lower()
    return language if language in _TITLES else "en"


def title_for(kind: str, sender: str, locale: str | None) -> str:
    return _TITLES[_language(locale)][kind].format(sender=sender)


def preview(message: cim_pb2.Message, show_text: bool) -> str:
    """The body of a push: empty unless show_text; never a system message's text."""
    if not show_text or message.type == cim_pb2.SYSTEM:
        return ""
    if message.type in _MEDIA:
        return _MEDIA[message.type]
    return message.text[:PREVIEW_LENGTH]


def notice_fields(message: cim_pb2.Message) -> dict[str, Any]:
    """A system message's JSON (cim.logic.notices); empty when it is not an object."""
    try:
        fields = json.loads(message.text)
    except ValueError:
        return {}
    return fields if isinstance(fields, dict) else {}


def sos_device(fields: dict[str, Any]) -> str:
    """The device that raised an SOS, as the notice names it."""
    device = fields.get("device")
    return device if isinstance(device, str) and device else "?"
