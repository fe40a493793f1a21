"""What every HTTP service of the node reports about the requests it answers.

Each request is counted and timed once, by the Site, whichever resource answered it
(declared endpoints, the OpenAPI document, a refusal before routing): the numbers are
the node's ``cim_http_requests_total`` and ``cim_http_request_duration_seconds`` in
``/metrics``. The route label is the template the request matched
(``/api/v1/posts/{post}``), named by the resource that recognised it; a request no
route recognised is ``unmatched``, so scanners cannot grow the label set.

twisted.web's access log (one line per request, in the daemon's log) is off unless
``[log] access_log`` asks for it: the operation log already records who logged in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from cim.http.deadlines import BoundedSite
from cim.metrics import HttpRequests

if TYPE_CHECKING:
    from cim.http.cors import CorsPolicy

__all__ = ["UNMATCHED", "UNOBSERVED", "ObservedSite", "SiteTelemetry", "name_route"]

UNMATCHED = "unmatched"
DISCONNECTED = "disconnected"
"""The status of a request whose client went away before the answer was complete."""
_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
_ROUTE = "_cim_route"


def name_route(request: server.Request, route: str) -> None:
    """Label ``request`` with the route template it matched (for its metrics)."""
    setattr(request, _ROUTE, route)


def route_of(request: server.Request) -> str:
    return str(getattr(request, _ROUTE, UNMATCHED))


@dataclass(frozen=True)
class SiteTelemetry:
    """Which service a Site serves, where its requests are counted, whether it logs them."""

    service: str
    requests: HttpRequests
    access_log: bool = False


UNOBSERVED = SiteTelemetry("unobserved", HttpRequests())
"""For sites outside a node (tests, tools): counted into numbers nobody reads."""


class ObservedSite(BoundedSite):
    """A bounded Site (read deadlines, ``cim.http.deadlines``) that counts and times every
    request, and writes an access log only on demand."""

    cors: CorsPolicy | None = None
    """Which other origins' pages may call the service (cim.http.cors); None: none."""

    def __init__(
        self,
        resource: Resource,
        reactor: IReactorTime,
        telemetry: SiteTelemetry = UNOBSERVED,
        **kwargs: Any,
    ) -> None:
        super().__init__(resource, reactor, **kwargs)
        self.telemetry = telemetry

    def getResourceFor(self, request: server.Request) -> Resource:
        # Called once per request, when it has arrived whole and is about to be served.
        started = self.reactor.seconds()
        request.notifyFinish().addBoth(self._observe, request, started)
        cors = self.cors
        if cors is not None:
            preflight = cors.check(request)
            if preflight is not None:
                return preflight
        return super().getResourceFor(request)

    def _observe(self, result: Failure | None, request: server.Request, started: float) -> None:
        method = request.method.decode("latin-1")
        status = DISCONNECTED if isinstance(result, Failure) else str(request.code)
        self.telemetry.requests.observe(
            self.telemetry.service,
            method if method in _METHODS else "other",
            route_of(request),
            status,
            self.reactor.seconds() - started,
        )

    def log(self, request: http.Request) -> None:
        if self.telemetry.access_log:
            super().log(request)
