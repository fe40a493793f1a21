"""The one-round-trip handshake, both sides, as pure functions over frame bodies.

No I/O and no clock reads happen here (the replay guard takes its clock), so the
node protocol and the client drive it from whatever event they like and the tests
check it byte for byte. The node does not look at the token or the timestamp: the
token lookup is asynchronous and belongs to the caller, which also consults a
``ReplayGuard`` before trusting a hello.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError
from twisted.internet.interfaces import IReactorTime

from cim.protocols import cim_pb2
from cim.protocols.crypto import (
    PROTOCOL_VERSION,
    SECRET_SIZE,
    FrameAuthenticationError,
    FrameOpener,
    FrameSealer,
    NodeKey,
    fingerprint_of,
    seal_for_node,
    session_ciphers,
)
from cim.protocols.resumption import (
    RESUME_REFUSED,
    OpenedTicket,
    Tickets,
    next_resumption_secret,
    proof_matches,
    resume_proof,
)

__all__ = [
    "MAX_OFFERED_SUITES",
    "MAX_SUITE_NAME",
    "MAX_TOKEN_LENGTH",
    "NONCE_SIZE",
    "PROTOCOL_VERSION",
    "ClientHandshake",
    "ClientHelloAccepted",
    "HandshakeRefused",
    "ReplayGuard",
    "Resumption",
    "accept_client_hello",
    "hello_digest",
]

NONCE_SIZE = 16
MAX_TOKEN_LENGTH = 256
MAX_OFFERED_SUITES = 16
MAX_SUITE_NAME = 64
HELLO_LABEL = b"cim client hello"
"""Fixed prefix of the hello digest, so it can never equal a hash made for another use."""

# Resolved once: enum attribute lookups on the generated module are not free.
_CLIENT_HELLO = cim_pb2.CLIENT_HELLO
_HANDSHAKE_ERROR = cim_pb2.HANDSHAKE_ERROR
_LOGIN_RESULT = cim_pb2.LOGIN_RESULT
_UNSUPPORTED_VERSION = cim_pb2.HandshakeError.UNSUPPORTED_VERSION
_SUITE_NOT_ALLOWED = cim_pb2.HandshakeError.SUITE_NOT_ALLOWED
_UNKNOWN_KEY = cim_pb2.HandshakeError.UNKNOWN_KEY
_BAD_HELLO = cim_pb2.HandshakeError.BAD_HELLO


class HandshakeRefused(Exception):
    """The node said no; carries exactly what goes into the HANDSHAKE_ERROR frame."""

    def __init__(
        self,
        reason: int,
        message: str,
        allowed_suites: Sequence[str] = (),
        retry_after_ms: int = 0,
    ) -> None:
        super().__init__(reason, message)
        self.reason = reason
        self.message = message
        self.allowed_suites: tuple[str, ...] = tuple(allowed_suites)
        self.retry_after_ms = retry_after_ms
        """RATE_LIMITED: how long to wait before the next hello."""

    @property
    def reason_name(self) -> str:
        """The Reason enum name, lowercased: a stable metrics label."""
        try:
            return cim_pb2.HandshakeError.Reason.Name(self.reason).lower()
        except ValueError:
            return str(self.reason)

    def to_body(self) -> bytes:
        error = cim_pb2.HandshakeError(
            reason=self.reason,  # type: ignore[arg-type]
            message=self.message,
            allowed_suites=self.allowed_suites,
            retry_after_ms=self.retry_after_ms,
        )
        return bytes((_HANDSHAKE_ERROR,)) + error.SerializeToString()

    @classmethod
    def from_body(cls, body: bytes) -> HandshakeRefused:
        """Rebuild the refusal on the client from a HANDSHAKE_ERROR frame body."""
        if not body or body[0] != _HANDSHAKE_ERROR:
            raise ValueError("not a HANDSHAKE_ERROR frame")
        error = cim_pb2.HandshakeError()
        try:
            error.ParseFromString(body[1:])
        except DecodeError:
            raise ValueError("malformed HANDSHAKE_ERROR frame") from None
        return cls(error.reason, error.message, tuple(error.allowed_suites), error.retry_after_ms)

    def __str__(self) -> str:
        text = f"{self.reason_name}: {self.message}"
        if self.allowed_suites:
            text += f" (the node allows: {', '.join(self.allowed_suites)})"
        return text


def _bad_hello(message: str) -> HandshakeRefused:
    return HandshakeRefused(_BAD_HELLO, message)


def hello_digest(
    version: int,
    offered: Sequence[str],
    suite: str,
    client_nonce: bytes,
    fingerprint: bytes,
) -> bytes:
    """SHA-256 over a canonical encoding of every plaintext field of a ClientHello.

    The client seals it inside KeyMaterial (RSA-OAEP, which nobody without the node key
    can read or alter), and the node recomputes it from the hello it received: a
    captured hello whose version, suites, nonce or fingerprint were changed on the
    way no longer matches its own sealed key material. Fixed-size or length-prefixed
    fields, count-prefixed list: two different hellos never encode to the same bytes.
    """
    if len(offered) > 255:
        raise ValueError("at most 255 suites can be offered")
    parts = [HELLO_LABEL, struct.pack(">I", version)]
    for field_bytes in (client_nonce, fingerprint):
        if len(field_bytes) > 255:
            raise ValueError("a hello field is longer than 255 bytes")
        parts.append(bytes((len(field_bytes),)))
        parts.append(field_bytes)
    parts.append(bytes((len(offered),)))
    for name in (*offered, suite):
        encoded = name.encode("utf-8")
        if len(encoded) > 255:
            raise ValueError("a suite name is longer than 255 bytes")
        parts.append(bytes((len(encoded),)))
        parts.append(encoded)
    return hashlib.sha256(b"".join(parts)).digest()


@dataclass
class ClientHelloAccepted:
    """A hello that decrypted and checked out; the token is not verified yet."""

    suite: str
    token: str = field(repr=False)
    device: str
    timestamp_ms: int
    client_nonce: bytes = field(repr=False)
    server_nonce: bytes = field(repr=False)
    sealer: FrameSealer = field(repr=False)
    opener: FrameOpener = field(repr=False)
    session_secret: bytes = field(repr=False, default=b"")
    """What the session keys were derived from: the next resumption secret comes from it."""
    fingerprint: bytes = field(repr=False, default=b"")
    ticket: OpenedTicket | None = None
    """Set when the hello resumed with a ticket (then ``token`` is empty)."""

    def resumption_secret(self) -> bytes:
        """The secret the ticket issued for this session carries (cim.protocols.resumption)."""
        return next_resumption_secret(
            self.session_secret, self.client_nonce, self.server_nonce, self.fingerprint
        )

    def reply_body(self, first_plaintext: bytes) -> bytes:
        """The node's answer: type byte, server nonce, then the first sealed frame.

        ``first_plaintext`` is the LOGIN_RESULT type byte and a LoginResult. Call it
        once: it consumes the node's first frame counter.
        """
        return bytes((_LOGIN_RESULT,)) + self.server_nonce + self.sealer.seal(first_plaintext)


def accept_client_hello(
    body: bytes,
    node_key: NodeKey,
    allowed_suites: Sequence[str],
    random_bytes: Callable[[int], bytes] = os.urandom,
    *,
    tickets: Tickets | None = None,
    now: float = 0.0,
) -> ClientHelloAccepted:
    """Check a CLIENT_HELLO frame body and derive the session's ciphers (node side).

    Raises HandshakeRefused with the reason to send back. The cheap checks come
    before the RSA decryption so junk costs the node as little as possible. A hello
    with a resumption ticket is checked against ``tickets`` at time ``now`` instead
    (no RSA); the caller still has to redeem the ticket in the state store.
    """
    if not body or body[0] != _CLIENT_HELLO:
        raise _bad_hello("the first frame must be a CLIENT_HELLO")
    hello = cim_pb2.ClientHello()
    try:
        hello.ParseFromString(body[1:])
    except DecodeError:
        raise _bad_hello("the ClientHello cannot be parsed") from None
    if hello.version != PROTOCOL_VERSION:
        raise HandshakeRefused(
            _UNSUPPORTED_VERSION,
            f"protocol version {hello.version} is not supported; this node speaks "
            f"version {PROTOCOL_VERSION}",
        )
    offered = tuple(hello.offered_suites)
    if len(offered) > MAX_OFFERED_SUITES or any(
        not name or len(name.encode("utf-8")) > MAX_SUITE_NAME for name in offered
    ):
        raise _bad_hello(
            f"offered_suites must hold at most {MAX_OFFERED_SUITES} names "
            f"of 1 to {MAX_SUITE_NAME} bytes"
        )
    allowed = tuple(allowed_suites)
    if hello.suite not in allowed:
        raise HandshakeRefused(
            _SUITE_NOT_ALLOWED,
            f"cipher suite {hello.suite!r} is not allowed here; "
            f"this node allows: {', '.join(allowed)}",
            allowed,
        )
    if hello.suite not in offered:
        raise HandshakeRefused(
            _SUITE_NOT_ALLOWED,
            f"the chosen suite {hello.suite!r} is not among offered_suites",
            allowed,
        )
    if not hmac.compare_digest(hello.key_fingerprint, node_key.fingerprint):
        raise HandshakeRefused(
            _UNKNOWN_KEY,
            "key_fingerprint is not this node's key; log in through the router again",
        )
    if len(hello.client_nonce) != NONCE_SIZE:
        raise _bad_hello(f"client_nonce must be {NONCE_SIZE} bytes")
    if hello.resume_ticket:
        return _accept_resumption(hello, offered, node_key, tickets, now, random_bytes)
    # Decryption, parse and digest failures get the same message: the node must not
    # tell a prober which step failed (nor that an altered blob still decrypted).
    undecryptable = "sealed_key cannot be decrypted to valid key material for this hello"
    try:
        sealed = node_key.unseal(hello.sealed_key)
        material = cim_pb2.KeyMaterial()
        material.ParseFromString(sealed)
    except (ValueError, DecodeError):
        raise _bad_hello(undecryptable) from None
    # The transcript: every plaintext field the replay guard and the key schedule rely
    # on must be the one the client sealed. A replay with any of them changed stops
    # here, before the token is looked up or any session is touched.
    expected = hello_digest(
        hello.version, offered, hello.suite, hello.client_nonce, hello.key_fingerprint
    )
    if not hmac.compare_digest(material.hello_digest, expected):
        raise _bad_hello(undecryptable)
    if len(material.secret) != SECRET_SIZE:
        raise _bad_hello(f"the key material secret must be {SECRET_SIZE} bytes")
    if not material.token or len(material.token) > MAX_TOKEN_LENGTH:
        raise _bad_hello(f"the token must be 1 to {MAX_TOKEN_LENGTH} characters")
    return _accepted(
        hello,
        offered,
        node_key,
        random_bytes,
        secret=material.secret,
        token=material.token,
        device=material.device,
        timestamp_ms=material.timestamp_ms,
    )


def _resume_refused(message: str) -> HandshakeRefused:
    return HandshakeRefused(RESUME_REFUSED, message + "; log in again with a full hello")


def _accept_resumption(
    hello: cim_pb2.ClientHello,
    offered: tuple[str, ...],
    node_key: NodeKey,
    tickets: Tickets | None,
    now: float,
    random_bytes: Callable[[int], bytes],
) -> ClientHelloAccepted:
    """The resume hello's checks: the node's own ticket, unexpired, for this device,
    and the proof that the sender holds the ticket's resumption secret."""
    if hello.sealed_key:
        raise _bad_hello("a hello carries sealed_key or resume_ticket, not both")
    if tickets is None or tickets.window <= 0:
        raise _resume_refused("this node does not resume sessions")
    opened = tickets.open(hello.resume_ticket)
    # A forged ticket, another node's and a wrong proof get one message: the node is
    # no oracle for which check failed.
    invalid = "the resumption ticket is not valid here"
    if opened is None:
        raise _resume_refused(invalid)
    digest = hello_digest(
        hello.version, offered, hello.suite, hello.client_nonce, hello.key_fingerprint
    )
    if not proof_matches(
        opened, digest, hello.resume_ticket, hello.resume_device, hello.resume_proof
    ):
        raise _resume_refused(invalid)
    if opened.expires_at <= now:
        raise _resume_refused("the resumption ticket expired")
    if not hmac.compare_digest(opened.device.encode("utf-8"), hello.resume_device.encode("utf-8")):
        raise _resume_refused("the resumption ticket was issued to another device")
    return _accepted(
        hello,
        offered,
        node_key,
        random_bytes,
        secret=opened.secret,
        token="",
        device=opened.device,
        timestamp_ms=0,
        ticket=opened,
    )


