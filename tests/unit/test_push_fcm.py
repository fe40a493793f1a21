"""The FCM provider's access token: one exchange shared by the pushes waiting for it,
renewed on a 401; the HTTP side is treq's StubTreq, the exchange a fake credential."""

from __future__ import annotations

import json
import time
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource, server

from cim.push.notification import ACCEPTED, DEAD, Notification
from cim.push.providers.fcm import FcmProvider
from cim.storage.push import PushRegistration


class FakeCredentials:
    def __init__(self) -> None:
        self.refreshes = 0
        self.token: str | None = None
        self.valid = False

    def refresh(self, request: Any) -> None:
        self.refreshes += 1
        self.token = f"token-{self.refreshes}"
        self.valid = True


class FcmSend(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []
        self.refuse_first = False

    def render_POST(self, request: server.Request) -> bytes:
        authorization = request.getHeader("authorization") or ""
        self.seen.append(authorization)
        if self.refuse_first and len(self.seen) == 1:
            request.setResponseCode(401)
            return b'{"error": {"status": "UNAUTHENTICATED"}}'
        body = json.loads(request.content.read())  # type: ignore[union-attr]
        if body["message"]["token"] == "gone":
            request.setResponseCode(404)
            return b'{"error": {"status": "NOT_FOUND"}}'
        return b'{"name": "projects/p/messages/1"}'


def push(token: str = "device-token") -> Notification:
    return Notification(
        PushRegistration("bob", "phone", "fcm", token, None, None, 0, 0),
        "d:a:b",
        1,
        1,
        1,
        "New message from alice",
        "",
        False,
        "message",
        time.time(),
        60.0,
    )


class FcmProviderTests(SynchronousTestCase):
    def make(self) -> tuple[FcmProvider, FcmSend, FakeCredentials, list[Any]]:
        send = FcmSend()
        credentials = FakeCredentials()
        held: list[Any] = []

        def run(work: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            held.append(lambda: maybeDeferred(work).chainDeferred(d))
            return d

        provider = FcmProvider(
            Clock(),  # type: ignore[arg-type]
            run,
            credentials,  # type: ignore[arg-type]
            "p",
            "http://fcm.invalid",
            5.0,
            http=StubTreq(send),  # type: ignore[arg-type]
        )
        self.http = provider._http
        return provider, send, credentials, held

    def outcome(self, d: Deferred[Any]) -> Any:
        self.http.flush()  # type: ignore[attr-defined]
        return self.successResultOf(d)

    def test_pushes_waiting_share_one_exchange(self) -> None:
        provider, send, credentials, held = self.make()
        first, second = provider.send(push()), provider.send(push())
        self.assertEqual(len(held), 1)
        held.pop()()
        self.assertEqual([self.outcome(d).kind for d in (first, second)], [ACCEPTED, ACCEPTED])
        self.assertEqual(credentials.refreshes, 1)
        self.assertEqual(send.seen, ["Bearer token-1", "Bearer token-1"])
        third = provider.send(push("gone"))
        self.assertEqual(held, [])  # still valid: no exchange
        self.assertEqual(self.outcome(third).kind, DEAD)

    def test_a_401_renews_the_token_once(self) -> None:
        provider, send, _, held = self.make()
        send.refuse_first = True
        d = provider.send(push())
        held.pop()()
        self.http.flush()  # type: ignore[attr-defined]
        held.pop()()
        self.assertEqual(self.outcome(d).kind, ACCEPTED)
        self.assertEqual(send.seen, ["Bearer token-1", "Bearer token-2"])
