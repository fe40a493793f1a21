"""Declared endpoints: every HTTP service's routes, declared once and served one way.

An ``Endpoint`` names a method, a path template and the coroutine that serves it, with
what the machinery should do first: convert path and query parameters, read and check
a JSON body, authenticate the caller. ``EndpointResource`` routes requests to the
declarations and answers everything in JSON, refusals included (404, 405, the
endpoint's own ``HttpError``, and a bare logged 500 for anything unexpected). The
router, the file service, the admin service and the logic service all declare their
routes this way; ``cim.http.openapi`` documents the same declarations.

The order of the checks is fixed, so the same bad request always gets the same
answer: path parameters, query parameters, the body, the caller, then the endpoint.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, NoReturn, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

from cim.http.auth import invalid_token
from cim.http.schema import body_problem, body_validator, convert_param, convert_query
from cim.http.site import (
    HttpError,
    Reply,
    client_host,
    internal_error,
    read_json_object,
    write_reply,
)
from cim.http.telemetry import name_route

if TYPE_CHECKING:
    from jsonschema import Draft202012Validator

__all__ = [
    "Authenticate",
    "Call",
    "Endpoint",
    "EndpointResource",
    "ErrorReplies",
    "no_error_replies",
    "nobody",
]

CallerT = TypeVar("CallerT")


@dataclass(frozen=True)
class Call(Generic[CallerT]):
    """One request, checked as its endpoint declares, as the endpoint's coroutine sees it."""

    request: server.Request
    caller: CallerT | None
    """Who calls, for an ``authenticated`` endpoint (None for the others)."""
    params: Mapping[str, Any]
    query: Mapping[str, Any]
    body: Mapping[str, Any]
    address: str
    """The peer's host, the key of per-address throttles."""

    @property
    def user(self) -> CallerT:
        """The authenticated caller (every ``authenticated`` endpoint has one)."""
        assert self.caller is not None
        return self.caller


