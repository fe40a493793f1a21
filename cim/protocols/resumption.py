"""Session resumption: a reconnect to the same node without RSA and without the router.

A full handshake ends with a LoginResult that carries a ticket. The ticket is sealed
by the node to itself (ChaCha20-Poly1305 under a key derived from the node's private
key, the node id as associated data), so the client cannot read or change it and
another node cannot open it. Inside: a random ticket id, the expiry, the token hash
of the session it resumes, the user and device, and the resumption secret, which both
sides derive from the finished handshake's key material and which never travels.

The next hello to that node may carry the ticket instead of sealed key material, with
a fresh client nonce and an HMAC over the hello's fields keyed by the resumption
secret (the proof that the sender holds the secret, not only a copied ticket). The
node opens the ticket, checks the expiry and the proof (constant time), then asks the
state store to redeem the ticket id: one atomic step that refuses an id seen before
and answers the live session of the token hash, so a replayed resume hello fails and
a ticket dies with its token (logout, kick, password change, account deletion and
expiry all end the session). Both sides then derive the new session keys from the
resumption secret and both nonces, exactly as a full handshake does from its secret.

Nothing secret sits in the state store: only ticket ids already used.
"""

from __future__ import annotations

import hmac
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cim.backends.state import token_hash
from cim.interfaces import ISessionStore, SessionRecord
from cim.protocols import cim_pb2
from cim.protocols.crypto import SECRET_SIZE

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from cim.protocols.handshake import ClientHelloAccepted

__all__ = [
    "RESUME_REFUSED",
    "TICKET_ID_SIZE",
    "OpenedTicket",
    "Tickets",
    "next_resumption_secret",
    "proof_matches",
    "resume_proof",
]

RESUME_REFUSED = cim_pb2.HandshakeError.RESUME_REFUSED
RESUME_USED_BODY = (
    bytes((cim_pb2.HANDSHAKE_ERROR,))
    + cim_pb2.HandshakeError(
        reason=RESUME_REFUSED,
        message="the resumption ticket was used before or its session ended; "
        "log in again with a full hello",
    ).SerializeToString()
)
"""The HANDSHAKE_ERROR for a ticket the state store would not redeem."""
TICKET_ID_SIZE = 16
_TICKET_VERSION = 1
_AEAD_NONCE_SIZE = 12
_MAX_TICKET_SIZE = 1024
SECRET_LABEL = b"cim resumption secret"
"""HKDF info prefix of the resumption secret: never equal to a key made for another use."""
PROOF_LABEL = b"cim resume hello"
"""Prefix of the proof's HMAC input."""
TICKET_KEY_LABEL = b"cim resumption ticket key"
"""NodeKey.derived_key label of the key tickets are sealed with."""


def next_resumption_secret(
    secret: bytes, client_nonce: bytes, server_nonce: bytes, fingerprint: bytes
) -> bytes:
    """The resumption secret a finished handshake leaves behind (both sides).

    HKDF-SHA256 over the session's input secret (the client's sealed secret, or the
    resumption secret a resumed session started from), both nonces as salt, and its
    own label and the node key fingerprint as info: it differs from every session key
    and from the secret it came from, so a chain of resumptions never repeats a key.
    """
    return HKDF(
        algorithm=hashes.SHA256(),
        length=SECRET_SIZE,
        salt=client_nonce + server_nonce,
        info=SECRET_LABEL + fingerprint,
    ).derive(secret)


def resume_proof(secret: bytes, digest: bytes, ticket: bytes, device: str) -> bytes:
    """HMAC-SHA256 keyed by the resumption secret over the resume hello's fields.

    ``digest`` is the hello_digest of the plaintext fields a full hello also carries
    (version, suites, client nonce, key fingerprint); the ticket and the device follow,
    length-prefixed. A hello with any of them changed no longer matches.
    """
    encoded = device.encode("utf-8")
    if len(ticket) > 0xFFFF or len(encoded) > 255:
        raise ValueError("the ticket or the device name is too long")
    message = b"".join(
        (
            PROOF_LABEL,
            digest,
            struct.pack(">H", len(ticket)),
            ticket,
            bytes((len(encoded),)),
            encoded,
        )
    )
    return hmac.digest(secret, message, "sha256")


@dataclass(frozen=True)
class OpenedTicket:
    """A ticket this node sealed, opened: what the resume hello claims to resume."""

    ticket_id: str
    expires_at: float
    token_hash: str = field(repr=False)
    user: str
    device: str
    secret: bytes = field(repr=False)


