"""The admin service: /health for supervisors and load balancers, /metrics for Prometheus.

It listens on loopback by default; it also refuses any peer that is not local, so a
mistaken ``listen`` line does not publish the node's internals.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

from cim.http.endpoints import Call, Endpoint, EndpointResource, nobody
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
) -> server.Site:
    registry = CollectorRegistry()
    registry.register(NodeMetricsCollector(metrics, node_id))

    async def health_report(call: Call[None]) -> Reply:
        report = health()
        return json_reply(200 if report.get("status") == "ok" else 503, report)

    async def metrics_text(call: Call[None]) -> Reply:
        return Reply(200, generate_latest(registry), CONTENT_TYPE_LATEST.encode())

    endpoints = [
        Endpoint(
            "GET",
            "/health",
            "health",
            "The node's health: 200 when ready, 503 while starting or failing",
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
            authenticated=False,
        ),
    ]
    routes = EndpointResource(endpoints, nobody, ADMIN_MAX_BODY_SIZE)
    return bounded_site(LocalPeersOnly(routes), ADMIN_MAX_BODY_SIZE, reactor)
