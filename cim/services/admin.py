"""The admin service: /health for supervisors and load balancers, /metrics for Prometheus.

/health names the node's version and commit; /metrics carries the node's counters,
``cim_build_info``, and the process's CPU, memory, file descriptors and GC.

It listens on loopback by default; it also refuses any peer that is not local, so a
mistaken ``listen`` line does not publish the node's internals. Being local proves
nothing more (a reverse proxy on the host makes every caller local), so what is not
for everyone asks for an operator's token (``cim.http.operators``): ``/metrics``
unless ``[admin] metrics_open = loopback``, and the details of ``/health``, which
without a token says only whether the node is up, for load balancers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
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
from cim.http.telemetry import UNOBSERVED, SiteTelemetry
from cim.metrics import NodeMetrics, NodeMetricsCollector
from cim.version import RELEASE, Build

# Admin requests carry no body worth the name.
ADMIN_MAX_BODY_SIZE = 1024
HEALTH_FOR_EVERYONE = ("status", "node", "version")
"""What /health tells a caller without a token: up or not, which node answered, and
the release it runs (the commit and the details need a token)."""


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


class BuildInfo(Collector):
    """``cim_build_info{version, commit} 1``: which cim each scraped node runs."""

    def __init__(self, build: Build) -> None:
        self._build = build

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "cim_build_info",
            "The cim version and git commit this node runs (always 1).",
            labels=["version", "commit"],
        )
        info.add_metric([self._build.version, self._build.commit or "unknown"], 1)
        yield info


def node_registry(node_id: str, metrics: NodeMetrics, build: Build) -> CollectorRegistry:
    """Everything /metrics shows: the node's counters, its build, and the process itself.

    The node has its own registry rather than prometheus_client's global one (several
    nodes share a process in tests), so the process, GC and platform collectors the
    global registry would carry are registered here.
    """
    registry = CollectorRegistry()
    registry.register(NodeMetricsCollector(metrics, node_id))
    registry.register(BuildInfo(build))
    ProcessCollector(registry=registry)  # CPU seconds, RSS, open and maximum fds
    GCCollector(registry=registry)  # collections and objects collected, per generation
    PlatformCollector(registry=registry)  # python_info{version, implementation}
    return registry


def admin_site(
    node_id: str,
    metrics: NodeMetrics,
    health: Callable[[], dict[str, Any]],
    reactor: IReactorTime,
    operators: Operators = NO_OPERATORS,
    metrics_open: bool = False,
    build: Build = RELEASE,
    telemetry: SiteTelemetry = UNOBSERVED,
) -> server.Site:
    """``metrics_open``: /metrics answers local peers without a token (``[admin]
    metrics_open = loopback``); ``build``: what /health and cim_build_info report (the
    daemon passes the commit)."""
    registry = node_registry(node_id, metrics, build)

    async def health_report(call: Call[str]) -> Reply:
        report = health() | build.as_json()
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
    return bounded_site(LocalPeersOnly(routes), ADMIN_MAX_BODY_SIZE, reactor, telemetry)
