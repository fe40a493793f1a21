"""Proof of possession for instant upload: a keyed hash of a range the server picks.

Knowing a file's MD5 and size must not be enough to get the file: both travel in
descriptions, logs and bug reports. So before the server links an existing blob to a
caller, the caller proves they have the bytes. The server answers ``files/check``
with a challenge: a random 128-bit nonce and a random range of the content (up to
``PROOF_RANGE`` bytes, the whole file when it is smaller); the proof is
``hex(HMAC-SHA256(key=nonce, message=those bytes))``.

The challenge is stateless, so any node of a cluster can check it: its fields travel
in a token MACed with the file service's key, bound to the user, the MD5, the size
and an expiry of ``CHALLENGE_TTL`` seconds. A challenge is issued whether or not the
content is stored, and a wrong proof is answered as unknown content, so the check
tells nobody without the bytes whether a file exists.

Both sides use ``proof_of``: the client library (``cim.client.files``) and the
server, which reads the range from the blob on its file pool.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Any

from cim.files.signing import UrlSigner
from cim.json_convention import iso_time

__all__ = [
    "CHALLENGE_TTL",
    "PROOF_RANGE",
    "Challenge",
    "ChallengeRefused",
    "Challenges",
    "check_proof_format",
    "proof_of",
    "same_proof",
]

PROOF_RANGE = 64 * 1024
"""Bytes the proof covers (at most): cheap for the server to read, whatever the size."""
CHALLENGE_TTL = 120
"""Seconds a challenge may be answered in: enough to read 64 KiB on a slow phone."""
NONCE_BYTES = 16

_TOKEN = re.compile(r"(\d{1,19})\.(\d{1,19})\.(\d{1,19})\.([A-Za-z0-9_-]{22})\.([A-Za-z0-9_-]{43})")
_PROOF = re.compile(r"[0-9a-f]{64}")


def proof_of(nonce: str, data: bytes) -> str:
    """The proof for a challenge: hex HMAC-SHA256 of the range's bytes under the nonce."""
    key = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
    return hmac.new(key, data, hashlib.sha256).hexdigest()


class ChallengeRefused(Exception):
    """A challenge token that is malformed, not this caller's, or too old."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Challenge:
    nonce: str
    offset: int
    length: int
    expires: int
    token: str

    def as_json(self) -> dict[str, Any]:
        return {
            "token": self.token,
            "nonce": self.nonce,
            "offset": self.offset,
            "length": self.length,
            "expires_at": iso_time(self.expires),
        }


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class Challenges:
    """Issues and checks challenges under the file service's key."""

    def __init__(self, signer: UrlSigner) -> None:
        self._signer = signer

    def _mac(
        self, user: str, md5: str, size: int, offset: int, length: int, expires: int, nonce: str
    ) -> str:
        return self._signer.mac("cim-file-proof", user, md5, size, offset, length, expires, nonce)

    def issue(self, user: str, md5: str, size: int, now: float) -> Challenge:
        length = min(size, PROOF_RANGE)
        offset = secrets.randbelow(size - length + 1)
        expires = int(now) + CHALLENGE_TTL
        nonce = _b64(secrets.token_bytes(NONCE_BYTES))
        mac = self._mac(user, md5, size, offset, length, expires, nonce)
        token = f"{offset}.{length}.{expires}.{nonce}.{mac}"
        return Challenge(nonce, offset, length, expires, token)

    def verify(self, user: str, md5: str, size: int, token: Any, now: float) -> Challenge:
        """The challenge ``token`` stands for, if it was issued to ``user`` for this content."""
        match = _TOKEN.fullmatch(token) if isinstance(token, str) else None
        if match is None:
            raise ChallengeRefused(
                "bad_challenge", "'challenge' is not a token this service issued"
            )
        offset, length, expires = (int(match.group(n)) for n in (1, 2, 3))
        nonce, mac = match.group(4), match.group(5)
        expected = self._mac(user, md5, size, offset, length, expires, nonce)
        if not hmac.compare_digest(expected.encode(), mac.encode()):
            raise ChallengeRefused(
                "bad_challenge", "'challenge' was not issued to you for this md5 and size"
            )
        if expires < now:
            raise ChallengeRefused(
                "challenge_expired", "the challenge has expired; ask for a new one"
            )
        return Challenge(nonce, offset, length, expires, token)


def check_proof_format(proof: Any) -> str:
    """The proof as 64 lowercase hex digits, or ChallengeRefused."""
    if not isinstance(proof, str) or not _PROOF.fullmatch(proof.lower()):
        raise ChallengeRefused("bad_request", "'proof' must be 64 hexadecimal digits")
    return proof.lower()


def same_proof(expected: str, given: str) -> bool:
    try:
        return hmac.compare_digest(binascii.unhexlify(expected), binascii.unhexlify(given))
    except (binascii.Error, ValueError):
        return False
