"""Which web pages may use cim from another origin: CORS for the HTTP APIs, and the
same origin check for the WebSocket gateway's upgrade (cim.protocols.gateway).

A browser sends ``Origin`` with every cross-origin call and asks first (a preflight,
``OPTIONS`` with ``Access-Control-Request-Method``) before one with a bearer token or
a JSON body. The router, logic and files services share this one implementation,
each with its own ``cors_origins``: an allowed origin gets the ``Access-Control-*``
headers on every answer (errors too, so the page can read them) and a 204 to its
preflights; any other origin gets no CORS header, so the browser keeps the answer
from the page, and a 403 to its preflights. Calls without ``Origin`` (not from a
browser page) are not affected: CORS protects users of browsers, not the API.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from urllib.parse import urlsplit

from twisted.web import server
from twisted.web.resource import Resource

__all__ = ["CorsPolicy", "OriginPolicy", "normalize_origin"]

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

ALLOWED_METHODS = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
ALLOWED_HEADERS = (
    b"Authorization, Content-Type, Content-MD5, Content-Range, Range, If-None-Match, If-Range"
)
EXPOSED_HEADERS = b"Retry-After, ETag, Content-Range, Content-Disposition, Location"
PREFLIGHT_MAX_AGE = b"600"


def normalize_origin(origin: str) -> str | None:
    """``scheme://host[:port]`` in lower case without a default port; None if not one."""
    try:
        parts = urlsplit(origin.strip().lower())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        return None
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[parts.scheme]:
        return f"{parts.scheme}://{host}"
    return f"{parts.scheme}://{host}:{port}"


class OriginPolicy:
    """A set of allowed origins (``*``: every one), compared after normalization."""

    def __init__(self, origins: Iterable[str]) -> None:
        listed = tuple(origins)
        self.any = "*" in listed
        self.origins = frozenset(
            normalized
            for normalized in (normalize_origin(o) for o in listed if o != "*")
            if normalized is not None
        )

    def __bool__(self) -> bool:
        return self.any or bool(self.origins)

    def allows(self, origin: str) -> bool:
        if origin == "null":
            return False  # sandboxed frames and files: no page anyone can name
        if self.any:
            return True
        normalized = normalize_origin(origin)
        return normalized is not None and normalized in self.origins


class _Preflight(Resource):
    """The answer to a preflight: 204 with the permissions, or 403 for a stranger."""

    isLeaf = True

    def __init__(self, allowed: bool) -> None:
        super().__init__()
        self.allowed = allowed

    def render(self, request: server.Request) -> bytes:
        if not self.allowed:
            # The JSON error every cim HTTP answer has (cim.http.site, which imports us).
            request.setResponseCode(403)
            request.setHeader(b"Content-Type", b"application/json")
            error = {"error": "origin_not_allowed", "message": "this origin may not call this API"}
            return json.dumps(error).encode()
        request.setResponseCode(204)
        request.setHeader(b"Access-Control-Allow-Methods", ALLOWED_METHODS)
        request.setHeader(b"Access-Control-Allow-Headers", ALLOWED_HEADERS)
        request.setHeader(b"Access-Control-Max-Age", PREFLIGHT_MAX_AGE)
        return b""


class CorsPolicy:
    """CORS for one HTTP service: asked by its Site before a request is routed."""

    def __init__(self, origins: Iterable[str]) -> None:
        self.policy = OriginPolicy(origins)

    def check(self, request: server.Request) -> Resource | None:
        """Add the CORS headers an allowed origin gets; a preflight is answered here
        (the resource returned), anything else goes on to the service's routes."""
        raw = request.getHeader(b"origin")
        if raw is None:
            return None
        origin = raw.decode("latin-1")
        allowed = self.policy.allows(origin)
        preflight = request.method == b"OPTIONS" and (
            request.getHeader(b"access-control-request-method") is not None
        )
        # Answers differ by Origin: caches must keep them apart.
        request.setHeader(b"Vary", b"Origin")
        if allowed:
            request.setHeader(b"Access-Control-Allow-Origin", raw)
            request.setHeader(b"Access-Control-Expose-Headers", EXPOSED_HEADERS)
        if preflight:
            return _Preflight(allowed)
        return None
