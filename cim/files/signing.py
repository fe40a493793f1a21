"""The file service's key: signed download URLs and instant-upload challenges.

A signed URL ``/files/{id}?expires=T&sig=S`` is short-lived and bound to one user: S
is an HMAC-SHA256 of the file id, the variant (the file or its thumbnail), the user
and T under a key only the file service knows. The user is not in the URL; the
download checks S against the user of the bearer token, so a URL is worth nothing
to anyone else, and nothing at all without that user's token. Every node that serves
the same storage must use the same key, so the key is a file an operator can put on
the shared mount (``[files] url_key``). Each use has its own first line in what is
signed, so a MAC made for one purpose never passes for another.
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
    """Signs and checks (file id, variant, user, expiry), and MACs for other purposes."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def __repr__(self) -> str:
        return "UrlSigner(<key hidden>)"

    def mac(self, purpose: str, *fields: object) -> str:
        """base64url (no padding) of HMAC-SHA256 over the purpose and the fields."""
        message = "\n".join([purpose, *(str(field) for field in fields)]).encode()
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def signature(self, file_id: str, variant: str, user: str, expires: int) -> str:
        return self.mac("cim-file-url-v2", file_id, variant, user, expires)

    def check(
        self, file_id: str, variant: str, user: str, expires: int, signature: str, now: float
    ) -> bool:
        """True when the signature is ours, for this user, and ``expires`` has not passed."""
        if expires < now:
            return False
        expected = self.signature(file_id, variant, user, expires)
        return hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace"))


class KeyFileSigner(UrlSigner):
    """A ``UrlSigner`` whose key is the file at ``path``, read or created by ``load``.

    The file service is made with the service tree, before anything on disk is read or
    created (the key may live on a shared mount, and a key that cannot be read must
    stop the start-up with ``[files] url_key: why``); ``load`` runs when the service
    starts, before its port opens. A signature asked for before that is a bug, never a
    URL signed with an empty key.
    """

    def __init__(self, path: str) -> None:
        super().__init__(b"")
        self.path = path

    def __repr__(self) -> str:
        return f"KeyFileSigner({self.path!r}, <key hidden>)"

    def load(self) -> None:
        self._key = load_or_create_key(self.path)

    def mac(self, purpose: str, *fields: object) -> str:
        if not self._key:
            raise RuntimeError(f"the URL signing key {self.path} is used before it was loaded")
        return super().mac(purpose, *fields)
