"""The node's RSA key, the session key schedule and the two frame cipher suites.

Everything here is pure computation with no I/O except the key file, so the
handshake and the wire layer can be tested byte for byte. ``docs/crypto.md`` has
the measurements behind the choices (pyca/cryptography, precomputed HMAC states)
and ``docs/protocol.md`` the exact byte layouts a client in another language needs.

Every opener refuses to open anything more once one frame has failed: a stream
whose frame failed to authenticate is hostile or broken, and continuing would let
an attacker probe (RC4's keystream must never advance past a rejected frame).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Sequence
from typing import Literal, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.decrepit.ciphers.algorithms import ARC4
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cim.config import KNOWN_SUITES, SUITE_CHACHA, SUITE_RC4

__all__ = [
    "KEY_LABEL",
    "KNOWN_SUITES",
    "MIN_RSA_BITS",
    "PROTOCOL_VERSION",
    "RC4_DROP",
    "SECRET_SIZE",
    "SUITE_CHACHA",
    "SUITE_RC4",
    "TAG_SIZE",
    "ChaChaOpener",
    "ChaChaSealer",
    "FrameAuthenticationError",
    "FrameOpener",
    "FrameSealer",
    "KeyFileError",
    "NodeKey",
    "Rc4HmacOpener",
    "Rc4HmacSealer",
    "fingerprint_of",
    "key_schedule_info",
    "seal_for_node",
    "session_ciphers",
]

PROTOCOL_VERSION = 2
"""Wire protocol version; bound into the key schedule so versions never share keys.