@dataclass(frozen=True)
class Endpoint(Generic[CallerT]):
    """One operation: its place, what to check first, and the coroutine that serves it.

    ``serve`` returns the reply, or None when it has answered the request itself (a
    download streamed to the client).
    """

    method: str
    path: str
    """A path template below the resource's prefix, e.g. ``/posts/{post}/like``."""
    operation_id: str
    summary: str
    tag: str
    serve: Callable[[Call[CallerT]], Awaitable[Reply | None]]
    body: Mapping[str, Any] | None = None
    """The JSON Schema of the body; the body is read, checked and in ``Call.body``."""
    json_body: bool = False
    """Read a JSON object body into ``Call.body`` without a schema: the endpoint checks
    its fields itself (the file service, whose rules live in its store)."""
    response: Mapping[str, Any] | None = None
    status: int = 200
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Path parameters: ``{"type": "integer"}`` (a database id) or a string schema. Any
    segment matches the route; one that fails its schema is a 404 ``no such NAME``."""
    segments: Mapping[str, str] = field(default_factory=dict)
    """Path parameters as regular expressions of the segment: one that does not match
    leaves the route unmatched, as if the path did not exist. Passed on as text."""
    query: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    authenticated: bool = True
    errors: tuple[int, ...] = ()
    """Refusals the operation documents beyond the ones every operation may give."""
    also: tuple[int, ...] = ()
    """Other success statuses, with the same response schema (e.g. 200 for a repeat of
    a call that answers 201 when it creates)."""
    description: str = ""


Authenticate = Callable[[server.Request], Awaitable[CallerT]]
"""Who calls: raises the 401 (or the 503 of an unreachable session store) itself."""

ErrorReplies = Callable[[Exception, Endpoint[Any]], "Reply | None"]
"""The reply for an exception a service expects from its endpoints (its domain's
refusals, a database that is down), or None to answer it as a bug: a logged 500."""


async def nobody(request: server.Request) -> NoReturn:
    """The authenticator of a resource whose endpoints are all open: refuses everyone."""
    raise invalid_token()


def no_error_replies(error: Exception, endpoint: Endpoint[Any]) -> Reply | None:
    return None


@dataclass(frozen=True)
class _Route(Generic[CallerT]):
    endpoint: Endpoint[CallerT]
    pattern: re.Pattern[str]
    validator: Draft202012Validator | None


def _path_pattern(template: str, endpoint: Endpoint[Any]) -> re.Pattern[str]:
    pattern = ""
    for literal, name in re.findall(r"([^{]*)(?:\{(\w+)\})?", template):
        pattern += re.escape(literal)
        if not name:
            continue
        if name in endpoint.segments:
            pattern += f"(?P<{name}>{endpoint.segments[name]})"
        elif name in endpoint.params:
            pattern += f"(?P<{name}>[^/]+)"
        else:
            raise ValueError(f"{template}: path parameter {name!r} has no schema")
    return re.compile(pattern)


class EndpointResource(Resource, Generic[CallerT]):
    """Routes declared endpoints; answers JSON for everything, errors included.

    ``head_as_get``: answer HEAD with an endpoint's GET (the headers without the body).
    A resource that publishes its operations in an OpenAPI document answers only what
    the document lists, so HEAD is a 405 there.
    """

    isLeaf = True
    _log = Logger()

    def __init__(
        self,
        endpoints: Sequence[Endpoint[CallerT]],
        authenticate: Authenticate[CallerT],
        max_body_size: int,
        *,
        prefix: str = "",
        error_replies: ErrorReplies = no_error_replies,
        head_as_get: bool = True,
    ) -> None:
        super().__init__()
        self._caller_of = authenticate
        self._max_body_size = max_body_size
        self._error_replies = error_replies
        self._head_as_get = head_as_get
        self.prefix = prefix
        self.endpoints = list(endpoints)
        self._routes: list[_Route[CallerT]] = []
        seen: set[tuple[str, str]] = set()
        for endpoint in self.endpoints:
            key = (endpoint.method, endpoint.path)
            if key in seen:
                raise ValueError(f"{endpoint.method} {endpoint.path} is declared twice")
            seen.add(key)
            validator = None if endpoint.body is None else body_validator(endpoint.body)
            pattern = _path_pattern(prefix + endpoint.path, endpoint)
            self._routes.append(_Route(endpoint, pattern, validator))

    def render(self, request: server.Request) -> bytes | int:
        path = request.path.decode("latin-1")
        method = request.method.decode("latin-1")
        if method == "HEAD" and self._head_as_get:
            method = "GET"
        allowed: list[str] = []
        for route in self._routes:
            match = route.pattern.fullmatch(path)
            if match is None:
                continue
            name_route(request, self.prefix + route.endpoint.path)
            if route.endpoint.method != method:
                allowed.append(route.endpoint.method)
                continue
            self._answer(request, route, match.groupdict())
            return server.NOT_DONE_YET
        if allowed:
            allow = ", ".join(sorted(set(allowed))).encode()
            error = HttpError(
                405, "method_not_allowed", "method not allowed here", ((b"Allow", allow),)
            )
            return write_reply(request, error.reply())
        return write_reply(request, HttpError(404, "not_found", "no such resource").reply())

    def _answer(
        self, request: server.Request, route: _Route[CallerT], raw_params: dict[str, str]
    ) -> None:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        async def answer() -> None:
            try:
                reply = await self._serve(request, route, raw_params)
            except HttpError as error:
                reply = error.reply()
            except Exception as error:
                reply = self._error_replies(error, route.endpoint) or internal_error(request)
            if reply is None or gone:
                return
            if request.startedWriting:
                # A streamed answer failed halfway: all one can do is cut the connection.
                request.loseConnection()
                return
            body = write_reply(request, reply)
            if request.method != b"HEAD":
                request.write(body)
            request.finish()

        Deferred.fromCoroutine(answer()).addErrback(
            lambda failure: self._log.failure("could not send a reply", failure)
        )

    async def _serve(
        self, request: server.Request, route: _Route[CallerT], raw_params: dict[str, str]
    ) -> Reply | None:
        endpoint = route.endpoint
        params = {
            name: value if name in endpoint.segments else _param(endpoint, name, value)
            for name, value in raw_params.items()
        }
        query = {}
        args = request.args or {}
        for name, schema in endpoint.query.items():
            values = args.get(name.encode())
            if values:
                query[name] = convert_query(name, values[0], schema)
        body: dict[str, Any] = {}
        if route.validator is not None or endpoint.json_body:
            body = read_json_object(request, self._max_body_size)
        if route.validator is not None:
            problem = body_problem(route.validator, body)
            if problem is not None:
                raise HttpError(400, "bad_request", problem)
        caller = await self._caller_of(request) if endpoint.authenticated else None
        return await endpoint.serve(
            Call(request, caller, params, query, body, client_host(request))
        )


def _param(endpoint: Endpoint[Any], name: str, raw: str) -> Any:
    return convert_param(name, raw, endpoint.params[name])
