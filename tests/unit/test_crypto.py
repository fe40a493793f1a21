"""The node key file, the key schedule and both frame cipher suites."""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import struct
from typing import TYPE_CHECKING

from cryptography.hazmat.decrepit.ciphers.algorithms import ARC4
from cryptography.hazmat.primitives.ciphers import Cipher
from twisted.trial import unittest

from cim.protocols import crypto
from cim.protocols.crypto import (
    KNOWN_SUITES,
    SUITE_CHACHA,
    SUITE_RC4,
    FrameAuthenticationError,
    FrameOpener,
    FrameSealer,
    KeyFileError,
    NodeKey,
    Rc4HmacOpener,
    Rc4HmacSealer,
    fingerprint_of,
    seal_for_node,
    session_ciphers,
)

SECRET = bytes(range(32))
CLIENT_NONCE = b"c" * 16
SERVER_NONCE = b"s" * 16
FINGERPRINT = hashlib.sha256(b"node key").digest()
OFFERED = (SUITE_CHACHA, SUITE_RC4)

_shared_key: NodeKey | None = None


def shared_node_key() -> NodeKey:
    """One generated key for the tests that do not care which key it is (RSA is slow)."""
    global _shared_key
    if _shared_key is None:
        _shared_key = NodeKey.generate()
    return _shared_key


def pair(
    suite: str,
    offered: tuple[str, ...] = OFFERED,
    secret: bytes = SECRET,
    client_suite: str | None = None,
    client_offered: tuple[str, ...] | None = None,
) -> tuple[FrameSealer, FrameOpener, FrameSealer, FrameOpener]:
    """(client sealer, client opener, node sealer, node opener) for one session."""
    client = session_ciphers(
        client_suite or suite,
        secret,
        CLIENT_NONCE,
        SERVER_NONCE,
        FINGERPRINT,
        client_offered or offered,
        "client",
    )
    node = session_ciphers(suite, secret, CLIENT_NONCE, SERVER_NONCE, FINGERPRINT, offered, "node")
    return client[0], client[1], node[0], node[1]


if TYPE_CHECKING:
    _MixinBase = unittest.TestCase
else:
    _MixinBase = object


