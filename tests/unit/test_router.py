"""The router over a real twisted.web Site: login, logout, throttles, JSON errors, quiet logs."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from cim.backends.registry.local import LocalRegistry
from cim.backends.state import token_hash
from cim.backends.state.memory import MemoryState
from cim.config import ImConfig, RouterConfig
from cim.http.telemetry import SiteTelemetry
from cim.interfaces import NodeInfo, SessionRecord, StateUnavailable
from cim.metrics import NodeMetrics
from cim.oplog import OperationLog
from cim.services.router import router_site
from tests.fakes.operators import OPS1_TOKEN, OPS2_TOKEN, bearer, operator_tokens

LOCAL_PEER = IPv4Address("TCP", "127.0.0.1", 40000)
NODE = NodeInfo("n1", "im.example", 9000, b"\x30\x82fake-der-public-key")


# --- an HTTP client made of a StringTransport ------------------------------------------


@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_response(raw: bytes) -> HttpResponse:
    head, separator, rest = raw.partition(b"\r\n\r\n")
    if not separator:
        raise AssertionError(f"no complete response yet: {raw!r}")
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers["content-length"])
    if len(rest) < length:
        raise AssertionError(f"truncated body: {raw!r}")
    return HttpResponse(int(lines[0].split()[1]), headers, rest[:length])


def request_bytes(
    method: str,
    path: str,
    body: bytes = b"",
    headers: Iterable[tuple[str, str]] = (),
    chunked: bool = False,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: router.test", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        encoded = b"".join(
            b"%x\r\n%s\r\n" % (len(body[i : i + 100]), body[i : i + 100])
            for i in range(0, len(body), 100)
        )
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + encoded + b"0\r\n\r\n"
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class HttpConnection:
    """One client connection to a Site, driven by hand."""

    def __init__(self, site: Site, peer: IAddress = LOCAL_PEER) -> None:
        self.transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8080), peerAddress=peer
        )
        self.channel = site.buildProtocol(peer)
        assert self.channel is not None
        self.channel.makeConnection(self.transport)

    def send(self, raw: bytes) -> None:
        self.channel.dataReceived(raw)

    def response(self) -> HttpResponse:
        return parse_response(self.transport.value())

    def close(self) -> None:
        self.channel.connectionLost(Failure(ConnectionDone()))


def exchange(
    site: Site,
    method: str,
    path: str,
    body: bytes = b"",
    headers: Iterable[tuple[str, str]] = (),
    peer: IAddress = LOCAL_PEER,
    chunked: bool = False,
) -> HttpResponse:
    connection = HttpConnection(site, peer)
    connection.send(request_bytes(method, path, body, headers, chunked))
    response = connection.response()
    connection.close()
    return response


# --- fakes ------------------------------------------------------------------------------


class FakeAccounts:
    """check_password answers at once, or later when ``hold`` is set."""

    def __init__(self, passwords: dict[str, str]) -> None:
        self.passwords = passwords
        self.checked: list[str] = []
        self.hold = False
        self.held: list[tuple[Deferred[bool], bool]] = []

    def check_password(self, name: str, password: str) -> Deferred[bool]:
        self.checked.append(name)
        correct = self.passwords.get(name) == password
        if not self.hold:
            return defer.succeed(correct)
        d: Deferred[bool] = Deferred()
        self.held.append((d, correct))
        return d

    def release(self) -> None:
        for d, correct in self.held:
            d.callback(correct)
        self.held.clear()


def counting_token_bytes() -> Iterator[bytes]:
    number = 0
    while True:
        number += 1
        yield number.to_bytes(32, "big")


# --- tests ------------------------------------------------------------------------------


class RouterTests(SynchronousTestCase):
    PASSWORD = "correct horse battery staple"

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.accounts = FakeAccounts({"alice": self.PASSWORD, "bob": "bob-secret-pw"})
        self.state = MemoryState(self.clock)
        self.ended: list[tuple[SessionRecord, str]] = []
        self.state.sessions.add_session_ended_listener(
            lambda record, why: self.ended.append((record, why))
        )
        self.registry = LocalRegistry()
        self.successResultOf(self.registry.register(NODE))
        self.metrics = NodeMetrics()
        self.config = RouterConfig(
            max_failed_logins_per_user=3,
            max_failed_logins_per_address=5,
            failed_login_window=60,
            max_body_size=512,
            token_ttl=3600,
        )
        self.im_config = ImConfig(heartbeat_interval=20)
        self.tokens: list[bytes] = []
        token_source = counting_token_bytes()

        def token_bytes(count: int) -> bytes:
            assert count == 32
            value = next(token_source)
            self.tokens.append(value)
            return value

        self.operators = operator_tokens(self, {"ops1": OPS1_TOKEN, "ops2": OPS2_TOKEN})
        self.oplog_path = self.operators.path + ".log"
        self.oplog = OperationLog(self.oplog_path, "n1", self.clock.seconds)
        self.addCleanup(self.oplog.close)
        self.signed_out: list[tuple[str, str, str]] = []
        self.signed_out_fails = False
        self.site = self.make_site(self.config, token_bytes)
        self.log_events: list[LogEvent] = []
        observer = cast(ILogObserver, self.log_events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def make_site(self, config: RouterConfig, token_bytes: Any = None) -> Site:
        extra = {} if token_bytes is None else {"token_bytes": token_bytes}
        site = router_site(
            config,
            self.im_config,
            self.accounts,
            self.state.sessions,
            self.state.presence,
            self.registry,
            self.clock,
            self.metrics,
            oplog=self.oplog,
            operators=self.operators,
            **extra,
            telemetry=SiteTelemetry("router", self.metrics.http, access_log=True),
            signed_out=self.device_signed_out,
        )
        # Started, so the access log (on here) runs too and its lines are checked for secrets.
        site.doStart()
        self.addCleanup(site.doStop)
        return site

    def login(
        self,
        user: str = "alice",
        password: str | None = None,
        device: str | None = None,
        peer: IPv4Address = LOCAL_PEER,
        site: Site | None = None,
    ) -> HttpResponse:
        body: dict[str, Any] = {"user": user, "password": password or self.PASSWORD}
        if device is not None:
            body["device"] = device
        return self.post_login(json.dumps(body).encode(), peer=peer, site=site)

    def post_login(
        self,
        body: bytes,
        content_type: str = "application/json",
        peer: IPv4Address = LOCAL_PEER,
        site: Site | None = None,
        chunked: bool = False,
    ) -> HttpResponse:
        return exchange(
            site or self.site,
            "POST",
            "/api/v1/login",
            body,
            [("Content-Type", content_type)],
            peer,
            chunked,
        )

    async def device_signed_out(self, user: str, device: str, peer: str) -> None:
        self.signed_out.append((user, device, peer))
        if self.signed_out_fails:
            raise RuntimeError("the database is down")

    def logout(self, token: str | None) -> HttpResponse:
        headers = [] if token is None else [("Authorization", f"Bearer {token}")]
        return exchange(self.site, "POST", "/api/v1/logout", headers=headers)

    def assertError(self, response: HttpResponse, status: int, code: str) -> None:
        self.assertEqual(response.status, status, response.body)
        self.assertEqual(response.headers["content-type"], "application/json")
        body = response.json()
        self.assertEqual(body["error"], code)
        self.assertIsInstance(body["message"], str)
        self.assertTrue(body["message"])

    # --- login --------------------------------------------------------------------------

    def test_login_success_body(self) -> None:
        response = self.login(device="phone")
        self.assertEqual(response.status, 200, response.body)
        self.assertEqual(response.headers["content-type"], "application/json")
        self.assertEqual(response.headers["cache-control"], "no-store")
        body = response.json()
        expected_token = base64.urlsafe_b64encode(self.tokens[0]).rstrip(b"=").decode()
        self.assertEqual(body["token"], expected_token)
        self.assertEqual(len(body["token"]), 43)
        self.assertEqual(body["user"], "alice")
        self.assertEqual(body["node"], {"id": "n1", "host": "im.example", "port": 9000})
        self.assertEqual(base64.b64decode(body["server_key"]), NODE.public_key_der)
        self.assertEqual(body["key_fingerprint"], hashlib.sha256(NODE.public_key_der).hexdigest())
        self.assertEqual(body["heartbeat_interval"], 20)
        self.assertEqual(body["heartbeat_timeout"], 60)
        self.assertEqual(body["cipher_suites"], list(self.im_config.cipher_suites))
        self.assertEqual(body["expires_at"], "1970-01-12T14:46:40.000Z")  # 1_000_000 + 3600

        record = self.successResultOf(
            self.state.sessions.session_for_token(token_hash(body["token"]))
        )
        assert record is not None
        self.assertEqual(record.session_id, body["session_id"])
        self.assertEqual((record.user, record.device, record.node_id), ("alice", "phone", "n1"))
        self.assertEqual(self.metrics.logins["ok"], 1)

    def test_default_device(self) -> None:
        token = self.login().json()["token"]
        record = self.successResultOf(self.state.sessions.session_for_token(token_hash(token)))
        assert record is not None
        self.assertEqual(record.device, "default")

    def test_wrong_password(self) -> None:
        self.assertError(self.login(password="wrong"), 401, "invalid_credentials")
        self.assertError(self.login(user="nobody", password="x"), 401, "invalid_credentials")
        self.assertEqual(self.metrics.logins["invalid_credentials"], 2)
        self.assertEqual(self.state.table.sessions, {})

    def test_throttled_per_user(self) -> None:
        for _ in range(3):
            self.assertError(self.login(password="wrong"), 401, "invalid_credentials")
        checked = len(self.accounts.checked)
        # Even the right password is not checked: no KDF runs while blocked.
        response = self.login(peer=IPv4Address("TCP", "10.0.0.9", 1))
        self.assertError(response, 429, "throttled")
        self.assertEqual(response.headers["retry-after"], "60")
        self.assertEqual(len(self.accounts.checked), checked)
        self.assertEqual(self.metrics.logins["throttled"], 1)
        # Other users are not affected.
        self.assertEqual(self.login(user="bob", password="bob-secret-pw").status, 200)
        self.clock.advance(45)
        self.assertEqual(self.login().headers["retry-after"], "15")
        self.clock.advance(15)
        self.assertEqual(self.login().status, 200)

    def test_guesses_sent_at_once_cannot_exceed_the_limit(self) -> None:
        """Each attempt counts before its KDF answers, so twenty simultaneous guesses
        get three password checks (the per-user limit), not twenty."""
        self.accounts.hold = True
        connections = []
        body = json.dumps({"user": "alice", "password": "guess"}).encode()
        for _ in range(20):
            connection = HttpConnection(self.site)
            connection.send(request_bytes("POST", "/api/v1/login", body, [("Content-Type", JSON)]))
            connections.append(connection)
        self.assertEqual(len(self.accounts.checked), 3)
        self.accounts.hold = False
        self.accounts.release()
        statuses = sorted(connection.response().status for connection in connections)
        self.assertEqual(statuses, [401] * 3 + [429] * 17)
        for connection in connections:
            connection.close()

    def test_a_correct_password_is_not_counted_against_the_address(self) -> None:
        peer = IPv4Address("TCP", "198.51.100.20", 1)
        for _ in range(10):
            self.assertEqual(self.login(peer=peer).status, 200)
        self.assertEqual(len(self.site.resource.address_throttle), 0)  # type: ignore[attr-defined]

    def test_success_resets_user_failures(self) -> None:
        for _ in range(2):
            self.login(password="wrong")
        self.assertEqual(self.login().status, 200)
        for _ in range(2):
            self.login(password="wrong")
        self.assertEqual(self.login().status, 200)

    def test_throttled_per_address(self) -> None:
        attacker = IPv4Address("TCP", "203.0.113.7", 5555)
        for i in range(5):
            self.assertError(
                self.login(user=f"victim{i}", password="guess", peer=attacker),
                401,
                "invalid_credentials",
            )
        checked = len(self.accounts.checked)
        self.assertError(self.login(user="bob", password="guess", peer=attacker), 429, "throttled")
        self.assertEqual(len(self.accounts.checked), checked)
        # A valid login from the same address does not lift the address block.
        self.assertError(self.login(peer=attacker), 429, "throttled")
        # Another address is not affected.
        self.assertEqual(self.login(peer=IPv4Address("TCP", "198.51.100.1", 1)).status, 200)

    def test_body_too_large(self) -> None:
        body = json.dumps({"user": "alice", "password": "x" * 600}).encode()
        self.assertError(self.post_login(body), 413, "body_too_large")
        self.assertError(self.post_login(body, chunked=True), 413, "body_too_large")
        self.assertEqual(self.accounts.checked, [])
        self.assertEqual(self.metrics.logins["bad_request"], 2)

    def test_chunked_body_within_limit(self) -> None:
        body = json.dumps({"user": "alice", "password": self.PASSWORD, "pad": "y" * 200}).encode()
        self.assertEqual(self.post_login(body, chunked=True).status, 200)

    def test_wrong_content_type(self) -> None:
        body = json.dumps({"user": "alice", "password": self.PASSWORD}).encode()
        self.assertError(self.post_login(body, "text/plain"), 415, "unsupported_media_type")
        ok = self.post_login(body, "application/json; charset=utf-8")
        self.assertEqual(ok.status, 200)

    def test_bad_requests(self) -> None:
        bodies = [
            b"{not json",
            b"[1, 2]",
            b'"alice"',
            b"\xff\xfe\x00",
            b'{"user": "alice", "password": NaN}',
            json.dumps({"user": 5, "password": "x"}).encode(),
            json.dumps({"user": "", "password": "x"}).encode(),
            json.dumps({"user": "alice"}).encode(),
            json.dumps({"user": "alice", "password": ["x"]}).encode(),
            json.dumps({"user": "alice", "password": "x", "device": ""}).encode(),
            json.dumps({"user": "alice", "password": "x", "device": "d" * 65}).encode(),
            json.dumps({"user": "alice", "password": "x", "device": "a\nb"}).encode(),
            json.dumps({"user": "alice", "password": "x", "device": 7}).encode(),
            b"[" * 400,
        ]
        for body in bodies:
            self.assertError(self.post_login(body), 400, "bad_request")
        self.assertEqual(self.accounts.checked, [])
        self.assertEqual(self.metrics.logins["bad_request"], len(bodies))
        self.assertEqual(self.login(device="d" * 64).status, 200)

    def test_refuse_new_while_online(self) -> None:
        """Past [im] max_devices_per_user devices online, refuse_new refuses a new
        device with a clear error; a device already counted may log in again."""
        self.im_config = ImConfig(heartbeat_interval=20, max_devices_per_user=2)
        site = self.make_site(RouterConfig(duplicate_login="refuse_new"))
        records = []
        for device in ("phone", "web"):
            answer = self.login(device=device, site=site)
            self.assertEqual(answer.status, 200)
            record = self.successResultOf(
                self.state.sessions.session_for_token(token_hash(answer.json()["token"]))
            )
            assert record is not None
            self.successResultOf(self.state.presence.mark_online(record))
            records.append(record)
        refused = self.login(device="pad", site=site)
        self.assertError(refused, 409, "too_many_devices")
        self.assertIn("max_devices_per_user", refused.json()["message"])
        self.assertEqual(self.metrics.logins["refused"], 1)
        self.assertEqual(self.login(device="web", site=site).status, 200)
        self.successResultOf(self.state.presence.mark_offline(records[0]))
        self.assertEqual(self.login(device="pad", site=site).status, 200)

    def test_kick_old(self) -> None:
        first = self.login().json()
        second = self.login().json()
        self.assertNotEqual(first["token"], second["token"])
        self.assertEqual([why for _, why in self.ended], ["logged in again on this device"])
        self.assertIsNone(
            self.successResultOf(self.state.sessions.session_for_token(token_hash(first["token"])))
        )

    def test_devices_of_one_user_log_in_side_by_side(self) -> None:
        phone = self.login(device="phone").json()
        web = self.login(device="web").json()
        self.assertEqual(self.ended, [])
        for answer in (phone, web):
            record = self.successResultOf(
                self.state.sessions.session_for_token(token_hash(answer["token"]))
            )
            self.assertIsNotNone(record)

    def test_no_node(self) -> None:
        self.successResultOf(self.registry.unregister())
        self.assertError(self.login(), 503, "no_node")
        self.assertEqual(self.metrics.logins["no_node"], 1)
        self.assertEqual(self.state.table.sessions, {})

    def test_answer_after_slow_password_check(self) -> None:
        self.accounts.hold = True
        connection = HttpConnection(self.site)
        body = json.dumps({"user": "alice", "password": self.PASSWORD}).encode()
        connection.send(request_bytes("POST", "/api/v1/login", body, [("Content-Type", JSON)]))
        self.assertEqual(connection.transport.value(), b"")
        self.accounts.release()
        self.assertEqual(connection.response().status, 200)
        connection.close()

    def test_client_gone_before_answer(self) -> None:
        self.accounts.hold = True
        connection = HttpConnection(self.site)
        body = json.dumps({"user": "alice", "password": self.PASSWORD}).encode()
        connection.send(request_bytes("POST", "/api/v1/login", body, [("Content-Type", JSON)]))
        connection.close()
        self.accounts.release()
        self.assertEqual(connection.transport.value(), b"")
        http = self.metrics.http
        self.assertEqual(http.count("router", "POST", "/api/v1/login", "disconnected"), 1)

    def test_request_latency_is_measured_on_the_site_clock(self) -> None:
        self.accounts.hold = True
        connection = HttpConnection(self.site)
        body = json.dumps({"user": "alice", "password": self.PASSWORD}).encode()
        connection.send(request_bytes("POST", "/api/v1/login", body, [("Content-Type", JSON)]))
        self.clock.advance(0.3)  # the password check takes its time
        self.accounts.release()
        self.assertEqual(connection.response().status, 200)
        connection.close()
        families = {family.name: family for family in self.metrics.http.families()}
        samples = {
            (sample.name, sample.labels.get("le")): sample.value
            for sample in families["cim_http_request_duration_seconds"].samples
            if sample.labels["route"] == "/api/v1/login"
        }
        self.assertAlmostEqual(samples[("cim_http_request_duration_seconds_sum", None)], 0.3)
        self.assertEqual(samples[("cim_http_request_duration_seconds_bucket", "0.25")], 0)
        self.assertEqual(samples[("cim_http_request_duration_seconds_bucket", "0.5")], 1)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_unexpected_error_is_generic_500(self) -> None:
        def broken(*args: object) -> Deferred[Any]:
            return defer.fail(RuntimeError("state store exploded"))

        self.patch(self.state.sessions, "create_session", broken)
        response = self.login()
        self.assertError(response, 500, "internal_error")
        self.assertNotIn(b"exploded", response.body)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.metrics.logins["error"], 1)
        self.assertNoSecretsLogged([self.PASSWORD])

    # --- logout -------------------------------------------------------------------------

    def test_logout(self) -> None:
        token = self.login().json()["token"]
        response = self.logout(token)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.json(), {"ok": True})
        self.assertEqual([why for _, why in self.ended], ["logged out"])
        self.assertIsNone(
            self.successResultOf(self.state.sessions.session_for_token(token_hash(token)))
        )
        self.assertError(self.logout(token), 401, "invalid_token")

    def test_a_logout_ends_what_belongs_to_the_device(self) -> None:
        """Its push registration goes (cim.push); a newer login of the device does not."""
        token = self.login(device="phone").json()["token"]
        self.login(device="phone")  # a newer login of the same device: not a logout
        self.assertEqual(self.signed_out, [])
        token = self.login(device="phone").json()["token"]
        self.assertEqual(self.logout(token).status, 200)
        self.assertEqual([(u, d) for u, d, _ in self.signed_out], [("alice", "phone")])
        # What it ends failing does not fail the logout: the session is over.
        self.signed_out_fails = True
        token = self.login(device="tablet").json()["token"]
        self.assertEqual(self.logout(token).status, 200)
        self.assertEqual(self.signed_out[-1][:2], ("alice", "tablet"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIsNone(
            self.successResultOf(self.state.sessions.session_for_token(token_hash(token)))
        )

    def test_logout_without_valid_token(self) -> None:
        response = self.logout(None)
        self.assertError(response, 401, "invalid_token")
        self.assertIn("Bearer", response.headers["www-authenticate"])
        self.assertError(self.logout("made-up"), 401, "invalid_token")
        bad_scheme = exchange(
            self.site, "POST", "/api/v1/logout", headers=[("Authorization", "Basic abc")]
        )
        self.assertError(bad_scheme, 401, "invalid_token")

    def test_login_logout_cycles_leave_nothing_behind(self) -> None:
        for _ in range(200):
            token = self.login().json()["token"]
            self.assertEqual(self.logout(token).status, 200)
        self.assertEqual(self.state.table.sessions, {})
        self.assertEqual(self.state.table.devices_by_user, {})
        root: Any = self.site.resource
        self.assertEqual(len(root.user_throttle), 0)
        self.assertEqual(len(root.address_throttle), 0)

    # --- routing ------------------------------------------------------------------------

    def test_unknown_path_and_method(self) -> None:
        self.assertError(exchange(self.site, "GET", "/"), 404, "not_found")
        self.assertError(exchange(self.site, "POST", "/api/v1/nope"), 404, "not_found")
        self.assertError(exchange(self.site, "POST", "/api/v1/login/extra"), 404, "not_found")
        response = exchange(self.site, "GET", "/api/v1/login")
        self.assertError(response, 405, "method_not_allowed")
        self.assertEqual(response.headers["allow"], "POST")

    def test_node_follows_the_ring_and_registry_changes(self) -> None:
        """Users spread over the live nodes; a node that leaves gets nobody new."""
        second = NodeInfo("n2", "im2.example", 9001, NODE.public_key_der)
        self.successResultOf(self.registry.register(second))
        # LocalRegistry holds one node; simulate a cluster view through its listeners.
        root: Any = self.site.resource
        root._chooser._nodes_changed([NODE, second])
        chosen = {}
        for number in range(40):
            user = f"user{number}"
            self.accounts.passwords[user] = self.PASSWORD
            response = self.login(user)
            self.assertEqual(response.status, 200, response.body)
            chosen[user] = response.json()["node"]["id"]
        self.assertEqual(set(chosen.values()), {"n1", "n2"})
        root._chooser._nodes_changed([NODE])
        self.assertEqual(self.login("user1").json()["node"]["id"], "n1")
        root._chooser._nodes_changed([])
        self.assertError(self.login("user2"), 503, "no_node")

    def test_state_store_down_gives_503(self) -> None:
        def unavailable(*args: Any, **kwargs: Any) -> Deferred[Any]:
            return defer.fail(StateUnavailable("redis is down"))

        self.patch(self.state.sessions, "create_session", unavailable)
        self.patch(self.state.sessions, "end_session", unavailable)
        response = self.login()
        self.assertError(response, 503, "state_unavailable")
        self.assertEqual(response.headers["retry-after"], "5")
        logout = exchange(
            self.site, "POST", "/api/v1/logout", headers=[("Authorization", "Bearer whatever")]
        )
        self.assertError(logout, 503, "state_unavailable")
        self.assertEqual(self.metrics.logins["unavailable"], 1)

    def admin_events(self) -> list[dict[str, Any]]:
        with open(self.oplog_path, encoding="utf-8") as handle:
            events = [json.loads(line) for line in handle]
        return [
            {"user": e["user"], "peer": e["peer"], **e["detail"]}
            for e in events
            if e["event"] == "admin"
        ]

    def test_online_list_for_operators_from_local_peers(self) -> None:
        for user in ("bob", "alice"):
            token = self.login(user, self.accounts.passwords[user]).json()["token"]
            record = self.successResultOf(self.state.sessions.session_for_token(token_hash(token)))
            assert record is not None
            self.successResultOf(self.state.presence.mark_online(record))
        response = exchange(self.site, "GET", "/api/v1/online?limit=1", headers=[bearer()])
        self.assertEqual(response.status, 200, response.body)
        self.assertEqual(
            response.json(),
            {
                "items": ["alice"],
                "devices": {"alice": ["default"]},
                "total": 2,
                "nodes": {"n1": 2},
                "offset": 0,
                "limit": 1,
            },
        )
        page = exchange(
            self.site, "GET", "/api/v1/online?offset=1&limit=5", headers=[bearer()]
        ).json()
        self.assertEqual(page["items"], ["bob"])
        self.assertError(
            exchange(self.site, "GET", "/api/v1/online?limit=0", headers=[bearer()]),
            400,
            "bad_request",
        )
        remote = IPv4Address("TCP", "203.0.113.9", 5555)
        self.assertError(
            exchange(self.site, "GET", "/api/v1/online", headers=[bearer()], peer=remote),
            403,
            "forbidden",
        )
        self.assertIn(
            {
                "user": "ops1",
                "peer": "127.0.0.1",
                "action": "online.list",
                "target": "",
                "outcome": "ok",
            },
            self.admin_events(),
        )

    def test_admin_kick_of_one_device(self) -> None:
        """cimctl kick USER --device D ends that device's session only."""
        phone = self.login(device="phone").json()["token"]
        web = self.login(device="web").json()["token"]
        headers = [("Content-Type", "application/json"), bearer(OPS2_TOKEN)]
        body = json.dumps({"user": "alice", "device": "web"}).encode()
        response = exchange(self.site, "POST", "/api/v1/admin/kick", body, headers)
        self.assertEqual(response.status, 200, response.body)
        self.assertEqual([d["device"] for d in response.json()["devices"]], ["web"])
        self.assertIsNone(
            self.successResultOf(self.state.sessions.session_for_token(token_hash(web)))
        )
        self.assertIsNotNone(
            self.successResultOf(self.state.sessions.session_for_token(token_hash(phone)))
        )
        again = exchange(self.site, "POST", "/api/v1/admin/kick", body, headers)
        self.assertError(again, 404, "no_session")
        bad = json.dumps({"user": "alice", "device": 3}).encode()
        self.assertError(
            exchange(self.site, "POST", "/api/v1/admin/kick", bad, headers), 400, "bad_request"
        )

    def test_online_list_needs_an_admin_token_from_loopback_too(self) -> None:
        """Issue 17, acceptance 3: the admin API's online list requires the token."""
        token = self.login().json()["token"]
        record = self.successResultOf(self.state.sessions.session_for_token(token_hash(token)))
        assert record is not None
        self.successResultOf(self.state.presence.mark_online(record))
        for headers in (
            [],
            [bearer("x" * 43)],
            [bearer(token)],  # a user's own login token is not an operator's
            [("Authorization", f"Basic {OPS1_TOKEN}")],
            [("Authorization", f"Bearer {OPS1_TOKEN}x")],
        ):
            response = exchange(self.site, "GET", "/api/v1/online", headers=headers)
            self.assertError(response, 401, "invalid_token")
            self.assertEqual(response.headers["www-authenticate"], 'Bearer realm="cim"')
            self.assertNotIn(b"alice", response.body)
        refusals = [e for e in self.admin_events() if e["outcome"] == "invalid_token"]
        self.assertEqual(len(refusals), 5)
        self.assertEqual(
            refusals[0],
            {
                "user": None,
                "peer": "127.0.0.1",
                "action": "online.list",
                "target": "",
                "outcome": "invalid_token",
            },
        )
        with open(self.oplog_path, encoding="utf-8") as handle:
            self.assertNotIn(OPS1_TOKEN[:20], handle.read())

    def test_admin_kick_ends_the_session_by_user_name(self) -> None:
        ended: list[tuple[SessionRecord, str]] = []
        self.state.sessions.add_session_ended_listener(
            lambda record, why: ended.append((record, why))
        )
        token = self.login().json()["token"]
        record = self.successResultOf(self.state.sessions.session_for_token(token_hash(token)))
        assert record is not None
        body = json.dumps({"user": "alice"}).encode()
        headers = [("Content-Type", "application/json"), bearer(OPS2_TOKEN)]
        remote = IPv4Address("TCP", "203.0.113.9", 5555)
        refused = exchange(self.site, "POST", "/api/v1/admin/kick", body, headers, peer=remote)
        self.assertError(refused, 403, "forbidden")
        self.assertEqual(ended, [])
        response = exchange(self.site, "POST", "/api/v1/admin/kick", body, headers)
        self.assertEqual(response.status, 200, response.body)
        self.assertEqual(
            response.json(),
            {
                "ok": True,
                "user": "alice",
                "session_id": record.session_id,
                "node": "n1",
                "devices": [{"device": "default", "session_id": record.session_id, "node": "n1"}],
            },
        )
        self.assertEqual(ended, [(record, "kicked by an administrator")])
        self.assertIsNone(
            self.successResultOf(self.state.sessions.session_for_token(token_hash(token)))
        )
        again = exchange(self.site, "POST", "/api/v1/admin/kick", body, headers)
        self.assertError(again, 404, "no_session")
        bad = exchange(self.site, "POST", "/api/v1/admin/kick", b'{"user": 7}', headers)
        self.assertError(bad, 400, "bad_request")
        events = self.admin_events()
        self.assertEqual(
            [e for e in events if e["action"] == "user.kick"],
            [
                {
                    "user": None,
                    "peer": "203.0.113.9",
                    "action": "user.kick",
                    "target": "",
                    "outcome": "forbidden",
                },
                {
                    "user": "ops2",
                    "peer": "127.0.0.1",
                    "action": "user.kick",
                    "target": "alice",
                    "outcome": "ok",
                },
                {
                    "user": "ops2",
                    "peer": "127.0.0.1",
                    "action": "user.kick",
                    "target": "alice",
                    "outcome": "no_session",
                },
            ],
        )

    def test_kick_without_the_admin_token_is_401_from_loopback(self) -> None:
        """Issue 17, acceptance 3: kick without the token is 401 from loopback too."""
        token = self.login().json()["token"]
        body = json.dumps({"user": "alice"}).encode()
        for auth in ([], [bearer("y" * 43)], [bearer(token)]):
            response = exchange(
                self.site,
                "POST",
                "/api/v1/admin/kick",
                body,
                [("Content-Type", "application/json"), *auth],
            )
            self.assertError(response, 401, "invalid_token")
        self.assertEqual(self.ended, [])
        self.assertIsNotNone(
            self.successResultOf(self.state.sessions.session_for_token(token_hash(token)))
        )

    def test_revoking_an_operator_takes_effect_at_once(self) -> None:
        from tests.fakes.operators import write_tokens

        self.assertEqual(
            exchange(self.site, "GET", "/api/v1/online", headers=[bearer(OPS2_TOKEN)]).status,
            200,
        )
        write_tokens(self.operators.path, {"ops1": OPS1_TOKEN})
        self.assertError(
            exchange(self.site, "GET", "/api/v1/online", headers=[bearer(OPS2_TOKEN)]),
            401,
            "invalid_token",
        )
        self.assertEqual(
            exchange(self.site, "GET", "/api/v1/online", headers=[bearer()]).status, 200
        )

    # --- secrets ------------------------------------------------------------------------

    def assertNoSecretsLogged(self, secrets: list[str]) -> None:
        self.assertTrue(self.log_events)
        for event in self.log_events:
            text = (formatEvent(event) or "") + repr(event)
            for secret in secrets:
                self.assertNotIn(secret, text)

    def test_requests_are_counted_by_route_template_and_status(self) -> None:
        self.logout(self.login().json()["token"])
        self.login(password="wrong-password-123")
        exchange(self.site, "GET", "/api/v1/no/such/thing")
        exchange(self.site, "GET", "/api/v1/login")
        http = self.metrics.http
        self.assertEqual(http.count("router", "POST", "/api/v1/login", "200"), 1)
        self.assertEqual(http.count("router", "POST", "/api/v1/login", "401"), 1)
        self.assertEqual(http.count("router", "POST", "/api/v1/logout", "200"), 1)
        self.assertEqual(http.count("router", "GET", "/api/v1/login", "405"), 1)
        self.assertEqual(http.count("router", "GET", "unmatched", "404"), 1)

    def test_the_access_log_is_off_unless_asked_for(self) -> None:
        quiet = router_site(
            self.config,
            self.im_config,
            self.accounts,
            self.state.sessions,
            self.state.presence,
            self.registry,
            self.clock,
            self.metrics,
        )
        quiet.doStart()
        self.addCleanup(quiet.doStop)
        self.login(site=quiet)
        messages = [formatEvent(event) or "" for event in self.log_events]
        self.assertEqual([m for m in messages if "POST /api/v1/login" in m], [])
        self.login()
        messages = [formatEvent(event) or "" for event in self.log_events]
        self.assertEqual(len([m for m in messages if '"POST /api/v1/login HTTP/1.1"' in m]), 1)

    def test_no_secret_in_log_output(self) -> None:
        token = self.login().json()["token"]
        self.login(password="wrong-password-123")
        bob_token = self.login(user="bob", password="bob-secret-pw").json()["token"]
        self.logout(token)
        self.logout(bob_token + "x")
        messages = [formatEvent(event) or "" for event in self.log_events]
        self.assertTrue(any("login ok for 'alice'" in m for m in messages), messages)
        # The access log is on too: it names the request line, never the body.
        self.assertTrue(any('"POST /api/v1/login HTTP/1.1" 401' in m for m in messages), messages)
        self.assertNoSecretsLogged(
            [self.PASSWORD, "wrong-password-123", "bob-secret-pw", token, bob_token]
        )


JSON = "application/json"
