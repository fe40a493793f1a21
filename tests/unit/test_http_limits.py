"""HTTP deadlines and connection limits (issue 16: Seen 6 and 8), driven by hand on a Clock."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, ITCPTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import server
from twisted.web.resource import Resource
from zope.interface import implementer

from cim.config import HttpConfig
from cim.http.deadlines import LINGER, BoundedChannel, BoundedSite, Phase, RequestDeadlines
from cim.http.limits import (
    ConnectionLimits,
    DescriptorReserve,
    HttpConnections,
    address_key,
    count_open_fds,
    fd_limit,
)
from cim.http.site import bounded_site

DEADLINES = RequestDeadlines(
    header_timeout=10.0, body_timeout=30.0, min_body_rate=1024.0, idle_timeout=60.0
)


class Echo(Resource):
    """Answers the body's length; or, with ``hold``, nothing until told."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held: list[server.Request] = []
        self.hold = False

    def render(self, request: server.Request) -> bytes | int:
        if self.hold:
            self.held.append(request)
            return server.NOT_DONE_YET
        content = request.content
        size = len(content.read()) if content is not None else 0
        return json.dumps({"received": size}).encode()


@implementer(ITCPTransport)
class TcpTransport(StringTransport):
    """A StringTransport that half-closes as a TCP one does."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


class Connection:
    def __init__(self, factory: Any, peer: IAddress | None = None) -> None:
        peer = peer or IPv4Address("TCP", "203.0.113.5", 40000)
        self.transport = TcpTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8080), peerAddress=peer
        )
        self.channel = factory.buildProtocol(peer)
        if self.channel is not None:
            self.channel.makeConnection(self.transport)

    def send(self, raw: bytes) -> None:
        self.channel.dataReceived(raw)

    def status(self) -> int | None:
        raw = self.transport.value()
        if not raw:
            return None
        return int(raw.split(b" ", 2)[1])

    def answer(self) -> dict[str, Any]:
        raw = self.transport.value()
        return json.loads(raw.partition(b"\r\n\r\n")[2])  # type: ignore[no-any-return]

    @property
    def closed(self) -> bool:
        t = self.transport
        return t.disconnecting or t.disconnected or t.write_closed

    def lose(self) -> None:
        self.channel.connectionLost(Failure(ConnectionDone()))


def site_on(clock: Clock, resource: Resource | None = None) -> BoundedSite:
    site = bounded_site(resource or Echo(), 1 << 20, clock)
    site.apply(DEADLINES)
    return site


class DeadlineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.resource = Echo()
        self.site = site_on(self.clock, self.resource)

    def test_a_trickled_head_is_cut_at_the_header_timeout_with_408(self) -> None:
        """Seen 6: half a request, then a byte every few seconds, no longer holds on."""
        connection = Connection(self.site)
        connection.send(b"GET /x HTTP/1.1\r\nHost: a\r\n")
        for _ in range(3):
            self.clock.advance(3)
            connection.send(b"X")
        self.assertFalse(connection.closed)
        self.clock.advance(1.5)
        self.assertEqual(connection.status(), 408)
        self.assertEqual(connection.answer()["error"], "request_timeout")
        self.assertTrue(connection.transport.write_closed)
        # The peer is read from (and ignored) for a moment, then cut.
        connection.send(b"more")
        self.assertFalse(connection.transport.disconnected)
        self.clock.advance(LINGER)
        self.assertTrue(connection.transport.disconnected)

    def test_a_silent_connection_is_closed_without_an_answer(self) -> None:
        connection = Connection(self.site)
        self.clock.advance(9.9)
        self.assertFalse(connection.closed)
        self.clock.advance(0.2)
        self.assertTrue(connection.transport.disconnected)
        self.assertEqual(connection.transport.value(), b"")

    def test_a_prompt_request_is_answered_and_the_connection_kept(self) -> None:
        connection = Connection(self.site)
        self.clock.advance(9)
        connection.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(connection.status(), 200)
        self.assertEqual(connection.channel.phase, Phase.WAITING)
        # Kept alive: idle, but under idle_timeout, it stays; the header deadline
        # of the next request starts with its first byte.
        self.clock.advance(50)
        self.assertFalse(connection.closed)
        connection.transport.clear()
        connection.send(b"GET /y HTTP/1.1\r\n")
        self.clock.advance(9)
        connection.send(b"Host: a\r\n\r\n")
        self.assertEqual(connection.status(), 200)

    def test_an_idle_kept_alive_connection_closes_after_the_idle_timeout(self) -> None:
        connection = Connection(self.site)
        connection.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        self.clock.advance(59)
        self.assertFalse(connection.closed)
        self.clock.advance(2)
        self.assertTrue(connection.transport.disconnecting)

    def test_the_next_pipelined_request_gets_its_own_header_deadline(self) -> None:
        self.resource.hold = True
        connection = Connection(self.site)
        connection.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\nGET /y HTTP/1.1\r\n")
        self.clock.advance(100)  # being answered: no read deadline
        self.assertFalse(connection.closed)
        request = self.resource.held.pop()
        self.resource.hold = False
        request.write(b"done")
        request.finish()
        self.assertEqual(connection.channel.phase, Phase.HEAD)
        self.clock.advance(10.5)
        self.assertIn(b"408 Request Timeout", connection.transport.value())

    def test_a_slow_but_steady_upload_gets_through(self) -> None:
        """2 KiB/s for a 200 KiB body: over 100 s, but above min_body_rate."""
        connection = Connection(self.site)
        size = 200 * 1024
        connection.send(b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)
        self.assertEqual(connection.channel.phase, Phase.BODY)
        for _ in range(size // 2048):
            self.clock.advance(1)
            connection.send(b"a" * 2048)
        self.assertEqual(connection.status(), 200)
        self.assertEqual(connection.answer(), {"received": size})

    def test_a_trickled_body_is_cut_once_under_the_minimum_rate(self) -> None:
        connection = Connection(self.site)
        connection.send(b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n")
        sent = 0
        # 100 bytes a second: 30 s of grace, then 1 KiB/s is owed.
        while connection.status() is None and self.clock.seconds() < 120:
            self.clock.advance(1)
            if connection.status() is None:
                connection.send(b"a" * 100)
                sent += 100
        self.assertEqual(connection.status(), 408)
        self.assertIn("slower than 1024 bytes/s", connection.answer()["message"])
        # body_timeout + received / rate: 30 + ~3400 / 1024, about 33 s.
        self.assertTrue(32 <= self.clock.seconds() <= 35, self.clock.seconds())

    def test_without_a_rate_the_body_has_body_timeout(self) -> None:
        self.site.apply(RequestDeadlines(body_timeout=5, min_body_rate=0))
        connection = Connection(self.site)
        connection.send(b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
        self.clock.advance(4.9)
        self.assertIsNone(connection.status())
        self.clock.advance(0.2)
        self.assertEqual(connection.status(), 408)

    def test_a_20_kib_header_is_answered_431(self) -> None:
        """Seen 8: a Range header over 16 KiB used to drop the connection unanswered."""
        connection = Connection(self.site)
        connection.send(
            b"GET /x HTTP/1.1\r\nHost: a\r\nRange: bytes=" + b"1" * 20480 + b"-\r\n\r\n"
        )
        self.assertEqual(connection.status(), 431)
        self.assertEqual(connection.answer()["error"], "request_header_fields_too_large")
        self.assertTrue(connection.transport.write_closed)

    def test_many_headers_over_16_kib_in_all_are_answered_431(self) -> None:
        connection = Connection(self.site)
        headers = b"".join(b"X-Filler-%d: %s\r\n" % (n, b"v" * 1000) for n in range(20))
        connection.send(b"GET /x HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n")
        self.assertEqual(connection.status(), 431)

    def test_a_5000_digit_content_length_is_answered_413(self) -> None:
        """int() of it used to raise out of twisted.web: a traceback and no answer."""
        connection = Connection(self.site)
        head = b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: " + b"9" * 5000
        connection.send(head + b"\r\n\r\nbody")
        self.assertEqual(connection.status(), 413)
        self.assertEqual(connection.answer()["error"], "body_too_large")
        self.assertFalse(self.flushLoggedErrors())

    def test_an_odd_content_type_on_a_post_is_no_traceback(self) -> None:
        """twisted.web's form parsing raised on a \\x1e in Content-Type: no answer."""
        connection = Connection(self.site)
        connection.send(
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Type: a\x1eb/json\r\n"
            b"Content-Length: 2\r\n\r\n{}"
        )
        self.assertEqual(connection.status(), 200)

    def test_a_malformed_request_gets_a_json_400(self) -> None:
        connection = Connection(self.site)
        connection.send(b"NONSENSE\r\n\r\n")
        self.assertEqual(connection.status(), 400)
        self.assertEqual(connection.answer()["error"], "bad_request")

    def test_a_client_that_reads_nothing_of_its_answer_is_cut(self) -> None:
        self.resource.hold = True
        connection = Connection(self.site)
        connection.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        request = self.resource.held.pop()
        request.write(b"x" * 100)
        connection.channel.pauseProducing()  # the transport's buffer is full
        self.clock.advance(59)
        self.assertFalse(connection.transport.disconnected)
        connection.channel.resumeProducing()  # it read some
        connection.channel.pauseProducing()
        self.clock.advance(59)
        self.assertFalse(connection.transport.disconnected)
        self.clock.advance(2)
        self.assertTrue(connection.transport.disconnected)

    def test_a_request_being_answered_has_no_read_deadline(self) -> None:
        self.resource.hold = True
        connection = Connection(self.site)
        connection.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        self.clock.advance(3600)
        self.assertFalse(connection.closed)
        request = self.resource.held.pop()
        request.write(b"late")
        request.finish()
        self.assertEqual(connection.status(), 200)