2: KeyMaterial carries the hello_digest (docs/crypto.md, "Replayed hellos"); version 1
hellos are refused, since a node that took them would reopen the replay they allow.
"""

SECRET_SIZE = 32
TAG_SIZE = 16
MIN_RSA_BITS = 2048
RC4_DROP = 3072
"""Initial RC4 keystream bytes thrown away: the first bytes are the most biased."""

KEY_LABEL = b"cim session keys"
"""Fixed prefix of the HKDF info, so these keys can never collide with another use."""

_OAEP = padding.OAEP(
    mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
)

# Direction constants in the ChaCha20-Poly1305 nonce. The keys already differ per
# direction; the constant keeps the nonces distinct even if they did not.
_CLIENT_TO_NODE = 1
_NODE_TO_CLIENT = 2
_NONCE = struct.Struct(">IQ")
_COUNTER = struct.Struct(">Q")
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))
_SHA256_BLOCK = 64


class FrameAuthenticationError(Exception):
    """A frame was tampered with, replayed, reordered, truncated or sent the wrong way."""


class KeyFileError(Exception):
    """The node key file exists but must not be used as it is."""


class FrameSealer(Protocol):
    def seal(self, plaintext: bytes) -> bytes: ...

    def release(self) -> None:
        """Free what can be rebuilt (the connection is idle); the next frame works."""


class FrameOpener(Protocol):
    def open(self, body: bytes) -> bytes: ...

    def release(self) -> None:
        """Free what can be rebuilt (the connection is idle); the next frame works."""


# ------------------------------------------------------------------------- node key


class NodeKey:
    """The node's long-term RSA key: clients pin its fingerprint and seal secrets to it."""

    __slots__ = ("_private_key", "fingerprint", "public_der")

    def __init__(self, private_key: rsa.RSAPrivateKey) -> None:
        if private_key.key_size < MIN_RSA_BITS:
            raise ValueError(f"the node key must have at least {MIN_RSA_BITS} bits")
        self._private_key = private_key
        self.public_der: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.fingerprint: bytes = fingerprint_of(self.public_der)

    @classmethod
    def generate(cls, bits: int = MIN_RSA_BITS) -> NodeKey:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=bits))

    @classmethod
    def load_or_create(cls, path: str, bits: int = MIN_RSA_BITS) -> NodeKey:
        """Load the key at ``path``, creating it on first start.

        A key other users can read is refused instead of silently fixed: the key
        may already have leaked and the operator has to know.
        """
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            try:
                return cls._create(path, bits)
            except OSError as exc:
                raise KeyFileError(f"cannot create the node key {path}: {exc.strerror}") from None
        except OSError as exc:
            raise KeyFileError(f"cannot read the node key {path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if mode & 0o077:
                raise KeyFileError(
                    f"the node key {path} is accessible by group or others "
                    f"(mode {mode & 0o777:04o}); run: chmod 600 {path}"
                )
            try:
                pem = handle.read()
            except OSError as exc:
                raise KeyFileError(f"cannot read the node key {path}: {exc.strerror}") from None
        return cls._from_pem(pem, path)

    @classmethod
    def _from_pem(cls, pem: bytes, path: str) -> NodeKey:
        try:
            private_key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError):
            raise KeyFileError(
                f"the node key {path} is not an unencrypted PEM private key"
            ) from None
        if not isinstance(private_key, rsa.RSAPrivateKey):
            raise KeyFileError(f"the node key {path} is not an RSA key")
        if private_key.key_size < MIN_RSA_BITS:
            raise KeyFileError(
                f"the node key {path} has {private_key.key_size} bits; "
                f"at least {MIN_RSA_BITS} are required"
            )
        return cls(private_key)

    @classmethod
    def _create(cls, path: str, bits: int) -> NodeKey:
        # Written under a temporary name with O_EXCL and mode 0600 (the key is never
        # readable by others, not even for a moment), then linked into place so a
        # crash never leaves a half-written key and two daemons starting at once
        # agree on one key instead of the second overwriting the first.
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, mode=0o700, exist_ok=True)
        key = cls.generate(bits)
        pem = key._private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        temporary = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(pem)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(temporary, path)
            except FileExistsError:
                return cls.load_or_create(path, bits)
            except OSError:
                # A filesystem without hard links: fall back to an atomic rename.
                os.rename(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
        _fsync_directory(parent)
        return key

    def derived_key(self, label: bytes) -> bytes:
        """32 bytes derived from the private key for one use (``label``): as secret as
        the key, the same after a restart, and new when the key is replaced."""
        der = self._private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(der)

    def unseal(self, sealed: bytes) -> bytes:
        """Decrypt an RSA-OAEP(SHA-256) blob sealed to this key; ValueError if it fails."""
        try:
            return self._private_key.decrypt(sealed, _OAEP)
        except ValueError:
            raise ValueError("cannot decrypt the sealed key material") from None

    def __repr__(self) -> str:
        return f"<NodeKey fingerprint={self.fingerprint.hex()[:16]}...>"


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fingerprint_of(public_der: bytes) -> bytes:
    """SHA-256 of the SubjectPublicKeyInfo DER: what clients pin."""
    return hashlib.sha256(public_der).digest()


def seal_for_node(public_der: bytes, plaintext: bytes) -> bytes:
    """RSA-OAEP(SHA-256, MGF1-SHA-256, no label) to the node's public key (client side)."""
    public_key = serialization.load_der_public_key(public_der)
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise ValueError("the node key is not an RSA key")
    if public_key.key_size < MIN_RSA_BITS:
        raise ValueError(f"the node key has fewer than {MIN_RSA_BITS} bits")
    limit = public_key.key_size // 8 - 2 * 32 - 2
    if len(plaintext) > limit:
        raise ValueError(
            f"{len(plaintext)} bytes cannot be sealed to a {public_key.key_size}-bit key "
            f"(at most {limit}); use a shorter token or device name"
        )
    return public_key.encrypt(plaintext, _OAEP)


# --------------------------------------------------------------------- key schedule


def key_schedule_info(fingerprint: bytes, offered: Sequence[str], suite: str) -> bytes:
    """The HKDF info: binds version, node key, the client's offer and the choice.

    Each suite name is length-prefixed and the list is count-prefixed, so no two
    different (offered, suite) pairs can encode to the same bytes.
    """
    if len(fingerprint) != 32:
        raise ValueError("the key fingerprint must be 32 bytes")
    if len(offered) > 255:
        raise ValueError("at most 255 suites can be offered")
    parts = [KEY_LABEL, struct.pack(">I", PROTOCOL_VERSION), fingerprint, bytes((len(offered),))]
    for name in (*offered, suite):
        encoded = name.encode("utf-8")
        if len(encoded) > 255:
            raise ValueError("a suite name is longer than 255 bytes")
        parts.append(bytes((len(encoded),)))
        parts.append(encoded)
    return b"".join(parts)


def session_ciphers(
    suite: str,
    secret: bytes,
    client_nonce: bytes,
    server_nonce: bytes,
    fingerprint: bytes,
    offered: Sequence[str],
    role: Literal["client", "node"],
) -> tuple[FrameSealer, FrameOpener]:
    """The (sealer, opener) pair for one side of one session.

    HKDF-SHA256 with the client's secret as input keying material and both nonces
    as salt, so neither side alone picks the keys and every session's keys differ.
    """
    if len(secret) != SECRET_SIZE:
        raise ValueError(f"the session secret must be {SECRET_SIZE} bytes")
    if not client_nonce or not server_nonce:
        raise ValueError("both nonces are required")
    if role not in ("client", "node"):
        raise ValueError(f"unknown role {role!r}")
    if suite == SUITE_CHACHA:
        length = 64
    elif suite == SUITE_RC4:
        length = 128
    else:
        raise ValueError(f"unknown cipher suite {suite!r}")
    keys = HKDF(
        algorithm=hashes.SHA256(),
        length=length,
        salt=client_nonce + server_nonce,
        info=key_schedule_info(fingerprint, offered, suite),
    ).derive(secret)
    half = length // 2
    client_to_node, node_to_client = keys[:half], keys[half:]
    if role == "client":
        send_keys, receive_keys, send_direction = client_to_node, node_to_client, _CLIENT_TO_NODE
    else:
        send_keys, receive_keys, send_direction = node_to_client, client_to_node, _NODE_TO_CLIENT
    receive_direction = _CLIENT_TO_NODE + _NODE_TO_CLIENT - send_direction
    if suite == SUITE_CHACHA:
        # Both hold the one 64-byte string and take their direction's half when they
        # make their context: one object per connection instead of two halves kept.
        return ChaChaSealer(keys, send_direction), ChaChaOpener(keys, receive_direction)
    return (
        Rc4HmacSealer(send_keys[:32], send_keys[32:]),
        Rc4HmacOpener(receive_keys[:32], receive_keys[32:]),
    )


# -------------------------------------------------------------- chacha20-poly1305


def _chacha_key(keys: bytes, direction: int) -> bytes:
    """One direction's key of the session's 64 bytes (client to node first)."""
    return keys[:32] if direction == _CLIENT_TO_NODE else keys[32:]


class ChaChaSealer:
    """Seals one direction's frames; the nonce is the direction and the frame counter.

    The AEAD object holds about 2.3 KiB of OpenSSL context once used, more than the
    rest of an idle connection; ``release`` drops it while the connection only
    exchanges heartbeats, and the next frame rebuilds it from the key (~1 µs).
    ``keys`` are both directions' (64 bytes, client to node first), shared with the
    connection's opener: the sealer takes its ``direction``'s half when it builds.
    """

    __slots__ = ("_aead", "_counter", "_direction", "_keys")

    def __init__(self, keys: bytes, direction: int) -> None:
        if len(keys) != 64 or direction not in (_CLIENT_TO_NODE, _NODE_TO_CLIENT):
            raise ValueError("chacha20-poly1305 needs both directions' 64 bytes of keys")
        self._keys = keys
        self._aead: ChaCha20Poly1305 | None = None
        self._direction = direction
        self._counter = 0

    def seal(self, plaintext: bytes) -> bytes:
        aead = self._aead
        if aead is None:
            aead = self._aead = ChaCha20Poly1305(_chacha_key(self._keys, self._direction))
        counter = self._counter
        self._counter = counter + 1
        return aead.encrypt(_NONCE.pack(self._direction, counter), plaintext, None)

    def release(self) -> None:
        self._aead = None

    def __repr__(self) -> str:
        return f"<ChaChaSealer frames={self._counter}>"


class ChaChaOpener:
    """Opens one direction's frames in order; any failure ends the stream. ``keys`` as
    for ChaChaSealer."""

    __slots__ = ("_aead", "_counter", "_direction", "_failed", "_keys")

    def __init__(self, keys: bytes, direction: int) -> None:
        if len(keys) != 64 or direction not in (_CLIENT_TO_NODE, _NODE_TO_CLIENT):
            raise ValueError("chacha20-poly1305 needs both directions' 64 bytes of keys")
        self._keys = keys
        self._aead: ChaCha20Poly1305 | None = None
        self._direction = direction
        self._counter = 0
        self._failed = False

    def open(self, body: bytes) -> bytes:
        aead = self._aead
        if aead is None:
            if self._failed:
                raise FrameAuthenticationError("the stream already failed authentication")
            aead = self._aead = ChaCha20Poly1305(_chacha_key(self._keys, self._direction))
        try:
            plaintext = aead.decrypt(_NONCE.pack(self._direction, self._counter), body, None)
        except (InvalidTag, ValueError):
            self._aead = None
            self._failed = True
            raise FrameAuthenticationError("frame failed authentication") from None
        self._counter += 1
        return plaintext

    def release(self) -> None:
        """See ChaChaSealer.release."""
        self._aead = None

    def __repr__(self) -> str:
        state = "failed" if self._failed else "ok"
        return f"<ChaChaOpener frames={self._counter} {state}>"


# ----------------------------------------------------------------- rc4-hmac-sha256


def _hmac_states(mac_key: bytes) -> tuple[hashlib._Hash, hashlib._Hash]:
    """The HMAC-SHA256 inner and outer states after absorbing the padded key.

    Copying these per frame instead of calling ``hmac.digest`` halves the MAC's
    cost: the two key blocks are hashed once per session instead of once per frame.
    """
    if len(mac_key) > _SHA256_BLOCK:
        mac_key = hashlib.sha256(mac_key).digest()
    block = mac_key.ljust(_SHA256_BLOCK, b"\0")
    return hashlib.sha256(block.translate(_IPAD)), hashlib.sha256(block.translate(_OPAD))


class Rc4HmacSealer:
    """RC4 (first 3072 keystream bytes dropped) then HMAC-SHA256 over counter and ciphertext.

    RC4 is a running keystream, so nothing can be released while a session is idle.
    """

    __slots__ = ("_counter", "_encrypt", "_inner", "_outer")

    def __init__(self, rc4_key: bytes, mac_key: bytes) -> None:
        encryptor = Cipher(ARC4(rc4_key), mode=None).encryptor()
        encryptor.update(bytes(RC4_DROP))
        self._encrypt = encryptor.update
        self._inner, self._outer = _hmac_states(mac_key)
        self._counter = 0

    def seal(self, plaintext: bytes) -> bytes:
        counter = self._counter
        self._counter = counter + 1
        ciphertext = self._encrypt(plaintext)
        inner = self._inner.copy()
        inner.update(_COUNTER.pack(counter))
        inner.update(ciphertext)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return ciphertext + outer.digest()[:TAG_SIZE]

    def release(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<Rc4HmacSealer frames={self._counter}>"


class Rc4HmacOpener:
    """Checks the tag before decrypting, so a rejected frame never moves the keystream."""

    __slots__ = ("_counter", "_decrypt", "_failed", "_inner", "_outer")

    def __init__(self, rc4_key: bytes, mac_key: bytes) -> None:
        decryptor = Cipher(ARC4(rc4_key), mode=None).decryptor()
        decryptor.update(bytes(RC4_DROP))
        self._decrypt = decryptor.update
        self._inner, self._outer = _hmac_states(mac_key)
        self._counter = 0
        self._failed = False

    def open(self, body: bytes) -> bytes:
        if self._failed:
            raise FrameAuthenticationError("the stream already failed authentication")
        if len(body) < TAG_SIZE:
            self._failed = True
            raise FrameAuthenticationError("frame shorter than its tag")
        ciphertext = body[:-TAG_SIZE]
        counter = self._counter
        inner = self._inner.copy()
        inner.update(_COUNTER.pack(counter))
        inner.update(ciphertext)
        outer = self._outer.copy()
        outer.update(inner.digest())
        if not hmac.compare_digest(outer.digest()[:TAG_SIZE], body[-TAG_SIZE:]):
            self._failed = True
            raise FrameAuthenticationError("frame failed authentication")
        self._counter = counter + 1
        return self._decrypt(ciphertext)

    def release(self) -> None:
        pass

    def __repr__(self) -> str:
        state = "failed" if self._failed else "ok"
        return f"<Rc4HmacOpener frames={self._counter} {state}>"