class SuiteTestsMixin(_MixinBase):
    """Run against both suites; ``suite`` is set by the concrete classes."""

    suite: str

    def assertFailsThenStaysDead(self, opener: FrameOpener, bad: bytes, good: bytes) -> None:
        self.assertRaises(FrameAuthenticationError, opener.open, bad)
        self.assertRaises(FrameAuthenticationError, opener.open, good)

    def test_round_trip_both_directions(self) -> None:
        client_sealer, client_opener, node_sealer, node_opener = pair(self.suite)
        for index in range(5):
            text = b"\x0c" + os.urandom(119) + bytes((index,))
            self.assertEqual(node_opener.open(client_sealer.seal(text)), text)
            self.assertEqual(client_opener.open(node_sealer.seal(text)), text)

    def test_release_while_idle_keeps_the_stream_going(self) -> None:
        """An idle connection frees its cipher contexts; the next frames still work."""
        client_sealer, _, _, node_opener = pair(self.suite)
        first = client_sealer.seal(b"\x0cone")
        self.assertEqual(node_opener.open(first), b"\x0cone")
        client_sealer.release()
        node_opener.release()
        second = client_sealer.seal(b"\x0ctwo")
        self.assertEqual(node_opener.open(second), b"\x0ctwo")
        # Counters kept going: replaying the first frame still fails.
        node_opener.release()
        self.assertRaises(FrameAuthenticationError, node_opener.open, first)
        node_opener.release()
        self.assertRaises(FrameAuthenticationError, node_opener.open, client_sealer.seal(b"x"))

    def test_ciphertext_hides_plaintext_and_adds_a_tag(self) -> None:
        client_sealer, _, _, _ = pair(self.suite)
        text = b"hello bob, this is alice" * 4
        body = client_sealer.seal(text)
        self.assertEqual(len(body), len(text) + crypto.TAG_SIZE)
        self.assertNotIn(b"hello bob", body)

    def test_directions_use_different_keys(self) -> None:
        client_sealer, _, node_sealer, _ = pair(self.suite)
        text = b"same text"
        self.assertNotEqual(client_sealer.seal(text), node_sealer.seal(text))

    def test_frame_from_the_wrong_direction_is_refused(self) -> None:
        client_sealer, client_opener, _, node_opener = pair(self.suite)
        body = client_sealer.seal(b"\x0chello")
        # The client's own opener reads node->client frames only.
        self.assertRaises(FrameAuthenticationError, client_opener.open, body)
        # A reflected frame does not poison the real receiver.
        self.assertEqual(node_opener.open(body), b"\x0chello")

    def test_tampered_byte_is_refused(self) -> None:
        client_sealer, _, _, node_opener = pair(self.suite)
        body = client_sealer.seal(b"\x0cpay alice 10")
        good_next = client_sealer.seal(b"\x0cnext")
        for position in (0, len(body) // 2, len(body) - 1):
            _, _, _, fresh_opener = pair(self.suite)
            tampered = bytearray(body)
            tampered[position] ^= 0x01
            self.assertRaises(FrameAuthenticationError, fresh_opener.open, bytes(tampered))
        tampered = bytearray(body)
        tampered[0] ^= 0x01
        self.assertFailsThenStaysDead(node_opener, bytes(tampered), good_next)

    def test_truncated_body_is_refused(self) -> None:
        client_sealer, _, _, node_opener = pair(self.suite)
        body = client_sealer.seal(b"\x0cpay alice 10")
        for cut in (1, crypto.TAG_SIZE, len(body) - 1, len(body)):
            _, _, _, fresh_opener = pair(self.suite)
            self.assertRaises(FrameAuthenticationError, fresh_opener.open, body[:-cut])
        self.assertFailsThenStaysDead(node_opener, body[:-1], body)

    def test_replayed_frame_is_refused(self) -> None:
        client_sealer, _, _, node_opener = pair(self.suite)
        first = client_sealer.seal(b"\x0cone")
        second = client_sealer.seal(b"\x0ctwo")
        self.assertEqual(node_opener.open(first), b"\x0cone")
        self.assertFailsThenStaysDead(node_opener, first, second)

    def test_reordered_frames_are_refused(self) -> None:
        client_sealer, _, _, node_opener = pair(self.suite)
        first = client_sealer.seal(b"\x0cone")
        second = client_sealer.seal(b"\x0ctwo")
        self.assertFailsThenStaysDead(node_opener, second, first)

    def test_dropped_frame_is_refused(self) -> None:
        client_sealer, _, _, node_opener = pair(self.suite)
        client_sealer.seal(b"\x0clost on the way")
        self.assertRaises(FrameAuthenticationError, node_opener.open, client_sealer.seal(b"x"))

    def test_other_session_secret_is_refused(self) -> None:
        client_sealer, _, _, _ = pair(self.suite)
        _, _, _, other_opener = pair(self.suite, secret=b"\x01" * 32)
        self.assertRaises(
            FrameAuthenticationError, other_opener.open, client_sealer.seal(b"\x0chi")
        )

    def test_offered_list_is_bound(self) -> None:
        # The node saw a list without RC4 (an attacker stripped it): keys differ.
        client_sealer, _, _, node_opener = pair(
            self.suite, offered=(self.suite,), client_offered=OFFERED
        )
        self.assertRaises(FrameAuthenticationError, node_opener.open, client_sealer.seal(b"x"))

    def test_offered_order_is_bound(self) -> None:
        client_sealer, _, _, node_opener = pair(
            self.suite, offered=OFFERED, client_offered=tuple(reversed(OFFERED))
        )
        self.assertRaises(FrameAuthenticationError, node_opener.open, client_sealer.seal(b"x"))

    def test_repr_shows_no_key(self) -> None:
        for part in pair(self.suite):
            text = repr(part)
            self.assertNotIn("key", text.lower())
            self.assertNotIn("\\x", text)


class ChaChaTests(SuiteTestsMixin, unittest.TestCase):
    suite = SUITE_CHACHA

    def test_nonce_is_direction_and_counter(self) -> None:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        keys = HKDF(
            hashes.SHA256(),
            64,
            CLIENT_NONCE + SERVER_NONCE,
            crypto.key_schedule_info(FINGERPRINT, OFFERED, SUITE_CHACHA),
        ).derive(SECRET)
        client_sealer, _, node_sealer, _ = pair(SUITE_CHACHA)
        client_sealer.seal(b"first")
        reference = ChaCha20Poly1305(keys[:32])
        self.assertEqual(
            client_sealer.seal(b"second"),
            reference.encrypt(b"\x00\x00\x00\x01" + struct.pack(">Q", 1), b"second", None),
        )
        self.assertEqual(
            node_sealer.seal(b"reply"),
            ChaCha20Poly1305(keys[32:]).encrypt(
                b"\x00\x00\x00\x02" + struct.pack(">Q", 0), b"reply", None
            ),
        )


class Rc4Tests(SuiteTestsMixin, unittest.TestCase):
    suite = SUITE_RC4

    RC4_KEY = bytes(range(100, 132))
    MAC_KEY = bytes(range(200, 232))

    def test_first_3072_keystream_bytes_are_dropped(self) -> None:
        reference = Cipher(ARC4(self.RC4_KEY), mode=None).encryptor()
        keystream = reference.update(bytes(3072 + 64))
        sealer = Rc4HmacSealer(self.RC4_KEY, self.MAC_KEY)
        body = sealer.seal(bytes(64))
        self.assertEqual(body[:64], keystream[3072:])

    def test_tag_is_hmac_sha256_over_counter_and_ciphertext(self) -> None:
        sealer = Rc4HmacSealer(self.RC4_KEY, self.MAC_KEY)
        for counter in range(3):
            body = sealer.seal(b"\x0c" + bytes(119))
            ciphertext, tag = body[:-16], body[-16:]
            expected = hmac.new(
                self.MAC_KEY, struct.pack(">Q", counter) + ciphertext, hashlib.sha256
            ).digest()
            self.assertEqual(tag, expected[:16])

    def test_precomputed_hmac_states_match_hmac_new(self) -> None:
        for key in (b"", b"k", bytes(32), bytes(range(64)), os.urandom(100)):
            inner, outer = crypto._hmac_states(key)
            for message in (b"", b"abc", os.urandom(1000)):
                inner_hash = inner.copy()
                inner_hash.update(message)
                outer_hash = outer.copy()
                outer_hash.update(inner_hash.digest())
                self.assertEqual(
                    outer_hash.digest(), hmac.new(key, message, hashlib.sha256).digest()
                )

    def test_failed_tag_does_not_advance_the_keystream(self) -> None:
        sealer = Rc4HmacSealer(self.RC4_KEY, self.MAC_KEY)
        opener = Rc4HmacOpener(self.RC4_KEY, self.MAC_KEY)
        body = sealer.seal(b"\x0csecret text")
        forged = body[:-1] + bytes((body[-1] ^ 1,))
        self.assertRaises(FrameAuthenticationError, opener.open, forged)
        # Dead for good, even for the genuine frame.
        self.assertRaises(FrameAuthenticationError, opener.open, body)


class KeyScheduleTests(unittest.TestCase):
    def test_chosen_suite_is_bound(self) -> None:
        info_chacha = crypto.key_schedule_info(FINGERPRINT, OFFERED, SUITE_CHACHA)
        info_rc4 = crypto.key_schedule_info(FINGERPRINT, OFFERED, SUITE_RC4)
        self.assertNotEqual(info_chacha, info_rc4)

    def test_encoding_is_unambiguous(self) -> None:
        infos = {
            crypto.key_schedule_info(FINGERPRINT, offered, suite)
            for offered, suite in [
                (("ab", "c"), "c"),
                (("a", "bc"), "c"),
                (("abc",), "c"),
                (("ab",), "cc"),
                (("ab", "cc"), "cc"),
                ((), "abcc"),
            ]
        }
        self.assertEqual(len(infos), 6)

    def test_info_layout(self) -> None:
        info = crypto.key_schedule_info(FINGERPRINT, OFFERED, SUITE_RC4)
        expected = (
            b"cim session keys"
            + b"\x00\x00\x00\x02"
            + FINGERPRINT
            + b"\x02"
            + b"\x11chacha20-poly1305"
            + b"\x0frc4-hmac-sha256"
            + b"\x0frc4-hmac-sha256"
        )
        self.assertEqual(info, expected)

    def test_fingerprint_is_bound(self) -> None:
        client = session_ciphers(
            SUITE_CHACHA, SECRET, CLIENT_NONCE, SERVER_NONCE, FINGERPRINT, OFFERED, "client"
        )
        node = session_ciphers(
            SUITE_CHACHA, SECRET, CLIENT_NONCE, SERVER_NONCE, b"\x00" * 32, OFFERED, "node"
        )
        self.assertRaises(FrameAuthenticationError, node[1].open, client[0].seal(b"x"))

    def test_nonces_are_bound(self) -> None:
        client = session_ciphers(
            SUITE_CHACHA, SECRET, CLIENT_NONCE, SERVER_NONCE, FINGERPRINT, OFFERED, "client"
        )
        node = session_ciphers(
            SUITE_CHACHA, SECRET, CLIENT_NONCE, b"t" * 16, FINGERPRINT, OFFERED, "node"
        )
        self.assertRaises(FrameAuthenticationError, node[1].open, client[0].seal(b"x"))

    def test_bad_arguments(self) -> None:
        args = (CLIENT_NONCE, SERVER_NONCE, FINGERPRINT, OFFERED, "client")
        self.assertRaises(ValueError, session_ciphers, "rc4-md5", SECRET, *args)
        self.assertRaises(ValueError, session_ciphers, SUITE_RC4, SECRET[:31], *args)
        self.assertRaises(
            ValueError,
            session_ciphers,
            SUITE_RC4,
            SECRET,
            CLIENT_NONCE,
            SERVER_NONCE,
            FINGERPRINT[:31],
            OFFERED,
            "client",
        )

    def test_known_suites(self) -> None:
        self.assertEqual(set(KNOWN_SUITES), {SUITE_CHACHA, SUITE_RC4})


class NodeKeyTests(unittest.TestCase):
    def test_created_with_mode_0600_and_reloaded(self) -> None:
        directory = self.mktemp()
        path = os.path.join(directory, "keys", "node_key.pem")
        key = NodeKey.load_or_create(path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path, "rb") as handle:
            pem = handle.read()
        self.assertTrue(pem.startswith(b"-----BEGIN PRIVATE KEY-----"))
        again = NodeKey.load_or_create(path)
        self.assertEqual(again.fingerprint, key.fingerprint)
        self.assertEqual(again.public_der, key.public_der)
        self.assertEqual(len(key.fingerprint), 32)
        self.assertEqual(key.fingerprint, fingerprint_of(key.public_der))
        self.assertEqual(os.listdir(os.path.dirname(path)), ["node_key.pem"])

    def test_group_readable_key_is_refused(self) -> None:
        directory = self.mktemp()
        path = os.path.join(directory, "node_key.pem")
        NodeKey.load_or_create(path)
        os.chmod(path, 0o640)
        error = self.assertRaises(KeyFileError, NodeKey.load_or_create, path)
        self.assertIn(path, str(error))
        self.assertIn("chmod 600", str(error))

    def test_garbage_key_file_is_refused(self) -> None:
        path = self.mktemp()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"not a key")
        os.close(fd)
        error = self.assertRaises(KeyFileError, NodeKey.load_or_create, path)
        self.assertIn(path, str(error))

    def test_uncreatable_key_is_a_key_file_error(self) -> None:
        blocker = self.mktemp()
        with open(blocker, "w") as handle:
            handle.write("a file where the directory should be")
        path = os.path.join(blocker, "node_key.pem")
        error = self.assertRaises(KeyFileError, NodeKey.load_or_create, path)
        self.assertIn(path, str(error))

    def test_small_key_is_refused(self) -> None:
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.assertRaises(
            ValueError, NodeKey, rsa.generate_private_key(public_exponent=65537, key_size=1024)
        )

    def test_repr_has_no_key_material(self) -> None:
        key = shared_node_key()
        text = repr(key)
        self.assertNotIn("PRIVATE", text)
        self.assertLess(len(text), 60)

    def test_seal_and_unseal(self) -> None:
        key = shared_node_key()
        sealed = seal_for_node(key.public_der, b"key material")
        self.assertEqual(len(sealed), 256)
        self.assertEqual(key.unseal(sealed), b"key material")
        tampered = bytes((sealed[0] ^ 1,)) + sealed[1:]
        self.assertRaises(ValueError, key.unseal, tampered)
        self.assertRaises(ValueError, key.unseal, b"short")

    def test_seal_refuses_too_much(self) -> None:
        key = shared_node_key()
        self.assertEqual(len(seal_for_node(key.public_der, bytes(190))), 256)
        error = self.assertRaises(ValueError, seal_for_node, key.public_der, bytes(191))
        self.assertIn("190", str(error))


