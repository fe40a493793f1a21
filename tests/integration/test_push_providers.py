"""Each push provider against a local server that speaks its protocol: the headers,
the JWT/OAuth claims verified with the test's keys, the payload (never message
text), and what each documented answer becomes."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from cim.backends.threads import ThreadPoolRunner
from cim.push.notification import ACCEPTED, DEAD, FAILED, RETRY, Notification, Outcome
from cim.push.providers.apns import ApnsProvider, load_p8_key
from cim.push.providers.fcm import SCOPE, FcmProvider, load_service_account
from cim.push.providers.webhook import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookProvider,
    verify_signature,
)
from cim.storage.push import PushRegistration
from tests.integration.support.push_servers import (
    Answer,
    ApnsServer,
    Captured,
    ProviderHttpServer,
    apns_key,
    fcm_service_account,
)

SECRET_TEXT = "meet me behind the gym"
APNS_TOKEN = "ab" * 32
SECRET = b"a shared secret of the webhook, 32+"


def notification(provider: str, token: str, urgent: bool = False, badge: int = 3) -> Notification:
    return Notification(
        registration=PushRegistration("bob", "phone", provider, token, "com.example", "en", 0, 0),
        conversation="d:alice:bob",
        seq=42,
        msg_id=9001,
        badge=badge,
        title="SOS from watch1" if urgent else "New message from alice",
        body="",
        urgent=urgent,
        kind="sos" if urgent else "message",
        appended_at=time.time(),
        ttl=3600.0,
    )


def assert_no_text(test: TestCase, requests: list[Captured]) -> None:
    for captured in requests:
        test.assertNotIn(SECRET_TEXT.encode(), captured.body)
        test.assertNotIn(SECRET_TEXT, json.dumps(captured.headers))


class WebhookTests(TestCase):
    timeout = 60

    def test_signed_post_and_answers(self) -> None:
        return ensureDeferred(self._webhook())

    async def _webhook(self) -> None:
        receiver = ProviderHttpServer()
        receiver.start()
        self.addCleanup(receiver.stop)
        provider = WebhookProvider(reactor, receiver.url + "/hook", SECRET, 5.0)  # type: ignore[arg-type]
        self.addCleanup(provider.close)
        receiver.script = [
            Answer(204),
            Answer(410),
            Answer(503, {"Retry-After": "7"}),
            Answer(400, {}, b"nope"),
        ]
        outcomes: list[Outcome] = []
        for _ in range(4):
            outcomes.append(await provider.send(notification("webhook", "opaque-token-1")))
        self.assertEqual(
            [(o.kind, o.status) for o in outcomes],
            [(ACCEPTED, 204), (DEAD, 410), (RETRY, 503), (FAILED, 400)],
        )
        self.assertEqual(outcomes[2].retry_after, 7.0)
        first = receiver.webhooks[0]
        self.assertEqual(first.path, "/hook")
        self.assertEqual(first.headers["content-type"], "application/json")
        timestamp = first.headers[TIMESTAMP_HEADER.lower()]
        signature = first.headers[SIGNATURE_HEADER.lower()]
        self.assertTrue(verify_signature(SECRET, timestamp, first.body, signature, time.time()))
        # A wrong secret, a changed body, or the same request replayed later: refused.
        self.assertFalse(verify_signature(b"x" * 32, timestamp, first.body, signature, time.time()))
        self.assertFalse(
            verify_signature(SECRET, timestamp, first.body + b" ", signature, time.time())
        )
        self.assertFalse(
            verify_signature(SECRET, timestamp, first.body, signature, time.time() + 301)
        )
        body = first.json()
        self.assertEqual(
            {k: body[k] for k in ("token", "user", "device", "conversation", "seq", "badge")},
            {
                "token": "opaque-token-1",
                "user": "bob",
                "device": "phone",
                "conversation": "d:alice:bob",
                "seq": 42,
                "badge": 3,
            },
        )
        self.assertNotIn("body", body)
        assert_no_text(self, receiver.webhooks)


class FcmTests(TestCase):
    timeout = 60

    def test_oauth_then_v1_send_and_answers(self) -> None:
        return ensureDeferred(self._fcm())

    async def _fcm(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        server = ProviderHttpServer()
        key_file, key = fcm_service_account(directory, server.url + "/token")
        server.oauth_key = key.public_key()
        server.start()
        self.addCleanup(server.stop)
        runner = ThreadPoolRunner("cim-push-test", 2, reactor)  # type: ignore[arg-type]
        runner.start()
        self.addCleanup(runner.stop)
        credentials = load_service_account(key_file)
        provider = FcmProvider(
            reactor,  # type: ignore[arg-type]
            runner.run,
            credentials,
            "cim-test",
            server.url,
            5.0,
        )
        self.addCleanup(provider.close)
        unregistered = {
            "error": {
                "code": 404,
                "status": "NOT_FOUND",
                "details": [
                    {
                        "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                        "errorCode": "UNREGISTERED",
                    }
                ],
            }
        }
        server.script = [
            Answer(200, {}, b'{"name": "projects/cim-test/messages/1"}'),
            Answer(200, {}, b'{"name": "projects/cim-test/messages/2"}'),
            Answer(429, {"Retry-After": "12"}, b'{"error": {"status": "RESOURCE_EXHAUSTED"}}'),
            Answer(404, {}, json.dumps(unregistered).encode()),
        ]
        token = "fcm-registration-token:" + "x" * 40
        outcomes = [
            await provider.send(notification("fcm", token)),
            await provider.send(notification("fcm", token, urgent=True)),
            await provider.send(notification("fcm", token)),
            await provider.send(notification("fcm", token)),
        ]
        self.assertEqual(
            [(o.kind, o.status) for o in outcomes],
            [(ACCEPTED, 200), (ACCEPTED, 200), (RETRY, 429), (DEAD, 404)],
        )
        self.assertEqual(outcomes[2].retry_after, 12.0)
        self.assertEqual(outcomes[3].reason, "UNREGISTERED")
        # One OAuth exchange for all four, its assertion signed by the account's key.
        [exchange] = server.tokens
        claims = exchange.claims
        self.assertEqual(claims["iss"], "pusher@cim-test.iam.gserviceaccount.com")
        # google-auth names Google's token endpoint as the audience, wherever it posts.
        self.assertEqual(claims["aud"], "https://oauth2.googleapis.com/token")
        self.assertIn(SCOPE, claims["scope"].split())
        self.assertGreater(claims["exp"], claims["iat"])
        self.assertEqual(exchange.jwt_header["kid"], "test-key-1")
        for sent in server.sends:
            self.assertEqual(sent.path, "/v1/projects/cim-test/messages:send")
            self.assertEqual(sent.headers["authorization"], "Bearer " + server.issued[0])
        normal = server.sends[0].json()["message"]
        urgent = server.sends[1].json()["message"]
        self.assertEqual(normal["token"], token)
        self.assertEqual(normal["android"]["priority"], "NORMAL")
        self.assertEqual(normal["android"]["collapse_key"], "d:alice:bob")
        self.assertEqual(normal["android"]["ttl"], "3600s")
        self.assertEqual(normal["data"]["seq"], "42")
        self.assertEqual(normal["data"]["conversation"], "d:alice:bob")
        self.assertEqual(normal["notification"], {"title": "New message from alice"})
        self.assertEqual(urgent["android"]["priority"], "HIGH")
        self.assertNotIn("collapse_key", urgent["android"])
        self.assertEqual(urgent["apns"]["headers"], {"apns-priority": "10"})
        assert_no_text(self, server.sends)


class ApnsTests(TestCase):
    timeout = 60

    def test_http2_tls_token_auth_and_answers(self) -> None:
        return ensureDeferred(self._apns())

    async def _apns(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        key_file, key = apns_key(directory)
        server = ApnsServer(directory, key.public_key())
        server.start()
        self.addCleanup(server.stop)
        runner = ThreadPoolRunner("cim-push-test", 2, reactor)  # type: ignore[arg-type]
        runner.start()
        self.addCleanup(runner.stop)
        import ssl

        provider = ApnsProvider(
            runner.run,
            server.url,
            load_p8_key(key_file),
            "TESTKEY123",
            "TEAM123456",
            "com.example.watch",
            5.0,
            verify=ssl.create_default_context(cafile=server.cert),
        )
        self.addCleanup(provider.close)
        server.script = [
            Answer(200),
            Answer(200),
            Answer(410, {}, b'{"reason":"Unregistered","timestamp":1800000000000}'),
            Answer(400, {}, b'{"reason":"BadDeviceToken"}'),
            Answer(503, {"retry-after": "30"}, b'{"reason":"ServiceUnavailable"}'),
            Answer(400, {}, b'{"reason":"BadTopic"}'),
        ]
        outcomes: list[Outcome] = [
            await provider.send(notification("apns", APNS_TOKEN, urgent=True)),
            await provider.send(notification("apns", APNS_TOKEN)),
        ]
        for _ in range(4):
            outcomes.append(await provider.send(notification("apns", APNS_TOKEN)))
        self.assertEqual(
            [(o.kind, o.status) for o in outcomes],
            [
                (ACCEPTED, 200),
                (ACCEPTED, 200),
                (DEAD, 410),
                (DEAD, 400),
                (RETRY, 503),
                (FAILED, 400),
            ],
        )
        self.assertEqual(outcomes[4].retry_after, 30.0)
        urgent, normal = server.requests[0], server.requests[1]
        for captured in server.requests:
            self.assertEqual(captured.http_version, "2")
            self.assertEqual(captured.path, f"/3/device/{APNS_TOKEN}")
            self.assertEqual(captured.jwt_header, {"alg": "ES256", "kid": "TESTKEY123"})
            self.assertEqual(captured.claims["iss"], "TEAM123456")
            self.assertLessEqual(abs(captured.claims["iat"] - time.time()), 60)
            self.assertEqual(captured.headers["apns-topic"], "com.example.watch")
            self.assertEqual(captured.headers["apns-push-type"], "alert")
        self.assertEqual(urgent.headers["apns-priority"], "10")
        self.assertNotIn("apns-collapse-id", urgent.headers)
        self.assertEqual(normal.headers["apns-priority"], "5")
        self.assertEqual(normal.headers["apns-collapse-id"], "d:alice:bob")
        payload: dict[str, Any] = normal.json()
        self.assertEqual(payload["aps"]["badge"], 3)
        self.assertEqual(payload["aps"]["alert"], {"title": "New message from alice"})
        self.assertEqual((payload["conversation"], payload["seq"]), ("d:alice:bob", 42))
        self.assertEqual(urgent.json()["aps"]["interruption-level"], "time-sensitive")
        # One provider token for all of them (Apple refuses new ones too often).
        self.assertEqual(len({c.headers["authorization"] for c in server.requests}), 1)
        assert_no_text(self, server.requests)
