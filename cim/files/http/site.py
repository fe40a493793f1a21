"""The file service's Site: its declared endpoints, spooled bodies and a redacted access log.

Every call is authenticated with the router's token (``Authorization: Bearer``),
downloads included: a file is read by the users it belongs to, and a signed URL only
narrows that to one user and a short time. The access log shows paths without query
strings, so signatures never reach it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.exc import OperationalError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import http, server

from cim.backends.threads import PoolNotRunning
from cim.files.http.bodies import MEMORY_SPOOL, FileRequest
from cim.files.http.downloads import Downloads
from cim.files.http.uploads import Uploads
from cim.files.store import FileProblem, FileStore
from cim.http.auth import BearerSessions
from cim.http.endpoints import Endpoint, EndpointResource
from cim.http.site import Reply, client_host, cors_policy, json_reply, too_many_requests
from cim.http.telemetry import UNOBSERVED, ObservedSite, SiteTelemetry
from cim.interfaces import ISessionStore
from cim.limits.policy import FILES, NO_LIMITS, RateLimits

__all__ = ["JSON_MAX_BODY", "files_resource", "files_site"]

_log = Logger()

JSON_MAX_BODY = 16384
FILE_ID = r"[A-Za-z0-9_-]{1,64}"
"""A file or upload id in a path; anything else is a path that does not exist."""


def files_resource(
    store: FileStore,
    sessions: ISessionStore,
    clock: IReactorTime,
    limits: RateLimits = NO_LIMITS,
) -> EndpointResource[str]:
    """Every file service path; answers JSON for everything but file bytes."""
    bearer = CallsPerUser(sessions, limits)

    def refusal(error: Exception, endpoint: Endpoint[Any]) -> Reply | None:
        if isinstance(error, OperationalError | PoolNotRunning):
            # Every call reads the database (who may read a file): say so, briefly.
            _log.warn(
                "database unavailable serving {path}: {error}", path=endpoint.path, error=error
            )
            payload = {
                "error": "database_unavailable",
                "message": "the database is unreachable; try again shortly",
            }
            return json_reply(503, payload, ((b"Retry-After", b"5"),))
        if not isinstance(error, FileProblem):
            return None
        store.metrics.refused[error.code] += 1
        payload = {"error": error.code, "message": error.message, **error.extra}
        return json_reply(error.status, payload)

    endpoints = [
        *Uploads(store, bearer).endpoints(FILE_ID),
        *Downloads(store, clock).endpoints(FILE_ID),
    ]
    return EndpointResource(endpoints, bearer.user, JSON_MAX_BODY, error_replies=refusal)


class CallsPerUser(BearerSessions):
    """The caller's token, within its rate of calls ([limits] files: a 429 with
    Retry-After past it). Every call that names its user by token passes here once;
    downloads by signed URL do not (the HTTP service's connection limits bound those).
    """

    def __init__(self, sessions: ISessionStore, limits: RateLimits) -> None:
        super().__init__(sessions)
        self._limits = limits

    async def user(self, request: server.Request) -> str:
        user = await super().user(request)
        wait = self._limits.take(FILES, user)
        if wait > 0:
            raise too_many_requests("rate_limited", "too many calls; slow down", wait)
        return user


def _redacted_access_log(timestamp: str, request: server.Request) -> str:
    """The combined log format without the query string, where signatures travel."""
    escape = http._escape
    path = (request.uri or b"").split(b"?", 1)[0]
    agent = escape(request.getHeader(b"user-agent") or b"-")
    return '"{}" - - {} "{} {} {}" {} {} "-" "{}"'.format(
        escape(client_host(request)),
        timestamp,
        escape(request.method or b"-"),
        escape(path),
        escape(request.clientproto or b"-"),
        request.code,
        request.sentLength or "-",
        agent,
    )


def files_site(
    store: FileStore,
    sessions: ISessionStore,
    clock: IReactorTime,
    max_body_size: int,
    memory_limit: int = MEMORY_SPOOL,
    limits: RateLimits = NO_LIMITS,
    telemetry: SiteTelemetry = UNOBSERVED,
    cors_origins: tuple[str, ...] = (),
) -> ObservedSite:
    """The service's Site; no request body may be larger than a chunk (or a JSON call)."""
    request_class = type(
        "FileRequest",
        (FileRequest,),
        {
            "max_body_size": max(max_body_size, JSON_MAX_BODY),
            "spool_dir": store.blobs.tmp_dir,
            "memory_limit": memory_limit,
        },
    )
    site = ObservedSite(
        files_resource(store, sessions, clock, limits),
        clock,
        telemetry,
        requestFactory=request_class,
        logFormatter=_redacted_access_log,
    )
    site.cors = cors_policy(cors_origins)
    return site
