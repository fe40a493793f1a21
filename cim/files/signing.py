"""Signed download URLs: what lets a message's receiver fetch a file without a token.

A message carries ``/files/{id}?expires=T&sig=S`` where S is an HMAC-SHA256 of the
file id, the variant (the file or its thumbnail) and T under a key only the file
service knows. Every node that serves the same storage must use the same key, so the
key is a file an operator can put on the shared mount (``[files] url_key``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets

KEY_BYTES = 32


class UrlKeyError(Exception):
    """The signing key cannot be read, created, or is readable by others."""


def load_or_create_key(path: str) -> bytes:
    """The key in ``path``, created (mode 0600) on first start.

    ``O_EXCL`` makes the creation safe when several nodes start at once on a shared
    directory: one writes the key, the others read it. A key readable by group or
    others is refused, like the node's RSA key.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_key(path)
    except OSError as exc:
        raise UrlKeyError(f"cannot create the URL signing key {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(base64.b64encode(secrets.token_bytes(KEY_BYTES)) + b"\n")
        handle.flush()
        os.fsync(handle.fileno())
    return _read_key(path)


def _read_key(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            raw = handle.read()
    except OSError as exc:
        raise UrlKeyError(f"cannot read the URL signing key {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise UrlKeyError(
            f"the URL signing key {path} is accessible by group or others "
            f"(mode {mode & 0o777:04o}); run: chmod 600 {path}"
        )
    try:
        key = base64.b64decode(raw.strip(), validate=True)
    except ValueError:
        key = b""
    if len(key) < 16:
        # A concurrent creator may not have written it yet; a real key is 32 bytes.
        raise UrlKeyError(f"the URL signing key {path} is empty or malformed")
    return key


class UrlSigner:
    """Signs and checks (file id, variant, expiry) triples."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def __repr__(self) -> str:
        return "UrlSigner(<key hidden>)"

    def signature(self, file_id: str, variant: str, expires: int) -> str:
        message = f"cim-file-url\n{file_id}\n{variant}\n{expires}".encode()
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def check(self, file_id: str, variant: str, expires: int, signature: str, now: float) -> bool:
        """True when the signature is ours and ``expires`` has not passed."""
        if expires < now:
            return False
        expected = self.signature(file_id, variant, expires)
        return hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace"))
