"""The one-round-trip handshake, client and node, driven in memory."""

from __future__ import annotations

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
)
from cim.protocols.handshake import (
    NONCE_SIZE,
    PROTOCOL_VERSION,
    ClientHandshake,
    HandshakeRefused,
    ReplayGuard,
    accept_client_hello,
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
        def edit(hello: cim_pb2.ClientHello) -> None:
            hello.version = 2

        error = self.refused(edit_hello(self.client.hello_body(), edit))
        self.assertEqual(error.reason, Reason.UNSUPPORTED_VERSION)

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
        # the node's own limit.
        self.node_key = NodeKey.generate(3072)
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
    """An attacker edits the plaintext hello; the node allows both suites."""

    def setUp(self) -> None:
        self.node_key = shared_node_key()

    def run_with(
        self, edit: Callable[[cim_pb2.ClientHello], None], suite: str = SUITE_CHACHA
    ) -> tuple[ClientHandshake, bytes]:
        client = ClientHandshake(self.node_key.public_der, TOKEN, "phone", suite, BOTH, NOW_MS)
        tampered = edit_hello(client.hello_body(), edit)
        accepted = accept_client_hello(tampered, self.node_key, BOTH)
        return client, accepted.reply_body(login_result_plaintext())

    def test_rewritten_suite_fails(self) -> None:
        def to_rc4(hello: cim_pb2.ClientHello) -> None:
            hello.suite = SUITE_RC4

        client, reply = self.run_with(to_rc4)
        self.assertRaises(FrameAuthenticationError, client.finish, reply)

    def test_stripped_offer_fails(self) -> None:
        def strip_chacha(hello: cim_pb2.ClientHello) -> None:
            del hello.offered_suites[:]
            hello.offered_suites.append(SUITE_RC4)

        client, reply = self.run_with(strip_chacha, suite=SUITE_RC4)
        self.assertRaises(FrameAuthenticationError, client.finish, reply)

    def test_reordered_offer_fails(self) -> None:
        def reorder(hello: cim_pb2.ClientHello) -> None:
            hello.offered_suites.reverse()

        client, reply = self.run_with(reorder)
        self.assertRaises(FrameAuthenticationError, client.finish, reply)

    def test_rewritten_server_nonce_fails(self) -> None:
        client, reply = self.run_with(lambda hello: None)
        tampered = reply[:1] + bytes((reply[1] ^ 1,)) + reply[2:]
        self.assertRaises(FrameAuthenticationError, client.finish, tampered)

    def test_untampered_passes(self) -> None:
        client, reply = self.run_with(lambda hello: None)
        client.finish(reply)

    def test_garbage_reply(self) -> None:
        client = ClientHandshake(self.node_key.public_der, TOKEN, "phone", SUITE_RC4, BOTH, NOW_MS)
        self.assertRaises(ValueError, client.finish, b"")
        self.assertRaises(ValueError, client.finish, b"\x0c" + bytes(40))
        self.assertRaises(ValueError, client.finish, b"\x02\xff\xff")
        self.assertRaises(FrameAuthenticationError, client.finish, b"\x03" + bytes(10))
        self.assertRaises(FrameAuthenticationError, client.finish, b"\x03" + bytes(60))


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
