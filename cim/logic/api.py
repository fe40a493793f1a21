"""The logic service's HTTP layer: declared endpoints, one resource, one OpenAPI spec.

Every endpoint is declared once, as an ``Endpoint`` with its JSON schemas; the
resource routes, authenticates and validates from those declarations, and the OpenAPI
document served at ``/api/v1/openapi.json`` is built from the same objects, so the
spec cannot drift from what the server accepts.

Input is checked before any feature code runs: a body must be a JSON object that
matches the endpoint's schema (JSON Schema 2020-12, the dialect of OpenAPI 3.1), and
strings that no database stores faithfully (NUL, lone surrogates) or numbers that are
not finite are refused with a 400, so bad input never becomes a 500. Feature code
raises ``HttpError`` for the refusals it decides (403, 404, 409...).
"""

from __future__ import annotations

import math
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from sqlalchemy.exc import IntegrityError, OperationalError
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

from cim.accounts.store import UserRecord
from cim.backends.state import token_hash
from cim.http.site import (
    HttpError,
    Reply,
    bounded_site,
    client_host,
    internal_error,
    json_reply,
    read_json_object,
    write_reply,
)
from cim.interfaces import IStateBackend, StateUnavailable
from cim.storage.database import PoolNotRunning

__all__ = [
    "API_PREFIX",
    "Answer",
    "Call",
    "Caller",
    "Endpoint",
    "LogicResource",
    "array_of",
    "is_media_url",
    "logic_site",
    "object_schema",
    "openapi_document",
]

API_PREFIX = "/api/v1"
OPENAPI_PATH = API_PREFIX + "/openapi.json"
MAX_ID = 2**63 - 1
"""Ids are 64-bit database keys; a larger number in a path is simply not found."""

Answer = tuple[int, Any]
"""A status and the JSON-serialisable payload to send with it."""


@dataclass(frozen=True)
class Caller:
    """Who is calling, from the router's token: never from anything in the request."""

    user: str
    kind: str

    @property
    def is_device(self) -> bool:
        return self.kind == "device"


@dataclass(frozen=True)
class Call:
    """One validated request as feature code sees it."""

    caller: Caller | None
    params: Mapping[str, Any]
    query: Mapping[str, Any]
    body: Mapping[str, Any]
    address: str

    @property
    def user(self) -> Caller:
        """The authenticated caller (every endpoint but the open ones has one)."""
        assert self.caller is not None
        return self.caller


