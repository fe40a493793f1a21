"""What cim's small HTTP services share: bounded JSON bodies and JSON errors.

Clients and scripts should be able to rely on every response, errors included, being
JSON ``{"error": code, "message": text}`` with a meaningful status, so twisted.web's
HTML error pages never reach them.
"""

from __future__ import annotations

import io
import ipaddress
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from cim.http.cors import CorsPolicy
from cim.http.telemetry import UNOBSERVED, ObservedSite, SiteTelemetry

JSON_TYPE = b"application/json"


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: bytes = JSON_TYPE
    headers: tuple[tuple[bytes, bytes], ...] = ()


class HttpError(Exception):
    """Raised anywhere below a route to answer with a JSON error."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        super().__init__(status, code, message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers

    def reply(self) -> Reply:
        return json_reply(self.status, {"error": self.code, "message": self.message}, self.headers)


def json_reply(
    status: int, payload: Mapping[str, Any], headers: tuple[tuple[bytes, bytes], ...] = ()
) -> Reply:
    return Reply(status, json.dumps(payload, separators=(",", ":")).encode(), JSON_TYPE, headers)


def too_many_requests(code: str, message: str, retry_after: float) -> HttpError:
    seconds = max(1, math.ceil(retry_after))
    return HttpError(429, code, message, ((b"Retry-After", str(seconds).encode()),))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def read_json_object(request: server.Request, max_size: int) -> dict[str, Any]:
    """The request body as a JSON object, or an HttpError saying what is wrong with it."""
    if getattr(request, "body_too_large", False):
        raise HttpError(413, "body_too_large", f"the request body exceeds {max_size} bytes")
    content_type = request.getHeader(b"content-type") or b""
    if content_type.split(b";", 1)[0].strip().lower() != JSON_TYPE:
        raise HttpError(415, "unsupported_media_type", "send the body as application/json")
    content = request.content
    raw = content.read(max_size + 1) if content is not None else b""
    if len(raw) > max_size:
        raise HttpError(413, "body_too_large", f"the request body exceeds {max_size} bytes")
    try:
        parsed = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise HttpError(400, "bad_request", "the body is not valid UTF-8 JSON") from None
    if not isinstance(parsed, dict):
        raise HttpError(400, "bad_request", "the body must be a JSON object")
    return parsed


def client_host(request: server.Request) -> str:
    """The peer's address as a throttling and logging key (no port: it changes per connection)."""
    address = request.getClientAddress()
    if isinstance(address, IPv4Address | IPv6Address):
        return address.host
    if isinstance(address, UNIXAddress):
        return "unix"
    return str(address)


class BoundedRequest(server.Request):
    """A request that stops storing its body past ``max_body_size``.

    twisted.web buffers a whole body (to a temporary file when large) before any
    resource sees it; this keeps at most the limit in memory and remembers the
    overflow, so the resource answers 413 without the server having held the excess.
    """

    max_body_size = 16384
    body_too_large = False

    def gotLength(self, length: int | None) -> None:
        self.content = io.BytesIO()
        if length is not None and length > self.max_body_size:
            self.body_too_large = True

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large or self.content is None:
            return
        if self.content.tell() + len(data) > self.max_body_size:
            self.body_too_large = True
            self.content = io.BytesIO()
            return
        self.content.write(data)


def bounded_site(
    root: Resource,
    max_body_size: int,
    reactor: IReactorTime,
    telemetry: SiteTelemetry = UNOBSERVED,
    cors_origins: tuple[str, ...] = (),
) -> ObservedSite:
    """A Site whose requests hold at most ``max_body_size`` body bytes.

    ``reactor`` drives the read deadlines (``cim.http.deadlines``), request timings and
    access-log timestamps; tests pass a Clock. ``telemetry``: which service's metrics
    count its requests.
    """
    request_class = type("BoundedRequest", (BoundedRequest,), {"max_body_size": max_body_size})
    site = ObservedSite(root, reactor, telemetry, requestFactory=request_class)
    site.cors = cors_policy(cors_origins)
    return site


def cors_policy(origins: tuple[str, ...]) -> CorsPolicy | None:
    """A service's ``cors_origins`` as its Site's CORS policy; None when it names none."""
    return CorsPolicy(origins) if origins else None


_log = Logger()


def internal_error(request: server.Request, failure: Failure | None = None) -> Reply:
    """Log an unexpected failure with where the request went, and answer a bare 500.

    The request body may hold secrets (passwords, tokens), so only the method and the
    path go to the log, and the answer says nothing about what failed.
    """
    _log.failure(
        "unexpected error serving {method} {path}",
        failure if failure is not None else Failure(),
        method=request.method.decode("latin-1"),
        path=request.path.decode("latin-1"),
    )
    return HttpError(500, "internal_error", "the server failed to handle the request").reply()


def write_reply(request: server.Request, reply: Reply) -> bytes:
    """Set status and headers; returns the body for render() or request.write()."""
    request.setResponseCode(reply.status)
    request.setHeader(b"Content-Type", reply.content_type)
    request.setHeader(b"Content-Length", str(len(reply.body)).encode())
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    for name, value in reply.headers:
        request.setHeader(name, value)
    return reply.body


def is_local_peer(request: server.Request) -> bool:
    address = request.getClientAddress()
    if isinstance(address, IPv4Address | IPv6Address):
        try:
            ip = ipaddress.ip_address(address.host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return ip.ipv4_mapped.is_loopback
        return ip.is_loopback
    # A UNIX socket is local, and its file permissions already decide who may connect.
    return isinstance(address, UNIXAddress)
