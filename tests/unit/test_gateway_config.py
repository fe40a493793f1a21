"""What the gateway adds around the IM connection: [ws] and cors_origins config, the
origin policy and CORS of the HTTP services, the WebSocket URL in the registry record
and in the router's login answer."""

from __future__ import annotations

import json
from dataclasses import dataclass

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from cim.backends.registry.local import LocalRegistry
from cim.backends.registry.znodes import decode_node, encode_node
from cim.backends.state.memory import MemoryState
from cim.config import ConfigError, ImConfig, RouterConfig, WsConfig, parse_config
from cim.http.cors import OriginPolicy, normalize_origin
from cim.http.site import bounded_site
from cim.interfaces import NodeInfo
from cim.metrics import NodeMetrics
from cim.services.im import advertised_ws_url
from cim.services.router import router_site
from tests.unit.test_router import FakeAccounts, exchange

PAGE = "https://chat.example.com"
PASSWORD = "correct horse battery staple"
MINIMAL = "[node]\nid = n1\n"


class WsConfigTests(SynchronousTestCase):
    def test_off_by_default_and_on_port_9001(self) -> None:
        config = parse_config(MINIMAL)
        self.assertFalse(config.ws.enabled)
        self.assertEqual(config.ws.listen, "tcp:9001:interface=127.0.0.1")
        self.assertEqual(config.ws.allowed_origins, ())
        self.assertEqual(config.router.cors_origins, ())

    def test_keys(self) -> None:
        config = parse_config(
            MINIMAL + "[ws]\nenabled = true\nadvertise = wss://chat.example.com/ws\n"
            "allowed_origins = HTTPS://Chat.Example.com, http://127.0.0.1:8083\n"
            "max_pings_per_second = 3\n"
            "[router]\ncors_origins = *\n[logic]\ncors_origins = https://a.example\n"
            "[files]\ncors_origins = https://b.example\n"
        )
        self.assertEqual(config.ws.advertise, "wss://chat.example.com/ws")
        self.assertEqual(
            config.ws.allowed_origins, ("https://chat.example.com", "http://127.0.0.1:8083")
        )
        self.assertEqual(config.ws.max_pings_per_second, 3)
        self.assertEqual(config.router.cors_origins, ("*",))
        self.assertEqual(config.logic.cors_origins, ("https://a.example",))
        self.assertEqual(config.files.cors_origins, ("https://b.example",))

    def test_mistakes_name_the_key(self) -> None:
        for text, key in (
            ("[ws]\nadvertise = http://chat.example.com\n", "advertise"),
            ("[ws]\nallowed_origins = https://chat.example.com/\n", "allowed_origins"),
            ("[ws]\nallowed_origins = chat.example.com\n", "allowed_origins"),
            ("[router]\ncors_origins = https://a.example/app\n", "cors_origins"),
            ("[ws]\nenabled = true\n[im]\nenabled = false\n", "enabled"),
            ("[ws]\nenabled = true\nlisten = unix:/tmp/ws.sock\n", "advertise"),
        ):
            with self.assertRaises(ConfigError) as raised:
                parse_config(MINIMAL + text)
            self.assertEqual(raised.exception.key, key, text)


class OriginPolicyTests(SynchronousTestCase):
    def test_normalized_like_a_browser_sends_it(self) -> None:
        self.assertEqual(normalize_origin("HTTPS://Chat.Example.com:443"), PAGE)
        self.assertEqual(normalize_origin("http://127.0.0.1:8083"), "http://127.0.0.1:8083")
        self.assertEqual(normalize_origin("http://[::1]:80"), "http://[::1]")
        for junk in ("null", "chat.example.com", "ftp://x", "https://x/path", "https://x:99999"):
            self.assertIsNone(normalize_origin(junk), junk)

    def test_allows_only_what_it_lists(self) -> None:
        policy = OriginPolicy([PAGE, "http://127.0.0.1:8083"])
        self.assertTrue(policy.allows("https://chat.example.com"))
        self.assertTrue(policy.allows("https://chat.example.com:443"))
        self.assertFalse(policy.allows("http://chat.example.com"))
        self.assertFalse(policy.allows("https://chat.example.com.evil.example"))
        self.assertFalse(policy.allows("http://127.0.0.1:8084"))
        self.assertFalse(policy.allows("null"))
        self.assertFalse(OriginPolicy([]).allows(PAGE))
        self.assertTrue(OriginPolicy(["*"]).allows("https://anyone.example"))
        self.assertFalse(OriginPolicy(["*"]).allows("null"))


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: object) -> bytes:
        return b'{"hello":true}'


