"""The web app's site: its files, the cache headers a release needs, and nothing else."""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cim.config import ConfigError, parse_config
from cim.webapp.site import PACKAGED_ROOT, MissingApp, check_root, web_site
from tests.unit.test_router import LOCAL_PEER, HttpConnection, exchange, request_bytes

INDEX = b"<!doctype html><title>cim</title><script type=module src=assets/app-1a2b.js></script>"
SCRIPT = b"console.log('cim');\n"


class WebSiteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = self.mktemp()
        os.makedirs(os.path.join(self.root, "assets"))
        with open(os.path.join(self.root, "index.html"), "wb") as f:
            f.write(INDEX)
        with open(os.path.join(self.root, "assets", "app-1a2b.js"), "wb") as f:
            f.write(SCRIPT)
        with open(os.path.join(self.root, "manifest.webmanifest"), "wb") as f:
            f.write(b"{}")
        with open(os.path.join(self.root, ".secret"), "wb") as f:
            f.write(b"hidden")
        outside = os.path.join(os.path.dirname(self.root), "outside.txt")
        with open(outside, "wb") as f:
            f.write(b"outside")
        self.site = web_site(self.root, Clock(), "'self' ws://127.0.0.1:8084")

    def test_the_index_is_served_at_the_root_and_revalidated(self) -> None:
        for path in ("/", "/index.html"):
            response = exchange(self.site, "GET", path)
            self.assertEqual((response.status, response.body), (200, INDEX))
            self.assertEqual(response.headers["cache-control"], "no-cache")
            self.assertTrue(response.headers["content-type"].startswith("text/html"))

    def test_hashed_assets_are_immutable(self) -> None:
        response = exchange(self.site, "GET", "/assets/app-1a2b.js")
        self.assertEqual((response.status, response.body), (200, SCRIPT))
        self.assertEqual(response.headers["cache-control"], "public, max-age=31536000, immutable")
        self.assertIn("javascript", response.headers["content-type"])
        other = exchange(self.site, "GET", "/manifest.webmanifest")
        self.assertEqual(other.headers["cache-control"], "public, max-age=300")

    def test_security_headers(self) -> None:
        headers = exchange(self.site, "GET", "/").headers
        policy = headers["content-security-policy"]
        self.assertIn("script-src 'self'", policy)
        self.assertIn("connect-src 'self' ws://127.0.0.1:8084", policy)
        self.assertIn("frame-ancestors 'none'", policy)
        self.assertEqual(headers["x-content-type-options"], "nosniff")
        self.assertEqual(headers["x-frame-options"], "DENY")

    def test_head_answers_without_a_body(self) -> None:
        connection = HttpConnection(self.site, LOCAL_PEER)
        connection.send(request_bytes("HEAD", "/assets/app-1a2b.js"))
        raw = connection.transport.value()
        connection.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertIn(f"Content-Length: {len(SCRIPT)}".encode(), head)
        self.assertEqual(body, b"")

    def test_a_known_etag_is_not_sent_again(self) -> None:
        etag = exchange(self.site, "GET", "/assets/app-1a2b.js").headers["etag"]
        connection = HttpConnection(self.site, LOCAL_PEER)
        connection.send(
            request_bytes("GET", "/assets/app-1a2b.js", headers=[("If-None-Match", etag)])
        )
        raw = connection.transport.value()
        connection.close()
        self.assertTrue(raw.startswith(b"HTTP/1.1 304 "), raw[:40])
        self.assertNotIn(SCRIPT, raw)

    def test_nothing_but_the_apps_files(self) -> None:
        for path in (
            "/missing.js",
            "/.secret",
            "/assets/../.secret",
            "/..%2Foutside.txt",
            "/%2e%2e/outside.txt",
            "/assets",  # a directory without an index: no listing
            "/assets/",
            "/index.html%00.js",
        ):
            response = exchange(self.site, "GET", path)
            self.assertEqual(response.status, 404, path)
            self.assertNotIn(b"hidden", response.body)
            self.assertNotIn(b"outside", response.body)
            self.assertEqual(response.json()["error"], "not_found")

    def test_only_reading(self) -> None:
        for method in ("POST", "PUT", "DELETE"):
            response = exchange(self.site, method, "/index.html", body=b"x")
            self.assertEqual(response.status, 405)
            self.assertEqual(response.headers["allow"], "GET, HEAD")

    def test_a_root_without_a_built_app_is_refused_with_the_remedy(self) -> None:
        empty = self.mktemp()
        os.makedirs(empty)
        with self.assertRaises(MissingApp) as caught:
            check_root(empty)
        self.assertIn("make web", str(caught.exception))
        self.assertEqual(check_root(self.root), self.root)
        self.assertTrue(PACKAGED_ROOT.endswith(os.path.join("cim", "webapp", "static")))


class WebConfigTests(SynchronousTestCase):
    def test_defaults_and_validation(self) -> None:
        config = parse_config("[node]\nid = n1\n")
        self.assertFalse(config.web.enabled)
        self.assertEqual(config.web.listen, "tcp:8083:interface=127.0.0.1")
        with self.assertRaises(ConfigError) as caught:
            parse_config("[node]\nid = n1\n[web]\nconnect_src = 'self', script-src *\n")
        self.assertIn("connect_src", str(caught.exception))
