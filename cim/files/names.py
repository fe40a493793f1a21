"""Client-supplied names and MIME types, made harmless for display and for headers.

A name is only ever shown to people and put in ``Content-Disposition``; it never
reaches a filesystem path (blobs are named by their SHA-256). Still, it is stripped
of any directory part and control characters, so a receiver that saves the file
under that name does not write ``../../etc/passwd``.
"""

from __future__ import annotations

import re
import unicodedata
import urllib.parse

MAX_NAME_LENGTH = 255
DEFAULT_NAME = "file"
DEFAULT_MIME = "application/octet-stream"

_MIME = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,62}/[a-z0-9][a-z0-9!#$&^_.+-]{0,62}")

# Types a browser may render from our origin without being told to download them.
_INLINE_PREFIXES = ("audio/", "video/")


def clean_name(raw: str) -> str:
    """A display name with no directory, no control characters, at most 255 characters.

    The extension survives truncation, because receivers pick an icon and an
    application by it.
    """
    text = unicodedata.normalize("NFC", raw)
    text = "".join(ch for ch in text if unicodedata.category(ch)[0] != "C")
    text = re.split(r"[/\\]", text)[-1].strip()
    text = text.lstrip(".").strip()
    if not text:
        return DEFAULT_NAME
    if len(text) > MAX_NAME_LENGTH:
        stem, dot, extension = text.rpartition(".")
        if dot and stem and 0 < len(extension) <= 16:
            text = stem[: MAX_NAME_LENGTH - len(extension) - 1].rstrip() + "." + extension
        else:
            text = text[:MAX_NAME_LENGTH].rstrip()
    return text or DEFAULT_NAME


def clean_mime(raw: str | None) -> str | None:
    """The lowercased type/subtype without parameters, or None when it is not one."""
    if raw is None or raw == "":
        return DEFAULT_MIME
    value = raw.split(";", 1)[0].strip().lower()
    return value if _MIME.fullmatch(value) else None


def is_inline(mime: str, verified_image: bool) -> bool:
    """Whether a browser may show the file in place instead of downloading it.

    Only images Pillow has decoded count as images: a client can call any bytes
    ``image/svg+xml`` or ``text/html``, and those could run script on our origin.
    """
    return verified_image or mime.startswith(_INLINE_PREFIXES)


def content_disposition(name: str, inline: bool) -> bytes:
    """RFC 6266 with an ASCII fallback and the exact name in RFC 5987 ``filename*``."""
    fallback = "".join(ch if 0x20 <= ord(ch) < 0x7F and ch not in '"\\%;' else "_" for ch in name)
    encoded = urllib.parse.quote(name, safe="")
    kind = "inline" if inline else "attachment"
    return f"{kind}; filename=\"{fallback}\"; filename*=UTF-8''{encoded}".encode("ascii")
