"""The admin site: /health, /metrics, operators' tokens, and refusal of non-local peers."""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from cim.http.telemetry import SiteTelemetry
from cim.metrics import NodeMetrics
from cim.protocols import cim_pb2
from cim.services.admin import admin_site
from cim.version import Build
from tests.fakes.operators import OPS1_TOKEN, bearer, operator_tokens, write_tokens
from tests.unit.test_router import LOCAL_PEER, HttpResponse, exchange


def fetch(
    site: Site,
    path: str,
    peer: IAddress = LOCAL_PEER,
    method: str = "GET",
    token: str | None = OPS1_TOKEN,
) -> HttpResponse:
    return exchange(site, method, path, peer=peer, headers=[bearer(token)] if token else [])


class AdminTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.metrics = NodeMetrics()
        self.report: dict[str, Any] = {
            "status": "ok",
            "node": "n1",
            "connections": 3,
            "online_here": 2,
        }
        self.operators = operator_tokens(self)
        self.build = Build("0.1.0", "1a2b3c4d5e6f+modified")
        self.site = admin_site(
            "n1",
            self.metrics,
            lambda: dict(self.report),
            Clock(),
            self.operators,
            build=self.build,
            telemetry=SiteTelemetry("admin", self.metrics.http),
        )

    def test_health(self) -> None:
        response = fetch(self.site, "/health")
        self.assertEqual(response.status, 200)
        version = {"version": "0.1.0", "commit": "1a2b3c4d5e6f+modified"}
        self.assertEqual(response.json(), self.report | version)
        self.report["status"] = "starting"
        response = fetch(self.site, "/health")
        self.assertEqual(response.status, 503)
        self.assertEqual(response.json()["status"], "starting")

    def test_health_without_a_token_says_only_whether_the_node_is_up(self) -> None:
        response = fetch(self.site, "/health", token=None)
        everyone = {"node": "n1", "version": "0.1.0"}
        self.assertEqual((response.status, response.json()), (200, {"status": "ok"} | everyone))
        self.report["status"] = "starting"
        response = fetch(self.site, "/health", token=None)
        self.assertEqual(response.status, 503)
        self.assertEqual(response.json(), {"status": "starting"} | everyone)
        wrong = fetch(self.site, "/health", token="z" * 43)
        self.assertEqual((wrong.status, wrong.json()["error"]), (401, "invalid_token"))
        self.assertNotIn(b"online_here", wrong.body)

    def test_metrics_need_an_admin_token_from_loopback_too(self) -> None:
        self.metrics.connections_open = 7
        for token in (None, "z" * 43, OPS1_TOKEN[:-1]):
            response = fetch(self.site, "/metrics", token=token)
            self.assertEqual(response.status, 401, token)
            self.assertEqual(response.json()["error"], "invalid_token")
            self.assertEqual(response.headers["www-authenticate"], 'Bearer realm="cim"')
            self.assertNotIn(b"cim_", response.body)
        self.assertEqual(fetch(self.site, "/metrics").status, 200)

    def test_metrics_open_to_loopback_when_configured(self) -> None:
        site = admin_site(
            "n1", self.metrics, lambda: dict(self.report), Clock(), self.operators, True
        )
        response = fetch(site, "/metrics", token=None)
        self.assertEqual(response.status, 200)
        self.assertIn(b"cim_connections", response.body)
        remote = IPv4Address("TCP", "192.168.1.20", 5000)
        self.assertEqual(fetch(site, "/metrics", remote, token=None).status, 403)
        # /health's details still need a token.
        self.assertNotIn("connections", fetch(site, "/health", token=None).json())

    def test_a_site_without_operators_refuses_every_token(self) -> None:
        site = admin_site("n1", self.metrics, lambda: dict(self.report), Clock())
        self.assertEqual(fetch(site, "/metrics").status, 401)
        self.assertEqual(fetch(site, "/health").status, 401)
        self.assertEqual(fetch(site, "/health", token=None).status, 200)

    def test_a_broken_or_missing_token_file_refuses_everyone(self) -> None:
        with open(self.operators.path, "w", encoding="utf-8") as handle:
            handle.write(f"ops1 {OPS1_TOKEN}\n")
        self.assertEqual(fetch(self.site, "/metrics").status, 401)
        write_tokens(self.operators.path, {"ops1": OPS1_TOKEN})
        self.assertEqual(fetch(self.site, "/metrics").status, 200)
        os.unlink(self.operators.path)
        self.assertEqual(fetch(self.site, "/metrics").status, 401)

    def test_metrics(self) -> None:
        self.metrics.connections_open = 7
        self.metrics.frames_in[cim_pb2.MSG_R] = 3
        self.metrics.heartbeats_out = 2
        self.metrics.logins["ok"] = 4
        response = fetch(self.site, "/metrics")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers["content-type"], CONTENT_TYPE_LATEST)
        text = response.body.decode()
        self.assertIn('cim_connections{node="n1"} 7.0', text)
        self.assertIn('cim_frames_total{direction="in",type="msg_r"} 3.0', text)
        self.assertIn('cim_frames_total{direction="out",type="heartbeat"} 2.0', text)
        self.assertIn('cim_logins_total{outcome="ok"} 4.0', text)

    def test_health_of_a_release_without_a_commit(self) -> None:
        site = admin_site(
            "n1",
            self.metrics,
            lambda: dict(self.report),
            Clock(),
            self.operators,
            build=Build("0.2.0"),
        )
        self.assertEqual(fetch(site, "/health").json(), self.report | {"version": "0.2.0"})
        self.assertIn(
            'cim_build_info{commit="unknown",version="0.2.0"} 1.0',
            fetch(site, "/metrics").body.decode(),
        )

    def test_build_info_and_process_metrics(self) -> None:
        text = fetch(self.site, "/metrics").body.decode()
        self.assertIn('cim_build_info{commit="1a2b3c4d5e6f+modified",version="0.1.0"} 1.0', text)
        for name in (
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "python_gc_collections_total",
            "python_gc_objects_collected_total",
            "python_info",
        ):
            self.assertRegex(text, rf"(?m)^{name}(\{{[^}}]*\}})? [0-9.e+]+$", name)

    def test_http_requests_are_in_the_metrics(self) -> None:
        fetch(self.site, "/health")
        fetch(self.site, "/nope")
        text = fetch(self.site, "/metrics").body.decode()
        self.assertIn(
            'cim_http_requests_total{method="GET",route="/health",service="admin",status="200"}'
            " 1.0",
            text,
        )
        self.assertIn(
            'cim_http_requests_total{method="GET",route="unmatched",service="admin",status="404"}'
            " 1.0",
            text,
        )
        self.assertIn(
            'cim_http_request_duration_seconds_bucket{le="0.005",method="GET",route="/health",'
            'service="admin",status="200"} 1.0',
            text,
        )

    def test_non_loopback_peer_refused(self) -> None:
        for peer in (
            IPv4Address("TCP", "192.168.1.20", 5000),
            IPv6Address("TCP", "2001:db8::1", 5000),
            IPv6Address("TCP", "::ffff:10.0.0.1", 5000),
        ):
            for path in ("/health", "/metrics", "/nope"):
                response = fetch(self.site, path, peer)
                self.assertEqual(response.status, 403, (peer, path))
                self.assertEqual(response.json()["error"], "forbidden")
                self.assertNotIn(b"cim_", response.body)

    def test_local_peers_allowed(self) -> None:
        for peer in (
            IPv4Address("TCP", "127.0.0.2", 5000),
            IPv6Address("TCP", "::1", 5000),
            IPv6Address("TCP", "::ffff:127.0.0.1", 5000),
            UNIXAddress(b"/run/cim-admin.sock"),
        ):
            self.assertEqual(fetch(self.site, "/health", peer).status, 200, peer)

    def test_unknown_path_and_method(self) -> None:
        response = fetch(self.site, "/nope")
        self.assertEqual(response.status, 404)
        self.assertEqual(response.json()["error"], "not_found")
        response = fetch(self.site, "/metrics", method="POST")
        self.assertEqual(response.status, 405)
        self.assertEqual(response.headers["allow"], "GET")

    def test_broken_health_is_a_500(self) -> None:
        def broken() -> dict[str, Any]:
            raise RuntimeError("health check bug")

        site = admin_site("n1", self.metrics, broken, Clock())
        response = fetch(site, "/health", token=None)
        self.assertEqual(response.status, 500)
        self.assertEqual(response.json()["error"], "internal_error")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