class Tickets:
    """Seals and opens this node's resumption tickets.

    Layout of a ticket: version byte, 12-byte AEAD nonce, then ChaCha20-Poly1305 of
    (16-byte id, u64 expiry in ms, 32-byte resumption secret, 32-byte token hash,
    u8-length-prefixed user, u8-length-prefixed device) with the node id as associated
    data. Only this node's key opens it; a ticket for another node fails like a
    forged one.
    """

    def __init__(
        self,
        ticket_key: bytes,  # NodeKey.derived_key(TICKET_KEY_LABEL)
        node_id: str,
        window: float,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if len(ticket_key) != 32:
            raise ValueError("the ticket key must be 32 bytes")
        self._aead = ChaCha20Poly1305(ticket_key)
        self._aad = node_id.encode("utf-8")
        self.window = window
        """[im] resume_window in seconds; 0: no tickets are issued (or taken)."""
        self._random = random_bytes

    def seal(self, now: float, token_hash: str, user: str, device: str, secret: bytes) -> bytes:
        """A new ticket good for ``window`` seconds from ``now``."""
        user_bytes, device_bytes = user.encode("utf-8"), device.encode("utf-8")
        if len(user_bytes) > 255 or len(device_bytes) > 255:
            raise ValueError("the user or device name is too long for a ticket")
        if len(secret) != SECRET_SIZE:
            raise ValueError(f"the resumption secret must be {SECRET_SIZE} bytes")
        plaintext = b"".join(
            (
                self._random(TICKET_ID_SIZE),
                struct.pack(">Q", int((now + self.window) * 1000)),
                secret,
                bytes.fromhex(token_hash),
                bytes((len(user_bytes),)),
                user_bytes,
                bytes((len(device_bytes),)),
                device_bytes,
            )
        )
        nonce = self._random(_AEAD_NONCE_SIZE)
        return bytes((_TICKET_VERSION,)) + nonce + self._aead.encrypt(nonce, plaintext, self._aad)

    def issue_into(
        self,
        result: cim_pb2.LoginResult,
        record: SessionRecord,
        accepted: ClientHelloAccepted,
        now: float,
    ) -> None:
        """Put the next ticket of this session into its (OK) LoginResult, if resumption
        is on. The device is the one the LoginResult names, which the client resumes as."""
        if self.window <= 0 or not record.token_hash:
            return
        result.resume_ticket = self.seal(
            now, record.token_hash, record.user, result.device, accepted.resumption_secret()
        )
        result.resume_window_ms = int(self.window * 1000)

    def open(self, ticket: bytes) -> OpenedTicket | None:
        """The ticket's contents, or None for anything this node did not seal (for it)."""
        if not 1 + _AEAD_NONCE_SIZE < len(ticket) <= _MAX_TICKET_SIZE:
            return None
        if ticket[0] != _TICKET_VERSION:
            return None
        nonce = ticket[1 : 1 + _AEAD_NONCE_SIZE]
        try:
            plain = self._aead.decrypt(nonce, ticket[1 + _AEAD_NONCE_SIZE :], self._aad)
        except InvalidTag:
            return None
        fixed = TICKET_ID_SIZE + 8 + SECRET_SIZE + 32
        if len(plain) < fixed + 2:
            return None
        (expires_ms,) = struct.unpack_from(">Q", plain, TICKET_ID_SIZE)
        secret = plain[TICKET_ID_SIZE + 8 : TICKET_ID_SIZE + 8 + SECRET_SIZE]
        token_hash = plain[TICKET_ID_SIZE + 8 + SECRET_SIZE : fixed].hex()
        user_end = fixed + 1 + plain[fixed]
        device_end = user_end + 1 + plain[user_end]
        return OpenedTicket(
            ticket_id=plain[:TICKET_ID_SIZE].hex(),
            expires_at=expires_ms / 1000,
            token_hash=token_hash,
            user=plain[fixed + 1 : user_end].decode("utf-8"),
            device=plain[user_end + 1 : device_end].decode("utf-8"),
            secret=secret,
        )


def proof_matches(
    opened: OpenedTicket, digest: bytes, ticket: bytes, device: str, proof: bytes
) -> bool:
    """The resume hello's proof, checked in constant time."""
    try:
        expected = resume_proof(opened.secret, digest, ticket, device)
    except ValueError:
        return False
    return hmac.compare_digest(expected, proof)


def session_of(
    sessions: ISessionStore, accepted: ClientHelloAccepted
) -> Deferred[SessionRecord | None]:
    """The session a checked hello logs into: the token's, or the ticket's once the
    state store redeemed the ticket (None: unknown token, or ticket refused)."""
    ticket = accepted.ticket
    if ticket is None:
        return sessions.session_for_token(token_hash(accepted.token))

    def same_user(record: SessionRecord | None) -> SessionRecord | None:
        if record is None or record.user != ticket.user:
            return None
        return record

    d = sessions.redeem_ticket(ticket.ticket_id, ticket.token_hash, ticket.expires_at)
    return d.addCallback(same_user)
