"""The file service's Site: its declared endpoints, spooled bodies and a quiet access log.

Every call is authenticated with the router's token (``Authorization: Bearer``);
downloads also accept a signed URL, which is what messages carry. The access log
shows paths without query strings, so signatures never reach it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.web import http, server

from cim.files.http.bodies import MEMORY_SPOOL, FileRequest
from cim.files.http.downloads import Downloads
from cim.files.http.uploads import Uploads
from cim.files.store import FileProblem, FileStore
from cim.http.auth import BearerSessions
from cim.http.deadlines import BoundedSite
from cim.http.endpoints import Endpoint, EndpointResource
from cim.http.site import Reply, client_host, json_reply
from cim.interfaces import ISessionStore

__all__ = ["JSON_MAX_BODY", "files_resource", "files_site"]

JSON_MAX_BODY = 16384
FILE_ID = r"[A-Za-z0-9_-]{1,64}"
"""A file or upload id in a path; anything else is a path that does not exist."""


def files_resource(
    store: FileStore, sessions: ISessionStore, clock: IReactorTime
) -> EndpointResource[str]:
    """Every file service path; answers JSON for everything but file bytes."""
    bearer = BearerSessions(sessions)

    def refusal(error: Exception, endpoint: Endpoint[Any]) -> Reply | None:
        if not isinstance(error, FileProblem):
            return None
        store.metrics.refused[error.code] += 1
        payload = {"error": error.code, "message": error.message, **error.extra}
        return json_reply(error.status, payload)

    endpoints = [
        *Uploads(store, bearer).endpoints(FILE_ID),
        *Downloads(store, bearer, clock).endpoints(FILE_ID),
    ]
    return EndpointResource(endpoints, bearer.user, JSON_MAX_BODY, error_replies=refusal)


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
) -> BoundedSite:
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
    return BoundedSite(
        files_resource(store, sessions, clock),
        clock,
        requestFactory=request_class,
        logFormatter=_redacted_access_log,
    )
