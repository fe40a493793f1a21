"""The web chat app's files, served by the daemon (``[web]``).

The app (``web/``) is a bundle of static files: ``index.html`` and what it loads. It
talks to the router, logic and file services and to the WebSocket gateway on their own
ports; this site only hands out its files, so it needs no accounts and no state.

What a browser gets, and why:

- ``index.html`` (and ``/``) with ``Cache-Control: no-cache``: a new release is seen
  on the next load. Files under ``assets/`` carry a content hash in their names (the
  build puts it there), so they are ``immutable`` for a year.
- A Content-Security-Policy that allows scripts, styles and images from this origin
  only (images also from ``blob:`` and ``data:``, for thumbnails made in the page),
  no plugins, no framing; connections go wherever ``[web] connect_src`` says (the
  router, logic, files and gateway addresses; by default any ``http(s)``/``ws(s)``
  address, since those services live on other ports).
- GET and HEAD only, with ETags; no directory listings; names outside the root,
  hidden files, links and anything but a regular file are a plain 404. The files are
  read once at start-up (a release's app is a few hundred KiB), so no request waits
  on the disk.
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime
from twisted.web import server
from twisted.web.resource import Resource

from cim.http.site import HttpError, bounded_site, write_reply
from cim.http.telemetry import UNOBSERVED, ObservedSite, SiteTelemetry

__all__ = ["PACKAGED_ROOT", "AppFiles", "MissingApp", "check_root", "load_app", "web_site"]

PACKAGED_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
"""Where ``make web`` puts the built app, shipped with the package."""

DEFAULT_CONNECT_SRC = "'self' http: https: ws: wss:"
ONE_YEAR = 365 * 86400
MAX_APP_SIZE = 64 << 20
"""More than this under ``[web] root`` is a wrong directory, not a web app."""
_TYPES = {
    ".html": "text/html",
    ".js": "application/javascript",
    ".mjs": "application/javascript",
    ".css": "text/css",
    ".json": "application/json",
    ".map": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".webmanifest": "application/manifest+json",
    ".woff2": "font/woff2",
    ".txt": "text/plain",
}
WEB_MAX_BODY_SIZE = 1024
"""The app's files are only read: no request needs a body."""

_HEADERS = (
    (b"X-Content-Type-Options", b"nosniff"),
    (b"Referrer-Policy", b"no-referrer"),
    (b"X-Frame-Options", b"DENY"),
    (b"Cross-Origin-Opener-Policy", b"same-origin"),
)


class MissingApp(Exception):
    """``[web] enabled`` but the directory holds no built app."""


def check_root(root: str) -> str:
    """The app's directory, once it is known to hold ``index.html``."""
    index = os.path.join(root, "index.html")
    if not os.path.isfile(index):
        raise MissingApp(
            f"{root!r} holds no index.html: build the web app with `make web` "
            "(or point [web] root at a built one)"
        )
    return root


def content_security_policy(connect_src: str = DEFAULT_CONNECT_SRC) -> bytes:
    return "; ".join(
        (
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' blob: data: http: https:",
            "media-src 'self' blob: http: https:",
            f"connect-src {connect_src}",
            "object-src 'none'",
            "base-uri 'none'",
            "frame-ancestors 'none'",
            "form-action 'self'",
        )
    ).encode()


@dataclass(frozen=True)
class _AppFile:
    body: bytes
    content_type: bytes
    etag: bytes
    cache_control: bytes


def _content_type(name: str) -> bytes:
    kind = _TYPES.get(os.path.splitext(name)[1].lower())
    if kind is None:
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if kind.startswith("text/") or kind in ("application/javascript", "application/json"):
        kind += "; charset=utf-8"
    return kind.encode()


def _cache_control(relative: str) -> bytes:
    if os.path.basename(relative) == "index.html":
        return b"no-cache"
    if relative.startswith("assets/"):
        return f"public, max-age={ONE_YEAR}, immutable".encode()
    return b"public, max-age=300"


def load_app(root: str, max_total: int = MAX_APP_SIZE) -> dict[str, _AppFile]:
    """Every regular, non-hidden file below ``root``, read once at start-up.

    The app is a few files of a release: holding them in memory keeps disk reads off
    the reactor and makes what is served exactly what was there at start.
    """
    files: dict[str, _AppFile] = {}
    total = 0
    for directory, subdirectories, names in os.walk(check_root(root)):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        for name in sorted(names):
            path = os.path.join(directory, name)
            if name.startswith(".") or not os.path.isfile(path) or os.path.islink(path):
                continue
            with open(path, "rb") as handle:
                body = handle.read(max_total - total + 1)
            total += len(body)
            if total > max_total:
                raise MissingApp(f"{root!r} holds more than {max_total >> 20} MiB: not a web app")
            relative = os.path.relpath(path, root).replace(os.sep, "/")
            etag = b'"' + hashlib.sha256(body).hexdigest()[:32].encode() + b'"'
            files[relative] = _AppFile(body, _content_type(name), etag, _cache_control(relative))
    return files


class AppFiles(Resource):
    """Every path below the root: a file of the built app, or 404."""

    isLeaf = True

    def __init__(self, root: str, connect_src: str = DEFAULT_CONNECT_SRC) -> None:
        super().__init__()
        self._files = load_app(root)
        self._policy = content_security_policy(connect_src)

    def render(self, request: server.Request) -> bytes | int:
        if request.method not in (b"GET", b"HEAD"):
            error = HttpError(405, "method_not_allowed", "the web app's files are only read")
            request.setHeader(b"Allow", b"GET, HEAD")
            return write_reply(request, error.reply())
        found = self._file_for(request.postpath or [])
        if found is None:
            error = HttpError(404, "not_found", "no such file in the web app")
            return write_reply(request, error.reply())
        for name, value in _HEADERS:
            request.setHeader(name, value)
        request.setHeader(b"Content-Security-Policy", self._policy)
        request.setHeader(b"Cache-Control", found.cache_control)
        request.setHeader(b"ETag", found.etag)
        request.setHeader(b"Content-Type", found.content_type)
        if found.etag in (request.getHeader(b"if-none-match") or b"").split(b", "):
            request.setResponseCode(304)
            return b""
        request.setHeader(b"Content-Length", str(len(found.body)).encode())
        return b"" if request.method == b"HEAD" else found.body

    def _file_for(self, segments: list[bytes]) -> _AppFile | None:
        """Only a file read at start-up can be served: a lookup, never a path walk."""
        relative = "/".join(segment.decode("utf-8", "replace") for segment in segments)
        if not relative:
            relative = "index.html"
        found = self._files.get(relative)
        if found is None:
            found = self._files.get(relative.rstrip("/") + "/index.html")  # a directory's
        return found


def web_site(
    root: str,
    reactor: IReactorTime,
    connect_src: str = DEFAULT_CONNECT_SRC,
    telemetry: SiteTelemetry = UNOBSERVED,
) -> ObservedSite:
    """The site for ``[web] listen``; ``root`` must hold the built app (``check_root``)."""
    return bounded_site(
        AppFiles(check_root(root), connect_src), WEB_MAX_BODY_SIZE, reactor, telemetry
    )
