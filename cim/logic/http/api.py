"""What the logic service's endpoints share: who calls, how refusals are answered.

Callers authenticate with the router's token; the session it names must belong to an
account that still exists. A feature's refusal (``cim.logic.errors``) becomes the
status its kind stands for; a database that broke a key under a concurrent change is
a 409 to retry, one that is unreachable a 503 with ``Retry-After``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.exc import IntegrityError, OperationalError
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import server

from cim.accounts.store import UserRecord
from cim.http.auth import BearerSessions, invalid_token
from cim.http.endpoints import Call, Endpoint, EndpointResource
from cim.http.openapi import PublishedSpec, openapi_document
from cim.http.site import HttpError, Reply, bounded_site, json_reply, too_many_requests
from cim.http.telemetry import UNOBSERVED, SiteTelemetry
from cim.interfaces import ISessionStore
from cim.limits.policy import LOGIC, NO_LIMITS, RateLimits
from cim.logic.context import Caller
from cim.logic.errors import (
    BadInput,
    Conflict,
    Expired,
    Forbidden,
    LogicError,
    NotFound,
    TooManyAttempts,
)
from cim.storage.database import PoolNotRunning

__all__ = [
    "API_PREFIX",
    "OPENAPI_PATH",
    "LogicCall",
    "LogicCallers",
    "LogicEndpoint",
    "answer",
    "logic_document",
    "logic_error_reply",
    "logic_resource",
    "logic_site",
]

API_PREFIX = "/api/v1"
OPENAPI_PATH = API_PREFIX + "/openapi.json"
TITLE = "cim logic service"
VERSION = "1"
DESCRIPTION = (
    "Accounts, device binding, SOS alarms, geofences and likes. Authenticate "
    "with the token from the router's POST /api/v1/login as "
    "`Authorization: Bearer TOKEN`. Every notification these features send "
    "reaches users as an IM system message (see docs/protocol.md)."
)

LogicEndpoint = Endpoint[Caller]
LogicCall = Call[Caller]
UserLookup = Callable[[str], "Deferred[UserRecord | None]"]

_STATUS: tuple[tuple[type[LogicError], int], ...] = (
    (BadInput, 400),
    (Forbidden, 403),
    (NotFound, 404),
    (Conflict, 409),
    (Expired, 410),
)
_log = Logger()


def answer(status: int, payload: Any) -> Reply:
    """An endpoint's JSON answer (none for a 204)."""
    if status == 204:
        return Reply(204, b"")
    return json_reply(status, payload)


class LogicCallers:
    """The caller of a logic endpoint: the token's session, whose account must exist,
    within its rate of calls ([limits] logic: a 429 with Retry-After past it)."""

    def __init__(
        self, sessions: ISessionStore, users: UserLookup, limits: RateLimits = NO_LIMITS
    ) -> None:
        self._sessions = BearerSessions(sessions)
        self._users = users
        self._limits = limits

    async def __call__(self, request: server.Request) -> Caller:
        record = await self._sessions.session(request)
        wait = self._limits.take(LOGIC, record.user)
        if wait > 0:
            raise too_many_requests("rate_limited", "too many calls; slow down", wait)
        user = await self._users(record.user)
        if user is None:
            raise invalid_token()
        return Caller(user.name, user.kind, record.device)


def logic_error_reply(error: Exception, endpoint: Endpoint[Any]) -> Reply | None:
    """The answer to a feature's refusal or a database's failure; None for anything else."""
    if isinstance(error, TooManyAttempts):
        return too_many_requests(error.code, error.message, error.retry_after).reply()
    for kind, status in _STATUS:
        if isinstance(error, kind):
            return HttpError(status, error.code, error.message).reply()
    if isinstance(error, IntegrityError):
        # A concurrent change the feature's checks could not see, such as the caller's
        # account deleted while this call was in flight: the write broke a key, nothing
        # was stored, and a retry gets a proper answer.
        _log.info(
            "{method} {path} conflicted with a concurrent change: {error}",
            method=endpoint.method,
            path=endpoint.path,
            error=error.orig,
        )
        return HttpError(
            409, "conflict", "the request conflicts with a concurrent change; retry"
        ).reply()
    if isinstance(error, OperationalError | PoolNotRunning):
        _log.warn(
            "database unavailable serving {method} {path}: {error}",
            method=endpoint.method,
            path=endpoint.path,
            error=error,
        )
        return HttpError(
            503,
            "database_unavailable",
            "the database is unreachable; try again shortly",
            ((b"Retry-After", b"5"),),
        ).reply()
    return None


def logic_document(endpoints: Sequence[LogicEndpoint]) -> dict[str, Any]:
    """The OpenAPI 3.1 description of the endpoints, as served at ``OPENAPI_PATH``."""
    return openapi_document(
        endpoints, prefix=API_PREFIX, title=TITLE, version=VERSION, description=DESCRIPTION
    )


def logic_resource(
    endpoints: Sequence[LogicEndpoint],
    sessions: ISessionStore,
    users: UserLookup,
    max_body_size: int,
    limits: RateLimits = NO_LIMITS,
) -> PublishedSpec:
    """The endpoints below ``API_PREFIX``, with their OpenAPI document."""
    resource = EndpointResource(
        endpoints,
        LogicCallers(sessions, users, limits),
        max_body_size,
        prefix=API_PREFIX,
        error_replies=logic_error_reply,
        head_as_get=False,
    )
    return PublishedSpec(resource, OPENAPI_PATH, logic_document(resource.endpoints))


def logic_site(
    resource: PublishedSpec,
    max_body_size: int,
    clock: IReactorTime,
    telemetry: SiteTelemetry = UNOBSERVED,
    cors_origins: tuple[str, ...] = (),
) -> server.Site:
    return bounded_site(resource, max_body_size, clock, telemetry, cors_origins)
