"""Issue 18, the gateway, with a real daemon: browsers on WebSocket, phones on TCP.

The router hands out the node's WebSocket URL; a client on the gateway and one on
TCP chat both ways through the six packets; the router answers CORS preflights for
``[router] cors_origins``. Acceptance 4: wrong origin, text messages, 1 MiB
messages, 10,000 pings in a second and a client that never reads are each refused,
closed or throttled, while a canary pair chats on TCP through all of it (every one
of its messages delivered, exactly once and in order; its latencies are printed as
figures, never asserted).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import ssl
import threading
import time
import urllib.error
import urllib.request

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from cim.client.session import Backoff, ChatClient
from cim.protocols import cim_pb2
from tests.integration.support.cluster import (
    Cluster,
    eventually,
    login_body,
    reactor,
    ring_of,
)
from tests.integration.support.daemons import PASSWORD, DaemonProcess, client, free_port
from tests.integration.support.raw_client import RawClient
from tests.integration.support.raw_ws import (
    PING,
    TEXT,
    Closed,
    RawWebSocket,
    RawWsClient,
    UpgradeRefused,
)
from tests.integration.test_backpressure import Canary, counter, percentile
from tests.integration.test_reliability import shared_broker

PAGE = "http://app.example:8083"
USERS = ("alice", "bob", "slow", "flooder", "canary_a", "canary_b")
SLOW_READER_TIMEOUT = 3.0


def read_until(client: RawClient | RawWsClient, frame_type: int, limit: int = 50) -> bytes:
    """The next frame of ``frame_type`` (heartbeats and other frames skipped, bounded)."""
    for _ in range(limit):
        frame = client.read()
        if frame is not None and frame[0] == frame_type:
            return frame[1]
    raise AssertionError(f"no frame of type {frame_type} in {limit} frames")


def chat(
    test: TestCase, sender: RawClient | RawWsClient, receiver: RawClient | RawWsClient, seq: int
) -> None:
    """One message through the six packets; every step checked."""
    text = f"from {sender.user} over the other transport"
    sender.send(cim_pb2.MSG_R, cim_pb2.Message(to=receiver.user, text=text, client_seq=seq))
    msg_a = cim_pb2.MsgA.FromString(read_until(sender, cim_pb2.MSG_A))
    test.assertEqual(msg_a.client_seq, seq)
    msg_n = cim_pb2.Message.FromString(read_until(receiver, cim_pb2.MSG_N))
    test.assertEqual(
        (getattr(msg_n, "from"), msg_n.text, msg_n.id), (sender.user, text, msg_a.msg_id)
    )
    receiver.send(cim_pb2.ACK_R, cim_pb2.AckR(msg_id=msg_n.id))
    ack_a = cim_pb2.AckA.FromString(read_until(receiver, cim_pb2.ACK_A))
    test.assertEqual(ack_a.msg_id, msg_n.id)
    ack_n = cim_pb2.AckN.FromString(read_until(sender, cim_pb2.ACK_N))
    test.assertEqual((ack_n.msg_id, ack_n.status), (msg_a.msg_id, cim_pb2.DELIVERED))


def flood_messages(size: int) -> int:
    """Messages of ``size`` bytes that overflow what the kernel may buffer for one
    receiver that does not read (twice ``net.ipv4.tcp_wmem``'s maximum; 3,000 at least)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_wmem", encoding="ascii") as handle:
            most = int(handle.read().split()[2])
    except (OSError, ValueError, IndexError):
        most = 4 << 20
    return max(3000, 2 * most // size)


class GatewayTests(TestCase):
    timeout = 240

    def setUp(self) -> None:
        self.ws_port = free_port()
        self.logic_port = free_port()
        self.files_port = free_port()
        daemon = DaemonProcess(
            os.path.abspath(self.mktemp()),
            node_id="ws1",
            extra=(
                f"[ws]\nenabled = true\nlisten = tcp:{self.ws_port}:interface=127.0.0.1\n"
                f"allowed_origins = {PAGE}\n"
                f"[router]\ncors_origins = {PAGE}\n"
                f"[logic]\nenabled = true\ncors_origins = {PAGE}\n"
                f"listen = tcp:{self.logic_port}:interface=127.0.0.1\n"
                f"[files]\nenabled = true\ncors_origins = {PAGE}\n"
                f"listen = tcp:{self.files_port}:interface=127.0.0.1\n"
                f"[im]\noutbound_budget = 64KiB\nslow_reader_timeout = {SLOW_READER_TIMEOUT:g}s\n"
                "[limits]\nmessages = off\nhellos = off\n"
            ),
        )
        for user in USERS:
            added = daemon.cimctl("user", "add", user, stdin=PASSWORD + "\n")
            self.assertEqual(added.returncode, 0, added.stderr)
        daemon.start()
        self.addCleanup(daemon.stop)
        self.daemon = daemon

    def test_the_router_hands_out_the_websocket_url(self) -> None:
        status, body = self.daemon.login("alice")
        self.assertEqual(status, 200)
        self.assertEqual(body["node"]["ws_url"], f"ws://127.0.0.1:{self.ws_port}/")
        self.assertEqual(body["node"]["port"], self.daemon.im_port)

    def test_cim_client_sends_over_the_gateway(self) -> None:
        sent = client(self.daemon, "alice", "--transport", "websocket", "send", "bob", "hi")
        self.assertEqual(sent.returncode, 0, sent.stderr)
        self.assertEqual(json.loads(sent.stdout)["status"], "stored")  # bob is offline
        heard = client(self.daemon, "bob", "listen", "--count", "1")
        self.assertEqual(heard.returncode, 0, heard.stderr)
        self.assertEqual(json.loads(heard.stdout)["text"], "hi")

    def test_a_websocket_client_and_a_tcp_client_chat_both_ways(self) -> None:
        alice = RawWsClient(self.daemon.router_url, "alice", origin=PAGE)
        bob = RawClient(self.daemon.router_url, "bob")
        self.addCleanup(alice.close)
        self.addCleanup(bob.close)
        chat(self, alice, bob, 1)
        chat(self, bob, alice, 2)
        alice.heartbeat()
        self.assertIsNone(alice.read(), "an empty message is answered with one")
        online = self.daemon.online()["items"]
        self.assertEqual(sorted(online), ["alice", "bob"])

    def test_the_client_library_chats_over_the_gateway_with_one_on_tcp(self) -> None:
        return ensureDeferred(self._library_chat())  # type: ignore[return-value]

    async def _library_chat(self) -> None:
        def library_client(user: str, transport: str) -> ChatClient:
            chat_client = ChatClient(
                reactor,
                self.daemon.router_url,
                user,
                PASSWORD,
                device=transport,
                transport=transport,
                backoff=Backoff(initial=0.2, maximum=1.0),
                rng=random.Random(user),
            )
            self.addCleanup(lambda: ensureDeferred(chat_client.stop(logout=False)))
            return chat_client

        alice = library_client("alice", "websocket")
        bob = library_client("bob", "tcp")
        shown: dict[str, list[tuple[str, str]]] = {"alice": [], "bob": []}
        alice.on_message = lambda m: shown["alice"].append((getattr(m, "from"), m.text))
        bob.on_message = lambda m: shown["bob"].append((getattr(m, "from"), m.text))
        await alice.start()
        await bob.start()
        self.assertEqual(alice.state, "online")
        outcome = await alice.send_text("bob", "from the browser's library")
        self.assertEqual(outcome.status, "delivered")
        outcome = await bob.send_text("alice", "from the phone")
        self.assertEqual(outcome.status, "delivered")
        await eventually(lambda: bool(shown["alice"] and shown["bob"]), 30, "both messages shown")
        self.assertEqual(shown["bob"], [("alice", "from the browser's library")])
        self.assertEqual(shown["alice"], [("bob", "from the phone")])

    def test_cors_preflight_and_answers_of_router_logic_and_files(self) -> None:
        def preflight(base: str, path: str, origin: str) -> tuple[int, dict[str, str]]:
            request = urllib.request.Request(
                f"{base}{path}",
                method="OPTIONS",
                headers={
                    "Origin": origin,
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "content-type",
                },
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status, dict(response.headers)
            except urllib.error.HTTPError as error:
                return error.code, dict(error.headers)

        for base, path in (
            (f"http://127.0.0.1:{self.logic_port}", "/api/v1/register"),
            (f"http://127.0.0.1:{self.files_port}", "/files/uploads"),
        ):
            status, headers = preflight(base, path, PAGE)
            self.assertEqual((status, headers["Access-Control-Allow-Origin"]), (204, PAGE), base)
            status, headers = preflight(base, path, "http://evil.example")
            self.assertEqual(status, 403, base)
            self.assertNotIn("Access-Control-Allow-Origin", headers)

        router = self.daemon.router_url
        status, headers = preflight(router, "/api/v1/login", PAGE)
        self.assertEqual(status, 204)
        self.assertEqual(headers["Access-Control-Allow-Origin"], PAGE)
        self.assertIn("POST", headers["Access-Control-Allow-Methods"])
        self.assertIn("Content-Type", headers["Access-Control-Allow-Headers"])
        status, headers = preflight(router, "/api/v1/login", "http://evil.example")
        self.assertEqual(status, 403)
        self.assertNotIn("Access-Control-Allow-Origin", headers)
        login = urllib.request.Request(
            f"{self.daemon.router_url}/api/v1/login",
            data=json.dumps({"user": "alice", "password": PASSWORD}).encode(),
            headers={"Content-Type": "application/json", "Origin": PAGE},
        )
        with urllib.request.urlopen(login, timeout=10) as response:
            self.assertEqual(response.headers["Access-Control-Allow-Origin"], PAGE)
            self.assertIn("ws_url", json.loads(response.read())["node"])

    def test_hostile_clients_are_refused_closed_or_throttled_and_the_canary_goes_on(
        self,
    ) -> None:
        daemon = self.daemon
        url = f"ws://127.0.0.1:{self.ws_port}/"
        canary = Canary(daemon)
        canary.start()
        self.addCleanup(canary.stop)
        figures: list[str] = []

        # 1. A page of another origin: refused at the upgrade.
        with self.assertRaises(UpgradeRefused) as refused:
            RawWebSocket(url, origin="http://evil.example")
        self.assertEqual(refused.exception.status, 403)
        figures.append(f"wrong origin: HTTP {refused.exception.status} at the upgrade")

        # 2. A text message: closed with 1003.
        texter = RawWsClient(daemon.router_url, "alice", origin=PAGE)
        texter.ws.send_frame(TEXT, b"hello as text")
        with self.assertRaises(Closed) as closed:
            for _ in range(10):
                texter.read()
        self.assertEqual(closed.exception.code, 1003)
        figures.append(f"text message: closed with {closed.exception.code}")
        texter.close()

        # 3. A 1 MiB message (the frame limit is 64 KiB): closed with 1009.
        big = RawWsClient(daemon.router_url, "alice", origin=PAGE)
        with contextlib.suppress(OSError):  # the node may close before taking it all
            big.ws.send_binary(b"\x01" * (1 << 20))
        with self.assertRaises((Closed, OSError)) as closed:
            for _ in range(10):
                big.read()
        code = getattr(closed.exception, "code", None)
        self.assertIn(code, (1009, None))
        figures.append(f"1 MiB message: closed with {code or 'the TCP connection ended'}")
        big.close()

        # 4. 10,000 pings in a second: closed with 1008 after the allowed few.
        pinger = RawWsClient(daemon.router_url, "alice", origin=PAGE)
        started = time.monotonic()
        sent = 0
        try:
            for sent in range(1, 10_001):
                pinger.ws.send_frame(PING, b"p")
                if sent % 1000 == 0 and time.monotonic() - started > 1.0:
                    break
        except OSError:
            pass  # closed while we were still sending
        elapsed = time.monotonic() - started
        pongs = 0
        with self.assertRaises((Closed, OSError)) as closed:
            for _ in range(20_000):
                opcode, payload = pinger.ws.read_frame()
                if opcode == 0xA:
                    pongs += 1
                elif opcode == 0x8:
                    raise Closed(int.from_bytes(payload[:2], "big"))
        self.assertEqual(getattr(closed.exception, "code", None), 1008)
        self.assertLessEqual(pongs, 5)
        figures.append(
            f"pings: {sent} sent in {elapsed:.2f} s, {pongs} answered, then closed with 1008"
        )
        pinger.close()

        # 5. A client that never reads, flooded: no more live copies, then cut.
        slow = RawWsClient(daemon.router_url, "slow", origin=PAGE, receive_buffer=4096)
        flooder = RawClient(daemon.router_url, "flooder")
        answers = threading.Thread(target=drain, args=(flooder,), daemon=True)
        answers.start()
        flood_started = time.monotonic()
        cut_before = counter(daemon, "cim_slow_readers_cut_total")
        text = "x" * 1000
        flooded = 0
        beats = Beats(slow)
        # More than the kernel can hold for it: the server's send buffer autotunes up
        # to net.ipv4.tcp_wmem's maximum (4 MiB here), and a flood that fits there
        # leaves the node nothing queued to judge (seen: 3 MB sent, never cut).
        for flooded in range(1, flood_messages(len(text)) + 1):
            flooder.send(cim_pb2.MSG_R, cim_pb2.Message(to="slow", text=text, client_seq=flooded))
            if flooded % 100 == 0:
                beats.maybe()  # alive, just not reading
                if counter(daemon, "cim_slow_readers_cut_total") > cut_before:
                    break
                time.sleep(0.05)
        deadline = time.monotonic() + SLOW_READER_TIMEOUT + 20
        while counter(daemon, "cim_slow_readers_cut_total") <= cut_before:
            self.assertLess(time.monotonic(), deadline, "the slow reader was never cut")
            beats.maybe()
            time.sleep(0.2)
        cut_after = time.monotonic() - flood_started
        figures.append(
            f"non-reading client: {flooded} messages of 1 KB sent to it, cut after "
            f"{cut_after:.1f} s ([im] slow_reader_timeout = {SLOW_READER_TIMEOUT:g} s)"
        )
        flooder.close()
        slow.close()

        # The canary chatted on TCP through all of it (its stop waits for what is still
        # on its way).
        canary.stop()
        sent_by_canary = len(canary.sent)
        delivered = len(canary.delivered)
        latencies_ms = [latency * 1000 for latency in canary.latencies]
        figures.append(
            f"canary on TCP: {delivered}/{sent_by_canary} delivered, p50 "
            f"{percentile(latencies_ms, 0.5):.1f} ms, p99 {percentile(latencies_ms, 0.99):.1f} ms, "
            f"max {max(latencies_ms):.1f} ms"
        )
        metrics = daemon.metrics()
        figures.append(
            "node counted: text messages "
            f"{labelled(metrics, 'cim_frames_rejected', 'text message'):g}, ping floods "
            f"{labelled(metrics, 'cim_frames_rejected', 'ping flood'):g}, origin refusals "
            f"{labelled(metrics, 'cim_connections_refused', 'origin'):g}"
        )
        print("\n" + "\n".join(f"  gateway hostile input: {line}" for line in figures))
        self.assertEqual(labelled(metrics, "cim_frames_rejected", "ping flood"), 1)
        self.assertEqual(labelled(metrics, "cim_frames_rejected", "text message"), 1)
        # Every canary message arrived, exactly once, in order.
        self.assertGreater(sent_by_canary, 20)
        self.assertEqual(canary.delivered, list(range(1, sent_by_canary + 1)))
        self.assertEqual(daemon.health()["status"], "ok")
        self.assertIsNone(daemon.process.poll() if daemon.process else None)


class Beats:
    """A heartbeat a second at most (more would be a ping flood), until the node cuts."""

    def __init__(self, client: RawWsClient) -> None:
        self.client = client
        self.last = 0.0
        self.cut = False

    def maybe(self) -> None:
        now = time.monotonic()
        if self.cut or now - self.last < 1.0:
            return
        self.last = now
        try:
            self.client.heartbeat()
        except OSError:
            self.cut = True


def labelled(metrics: str, name: str, reason: str) -> float:
    """One labelled sample of a Prometheus text page (0 when absent)."""
    pattern = rf'^{name}(?:_total)?\{{reason="{re.escape(reason)}"\}} (\S+)$'
    match = re.search(pattern, metrics, re.M)
    return float(match.group(1)) if match else 0.0


def drain(client: RawClient) -> None:
    """Read (and drop) everything the node answers a flooding sender."""
    while True:
        try:
            client.read()
        except (ConnectionError, OSError):
            return


class CrossNodeGatewayTests(TestCase):
    """Two nodes on ZooKeeper, Redis and RabbitMQ: a browser on one node's gateway and a
    phone on the other's TCP port chat through the bus, and any router hands out the
    right node's WebSocket URL (from the node's registry record)."""

    timeout = 300

    def test_a_browser_on_one_node_and_a_phone_on_another(self) -> None:
        return ensureDeferred(self._across())  # type: ignore[return-value]

    async def _across(self) -> None:
        # Node ids of this cluster's own (cluster.py: own_prefix); alice is placed on
        # the first node, bob on the second.
        cluster = Cluster(self, count=2, amqp_url=shared_broker(self), websocket=True)
        node1, node2 = cluster.nodes
        ring = ring_of(cluster.nodes)
        names = [f"user{i}" for i in range(1000)]
        alice = next(n for n in names if ring.node_for(n).node_id == node1.node_id)  # type: ignore[union-attr]
        bob = next(n for n in names if ring.node_for(n).node_id == node2.node_id)  # type: ignore[union-attr]
        cluster.start([alice, bob])
        # node2's router sends alice to node1, and names node1's gateway.
        body = await login_body(node2, alice)
        self.assertEqual(body["node"]["id"], node1.node_id)
        self.assertEqual(
            body["node"]["ws_url"], f"ws://127.0.0.1:{cluster.ws_ports[node1.node_id]}/"
        )

        def library_client(user: str, first: DaemonProcess, transport: str) -> ChatClient:
            routers = [first.router_url] + [n.router_url for n in cluster.nodes if n is not first]
            chat_client = ChatClient(
                reactor,
                routers,
                user,
                PASSWORD,
                device=transport,
                transport=transport,
                backoff=Backoff(initial=0.2, maximum=2.0),
                rng=random.Random(user),
            )
            self.addCleanup(lambda: ensureDeferred(chat_client.stop(logout=False)))
            return chat_client

        browser = library_client(alice, node2, "websocket")
        phone = library_client(bob, node1, "tcp")
        shown: list[tuple[str, str]] = []
        browser.on_message = lambda m: shown.append((getattr(m, "from"), m.text)) or True
        phone.on_message = lambda m: shown.append((getattr(m, "from"), m.text)) or True
        await browser.start()
        await phone.start()
        assert browser.ticket is not None and phone.ticket is not None
        self.assertEqual(
            (browser.ticket.node.node_id, phone.ticket.node.node_id),
            (node1.node_id, node2.node_id),
        )
        outcome = await browser.send_text(bob, "from a browser on node1")
        self.assertEqual(outcome.status, "delivered")
        outcome = await phone.send_text(alice, "from a phone on node2")
        self.assertEqual(outcome.status, "delivered")
        await eventually(lambda: len(shown) == 2, 30, "both messages shown")
        self.assertEqual(
            sorted(shown),
            sorted([(alice, "from a browser on node1"), (bob, "from a phone on node2")]),
        )


def self_signed(directory: str) -> tuple[str, str]:
    """A key and a certificate for 127.0.0.1 (PEM files), as an operator's would be."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_path = os.path.join(directory, "ws-key.pem")
    cert_path = os.path.join(directory, "ws-cert.pem")
    with open(key_path, "wb") as handle:
        handle.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    with open(cert_path, "wb") as handle:
        handle.write(certificate.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


class SecureGatewayTests(TestCase):
    """``[ws] listen = ssl:...``: the router hands out wss://, and a chat runs over TLS."""

    timeout = 120

    def test_ssl_listen_gives_wss(self) -> None:
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        key_path, cert_path = self_signed(workdir)
        port = free_port()
        daemon = DaemonProcess(
            os.path.join(workdir, "node"),
            node_id="wss1",
            extra=(
                f"[ws]\nenabled = true\nlisten = ssl:{port}:privateKey={key_path}:"
                f"certKey={cert_path}:interface=127.0.0.1\n"
            ),
        )
        for user in ("alice", "bob"):
            added = daemon.cimctl("user", "add", user, stdin=PASSWORD + "\n")
            self.assertEqual(added.returncode, 0, added.stderr)
        daemon.start()
        self.addCleanup(daemon.stop)
        status, body = daemon.login("alice")
        self.assertEqual(status, 200)
        self.assertEqual(body["node"]["ws_url"], f"wss://127.0.0.1:{port}/")
        tls = ssl.create_default_context(cafile=cert_path)
        alice = RawWsClient(daemon.router_url, "alice", tls=tls)
        bob = RawClient(daemon.router_url, "bob")
        self.addCleanup(alice.close)
        self.addCleanup(bob.close)
        chat(self, alice, bob, 1)
        chat(self, bob, alice, 2)
