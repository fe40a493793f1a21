"""The URLs the features store for clients to open (avatars, post media)."""

from __future__ import annotations

import re
import urllib.parse

__all__ = ["is_media_url"]

_HTTP_URL = re.compile(r"https?://\S+")


def is_media_url(value: str) -> bool:
    """An http(s) URL with a host that URL parsers accept, so every client can open it
    (``http://[`` passes the schema's pattern but breaks ``urlsplit``)."""
    if _HTTP_URL.fullmatch(value) is None:
        return False
    try:
        parts = urllib.parse.urlsplit(value)
        _ = parts.port
    except ValueError:
        return False
    return bool(parts.hostname)