@dataclass(frozen=True)
class Endpoint:
    """One operation: its place, its schemas and the coroutine that serves it."""

    method: str
    path: str
    """An OpenAPI path template below the API root, e.g. ``/posts/{post}/like``."""
    operation_id: str
    summary: str
    tag: str
    serve: Callable[[Call], Awaitable[Answer]]
    body: Mapping[str, Any] | None = None
    response: Mapping[str, Any] | None = None
    status: int = 200
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Path parameters: ``{"type": "integer"}`` (a database id) or a string schema."""
    query: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    authenticated: bool = True
    errors: tuple[int, ...] = ()
    """Refusals the operation documents beyond the ones every operation may give."""
    also: tuple[int, ...] = ()
    """Other success statuses, with the same response schema (e.g. 200 for a repeat of
    a call that answers 201 when it creates)."""
    description: str = ""


# --- schema helpers ---------------------------------------------------------------------


def object_schema(
    properties: Mapping[str, Mapping[str, Any]],
    required: Iterable[str] = (),
    *,
    description: str = "",
) -> dict[str, Any]:
    """A closed JSON object: unknown keys are refused, so a typo is an error, not a no-op."""
    schema: dict[str, Any] = {
        "type": "object",
        "properties": dict(properties),
        "additionalProperties": False,
    }
    required = list(required)
    if required:
        schema["required"] = required
    if description:
        schema["description"] = description
    return schema


def array_of(items: Mapping[str, Any], max_items: int | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "array", "items": dict(items)}
    if max_items is not None:
        schema["maxItems"] = max_items
    return schema


ERROR_SCHEMA = object_schema(
    {
        "error": {"type": "string", "description": "a stable machine-readable code"},
        "message": {"type": "string", "description": "what went wrong, for people"},
    },
    ["error", "message"],
)

_COMMON_ERRORS = {
    400: "the request is malformed or breaks a rule; `message` says which",
    401: "the bearer token is missing, expired or unknown",
    409: "the request conflicts with the current state (or with a concurrent change: retry)",
    413: "the body is too large",
    415: "the body is not application/json",
    503: "a backend is unreachable; retry after the Retry-After header",
}
_ERROR_TEXT = {
    403: "the caller may not do this",
    404: "no such resource, or not one the caller may see",
    409: "the request conflicts with the current state",
    410: "the resource has expired",
    429: "too many attempts; retry after the Retry-After header",
}


# --- input checks -----------------------------------------------------------------------

_HTTP_URL = re.compile(r"https?://\S+")


def is_media_url(value: str) -> bool:
    """An http(s) URL with a host that URL parsers accept, so every client can open it
    (``http://[`` passes the schema's pattern but breaks ``urlsplit``)."""
    if _HTTP_URL.fullmatch(value) is None:
        return False
    try:
        parts = urllib.parse.urlsplit(value)
        _ = parts.port
    except ValueError:
        return False
    return bool(parts.hostname)


def _storable_problem(value: Any, where: str) -> str | None:
    """Why a decoded JSON value cannot be stored as given, or None."""
    if isinstance(value, str):
        if "\x00" in value:
            return f"{where}: text may not contain NUL characters"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{where}: text is not valid Unicode"
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where}: numbers must be finite"
    if isinstance(value, dict):
        for key, item in value.items():
            problem = _storable_problem(key, where) or _storable_problem(item, f"{where}.{key}")
            if problem:
                return problem
    elif isinstance(value, list):
        for index, item in enumerate(value):
            problem = _storable_problem(item, f"{where}[{index}]")
            if problem:
                return problem
    return None


def _field_path(error: ValidationError) -> str:
    parts = [str(part) for part in error.absolute_path]
    return ".".join(parts) if parts else "body"


def _schema_problem(validator: Draft202012Validator, body: Any) -> str | None:
    error = next(iter(sorted(validator.iter_errors(body), key=lambda e: e.path)), None)
    if error is None:
        return None
    where = _field_path(error)
    if error.schema.get("writeOnly") if isinstance(error.schema, dict) else False:
        # A password's value never goes back in an error message (nor into a log).
        return f"{where}: does not satisfy the rule '{error.validator}'"
    text = error.message
    if len(text) > 200:
        text = text[:200] + "..."
    return f"{where}: {text}"


def _path_pattern(template: str, params: Mapping[str, Mapping[str, Any]]) -> re.Pattern[str]:
    pattern = ""
    for literal, name in re.findall(r"([^{]*)(?:\{(\w+)\})?", template):
        pattern += re.escape(literal)
        if name:
            if name not in params:
                raise ValueError(f"{template}: path parameter {name!r} has no schema")
            pattern += f"(?P<{name}>[^/]+)"
    return re.compile(pattern)


def _convert_param(name: str, raw: str, schema: Mapping[str, Any]) -> Any:
    """A path parameter as its schema's type; a malformed one names nothing that exists."""
    if schema.get("type") == "integer":
        if not raw.isdigit() or len(raw) > 19 or not 1 <= int(raw) <= MAX_ID:
            raise HttpError(404, "not_found", f"no such {name}")
        return int(raw)
    pattern = schema.get("pattern")
    if pattern is not None and re.fullmatch(pattern, raw) is None:
        raise HttpError(404, "not_found", f"no such {name}")
    return raw