class CorsTests(SynchronousTestCase):
    """The shared CORS of the router, logic and files Sites (cim.http.site.bounded_site)."""

    def site(self, origins: tuple[str, ...]) -> Site:
        return bounded_site(Hello(), 1024, Clock(), cors_origins=origins)

    def test_a_preflight_of_an_allowed_origin(self) -> None:
        response = exchange(
            self.site((PAGE,)),
            "OPTIONS",
            "/api/v1/login",
            headers=[("Origin", PAGE), ("Access-Control-Request-Method", "POST")],
        )
        self.assertEqual(response.status, 204)
        self.assertEqual(response.headers["access-control-allow-origin"], PAGE)
        self.assertIn("POST", response.headers["access-control-allow-methods"])
        self.assertIn("Authorization", response.headers["access-control-allow-headers"])
        self.assertEqual(response.headers["vary"], "Origin")

    def test_a_preflight_of_another_origin_is_a_json_403(self) -> None:
        response = exchange(
            self.site((PAGE,)),
            "OPTIONS",
            "/api/v1/login",
            headers=[("Origin", "https://evil.example"), ("Access-Control-Request-Method", "POST")],
        )
        self.assertEqual(response.status, 403)
        self.assertEqual(response.json()["error"], "origin_not_allowed")
        self.assertNotIn("access-control-allow-origin", response.headers)

    def test_answers_carry_the_headers_for_an_allowed_origin_only(self) -> None:
        site = self.site((PAGE,))
        allowed = exchange(site, "GET", "/x", headers=[("Origin", PAGE)])
        self.assertEqual(allowed.status, 200)
        self.assertEqual(allowed.headers["access-control-allow-origin"], PAGE)
        self.assertIn("Retry-After", allowed.headers["access-control-expose-headers"])
        other = exchange(site, "GET", "/x", headers=[("Origin", "https://evil.example")])
        self.assertEqual(other.status, 200)  # the browser keeps it from the page
        self.assertNotIn("access-control-allow-origin", other.headers)
        plain = exchange(site, "GET", "/x")
        self.assertNotIn("vary", plain.headers)

    def test_without_cors_origins_nothing_changes(self) -> None:
        response = exchange(
            self.site(()),
            "OPTIONS",
            "/x",
            headers=[("Origin", PAGE), ("Access-Control-Request-Method", "POST")],
        )
        self.assertNotIn("access-control-allow-origin", response.headers)
        self.assertNotEqual(response.status, 204)


class RouterGatewayTests(SynchronousTestCase):
    """The router's login answer names the node's gateway; its CORS is the shared one."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.state = MemoryState(self.clock)
        self.registry = LocalRegistry()
        node = NodeInfo("n1", "im.example", 9000, b"\x30\x82fake-der", "wss://ws.ex/")
        self.successResultOf(self.registry.register(node))

    def site(self, config: RouterConfig) -> Site:
        return router_site(
            config,
            ImConfig(),
            FakeAccounts({"alice": PASSWORD}),
            self.state.sessions,
            self.state.presence,
            self.registry,
            self.clock,
            NodeMetrics(),
        )

    def test_login_names_the_websocket_url(self) -> None:
        response = exchange(
            self.site(RouterConfig()),
            "POST",
            "/api/v1/login",
            json.dumps({"user": "alice", "password": PASSWORD}).encode(),
            [("Content-Type", "application/json")],
        )
        self.assertEqual(response.status, 200, response.body)
        self.assertEqual(
            response.json()["node"],
            {"id": "n1", "host": "im.example", "port": 9000, "ws_url": "wss://ws.ex/"},
        )

    def test_the_router_answers_preflights_for_its_cors_origins(self) -> None:
        response = exchange(
            self.site(RouterConfig(cors_origins=(PAGE,))),
            "OPTIONS",
            "/api/v1/login",
            headers=[("Origin", PAGE), ("Access-Control-Request-Method", "POST")],
        )
        self.assertEqual(response.status, 204)
        self.assertEqual(response.headers["access-control-allow-origin"], PAGE)


class RegistryRecordTests(SynchronousTestCase):
    def test_the_websocket_url_travels_in_the_znode_and_is_optional(self) -> None:
        node = NodeInfo("n1", "10.0.0.1", 9000, b"key", "ws://10.0.0.1:9001/")
        self.assertEqual(decode_node("n1", encode_node(node)), node)
        without = NodeInfo("n1", "10.0.0.1", 9000, b"key")
        self.assertNotIn("ws_url", json.loads(encode_node(without)))
        self.assertEqual(decode_node("n1", encode_node(without)), without)
        bad = json.loads(encode_node(node))
        bad["ws_url"] = 7
        with self.assertRaises(ValueError):
            decode_node("n1", json.dumps(bad).encode())


@dataclass
class ListeningAt:
    address: IPv4Address | IPv6Address

    def getHost(self) -> IPv4Address | IPv6Address:
        return self.address


class AdvertisedUrlTests(SynchronousTestCase):
    def port(self, host: str, number: int) -> object:
        address = IPv6Address if ":" in host else IPv4Address
        return ListeningAt(address("TCP", host, number))  # type: ignore[arg-type]

    def test_derived_from_the_listening_port(self) -> None:
        config = WsConfig(listen="tcp:9001:interface=127.0.0.1")
        self.assertEqual(
            advertised_ws_url(config, self.port("127.0.0.1", 9001)),  # type: ignore[arg-type]
            "ws://127.0.0.1:9001/",
        )
        tls = WsConfig(listen="ssl:9443:privateKey=k.pem:interface=::1")
        self.assertEqual(
            advertised_ws_url(tls, self.port("::1", 9443)),  # type: ignore[arg-type]
            "wss://[::1]:9443/",
        )

    def test_advertise_wins(self) -> None:
        config = WsConfig(advertise="wss://chat.example.com/ws")
        self.assertEqual(
            advertised_ws_url(config, self.port("127.0.0.1", 9001)),  # type: ignore[arg-type]
            "wss://chat.example.com/ws",
        )