def _accepted(
    hello: cim_pb2.ClientHello,
    offered: Sequence[str],
    node_key: NodeKey,
    random_bytes: Callable[[int], bytes],
    *,
    secret: bytes,
    token: str,
    device: str,
    timestamp_ms: int,
    ticket: OpenedTicket | None = None,
) -> ClientHelloAccepted:
    """The node's nonce and the session's ciphers, one way for a full and a resumed hello
    (only the secret differs: the key material's, or the ticket's resumption secret)."""
    server_nonce = random_bytes(NONCE_SIZE)
    if len(server_nonce) != NONCE_SIZE:
        raise ValueError("random_bytes returned the wrong number of bytes")
    sealer, opener = session_ciphers(
        hello.suite, secret, hello.client_nonce, server_nonce, node_key.fingerprint, offered, "node"
    )
    return ClientHelloAccepted(
        suite=hello.suite,
        token=token,
        device=device,
        timestamp_ms=timestamp_ms,
        client_nonce=hello.client_nonce,
        server_nonce=server_nonce,
        sealer=sealer,
        opener=opener,
        session_secret=secret,
        fingerprint=node_key.fingerprint,
        ticket=ticket,
    )


class ReplayGuard:
    """Refuses a hello seen before or stamped too far from the node's clock.

    A nonce is remembered only as long as its timestamp could still pass the clock
    check; after that the timestamp check alone refuses a replay. Expiries sit in a
    heap pruned on every call, so memory is bounded by the hellos accepted within
    twice the window and no timer is needed per nonce.
    """

    def __init__(self, clock: IReactorTime, window: float) -> None:
        if window <= 0:
            raise ValueError("the replay window must be positive")
        # mypy without the zope plugin cannot type an interface's methods.
        self._seconds: Callable[[], float] = clock.seconds
        self._window_ms = window * 1000.0
        self._expiries: list[tuple[float, bytes]] = []
        self._seen: set[bytes] = set()

    def __len__(self) -> int:
        return len(self._seen)

    def fresh(self, client_nonce: bytes, timestamp_ms: int) -> bool:
        now_ms = self._seconds() * 1000.0
        expiries = self._expiries
        while expiries and expiries[0][0] < now_ms:
            self._seen.discard(heapq.heappop(expiries)[1])
        if abs(now_ms - timestamp_ms) > self._window_ms:
            return False
        if client_nonce in self._seen:
            return False
        self._seen.add(client_nonce)
        heapq.heappush(expiries, (timestamp_ms + self._window_ms, client_nonce))
        return True