def _convert_query(name: str, raw: bytes, schema: Mapping[str, Any]) -> Any:
    text = raw.decode("utf-8", "replace")
    kind = schema.get("type")
    if kind in ("integer", "number"):
        try:
            value: Any = int(text) if kind == "integer" else float(text)
        except ValueError:
            raise HttpError(400, "bad_request", f"query {name}: expected a {kind}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise HttpError(400, "bad_request", f"query {name}: expected a finite number")
        low, high = schema.get("minimum"), schema.get("maximum")
        if (low is not None and value < low) or (high is not None and value > high):
            raise HttpError(400, "bad_request", f"query {name}: must be between {low} and {high}")
        return value
    if "enum" in schema and text not in schema["enum"]:
        choices = ", ".join(schema["enum"])
        raise HttpError(400, "bad_request", f"query {name}: expected one of {choices}")
    if "\x00" in text or len(text) > int(schema.get("maxLength", 256)):
        raise HttpError(400, "bad_request", f"query {name}: not an acceptable value")
    return text


# --- the resource -----------------------------------------------------------------------


UserLookup = Callable[[str], "Deferred[UserRecord | None]"]


@dataclass(frozen=True)
class _Route:
    endpoint: Endpoint
    pattern: re.Pattern[str]
    validator: Draft202012Validator | None


class LogicResource(Resource):
    """Routes the declared endpoints; answers JSON for everything, errors included."""

    isLeaf = True
    _log = Logger()

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        state: IStateBackend,
        users: UserLookup,
        max_body_size: int,
        title: str = "cim logic service",
        version: str = "1",
    ) -> None:
        super().__init__()
        self._state = state
        self._users = users
        self._max_body_size = max_body_size
        self.endpoints = list(endpoints)
        self._routes: list[_Route] = []
        seen: set[tuple[str, str]] = set()
        for endpoint in self.endpoints:
            key = (endpoint.method, endpoint.path)
            if key in seen:
                raise ValueError(f"{endpoint.method} {endpoint.path} is declared twice")
            seen.add(key)
            validator = None
            if endpoint.body is not None:
                Draft202012Validator.check_schema(endpoint.body)
                validator = Draft202012Validator(endpoint.body)
            pattern = _path_pattern(API_PREFIX + endpoint.path, endpoint.params)
            self._routes.append(_Route(endpoint, pattern, validator))
        self.spec = openapi_document(self.endpoints, title, version)
        self._spec_reply = json_reply(200, self.spec)

    def render(self, request: server.Request) -> bytes | int:
        path = request.path.decode("latin-1")
        method = request.method.decode("latin-1")
        if path == OPENAPI_PATH and method in ("GET", "HEAD"):
            return write_reply(request, self._spec_reply)
        allowed: list[str] = []
        for route in self._routes:
            match = route.pattern.fullmatch(path)
            if match is None:
                continue
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

    def _answer(self, request: server.Request, route: _Route, raw_params: dict[str, str]) -> None:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        async def answer() -> None:
            try:
                reply = await self._serve(request, route, raw_params)
            except HttpError as error:
                reply = error.reply()
            except Exception:
                reply = internal_error(request)
            if gone:
                return
            body = write_reply(request, reply)
            if request.method != b"HEAD":
                request.write(body)
            request.finish()

        Deferred.fromCoroutine(answer()).addErrback(
            lambda failure: self._log.failure("could not send a reply", failure)
        )

    async def _serve(
        self, request: server.Request, route: _Route, raw_params: dict[str, str]
    ) -> Reply:
        endpoint = route.endpoint
        params = {
            name: _convert_param(name, value, endpoint.params[name])
            for name, value in raw_params.items()
        }
        query = {}
        args = request.args or {}
        for name, schema in endpoint.query.items():
            values = args.get(name.encode())
            if values:
                query[name] = _convert_query(name, values[0], schema)
        body: dict[str, Any] = {}
        if route.validator is not None:
            body = read_json_object(request, self._max_body_size)
            problem = _storable_problem(body, "body") or _schema_problem(route.validator, body)
            if problem is not None:
                raise HttpError(400, "bad_request", problem)
        try:
            caller = await self._authenticate(request) if endpoint.authenticated else None
            status, payload = await endpoint.serve(
                Call(caller, params, query, body, client_host(request))
            )
        except IntegrityError as error:
            # A concurrent change the feature's checks could not see, such as the
            # caller's account deleted while this call was in flight: the write broke
            # a key, nothing was stored, and a retry gets a proper answer.
            self._log.info(
                "{method} {path} conflicted with a concurrent change: {error}",
                method=endpoint.method,
                path=endpoint.path,
                error=error.orig,
            )
            raise HttpError(
                409, "conflict", "the request conflicts with a concurrent change; retry"
            ) from None
        except (OperationalError, PoolNotRunning) as error:
            self._log.warn(
                "database unavailable serving {method} {path}: {error}",
                method=endpoint.method,
                path=endpoint.path,
                error=error,
            )
            raise HttpError(
                503,
                "database_unavailable",
                "the database is unreachable; try again shortly",
                ((b"Retry-After", b"5"),),
            ) from None
        if status == 204:
            return Reply(204, b"")
        return json_reply(status, payload)

    async def _authenticate(self, request: server.Request) -> Caller:
        token = _bearer_token(request)
        record = None
        user = None
        if token is not None:
            try:
                record = await self._state.sessions.session_for_token(token_hash(token))
            except StateUnavailable:
                raise HttpError(
                    503,
                    "state_unavailable",
                    "the session store is unreachable; try again shortly",
                    ((b"Retry-After", b"5"),),
                ) from None
            if record is not None:
                user = await self._users(record.user)
        if record is None or user is None:
            raise HttpError(
                401,
                "invalid_token",
                "send the router's token as Authorization: Bearer TOKEN",
                ((b"WWW-Authenticate", b'Bearer realm="cim"'),),
            )
        return Caller(user.name, user.kind)


