"""Every request a cim Site answers is counted and timed once, under its route template."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cim.http.endpoints import EndpointResource
from cim.http.openapi import PublishedSpec, openapi_document
from cim.http.site import bounded_site
from cim.http.telemetry import SiteTelemetry
from cim.metrics import HttpRequests
from tests.unit.test_http_endpoints import callers, endpoints
from tests.unit.test_router import HttpConnection, exchange, request_bytes


class SiteTelemetryTests(SynchronousTestCase):
    def setUp(self) -> None:
        resource = EndpointResource(endpoints(), callers, 1024, prefix="/api")
        document = openapi_document(
            resource.endpoints, prefix="/api", title="t", version="1", description="d"
        )
        self.requests = HttpRequests()
        self.site = bounded_site(
            PublishedSpec(resource, "/api/spec.json", document),
            1024,
            Clock(),
            SiteTelemetry("things", self.requests),
        )

    def count(self, method: str, route: str, status: str) -> int:
        return self.requests.count("things", method, route, status)

    def test_routes_are_templates_not_paths(self) -> None:
        for thing in (1, 2, 3):
            headers = [("Authorization", "Bearer good")]
            self.assertEqual(
                exchange(self.site, "GET", f"/api/things/{thing}", headers=headers).status, 200
            )
        self.assertEqual(exchange(self.site, "GET", "/api/things/4").status, 401)
        self.assertEqual(self.count("GET", "/api/things/{thing}", "200"), 3)
        self.assertEqual(self.count("GET", "/api/things/{thing}", "401"), 1)

    def test_what_no_route_knows_is_one_label(self) -> None:
        for path in ("/nope", "/api/nope/1", "/api/things/1/x"):
            self.assertEqual(exchange(self.site, "GET", path).status, 404)
        self.assertEqual(self.count("GET", "unmatched", "404"), 3)

    def test_unknown_methods_are_one_label(self) -> None:
        self.assertEqual(exchange(self.site, "BREW", "/api/stream").status, 405)
        self.assertEqual(self.count("other", "/api/stream", "405"), 1)

    def test_streamed_answers_and_the_document_are_counted(self) -> None:
        connection = HttpConnection(self.site)
        connection.send(request_bytes("GET", "/api/stream"))
        self.assertTrue(connection.transport.value().startswith(b"HTTP/1.1 200"))
        connection.close()
        self.assertEqual(exchange(self.site, "GET", "/api/spec.json").status, 200)
        self.assertEqual(self.count("GET", "/api/stream", "200"), 1)
        self.assertEqual(self.count("GET", "/api/spec.json", "200"), 1)
