"""The APNs provider: Apple's HTTP/2 API with token-based authentication.

Each push is ``POST /3/device/<token>`` on ``[push] apns_endpoint`` with a provider
token (a JWT signed ES256 with the .p8 key: ``kid`` the key id, ``iss`` the team,
``iat`` when signed; Apple takes one for up to an hour and refuses new ones more
often than every 20 minutes, so it is renewed every 50) and the headers Apple
documents: ``apns-topic`` (the app's bundle id), ``apns-push-type: alert``,
``apns-priority`` (10 for an SOS, 5 otherwise), ``apns-expiration`` and, except for
an SOS, ``apns-collapse-id`` (the conversation: a newer push replaces an older one on
the device).

HTTP/2 needs a client Twisted does not have: ``httpx`` (with ``h2``) runs on the push
thread pool, one shared client and its connection, never on the reactor.

Answers: 200 accepted; 410 (Unregistered) and 400 BadDeviceToken mean the token is
dead; 403 ExpiredProviderToken renews the provider token and retries; 429 and 5xx
retry (Retry-After honoured); anything else is a refusal. A failed connection retries.
"""

from __future__ import annotations

import base64
import json
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from twisted.internet.defer import Deferred

from cim.push.notification import DEAD, RETRY, Notification, Outcome
from cim.push.providers.answers import outcome_of_status, payload_fields, retry_after_seconds

__all__ = ["ApnsProvider", "apns_payload", "es256_jwt", "load_p8_key"]

T = TypeVar("T")
Run = Callable[[Callable[[], T]], "Deferred[T]"]

TOKEN_LIFETIME = 50 * 60.0
"""Seconds a provider token is used before a new one is signed."""
_DEAD_REASONS = frozenset(("BadDeviceToken", "Unregistered"))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def load_p8_key(path: str) -> ec.EllipticCurvePrivateKey:
    """Apple's .p8: a PKCS#8 PEM P-256 key."""
    with open(path, "rb") as handle:
        key = serialization.load_pem_private_key(handle.read(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError("not a P-256 key (an APNs .p8 key file)")
    return key


def es256_jwt(key: ec.EllipticCurvePrivateKey, key_id: str, team_id: str, now: float) -> str:
    """The provider token: ES256 over header and claims, the signature as r || s."""
    header = _b64(json.dumps({"alg": "ES256", "kid": key_id}, separators=(",", ":")).encode())
    claims = _b64(json.dumps({"iss": team_id, "iat": int(now)}, separators=(",", ":")).encode())
    signing_input = f"{header}.{claims}".encode()
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    return f"{header}.{claims}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def apns_payload(notification: Notification) -> dict[str, Any]:
    alert: dict[str, str] = {"title": notification.title}
    if notification.body:
        alert["body"] = notification.body
    aps: dict[str, Any] = {"alert": alert, "badge": notification.badge, "sound": "default"}
    if notification.urgent:
        aps["interruption-level"] = "time-sensitive"
    else:
        aps["thread-id"] = notification.conversation
    return {
        "aps": aps,
        **payload_fields(
            notification.kind,
            notification.conversation,
            notification.seq,
            notification.msg_id,
            notification.badge,
        ),
    }


class ApnsProvider:
    name = "apns"

    def __init__(
        self,
        run: Run[Any],
        endpoint: str,
        key: ec.EllipticCurvePrivateKey,
        key_id: str,
        team_id: str,
        topic: str,
        timeout: float,
        verify: ssl.SSLContext | bool = True,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._run = run
        self._endpoint = endpoint.rstrip("/")
        self._key = key
        self._key_id = key_id
        self._team_id = team_id
        self._topic = topic
        self._wall_clock = wall_clock
        self._client = httpx.Client(http2=True, verify=verify, timeout=timeout)
        self._lock = threading.Lock()
        self._token: tuple[str, float] | None = None

    def _provider_token(self, renew: bool = False) -> str:
        """The current provider token (one for all threads), signed again when old."""
        with self._lock:
            now = self._wall_clock()
            if renew or self._token is None or now - self._token[1] >= TOKEN_LIFETIME:
                self._token = (es256_jwt(self._key, self._key_id, self._team_id, now), now)
            return self._token[0]

    def send(self, notification: Notification) -> Deferred[Outcome]:
        return self._run(lambda: self._post(notification))

    def _post(self, notification: Notification) -> Outcome:
        """On a push thread: one request, its answer as an Outcome."""
        outcome = self._attempt(notification, renew=False)
        if outcome.kind == RETRY and outcome.reason == "ExpiredProviderToken":
            outcome = self._attempt(notification, renew=True)
        return outcome

    def _attempt(self, notification: Notification, renew: bool) -> Outcome:
        now = self._wall_clock()
        headers = {
            "authorization": "bearer " + self._provider_token(renew),
            "apns-topic": self._topic,
            "apns-push-type": "alert",
            "apns-priority": "10" if notification.urgent else "5",
            "apns-expiration": str(int(now + notification.ttl)),
        }
        if not notification.urgent:
            headers["apns-collapse-id"] = notification.collapse_key[:64]
        url = f"{self._endpoint}/3/device/{notification.registration.token}"
        body = json.dumps(apns_payload(notification), separators=(",", ":")).encode()
        try:
            response = self._client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return Outcome(RETRY, 0, f"{type(exc).__name__}: {exc}")
        reason = ""
        try:
            answer = response.json() if response.content else {}
            reason = str(answer.get("reason", "")) if isinstance(answer, dict) else ""
        except ValueError:
            pass
        status = response.status_code
        if status == 410 or (status == 400 and reason in _DEAD_REASONS):
            return Outcome(DEAD, status, reason or "Unregistered")
        if status == 403 and reason == "ExpiredProviderToken":
            return Outcome(RETRY, status, reason)
        retry_after = retry_after_seconds(response.headers.get("retry-after"), now)
        return outcome_of_status(status, reason, retry_after)

    def close(self) -> Deferred[None]:
        return self._run(self._client.close)