_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9._~+/=-]{1,512})")


def _bearer_token(request: server.Request) -> str | None:
    header = request.getHeader(b"authorization")
    if header is None:
        return None
    match = _BEARER.fullmatch(header.decode("latin-1").strip())
    return match.group(1) if match else None


# --- the OpenAPI document ---------------------------------------------------------------


def _operation(endpoint: Endpoint) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": endpoint.operation_id,
        "summary": endpoint.summary,
        "tags": [endpoint.tag],
    }
    if endpoint.description:
        operation["description"] = endpoint.description
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": _param_schema(schema)}
        for name, schema in endpoint.params.items()
    ]
    parameters += [
        {"name": name, "in": "query", "required": False, "schema": dict(schema)}
        for name, schema in endpoint.query.items()
    ]
    if parameters:
        operation["parameters"] = parameters
    if endpoint.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": dict(endpoint.body)}},
        }
    responses: dict[str, Any] = {}
    if endpoint.status == 204:
        responses["204"] = {"description": "done"}
    else:
        success: dict[str, Any] = {"description": "success"}
        if endpoint.response is not None:
            success["content"] = {"application/json": {"schema": dict(endpoint.response)}}
        for status in (endpoint.status, *endpoint.also):
            responses[str(status)] = success
    errors = dict(_COMMON_ERRORS)
    if not endpoint.authenticated:
        errors.pop(401)
    if endpoint.body is None:
        errors.pop(413)
        errors.pop(415)
    for status in endpoint.errors:
        errors[status] = _ERROR_TEXT.get(status, "refused")
    if endpoint.params:
        errors.setdefault(404, _ERROR_TEXT[404])
    for status, text in sorted(errors.items()):
        responses[str(status)] = {
            "description": text,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    operation["responses"] = responses
    operation["security"] = [{"bearer": []}] if endpoint.authenticated else []
    return operation


def _param_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    if schema.get("type") == "integer":
        return {"type": "integer", "minimum": 1, "maximum": MAX_ID, **schema}
    return dict(schema)


def openapi_document(
    endpoints: Sequence[Endpoint], title: str = "cim logic service", version: str = "1"
) -> dict[str, Any]:
    """The OpenAPI 3.1 description of ``endpoints`` (what ``/api/v1/openapi.json`` serves)."""
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints:
        path = paths.setdefault(API_PREFIX + endpoint.path, {})
        path[endpoint.method.lower()] = _operation(endpoint)
    tags = sorted({endpoint.tag for endpoint in endpoints})
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": (
                "Accounts, device binding, SOS alarms, geofences and likes. Authenticate "
                "with the token from the router's POST /api/v1/login as "
                "`Authorization: Bearer TOKEN`. Every notification these features send "
                "reaches users as an IM system message (see docs/protocol.md)."
            ),
        },
        "tags": [{"name": tag} for tag in tags],
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR_SCHEMA},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def logic_site(resource: LogicResource, max_body_size: int, clock: IReactorTime) -> server.Site:
    return bounded_site(resource, max_body_size, clock)
