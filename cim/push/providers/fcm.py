"""The FCM provider: Firebase Cloud Messaging's HTTP v1 API.

Each push is ``POST /v1/projects/<project>/messages:send`` on ``[push] fcm_endpoint``
with an OAuth2 access token. The token comes from the service-account key file
(``[push] fcm_key_file``) through ``google-auth``: a JWT signed with the account's
key, exchanged at the file's ``token_uri``. google-auth blocks, so the exchange runs
on the push thread pool, once for all pushes until the token nears its expiry; the
sends themselves are treq requests on the reactor.

The message sets what FCM documents for waking a device: ``android.priority`` HIGH
for an SOS (NORMAL otherwise), ``android.ttl``, ``android.collapse_key`` and the
APNs headers (``apns-priority``, ``apns-collapse-id``) for iOS apps behind FCM; an
SOS is never collapsed.

Answers: 200 accepted; 404 or an ``UNREGISTERED`` error code means the token is dead;
401 renews the access token and retries; 429 and 5xx retry (Retry-After honoured);
anything else is a refusal.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import treq
from google.auth.transport.requests import Request as GoogleRequest
from google.oauth2 import service_account
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool

from cim.push.notification import DEAD, RETRY, Notification, Outcome
from cim.push.providers.answers import outcome_of_status, payload_fields, retry_after_seconds
from cim.reactor import ICimReactor

__all__ = ["SCOPE", "FcmProvider", "fcm_message", "load_service_account"]

T = TypeVar("T")
Run = Callable[[Callable[[], T]], "Deferred[T]"]

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"


def load_service_account(path: str) -> service_account.Credentials:
    """The key file, checked at start: a bad file stops the node with one line."""
    return service_account.Credentials.from_service_account_file(path, scopes=[SCOPE])


def fcm_message(notification: Notification) -> dict[str, Any]:
    data = {
        key: str(value)
        for key, value in payload_fields(
            notification.kind,
            notification.conversation,
            notification.seq,
            notification.msg_id,
            notification.badge,
        ).items()
    }
    shown: dict[str, str] = {"title": notification.title}
    if notification.body:
        shown["body"] = notification.body
    android: dict[str, Any] = {
        "priority": "HIGH" if notification.urgent else "NORMAL",
        "ttl": f"{int(notification.ttl)}s",
        "notification": {"notification_count": notification.badge},
    }
    apns_headers = {"apns-priority": "10" if notification.urgent else "5"}
    if not notification.urgent:
        android["collapse_key"] = notification.collapse_key
        apns_headers["apns-collapse-id"] = notification.collapse_key[:64]
    return {
        "message": {
            "token": notification.registration.token,
            "data": data,
            "notification": shown,
            "android": android,
            "apns": {"headers": apns_headers, "payload": {"aps": {"badge": notification.badge}}},
        }
    }


class FcmProvider:
    name = "fcm"

    def __init__(
        self,
        reactor: ICimReactor,
        run: Run[Any],
        credentials: service_account.Credentials,
        project: str,
        endpoint: str,
        timeout: float,
        http: HTTPClient | None = None,
    ) -> None:
        self._reactor = reactor
        self._run = run
        self._credentials = credentials
        self._url = f"{endpoint.rstrip('/')}/v1/projects/{project}/messages:send"
        self._timeout = timeout
        self._token: str | None = None
        self._waiting: list[Deferred[str]] = []
        self._pool: HTTPConnectionPool | None = None
        if http is None:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            http = HTTPClient(Agent(reactor, pool=self._pool))
        self._http = http

    # --- the access token -------------------------------------------------------------

    def _refresh(self) -> str:
        """On a push thread: google-auth signs the assertion and exchanges it."""
        self._credentials.refresh(GoogleRequest())
        return str(self._credentials.token)

    async def _access_token(self, renew: bool = False) -> str:
        """The access token; one refresh at a time, whoever asks meanwhile waits for it."""
        if renew:
            self._token = None
        if self._token is not None and self._credentials.valid:
            return self._token
        waiting: Deferred[str] = Deferred()
        self._waiting.append(waiting)
        if len(self._waiting) == 1:
            self._run(self._refresh).addBoth(self._refreshed)
        return await waiting

    def _refreshed(self, result: str | Failure) -> None:
        waiting, self._waiting = self._waiting, []
        if not isinstance(result, Failure):
            self._token = result
        for d in waiting:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    # --- sending ----------------------------------------------------------------------

    def send(self, notification: Notification) -> Deferred[Outcome]:
        return Deferred.fromCoroutine(self._send(notification))

    async def _send(self, notification: Notification) -> Outcome:
        try:
            token = await self._access_token()
        except Exception as exc:
            return Outcome(RETRY, 0, f"no access token: {type(exc).__name__}: {exc}")
        outcome = await self._post(notification, token)
        if outcome.status == 401:
            outcome = await self._post(notification, await self._access_token(renew=True))
        return outcome

    async def _post(self, notification: Notification, token: str) -> Outcome:
        body = json.dumps(fcm_message(notification), separators=(",", ":")).encode()
        headers: dict[bytes | str, bytes | str] = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {token}",
        }
        response = await self._http.post(
            self._url, data=body, headers=headers, timeout=self._timeout
        )
        raw = await treq.content(response)
        status = int(response.code)
        code = _error_code(raw)
        if status == 404 or code == "UNREGISTERED":
            return Outcome(DEAD, status, code or "NOT_FOUND")
        if status == 401:
            return Outcome(RETRY, status, code or "UNAUTHENTICATED")
        retry_after = retry_after_seconds(
            response.headers.getRawHeaders("Retry-After", [None])[0], self._reactor.seconds()
        )
        return outcome_of_status(status, code, retry_after)

    def close(self) -> Deferred[None]:
        if self._pool is None:
            return succeed(None)
        return self._pool.closeCachedConnections()


def _error_code(raw: bytes) -> str:
    """FCM's error code: ``error.details[].errorCode`` (UNREGISTERED, ...), else
    ``error.status``."""
    try:
        answer = json.loads(raw) if raw else {}
    except ValueError:
        return ""
    error = answer.get("error") if isinstance(answer, dict) else None
    if not isinstance(error, dict):
        return ""
    for detail in error.get("details") or ():
        if isinstance(detail, dict) and detail.get("errorCode"):
            return str(detail["errorCode"])
    return str(error.get("status", ""))
