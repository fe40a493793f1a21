"""The one-round-trip handshake, client and node, driven in memory."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable

from twisted.internet.task import Clock
from twisted.trial import unittest

from cim.protocols import cim_pb2
from cim.protocols.crypto import (
    SUITE_CHACHA,
    SUITE_RC4,
    FrameAuthenticationError,
    NodeKey,
    seal_for_node,
    session_ciphers,
)
from cim.protocols.handshake import (
    NONCE_SIZE,
    PROTOCOL_VERSION,
    ClientHandshake,
    HandshakeRefused,
    ReplayGuard,
    accept_client_hello,
    hello_digest,
)
from tests.unit.test_crypto import shared_node_key

TOKEN = "tok_3q2+7w-very-secret-token-value"
BOTH = (SUITE_CHACHA, SUITE_RC4)
NOW_MS = 1_700_000_000_000
Reason = cim_pb2.HandshakeError


def counting_random() -> Callable[[int], bytes]:
    """Deterministic, distinct 'random' bytes so tests can find them in the output."""
    counter = itertools.count(1)

    def random_bytes(size: int) -> bytes:
        return bytes((next(counter) % 256,)) * size

    return random_bytes


def login_result_plaintext(user: str = "alice") -> bytes:
    result = cim_pb2.LoginResult(status=cim_pb2.LoginResult.OK, user=user)
    return bytes((cim_pb2.LOGIN_RESULT,)) + result.SerializeToString()


def edit_hello(body: bytes, edit: Callable[[cim_pb2.ClientHello], None]) -> bytes:
    """What an attacker on the path can do to the plaintext hello."""
    hello = cim_pb2.ClientHello.FromString(body[1:])
    edit(hello)
    return body[:1] + hello.SerializeToString()


class FullExchangeTests(unittest.TestCase):
    def setUp(self) -> None:
        self.node_key = shared_node_key()

    def client(self, suite: str, offered: tuple[str, ...] = BOTH) -> ClientHandshake:
        return ClientHandshake(self.node_key.public_der, TOKEN, "phone", suite, offered, NOW_MS)

    def exchange(self, suite: str) -> None:
        client = self.client(suite)
        accepted = accept_client_hello(client.hello_body(), self.node_key, BOTH)
        self.assertEqual(accepted.suite, suite)
        self.assertEqual(accepted.token, TOKEN)
        self.assertEqual(accepted.device, "phone")
        self.assertEqual(accepted.timestamp_ms, NOW_MS)
        self.assertEqual(accepted.client_nonce, client.client_nonce)
        self.assertEqual(len(accepted.server_nonce), NONCE_SIZE)

        reply = accepted.reply_body(login_result_plaintext())
        self.assertEqual(reply[0], cim_pb2.LOGIN_RESULT)
        self.assertEqual(reply[1 : 1 + NONCE_SIZE], accepted.server_nonce)
        sealer, opener, first = client.finish(reply)
        self.assertEqual(first, login_result_plaintext())
        self.assertEqual(cim_pb2.LoginResult.FromString(first[1:]).user, "alice")

        # Both directions work after the handshake, counters continue.
        self.assertEqual(accepted.opener.open(sealer.seal(b"\x0aup")), b"\x0aup")
        self.assertEqual(opener.open(accepted.sealer.seal(b"\x0cdown")), b"\x0cdown")

    def test_chacha(self) -> None:
        self.exchange(SUITE_CHACHA)

    def test_rc4(self) -> None:
        self.exchange(SUITE_RC4)

    def test_hello_hides_token_and_secret(self) -> None:
        random_bytes = counting_random()
        client = ClientHandshake(
            self.node_key.public_der, TOKEN, "phone", SUITE_RC4, BOTH, NOW_MS, random_bytes
        )
        body = client.hello_body()
        self.assertNotIn(TOKEN.encode(), body)
        self.assertNotIn(b"secret-token", body)
        # counting_random gave the nonce first (\x01 * 16), then the secret (\x02 * 32).
        self.assertIn(b"\x01" * NONCE_SIZE, body)
        self.assertNotIn(b"\x02" * 32, body)
        self.assertNotIn(TOKEN, repr(client))

    def test_accepted_repr_hides_token(self) -> None:
        client = self.client(SUITE_CHACHA)
        accepted = accept_client_hello(client.hello_body(), self.node_key, BOTH)
        self.assertNotIn(TOKEN, repr(accepted))

    def test_hello_layout(self) -> None:
        client = self.client(SUITE_RC4)
        body = client.hello_body()
        self.assertEqual(body[0], cim_pb2.CLIENT_HELLO)
        hello = cim_pb2.ClientHello.FromString(body[1:])
        self.assertEqual(hello.version, PROTOCOL_VERSION)
        self.assertEqual(list(hello.offered_suites), list(BOTH))
        self.assertEqual(hello.suite, SUITE_RC4)
        self.assertEqual(hello.key_fingerprint, self.node_key.fingerprint)
        self.assertEqual(len(hello.sealed_key), 256)
        material = cim_pb2.KeyMaterial.FromString(self.node_key.unseal(hello.sealed_key))
        self.assertEqual(len(material.secret), 32)
        self.assertEqual(material.token, TOKEN)

    def test_client_refuses_suite_it_did_not_offer(self) -> None:
        self.assertRaises(
            ValueError,
            ClientHandshake,
            self.node_key.public_der,
            TOKEN,
            "phone",
            SUITE_RC4,
            (SUITE_CHACHA,),
            NOW_MS,
        )


class RefusalTests(unittest.TestCase):
    def setUp(self) -> None:
        self.node_key = shared_node_key()
        self.client = ClientHandshake(
            self.node_key.public_der, TOKEN, "phone", SUITE_RC4, BOTH, NOW_MS
        )

    def refused(self, body: bytes, allowed: tuple[str, ...] = BOTH) -> HandshakeRefused:
        error: HandshakeRefused = self.assertRaises(
            HandshakeRefused, accept_client_hello, body, self.node_key, allowed
        )
        return error

    def test_suite_not_allowed(self) -> None:
        error = self.refused(self.client.hello_body(), allowed=(SUITE_CHACHA,))
        self.assertEqual(error.reason, Reason.SUITE_NOT_ALLOWED)
        self.assertEqual(error.allowed_suites, (SUITE_CHACHA,))
        self.assertIn(SUITE_CHACHA, error.message)
        # The client turns the node's frame back into the same refusal.
        client_side = self.assertRaises(HandshakeRefused, self.client.finish, error.to_body())
        self.assertEqual(client_side.reason, Reason.SUITE_NOT_ALLOWED)
        self.assertEqual(client_side.allowed_suites, (SUITE_CHACHA,))
        self.assertEqual(client_side.message, error.message)
        self.assertIn("chacha20-poly1305", str(client_side))

    def test_chosen_suite_not_offered(self) -> None:
        def edit(hello: cim_pb2.ClientHello) -> None:
            del hello.offered_suites[:]
            hello.offered_suites.append(SUITE_CHACHA)

        error = self.refused(edit_hello(self.client.hello_body(), edit))
        self.assertEqual(error.reason, Reason.SUITE_NOT_ALLOWED)
        self.assertEqual(error.allowed_suites, BOTH)

    def test_unsupported_version(self) -> None:
        """Version 1 had no hello digest: taking it would reopen the replay it allows."""
        for version in (1, 3):

            def edit(hello: cim_pb2.ClientHello, version: int = version) -> None:
                hello.version = version

            error = self.refused(edit_hello(self.client.hello_body(), edit))
            self.assertEqual(error.reason, Reason.UNSUPPORTED_VERSION)
            self.assertIn("version 2", error.message)

    def test_unknown_key(self) -> None:
        other = ClientHandshake(NodeKey.generate().public_der, TOKEN, "p", SUITE_RC4, BOTH, 0)
        error = self.refused(other.hello_body())
        self.assertEqual(error.reason, Reason.UNKNOWN_KEY)

    def test_garbage(self) -> None:
        for body in (
            b"",
            b"\x01\xff\xff\xff",
            b"\x0a" + self.client.hello_body()[1:],
            bytes(100),
        ):
            error = self.refused(body)
            self.assertEqual(error.reason, Reason.BAD_HELLO, body)

    def test_empty_hello_has_version_zero(self) -> None:
        self.assertEqual(self.refused(b"\x01").reason, Reason.UNSUPPORTED_VERSION)

    def test_bad_nonce_size(self) -> None:
        def edit(hello: cim_pb2.ClientHello) -> None:
            hello.client_nonce = b"short"

        self.assertEqual(
            self.refused(edit_hello(self.client.hello_body(), edit)).reason, Reason.BAD_HELLO
        )

    def test_undecryptable_sealed_key(self) -> None:
        def edit(hello: cim_pb2.ClientHello) -> None:
            hello.sealed_key = bytes((hello.sealed_key[0] ^ 1,)) + hello.sealed_key[1:]

        self.assertEqual(
            self.refused(edit_hello(self.client.hello_body(), edit)).reason, Reason.BAD_HELLO
        )

    def bad_material(self, material: cim_pb2.KeyMaterial) -> HandshakeRefused:
        def edit(hello: cim_pb2.ClientHello) -> None:
            hello.sealed_key = seal_for_node(self.node_key.public_der, material.SerializeToString())

        return self.refused(edit_hello(self.client.hello_body(), edit))

    def test_bad_key_material(self) -> None:
        for material in (
            cim_pb2.KeyMaterial(secret=bytes(31), token=TOKEN),
            cim_pb2.KeyMaterial(secret=bytes(32), token=""),
        ):
            self.assertEqual(self.bad_material(material).reason, Reason.BAD_HELLO)

    def test_token_too_long(self) -> None:
        # 257 characters do not fit under a 2048-bit key at all; a bigger key shows
        # the node's own limit (4096 bits: a 256-character token and the hello digest).
        self.node_key = NodeKey.generate(4096)
        self.client = ClientHandshake(
            self.node_key.public_der, TOKEN, "phone", SUITE_RC4, BOTH, NOW_MS
        )
        material = cim_pb2.KeyMaterial(secret=bytes(32), token="x" * 257)
        self.assertEqual(self.bad_material(material).reason, Reason.BAD_HELLO)
        longest = ClientHandshake(
            self.node_key.public_der, "x" * 256, "phone", SUITE_RC4, BOTH, NOW_MS
        )
        accepted = accept_client_hello(longest.hello_body(), self.node_key, BOTH)
        self.assertEqual(accepted.token, "x" * 256)

    def test_undecodable_key_material(self) -> None:
        def edit(hello: cim_pb2.ClientHello) -> None:
            hello.sealed_key = seal_for_node(self.node_key.public_der, b"\xff\xff\xff")

        self.assertEqual(
            self.refused(edit_hello(self.client.hello_body(), edit)).reason, Reason.BAD_HELLO
        )

    def test_too_many_offered_suites(self) -> None:
        def edit(hello: cim_pb2.ClientHello) -> None:
            hello.offered_suites.extend(f"suite-{n}" for n in range(20))

        self.assertEqual(
            self.refused(edit_hello(self.client.hello_body(), edit)).reason, Reason.BAD_HELLO
        )

    def test_refusal_body(self) -> None:
        refusal = HandshakeRefused(Reason.UNKNOWN_KEY, "no such key")
        body = refusal.to_body()
        self.assertEqual(body[0], cim_pb2.HANDSHAKE_ERROR)
        parsed = cim_pb2.HandshakeError.FromString(body[1:])
        self.assertEqual(parsed.reason, Reason.UNKNOWN_KEY)
        self.assertEqual(parsed.message, "no such key")
        self.assertEqual(refusal.reason_name, "unknown_key")


class DowngradeTests(unittest.TestCase):
    """An attacker edits the plaintext hello; the node allows both suites.

    The node sees the edit (the hello digest sealed in the key material no longer
    matches) and refuses before deriving anything; and should a node ever take such a
    hello, the key schedule still makes the client refuse its answer.
    """

    def setUp(self) -> None:
        self.node_key = shared_node_key()

    def refused_by_node(
        self, edit: Callable[[cim_pb2.ClientHello], None], suite: str = SUITE_CHACHA
    ) -> None:
        client = ClientHandshake(self.node_key.public_der, TOKEN, "phone", suite, BOTH, NOW_MS)
        tampered = edit_hello(client.hello_body(), edit)
        error: HandshakeRefused = self.assertRaises(
            HandshakeRefused, accept_client_hello, tampered, self.node_key, BOTH
        )
        self.assertEqual(error.reason, Reason.BAD_HELLO)

    def test_rewritten_suite_is_refused(self) -> None:
        def to_rc4(hello: cim_pb2.ClientHello) -> None:
            hello.suite = SUITE_RC4

        self.refused_by_node(to_rc4)

    def test_stripped_offer_is_refused(self) -> None:
        def strip_chacha(hello: cim_pb2.ClientHello) -> None:
            del hello.offered_suites[:]
            hello.offered_suites.append(SUITE_RC4)

        self.refused_by_node(strip_chacha, suite=SUITE_RC4)

    def test_reordered_offer_is_refused(self) -> None:
        def reorder(hello: cim_pb2.ClientHello) -> None:
            hello.offered_suites.reverse()

        self.refused_by_node(reorder)

    def test_client_refuses_keys_derived_from_another_offer(self) -> None:
        """The second line: a node deriving from an edited offer is not believed."""
        client = ClientHandshake(self.node_key.public_der, TOKEN, "phone", SUITE_RC4, BOTH, NOW_MS)
        accepted = accept_client_hello(client.hello_body(), self.node_key, BOTH)
        material = cim_pb2.KeyMaterial.FromString(
            self.node_key.unseal(cim_pb2.ClientHello.FromString(client.hello_body()[1:]).sealed_key)
        )
        sealer, _ = session_ciphers(
            SUITE_RC4,
            material.secret,
            client.client_nonce,
            accepted.server_nonce,
            self.node_key.fingerprint,
            (SUITE_RC4,),
            "node",
        )
        reply = bytes((cim_pb2.LOGIN_RESULT,)) + accepted.server_nonce
        reply += sealer.seal(login_result_plaintext())
        self.assertRaises(FrameAuthenticationError, client.finish, reply)

    def test_rewritten_server_nonce_fails(self) -> None:
        client = ClientHandshake(
            self.node_key.public_der, TOKEN, "phone", SUITE_CHACHA, BOTH, NOW_MS
        )
        reply = accept_client_hello(client.hello_body(), self.node_key, BOTH).reply_body(
            login_result_plaintext()
        )
        tampered = reply[:1] + bytes((reply[1] ^ 1,)) + reply[2:]
        self.assertRaises(FrameAuthenticationError, client.finish, tampered)

    def test_untampered_passes(self) -> None:
        client = ClientHandshake(
            self.node_key.public_der, TOKEN, "phone", SUITE_CHACHA, BOTH, NOW_MS
        )
        reply = accept_client_hello(client.hello_body(), self.node_key, BOTH).reply_body(
            login_result_plaintext()
        )
        client.finish(reply)

    def test_garbage_reply(self) -> None:
        client = ClientHandshake(self.node_key.public_der, TOKEN, "phone", SUITE_RC4, BOTH, NOW_MS)
        self.assertRaises(ValueError, client.finish, b"")
        self.assertRaises(ValueError, client.finish, b"\x0c" + bytes(40))
        self.assertRaises(ValueError, client.finish, b"\x02\xff\xff")
        self.assertRaises(FrameAuthenticationError, client.finish, b"\x03" + bytes(10))
        self.assertRaises(FrameAuthenticationError, client.finish, b"\x03" + bytes(60))


class HelloDigestTests(unittest.TestCase):
    """The digest sealed in KeyMaterial: its layout is what another client must build."""

    def test_known_answer(self) -> None:
        digest = hello_digest(
            2, BOTH, SUITE_CHACHA, bytes(range(0x40, 0x50)), bytes(range(0xA0, 0xC0))
        )
        self.assertEqual(
            digest.hex(), "418cb251ffb4ec6fec929fe3a88115ea7c925568768921620c939b5de7e8ffc8"
        )

    def test_layout(self) -> None:
        nonce, fingerprint = bytes(range(16)), bytes(range(32))
        expected = hashlib.sha256(
            b"cim client hello"
            + b"\x00\x00\x00\x02"
            + b"\x10"
            + nonce
            + b"\x20"
            + fingerprint
            + b"\x02"
            + b"\x11chacha20-poly1305"
            + b"\x0frc4-hmac-sha256"
            + b"\x0frc4-hmac-sha256"
        ).digest()
        self.assertEqual(hello_digest(2, BOTH, SUITE_RC4, nonce, fingerprint), expected)

    def test_every_field_changes_it(self) -> None:
        base = (2, BOTH, SUITE_CHACHA, bytes(16), bytes(32))
        variants = [
            (1, BOTH, SUITE_CHACHA, bytes(16), bytes(32)),
            (2, BOTH[::-1], SUITE_CHACHA, bytes(16), bytes(32)),
            (2, (SUITE_CHACHA,), SUITE_CHACHA, bytes(16), bytes(32)),
            (2, BOTH, SUITE_RC4, bytes(16), bytes(32)),
            (2, BOTH, SUITE_CHACHA, b"\x01" + bytes(15), bytes(32)),
            (2, BOTH, SUITE_CHACHA, bytes(16), b"\x01" + bytes(31)),
            # Length prefixes: moving a byte between nonce and fingerprint is visible.
            (2, BOTH, SUITE_CHACHA, bytes(15), bytes(33)),
        ]
        digests = {hello_digest(*base)} | {hello_digest(*v) for v in variants}
        self.assertEqual(len(digests), len(variants) + 1)

    def test_sealed_in_the_key_material(self) -> None:
        node_key = shared_node_key()
        client = ClientHandshake(node_key.public_der, TOKEN, "phone", SUITE_RC4, BOTH, NOW_MS)
        hello = cim_pb2.ClientHello.FromString(client.hello_body()[1:])
        material = cim_pb2.KeyMaterial.FromString(node_key.unseal(hello.sealed_key))
        self.assertEqual(
            material.hello_digest,
            hello_digest(
                hello.version,
                tuple(hello.offered_suites),
                hello.suite,
                hello.client_nonce,
                hello.key_fingerprint,
            ),
        )

    def test_material_without_a_digest_is_refused(self) -> None:
        """A version-2 hello whose sealed material lacks the digest (or has another)."""
        node_key = shared_node_key()
        client = ClientHandshake(node_key.public_der, TOKEN, "phone", SUITE_RC4, BOTH, NOW_MS)
        for digest in (b"", bytes(32)):

            def edit(hello: cim_pb2.ClientHello, digest: bytes = digest) -> None:
                material = cim_pb2.KeyMaterial(
                    secret=bytes(32), token=TOKEN, timestamp_ms=NOW_MS, hello_digest=digest
                )
                hello.sealed_key = seal_for_node(node_key.public_der, material.SerializeToString())

            error: HandshakeRefused = self.assertRaises(
                HandshakeRefused,
                accept_client_hello,
                edit_hello(client.hello_body(), edit),
                node_key,
                BOTH,
            )
            self.assertEqual(error.reason, Reason.BAD_HELLO)


class ReplayGuardTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW_MS / 1000)
        self.guard = ReplayGuard(self.clock, window=60)

    def test_same_nonce_twice(self) -> None:
        self.assertTrue(self.guard.fresh(b"a" * 16, NOW_MS))
        self.assertFalse(self.guard.fresh(b"a" * 16, NOW_MS))
        self.assertTrue(self.guard.fresh(b"b" * 16, NOW_MS))

    def test_replay_later_within_window(self) -> None:
        self.assertTrue(self.guard.fresh(b"a" * 16, NOW_MS))
        self.clock.advance(59)
        self.assertFalse(self.guard.fresh(b"a" * 16, NOW_MS))

    def test_old_or_future_timestamp(self) -> None:
        self.assertFalse(self.guard.fresh(b"a" * 16, NOW_MS - 60_001))
        self.assertFalse(self.guard.fresh(b"b" * 16, NOW_MS + 60_001))
        self.assertTrue(self.guard.fresh(b"c" * 16, NOW_MS - 60_000))
        self.assertTrue(self.guard.fresh(b"d" * 16, NOW_MS + 60_000))

    def test_replay_after_window_refused_by_timestamp(self) -> None:
        self.assertTrue(self.guard.fresh(b"a" * 16, NOW_MS))
        self.clock.advance(61)
        self.assertFalse(self.guard.fresh(b"a" * 16, NOW_MS))

    def test_memory_is_pruned(self) -> None:
        for n in range(100):
            self.assertTrue(self.guard.fresh(n.to_bytes(16, "big"), NOW_MS))
        self.assertEqual(len(self.guard), 100)
        # A future-stamped hello lives until its own timestamp leaves the window.
        self.assertTrue(self.guard.fresh(b"f" * 16, NOW_MS + 30_000))
        self.clock.advance(61)
        self.assertTrue(self.guard.fresh(b"x" * 16, NOW_MS + 61_000))
        self.assertEqual(len(self.guard), 2)
        self.clock.advance(30)
        self.guard.fresh(b"y" * 16, 0)
        self.assertEqual(len(self.guard), 1)
        self.clock.advance(120)
        self.guard.fresh(b"z" * 16, 0)
        self.assertEqual(len(self.guard), 0)