@dataclass(frozen=True)
class Resumption:
    """What a client keeps to resume its session with one node: the ticket of the last
    LoginResult and the resumption secret both sides derived (never sent)."""

    ticket: bytes = field(repr=False)
    secret: bytes = field(repr=False)
    fingerprint: bytes
    """The node key the session was made with: a ticket is only offered to that key."""
    device: str
    expires_at: float
    """Client clock, seconds: after this the ticket is not offered."""


class ClientHandshake:
    """The client's half: builds the hello and turns the node's reply into ciphers.

    With ``resume`` (from ``resumption_after`` of the previous session with this node)
    the hello carries the ticket and its proof instead of RSA-sealed key material.
    """

    def __init__(
        self,
        public_der: bytes,
        token: str,
        device: str,
        suite: str,
        offered: Sequence[str],
        now_ms: int,
        random_bytes: Callable[[int], bytes] = os.urandom,
        resume: Resumption | None = None,
    ) -> None:
        offered = tuple(offered)
        if suite not in offered:
            raise ValueError(f"the chosen suite {suite!r} must be one of the offered suites")
        self.suite = suite
        self.offered = offered
        self.fingerprint = fingerprint_of(public_der)
        self.device = device
        self.resumed = resume is not None
        self.client_nonce = random_bytes(NONCE_SIZE)
        if len(self.client_nonce) != NONCE_SIZE:
            raise ValueError("random_bytes returned the wrong number of bytes")
        digest = hello_digest(PROTOCOL_VERSION, offered, suite, self.client_nonce, self.fingerprint)
        hello = cim_pb2.ClientHello(
            version=PROTOCOL_VERSION,
            offered_suites=offered,
            suite=suite,
            client_nonce=self.client_nonce,
            key_fingerprint=self.fingerprint,
        )
        if resume is not None:
            if resume.fingerprint != self.fingerprint:
                raise ValueError("the resumption ticket is for another node key")
            self._secret = resume.secret
            hello.resume_ticket = resume.ticket
            hello.resume_proof = resume_proof(resume.secret, digest, resume.ticket, resume.device)
            hello.resume_device = resume.device
        else:
            if not token or len(token) > MAX_TOKEN_LENGTH:
                raise ValueError(f"the token must be 1 to {MAX_TOKEN_LENGTH} characters")
            self._secret = random_bytes(SECRET_SIZE)
            if len(self._secret) != SECRET_SIZE:
                raise ValueError("random_bytes returned the wrong number of bytes")
            material = cim_pb2.KeyMaterial(
                secret=self._secret,
                token=token,
                timestamp_ms=now_ms,
                device=device,
                hello_digest=digest,
            )
            hello.sealed_key = seal_for_node(public_der, material.SerializeToString())
        self._hello_body = bytes((_CLIENT_HELLO,)) + hello.SerializeToString()

    def hello_body(self) -> bytes:
        return self._hello_body

    def finish(self, reply_body: bytes) -> tuple[FrameSealer, FrameOpener, bytes]:
        """Turn the node's first frame into (sealer, opener, first plaintext).

        Raises HandshakeRefused if the node refused, FrameAuthenticationError if the
        sealed part does not authenticate (a downgraded or tampered hello, or the
        wrong node), ValueError for anything else that is not a valid reply.
        """
        if not reply_body:
            raise ValueError("empty handshake reply")
        kind = reply_body[0]
        if kind == _HANDSHAKE_ERROR:
            raise HandshakeRefused.from_body(reply_body)
        if kind != _LOGIN_RESULT:
            raise ValueError(f"unexpected handshake reply type {kind}")
        server_nonce = reply_body[1 : 1 + NONCE_SIZE]
        if len(server_nonce) != NONCE_SIZE:
            raise FrameAuthenticationError("handshake reply truncated")
        sealer, opener = session_ciphers(
            self.suite,
            self._secret,
            self.client_nonce,
            server_nonce,
            self.fingerprint,
            self.offered,
            "client",
        )
        first_plaintext = opener.open(reply_body[1 + NONCE_SIZE :])
        if not first_plaintext or first_plaintext[0] != _LOGIN_RESULT:
            raise ValueError("the first encrypted frame is not a LOGIN_RESULT")
        self._server_nonce = server_nonce
        return sealer, opener, first_plaintext

    def resumption_after(self, result: cim_pb2.LoginResult, now: float) -> Resumption | None:
        """What to resume with next time, from the LoginResult ``finish`` returned
        (None when the node issued no ticket). Call after a successful ``finish``."""
        if not result.resume_ticket or not result.resume_window_ms:
            return None
        return Resumption(
            ticket=result.resume_ticket,
            secret=next_resumption_secret(
                self._secret, self.client_nonce, self._server_nonce, self.fingerprint
            ),
            fingerprint=self.fingerprint,
            device=result.device or self.device,
            expires_at=now + result.resume_window_ms / 1000,
        )

    def __repr__(self) -> str:
        return f"<ClientHandshake suite={self.suite} offered={','.join(self.offered)}>"
