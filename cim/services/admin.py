"""The admin service: /health for supervisors and load balancers, /metrics for Prometheus.

It listens on loopback by default; it also refuses any peer that is not local, so a
mistaken ``listen`` line does not publish the node's internals. Being local proves
nothing more (a reverse proxy on the host makes every caller local), so what is not
for everyone asks for an operator's token (``cim.http.operators``): ``/metrics``
unless ``[admin] metrics_open = loopback``, and the details of ``/health``, which
without a token says only whether the node is up, for load balancers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

from cim.http.endpoints import Call, Endpoint, EndpointResource
from cim.http.operators import NO_OPERATORS, Operators
from cim.http.site import (
    HttpError,
    Reply,
    bounded_site,
    is_local_peer,
    json_reply,
    write_reply,
)
from cim.metrics import NodeMetrics, NodeMetricsCollector

# Admin requests carry no body worth the name.
ADMIN_MAX_BODY_SIZE = 1024
HEALTH_FOR_EVERYONE = ("status", "node")
"""What /health tells a caller without a token: up or not, and which node answered."""


class LocalPeersOnly(Resource):
    """Refuses every non-local peer before the wrapped resource sees the request."""

    isLeaf = True
    _log = Logger()

    def __init__(self, inner: Resource) -> None:
        super().__init__()
        self._inner = inner

    def render(self, request: server.Request) -> bytes | int:
        if not is_local_peer(request):
            self._log.warn(
                "admin request refused from non-local peer {peer}", peer=request.getClientAddress()
            )
            error = HttpError(403, "forbidden", "the admin service answers local peers only")
            return write_reply(request, error.reply())
        return self._inner.render(request)


def admin_site(
    node_id: str,
    metrics: NodeMetrics,
    health: Callable[[], dict[str, Any]],
    reactor: IReactorTime,
    operators: Operators = NO_OPERATORS,
    metrics_open: bool = False,
) -> server.Site:
    """``metrics_open``: /metrics answers local peers without a token (``[admin]
    metrics_open = loopback``)."""
    registry = CollectorRegistry()
    registry.register(NodeMetricsCollector(metrics, node_id))

    async def health_report(call: Call[str]) -> Reply:
        report = health()
        status = 200 if report.get("status") == "ok" else 503
        if call.request.getHeader(b"authorization") is None:
            report = {key: report[key] for key in HEALTH_FOR_EVERYONE if key in report}
        else:
            await operators.authenticate(call.request)  # a wrong token is told so
        return json_reply(status, report)

    async def metrics_text(call: Call[str]) -> Reply:
        return Reply(200, generate_latest(registry), CONTENT_TYPE_LATEST.encode())

    endpoints = [
        Endpoint(
            "GET",
            "/health",
            "health",
            "The node's health: 200 when ready, 503 while starting or failing; "
            "the details with an operator's token",
            "admin",
            health_report,
            authenticated=False,
        ),
        Endpoint(
            "GET",
            "/metrics",
            "metrics",
            "The node's metrics in the Prometheus text format",
            "admin",
            metrics_text,
            authenticated=not metrics_open,
        ),
    ]
    routes = EndpointResource(endpoints, operators.authenticate, ADMIN_MAX_BODY_SIZE)
    return bounded_site(LocalPeersOnly(routes), ADMIN_MAX_BODY_SIZE, reactor)