class KnownAnswerTests(unittest.TestCase):
    """The test vectors printed in docs/protocol.md, so the document cannot go stale."""

    secret = bytes(range(32))
    client_nonce = bytes(range(0x40, 0x50))
    server_nonce = bytes(range(0x80, 0x90))
    fingerprint = bytes(range(0xA0, 0xC0))

    VECTORS = {
        SUITE_CHACHA: (
            "2eb9f17c9181510bf5bb6db7dec5d9d1401ea2dfc9cd",
            "6c865be46cb271aac63e052b5c22688f318ea0972781",
            "8c05684d42e750cd90f1854170521aa4a5",
        ),
        SUITE_RC4: (
            "fe565b63c1972ffe8ec1369ddd2afdb14b3575a4774e",
            "71685c1f29f2af9f33f29d32b0a99077c375d09fd2d4",
            "0480bb31bb3b41ae20a159a2b83de8bee7",
        ),
    }

    def test_info_and_okm(self) -> None:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        info = crypto.key_schedule_info(self.fingerprint, OFFERED, SUITE_CHACHA)
        self.assertEqual(
            info.hex(),
            "63696d2073657373696f6e206b65797300000002a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2"
            "b3b4b5b6b7b8b9babbbcbdbebf021163686163686132302d706f6c79313330350f7263342d686d"
            "61632d7368613235361163686163686132302d706f6c7931333035",
        )
        okm = HKDF(hashes.SHA256(), 64, self.client_nonce + self.server_nonce, info)
        self.assertEqual(
            okm.derive(self.secret).hex(),
            "5c3ad404f303cb4156102524041fd356986d68a3284b7be34b7d2c7f7a54f837"
            "bcc26995a09b5f34c96b6a4d66baf67958ecd29399ab5065649d4256a44a95a7",
        )

    def test_vectors(self) -> None:
        for suite, (first_up, second_up, first_down) in self.VECTORS.items():
            args = (self.client_nonce, self.server_nonce, self.fingerprint, OFFERED)
            client_sealer, _ = session_ciphers(suite, self.secret, *args, "client")
            node_sealer, node_opener = session_ciphers(suite, self.secret, *args, "node")
            self.assertEqual(client_sealer.seal(b"\x0ahello").hex(), first_up, suite)
            self.assertEqual(client_sealer.seal(b"\x0ahello").hex(), second_up, suite)
            self.assertEqual(node_sealer.seal(b"\x03").hex(), first_down, suite)
            self.assertEqual(node_opener.open(bytes.fromhex(first_up)), b"\x0ahello")
