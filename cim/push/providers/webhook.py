"""The webhook provider: a signed JSON POST to the operator's own push service.

Each push is one POST to ``[push] webhook_url`` with the body as JSON (the
registration's token among its fields) and two headers:

    X-Cim-Timestamp: 1800000000           (Unix seconds when it was signed)
    X-Cim-Signature: v1=<hex HMAC-SHA256(secret, timestamp + "." + body)>

The secret is the content of ``[push] webhook_secret_file`` (surrounding whitespace
removed). A receiver recomputes the signature over the timestamp header, a dot and
the raw body, compares it in constant time, and refuses a timestamp more than five
minutes away from its clock, which makes a captured request useless later
(``verify_signature`` is that check; docs/push.md says the same for other
languages).

The receiver answers 2xx (taken), 410 (the token is dead: the registration is
removed), 429 or 5xx (retried, honouring Retry-After); any other status is a refusal
that is not retried.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, succeed
from twisted.web.client import Agent, HTTPConnectionPool

from cim.push.notification import DEAD, Notification, Outcome
from cim.push.providers.answers import outcome_of_status, payload_fields, retry_after_seconds
from cim.reactor import ICimReactor

__all__ = [
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "TOLERANCE",
    "WebhookProvider",
    "sign",
    "verify_signature",
    "webhook_body",
]

TIMESTAMP_HEADER = "X-Cim-Timestamp"
SIGNATURE_HEADER = "X-Cim-Signature"
TOLERANCE = 300.0
"""Seconds a receiver accepts between the timestamp and its clock."""


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "v1=" + digest.hexdigest()


def verify_signature(
    secret: bytes, timestamp: str, body: bytes, signature: str, now: float
) -> bool:
    """What a receiver checks: the signature over timestamp and body, and a timestamp
    within ``TOLERANCE`` of its clock (an older request is a replay)."""
    if not timestamp.isdigit() or abs(now - int(timestamp)) > TOLERANCE:
        return False
    expected = sign(secret, int(timestamp), body)
    return hmac.compare_digest(expected.encode(), signature.encode())


def webhook_body(notification: Notification) -> dict[str, Any]:
    registration = notification.registration
    body: dict[str, Any] = {
        "user": registration.user,
        "device": registration.device,
        "token": registration.token,
        "app": registration.app,
        "locale": registration.locale,
        "urgent": notification.urgent,
        "title": notification.title,
        "collapse_key": None if notification.urgent else notification.collapse_key,
        "ttl": int(notification.ttl),
        **payload_fields(
            notification.kind,
            notification.conversation,
            notification.seq,
            notification.msg_id,
            notification.badge,
        ),
    }
    if notification.body:
        body["body"] = notification.body
    return body


class WebhookProvider:
    name = "webhook"

    def __init__(
        self,
        reactor: ICimReactor,
        url: str,
        secret: bytes,
        timeout: float,
        http: HTTPClient | None = None,
    ) -> None:
        self._reactor = reactor
        self._url = url
        self._secret = secret
        self._timeout = timeout
        self._pool: HTTPConnectionPool | None = None
        if http is None:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            http = HTTPClient(Agent(reactor, pool=self._pool))
        self._http = http

    def send(self, notification: Notification) -> Deferred[Outcome]:
        return Deferred.fromCoroutine(self._send(notification))

    async def _send(self, notification: Notification) -> Outcome:
        body = json.dumps(webhook_body(notification), separators=(",", ":")).encode()
        timestamp = int(self._reactor.seconds())
        headers: dict[bytes | str, bytes | str] = {
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: sign(self._secret, timestamp, body),
        }
        response = await self._http.post(
            self._url, data=body, headers=headers, timeout=self._timeout
        )
        text = await treq.text_content(response, encoding="utf-8")
        status = int(response.code)
        if status == 410:
            return Outcome(DEAD, status, "token dead")
        retry_after = retry_after_seconds(
            response.headers.getRawHeaders("Retry-After", [None])[0], self._reactor.seconds()
        )
        return outcome_of_status(status, text[:200], retry_after)

    def close(self) -> Deferred[None]:
        if self._pool is None:
            return succeed(None)
        return self._pool.closeCachedConnections()
