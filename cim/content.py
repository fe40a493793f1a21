"""What a client may put where other people read it: text, and URLs to open.

Text is stored and delivered exactly as sent, but control characters other than
newline and tab are refused where they come in (a message over IM, a string in the
logic API, a group's name), with a bad-request answer naming the field: an ESC
(``\\x1b``) starts an ANSI sequence that rewrites a terminal, a carriage return hides
what comes before it, and a C1 control (``\\x80``-``\\x9f``) is an escape of its own
for some terminals. Refusing them once at the edge means no client has to clean what
it receives. Everything else (emoji, other scripts, zero-width joiners) is text.

URLs that a client hands to other clients to open (a message's media, a post's
picture, an avatar) must be ``https``, or point at this node's own file service
(``[files] public_url``, whatever its scheme: a development node serves files over
plain http). ``javascript:``, ``data:``, ``file:`` and every other scheme are refused,
and so are URLs with a user name in them (``https://bank.example@evil.example/``).
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable

__all__ = ["MAX_URL_LENGTH", "MediaUrls", "control_characters_in"]

MAX_URL_LENGTH = 2048
_FORBIDDEN_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
"""Unicode's Cc category but for tab (\\x09) and newline (\\x0a)."""
_WHITESPACE = re.compile(r"\s")


def control_characters_in(text: str) -> bool:
    """Whether text holds a control character other than newline and tab."""
    return _FORBIDDEN_CONTROLS.search(text) is not None


def _parsed(url: str) -> urllib.parse.SplitResult | None:
    """The URL's parts when every client can open it: absolute, with a host, without
    white space, control characters or a user name, and a port in range."""
    if not url or len(url) > MAX_URL_LENGTH:
        return None
    if _WHITESPACE.search(url) or control_characters_in(url):
        return None
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # "https://h:99999" raises here
    except ValueError:
        return None
    if not parts.hostname or "@" in parts.netloc:
        return None
    return parts


class MediaUrls:
    """The URLs a client may send for others to open: https, or this node's files.

    ``own`` are base URLs of the node's file service (``[files] public_url``); the
    daemon adds the one its file service derived from its port with ``trust`` once it
    listens. Until then, and on a node without one, only https is accepted.
    """

    def __init__(self, own: Iterable[str] = ()) -> None:
        self._own: list[tuple[str, str, str]] = []
        for base in own:
            self.trust(base)

    def trust(self, base_url: str) -> None:
        """Accept URLs below base_url (``http://127.0.0.1:8082``), whatever its scheme."""
        parts = _parsed(base_url)
        if parts is None:
            raise ValueError(f"not a base URL: {base_url!r}")
        entry = (parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/") + "/")
        if entry not in self._own:
            self._own.append(entry)

    def accepts(self, url: str) -> bool:
        parts = _parsed(url)
        if parts is None:
            return False
        scheme = parts.scheme.lower()
        if scheme == "https":
            return True
        netloc = parts.netloc.lower()
        return any(
            scheme == own_scheme and netloc == own_netloc and parts.path.startswith(own_path)
            for own_scheme, own_netloc, own_path in self._own
        )
