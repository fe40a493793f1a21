"""Push against real daemons (issue #19's acceptance), the providers played by local
servers that speak their protocols (tests.integration.support.push_servers).

One node (memory state) for items 1-4 and 6; two nodes sharing Redis, ZooKeeper and
one database for item 5. Every request a provider server captured is checked to
carry no message text: the configuration is the default one (show_text off).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
import time
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from cim.accounts.store import BlockingAccountStore
from cim.backends.backoff import Backoff
from cim.client.session import ChatClient
from cim.config import AccountsConfig
from cim.groups.directory import new_group_id
from cim.protocols import cim_pb2
from cim.push.providers.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature
from cim.storage.database import open_engine, upgrade
from cim.storage.groups import create_group_txn
from cim.storage.schema import bindings, group_members
from cim.storage.timeline import group_joined
from tests.integration.support.cluster import Cluster, chat_client, eventually, sleep
from tests.integration.support.daemons import PASSWORD, DaemonProcess, free_port
from tests.integration.support.push_servers import (
    Answer,
    ApnsServer,
    Captured,
    ProviderHttpServer,
    apns_key,
    fcm_service_account,
)

APNS_PHONE = "a1" * 32
FCM_TABLET = "fcm-tablet-token:" + "t" * 40
FCM_BOB = "fcm-bob-token:" + "b" * 40
WEBHOOK_CAROL = "carol-opaque-token"
SECRET = b"webhook secret for the push tests"
TEXT_MARK = "private-words-"


def add_accounts(url: str, people: list[str], devices: list[str]) -> None:
    upgrade(url)
    engine = open_engine(url)
    try:
        accounts = BlockingAccountStore(engine, AccountsConfig(scrypt_n=4096), clock=time.time)
        for name in people:
            accounts.add_user(name, PASSWORD)
        for name in devices:
            accounts.add_user(name, PASSWORD, "device")
    finally:
        engine.dispose()


def family_group(url: str, group_id: str, owner: str, members: list[str]) -> None:
    """A group made straight in the database (its members' consent is not the point)."""
    engine = open_engine(url)
    try:
        with engine.begin() as connection:
            create_group_txn(connection, group_id, "family", owner, [], time.time(), 100)
            for member in members:
                connection.execute(
                    group_members.insert().values(
                        group_id=group_id, user_name=member, role="member", joined_at=1.0
                    )
                )
            group_joined(connection, group_id, members)
    finally:
        engine.dispose()


def bind(url: str, device: str, guardian: str) -> None:
    engine = open_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(
                bindings.insert().values(
                    device=device, guardian=guardian, status="active", created_at=1.0
                )
            )
    finally:
        engine.dispose()


async def login(router_url: str, user: str, device: str) -> str:
    response = await treq.post(
        f"{router_url}/api/v1/login",
        json={"user": user, "password": PASSWORD, "device": device},
        persistent=False,
    )
    body = await response.json()
    assert response.code == 200, body
    return str(body["token"])


async def logic(port: int, method: str, path: str, token: str, body: Any = None) -> tuple[int, Any]:
    response = await treq.request(
        method,
        f"http://127.0.0.1:{port}/api/v1{path}",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
        persistent=False,
    )
    text = await response.text()
    return int(response.code), json.loads(text) if text else None


async def register(
    router_url: str, port: int, user: str, device: str, provider: str, token: str
) -> None:
    session = await login(router_url, user, device)
    status, body = await logic(
        port, "PUT", "/devices/me/push", session, {"provider": provider, "token": token}
    )
    assert status == 200, body


def no_text(test: TestCase, captured: list[Captured]) -> None:
    """Acceptance 6: no request carries any message text."""
    for request in captured:
        test.assertNotIn(TEXT_MARK.encode(), request.body)
        test.assertNotIn(TEXT_MARK, json.dumps(request.headers))


class Providers:
    """The three providers' servers, and the [push] section pointing at them."""

    def __init__(self, test: TestCase, collapse_window: str = "10s") -> None:
        directory = os.path.abspath(test.mktemp())
        os.makedirs(directory)
        self.http = ProviderHttpServer()
        fcm_file, fcm_key = fcm_service_account(directory, self.http.url + "/token")
        self.http.oauth_key = fcm_key.public_key()
        self.http.start()
        test.addCleanup(self.http.stop)
        p8, key = apns_key(directory)
        self.apns = ApnsServer(directory, key.public_key())
        self.apns.start()
        test.addCleanup(self.apns.stop)
        secret_file = os.path.join(directory, "webhook.secret")
        with open(secret_file, "wb") as handle:
            handle.write(SECRET + b"\n")
        self.section = (
            "[push]\nenabled = true\n"
            f"collapse_window = {collapse_window}\n"
            "group_rate = off\nretry_initial = 0.5s\nretry_max = 2s\n"
            f"fcm_key_file = {fcm_file}\nfcm_endpoint = {self.http.url}\n"
            f"apns_key_file = {p8}\napns_key_id = TESTKEY123\napns_team_id = TEAM123456\n"
            f"apns_topic = com.example.watch\napns_endpoint = {self.apns.url}\n"
            f"apns_ca_file = {self.apns.cert}\n"
            f"webhook_url = {self.http.url}/hook\nwebhook_secret_file = {secret_file}\n"
        )

    def captured(self) -> list[Captured]:
        return self.http.sends + self.http.webhooks + self.apns.requests

    def fcm_to(self, token: str) -> list[dict[str, Any]]:
        return [
            c.json()["message"] for c in self.http.sends if c.json()["message"]["token"] == token
        ]


def client(router_url: str, user: str, device: str, inbox: list[cim_pb2.Message]) -> ChatClient:
    chat = ChatClient(
        reactor,
        [router_url],
        user,
        PASSWORD,
        device=device,
        backoff=Backoff(initial=0.2, maximum=2.0),
        rng=random.Random(user),
    )
    chat.on_message = lambda message: inbox.append(message) or True
    return chat


class OneNodeTests(TestCase):
    timeout = 240

    def test_acceptance_on_one_node(self) -> None:
        return ensureDeferred(self._one_node())

    async def _one_node(self) -> None:
        providers = Providers(self)
        workdir = os.path.abspath(self.mktemp())
        url = f"sqlite:///{workdir}/cim.db"
        os.makedirs(workdir)
        add_accounts(url, ["mum", "alice", "bob", "carol"], ["watch1"])
        bind(url, "watch1", "mum")
        family = new_group_id()
        family_group(url, family, "alice", ["bob", "carol"])
        logic_port = free_port()
        node = DaemonProcess(
            workdir,
            "push1",
            extra=f"[database]\nurl = {url}\n"
            f"[logic]\nenabled = true\nlisten = tcp:{logic_port}:interface=127.0.0.1\n"
            + providers.section,
        )
        node.start()
        self.addCleanup(node.stop)
        router = node.router_url
        await register(router, logic_port, "mum", "phone", "apns", APNS_PHONE)
        await register(router, logic_port, "mum", "tablet", "fcm", FCM_TABLET)
        await register(router, logic_port, "bob", "phone", "fcm", FCM_BOB)
        await register(router, logic_port, "carol", "phone", "webhook", WEBHOOK_CAROL)
        shown = node.cimctl("push", "show", "mum", "--json")
        self.assertEqual(shown.returncode, 0, shown.stderr)
        devices = {item["device"]: item for item in json.loads(shown.stdout)["items"]}
        self.assertEqual(
            {d: i["provider"] for d, i in devices.items()}, {"phone": "apns", "tablet": "fcm"}
        )
        self.assertNotIn(APNS_PHONE, shown.stdout)  # cimctl shows tokens cut

        # 1. mum's tablet connected, her phone (apns) asleep; the watch raises an SOS.
        tablet_inbox: list[cim_pb2.Message] = []
        tablet = client(router, "mum", "tablet", tablet_inbox)
        self.addCleanup(lambda: ensureDeferred(tablet.stop(logout=False)))
        await tablet.start()
        watch = await login(router, "watch1", "watch")
        status, raised = await logic(logic_port, "POST", "/sos", watch, {"lat": 1.0, "lon": 2.0})
        self.assertEqual(status, 201, raised)
        took = await eventually(lambda: len(providers.apns.requests) >= 1, 10, "the SOS push")
        await eventually(
            lambda: any(m.type == cim_pb2.SYSTEM for m in tablet_inbox), 10, "the SOS over IM"
        )
        await sleep(1.0)
        [sos] = providers.apns.requests
        self.assertEqual(sos.path, f"/3/device/{APNS_PHONE}")
        self.assertEqual(sos.headers["apns-priority"], "10")
        self.assertNotIn("apns-collapse-id", sos.headers)
        self.assertEqual(sos.json()["aps"]["alert"]["title"], "SOS from watch1")
        self.assertEqual(providers.fcm_to(FCM_TABLET), [])  # connected: no push
        print(f"SOS raised -> APNs request: {took:.3f} s", file=sys.stderr)

        # 2. 30 messages from alice to bob in 5 s, bob's fcm device away.
        alice = client(router, "alice", "laptop", [])
        self.addCleanup(lambda: ensureDeferred(alice.stop(logout=False)))
        await alice.start()
        for number in range(30):
            outcome = await alice.send_text("bob", f"{TEXT_MARK}{number}")
            self.assertEqual(outcome.status, "stored")
            await sleep(5 / 30)
        await eventually(
            lambda: any(m["data"]["badge"] == "30" for m in providers.fcm_to(FCM_BOB)),
            25,
            "bob's push with badge 30",
        )
        await sleep(3.0)
        pushes = providers.fcm_to(FCM_BOB)
        self.assertLessEqual(len(pushes), 2, pushes)
        self.assertEqual(pushes[-1]["data"]["badge"], "30")
        self.assertEqual(pushes[-1]["android"]["notification"]["notification_count"], 30)
        times = [c.at for c in providers.http.sends if c.json()["message"]["token"] == FCM_BOB]
        for earlier, later in itertools.pairwise(times):
            self.assertGreaterEqual(later - earlier, 9.0)

        # 4. carol's webhook: signed; a replay (old timestamp) fails the documented check.
        await alice.send_text("carol", f"{TEXT_MARK}for carol")
        await eventually(lambda: len(providers.http.webhooks) >= 1, 15, "carol's webhook")
        hook = providers.http.webhooks[0]
        timestamp = hook.headers[TIMESTAMP_HEADER.lower()]
        signature = hook.headers[SIGNATURE_HEADER.lower()]
        self.assertTrue(verify_signature(SECRET, timestamp, hook.body, signature, time.time()))
        self.assertFalse(
            verify_signature(SECRET, timestamp, hook.body, signature, time.time() + 600)
        )
        self.assertEqual(hook.json()["token"], WEBHOOK_CAROL)

        # A group message: each member's registered device but the sender's, once.
        outcome = await alice.send_group(family, f"{TEXT_MARK}to the family")
        self.assertEqual(outcome.status, "accepted", outcome)
        await eventually(
            lambda: (
                any(m["data"]["kind"] == "group" for m in providers.fcm_to(FCM_BOB))
                and any(w.json()["kind"] == "group" for w in providers.http.webhooks)
            ),
            15,
            "the group's pushes to bob and carol",
        )
        group_push = next(m for m in providers.fcm_to(FCM_BOB) if m["data"]["kind"] == "group")
        self.assertEqual(group_push["data"]["conversation"], f"g:{family}")
        self.assertEqual(group_push["notification"]["title"], "New message from alice in a group")

        # 3. A 503 with Retry-After is retried after it; APNs down, an SOS goes when it
        # is back; a 410 removes the registration.
        providers.apns.script = [Answer(503, {"retry-after": "2"}, b'{"reason":"Shutdown"}')]
        await logic(logic_port, "POST", "/sos", watch, {"lat": 1.0, "lon": 2.0})
        await eventually(lambda: len(providers.apns.requests) >= 3, 15, "the retried SOS")
        first, second = providers.apns.requests[1:3]
        self.assertGreaterEqual(second.at - first.at, 2.0)
        providers.apns.stop()
        before = len(providers.apns.requests)
        await logic(logic_port, "POST", "/sos", watch, {"lat": 1.0, "lon": 2.0})
        # While APNs is down, messages to mum (whose phone it would wake) go on: each
        # reaches her tablet, and alice hears "delivered".
        for number in range(20):
            outcome = await alice.send_text("mum", f"{TEXT_MARK}while-down-{number}")
            self.assertEqual(outcome.status, "delivered")
        texts = {m.text for m in tablet_inbox}
        self.assertTrue({f"{TEXT_MARK}while-down-{n}" for n in range(20)} <= texts)
        await sleep(3.0)
        providers.apns.start()
        await eventually(
            lambda: any(
                r.headers["apns-priority"] == "10" for r in providers.apns.requests[before:]
            ),
            15,
            "the SOS after the outage",
        )
        providers.apns.script = [Answer(410, {}, b'{"reason":"Unregistered"}')]
        await logic(logic_port, "POST", "/sos", watch, {"lat": 1.0, "lon": 2.0})

        def phone_gone() -> bool:
            shown = node.cimctl("push", "show", "mum", "--json")
            return "phone" not in {item["device"] for item in json.loads(shown.stdout)["items"]}

        await eventually(phone_gone, 20, "the dead token's registration removed")

        # 6. No request carried message text; the operation log and /metrics saw it all.
        no_text(self, providers.captured())
        metrics = node.metrics()
        self.assertIn('cim_pushes_total{outcome="accepted",provider="apns"}', metrics)
        self.assertIn('cim_pushes_total{outcome="dead",provider="apns"}', metrics)
        self.assertIn("cim_push_queue_depth", metrics)
        with open(os.path.join(workdir, "data", "operations.log"), encoding="utf-8") as handle:
            events = [json.loads(line)["event"] for line in handle]
        self.assertEqual(events.count("push.registered"), 4)
        self.assertIn("push.token_dead", events)
        await tablet.stop(logout=False)
        await alice.stop(logout=False)
        self.assertIn(node.stop(), (0, -15))  # as tests.integration.test_systemd
        log = node.log()
        self.assertNotIn("Traceback", log)
        self.assertNotIn("Unhandled", log)


class TwoNodeTests(TestCase):
    timeout = 240

    def test_a_message_to_an_offline_user_is_pushed_once_in_the_cluster(self) -> None:
        return ensureDeferred(self._two_nodes())

    async def _two_nodes(self) -> None:
        providers = Providers(self, collapse_window="1s")
        cluster = Cluster(self, count=2, logic=True, extra=providers.section)
        add_accounts(cluster.database_url, ["alice", "bob"], [])
        cluster.start([])
        first, second = cluster.nodes
        await register(
            first.router_url, cluster.logic_ports[first.node_id], "bob", "phone", "webhook", "b-1"
        )
        await sleep(1.5)  # past the nodes' start-up window (collapse_window)
        alice = chat_client(cluster, second, "alice")
        self.addCleanup(lambda: ensureDeferred(alice.stop(logout=False)))
        await alice.start()
        outcome = await alice.send_text("bob", f"{TEXT_MARK}hello")
        self.assertEqual(outcome.status, "stored")
        await eventually(lambda: len(providers.http.webhooks) >= 1, 15, "bob's push")
        await sleep(3.0)
        self.assertEqual(len(providers.http.webhooks), 1)
        self.assertEqual(providers.http.webhooks[0].json()["seq"], 1)
        no_text(self, providers.captured())