class FakeDescriptors:
    def __init__(self, limit: int, open_now: int) -> None:
        self.limit = limit
        self.open = open_now
        self.counts = 0

    def count(self) -> int:
        self.counts += 1
        return self.open


def address(host: str, port: int = 40000) -> IAddress:
    if ":" in host:
        return IPv6Address("TCP", host, port)
    return IPv4Address("TCP", host, port)


class LimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.fds = FakeDescriptors(limit=1000, open_now=100)
        self.reserve = DescriptorReserve(self.clock, self.fds.limit, self.fds.count)
        self.config = HttpConfig(max_connections_per_address=3, max_connections=5, fd_reserve=200)
        self.connections = HttpConnections(self.config, self.clock, self.reserve)
        self.echo = Echo()
        self.router = self.connections.guard("router", site_on(self.clock, self.echo))

    def connect(
        self, host: str = "203.0.113.5", factory: ConnectionLimits | None = None
    ) -> Connection:
        return Connection(factory or self.router, address(host))

    def test_connections_over_the_per_address_limit_get_503(self) -> None:
        held = [self.connect() for _ in range(3)]
        self.assertTrue(all(isinstance(c.channel, BoundedChannel) for c in held))
        over = self.connect()
        self.assertNotIsInstance(over.channel, BoundedChannel)
        self.assertIn(b"503 Service Unavailable", over.transport.value())
        self.assertEqual(
            json.loads(over.transport.value().split(b"\r\n\r\n")[1])["error"],
            "too_many_connections",
        )
        self.assertTrue(over.transport.disconnecting)
        # Another address is not affected; a closed connection frees its place.
        self.assertIsInstance(self.connect("203.0.113.6").channel, BoundedChannel)
        held[0].lose()
        self.assertIsInstance(self.connect().channel, BoundedChannel)
        self.assertEqual(self.router.refused["per_address"], 1)

    def test_at_the_total_the_longest_waiting_connection_makes_room(self) -> None:
        waiting = [self.connect(f"198.51.100.{n}") for n in range(5)]
        waiting[0].send(b"GET /x HTTP/1.1\r\n")  # its head trickles in: still waiting
        fresh = self.connect("198.51.100.200")
        self.assertIsInstance(fresh.channel, BoundedChannel)
        self.assertTrue(waiting[0].transport.disconnected)
        self.assertFalse(waiting[1].transport.disconnected)
        self.assertEqual(self.router.open, 5)
        self.assertEqual(self.router.cut["evicted"], 1)
        # The evicted channel's own close does not count twice.
        waiting[0].lose()
        self.assertEqual(self.router.open, 5)

    def test_busy_connections_are_never_closed_to_make_room(self) -> None:
        site = site_on(self.clock)
        cast_resource = site.resource
        assert isinstance(cast_resource, Echo)
        cast_resource.hold = True
        files = self.connections.guard("files", site)
        uploading = [self.connect(f"198.51.100.{n}", files) for n in range(5)]
        for n, connection in enumerate(uploading):
            if n % 2:
                connection.send(b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 9\r\n\r\nab")
            else:
                connection.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        refused = self.connect("198.51.100.200", files)
        self.assertIn(b"503", refused.transport.value())
        self.assertFalse(any(c.transport.disconnected for c in uploading))
        self.assertEqual(files.refused["total"], 1)

    def test_http_keeps_the_reserve_of_descriptors_free(self) -> None:
        """Seen 6: HTTP stops taking descriptors fd_reserve before the limit."""
        self.echo.hold = True
        self.fds.open = 790
        busy = [self.connect(f"198.51.100.{n}") for n in range(3)]
        for connection in busy:
            connection.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        # Counted once (790), then followed by the three admissions: 207 free.
        self.assertEqual(self.reserve.free(), 207)
        self.fds.open = 801
        self.clock.advance(1)  # counted again: 199 free, under the reserve
        refused = self.connect("198.51.100.4")
        self.assertIsNone(refused.channel)
        self.assertEqual(self.router.refused["fds"], 1)
        # Nothing was waiting, so nothing was closed to make room.
        self.assertFalse(any(c.transport.disconnected for c in busy))

    def test_short_of_descriptors_the_longest_waiting_connection_anywhere_goes(self) -> None:
        logic = self.connections.guard("logic", site_on(self.clock))
        idle = self.connect("198.51.100.1", logic)
        self.fds.open = 850
        self.clock.advance(1)  # 150 free: under the reserve (200)
        login = self.connect("198.51.100.2")
        self.assertIsInstance(login.channel, BoundedChannel)
        self.assertTrue(idle.transport.disconnected)
        self.assertEqual(logic.cut["evicted"], 1)
        self.assertEqual(self.connections.evicted, 1)

    def test_a_burst_digs_only_half_way_into_the_reserve(self) -> None:
        """A closed connection's descriptor returns only once its socket is closed."""
        waiting = [self.connect(f"198.51.100.{n}") for n in range(1, 4)]
        self.fds.open = 897
        self.clock.advance(1)  # counted: 897 open, 103 free (floor 200, half 100)
        first = self.connect("198.51.100.10")  # room made; 102 free after it
        second = self.connect("198.51.100.11")  # room made; 101 free after it
        third = self.connect("198.51.100.12")  # 101 free: still over half the floor
        fourth = self.connect("198.51.100.13")  # 100 free: refused, nobody else closed
        self.assertEqual(
            [c.channel is not None for c in (first, second, third, fourth)],
            [True, True, True, False],
        )
        self.assertTrue(all(c.transport.disconnected for c in waiting))
        self.assertEqual(self.reserve.free(), 100)
        for connection in waiting:  # the reactor closes their sockets
            connection.lose()
        self.assertEqual(self.reserve.free(), 103)
        self.assertEqual(self.router.open, 3)

    def test_admin_keeps_a_share_of_the_reserve(self) -> None:
        admin = self.connections.guard("admin", site_on(self.clock))
        self.fds.open = 850  # 150 free: under the reserve (200), over its quarter (50)
        self.clock.advance(1)
        self.assertIsNone(self.connect("198.51.100.1").channel)
        health = self.connect("127.0.0.1", admin)
        self.assertIsInstance(health.channel, BoundedChannel)
        health.lose()
        self.fds.open = 960
        self.clock.advance(1)
        self.assertIsNone(self.connect("127.0.0.1", admin).channel)
        self.assertEqual(admin.refused["fds"], 1)

    def test_descriptors_are_counted_at_most_once_a_second(self) -> None:
        for n in range(50):
            self.connect(
                f"198.51.100.{n % 250}", self.connections.guard(f"s{n}", site_on(self.clock))
            )
        self.assertEqual(self.fds.counts, 1)
        self.clock.advance(1)
        self.reserve.free()
        self.assertEqual(self.fds.counts, 2)

    def test_a_small_process_limit_keeps_a_quarter_at_most(self) -> None:
        reserve = DescriptorReserve(self.clock, 1024, lambda: 10)
        connections = HttpConnections(HttpConfig(fd_reserve=1024), self.clock, reserve)
        self.assertEqual(connections.fd_reserve, 256)

    def test_the_deadlines_of_http_reach_the_guarded_site(self) -> None:
        site = site_on(self.clock)
        config = HttpConfig(header_timeout=3, idle_timeout=7)
        HttpConnections(config, self.clock, self.reserve).guard("router", site)
        self.assertEqual((site.deadlines.header_timeout, site.timeOut), (3, 7))

    def test_only_bounded_sites_can_be_guarded(self) -> None:
        plain = server.Site(Echo())
        with self.assertRaises(TypeError):
            self.connections.guard("other", plain)

    def test_health_reports_connections_and_refusals(self) -> None:
        for _ in range(4):
            self.connect()
        report = self.connections.snapshot()
        self.assertEqual(report["fd_limit"], 1000)
        self.assertEqual(report["fd_reserve"], 200)
        self.assertEqual(report["services"]["router"]["open"], 3)
        self.assertEqual(report["services"]["router"]["refused"], {"per_address": 1})


class AddressTests(SynchronousTestCase):
    def test_keys(self) -> None:
        cases: list[tuple[IAddress, str]] = [
            (address("192.0.2.1"), "192.0.2.1"),
            (address("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64"),
            (address("2001:db8:1:2:ffff::1"), "2001:db8:1:2::/64"),
            (address("::ffff:192.0.2.7"), "192.0.2.7"),
            (UNIXAddress(b"/run/cim.sock"), "unix"),
        ]
        for given, expected in cases:
            self.assertEqual(address_key(given), expected)

    def test_the_process_descriptors_can_be_seen(self) -> None:
        counted = count_open_fds()
        self.assertIsNotNone(counted)
        assert counted is not None
        limit = fd_limit()
        self.assertTrue(limit is None or 0 < counted < limit)
