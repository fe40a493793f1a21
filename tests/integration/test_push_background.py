"""Push for devices connected with their app in the background, and a logout ending a
device's registration, against a real daemon (the webhook provider played by the
local server of tests.integration.support.push_servers).

bob has three devices connected: a phone in the background that never acknowledges
what it is handed, a tablet in the background that acknowledges everything, and a
laptop in the foreground that acknowledges nothing. A message from alice pushes the
phone only, after ``[push] background_grace``; an SOS pushes both background devices
at once and never the laptop.
"""

from __future__ import annotations

import json
import os
from typing import Any

import treq
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from cim.protocols import cim_pb2
from tests.integration.support.cluster import eventually, sleep
from tests.integration.support.daemons import DaemonProcess, free_port
from tests.integration.test_push_daemon import (
    TEXT_MARK,
    Providers,
    add_accounts,
    bind,
    client,
    logic,
    login,
    no_text,
)


class BackgroundTests(TestCase):
    timeout = 180

    def test_background_grace_sos_and_logout(self) -> None:
        return ensureDeferred(self._scenario())

    async def _scenario(self) -> None:
        providers = Providers(self, collapse_window="1s")
        workdir = os.path.abspath(self.mktemp())
        url = f"sqlite:///{workdir}/cim.db"
        os.makedirs(workdir)
        add_accounts(url, ["alice", "bob"], ["watch1"])
        bind(url, "watch1", "bob")
        logic_port = free_port()
        node = DaemonProcess(
            workdir,
            "pushbg",
            extra=f"[database]\nurl = {url}\n"
            f"[logic]\nenabled = true\nlisten = tcp:{logic_port}:interface=127.0.0.1\n"
            + providers.section
            + "background_grace = 1s\n",
        )
        node.start()
        self.addCleanup(node.stop)
        router = node.router_url

        sessions: dict[str, str] = {}
        for device in ("phone", "tablet", "laptop", "old"):
            sessions[device] = token = await login(router, "bob", device)
            body = {"provider": "webhook", "token": f"bob-{device}"}
            status, answer = await logic(logic_port, "PUT", "/devices/me/push", token, body)
            self.assertEqual(status, 200, answer)

        # A logout is the device signing out: its registration ends, the others stay.
        response = await treq.post(
            f"{router}/api/v1/logout",
            headers={"Authorization": f"Bearer {sessions['old']}"},
            persistent=False,
        )
        self.assertEqual(response.code, 200, await response.text())
        shown = node.cimctl("push", "show", "bob", "--json")
        self.assertEqual(shown.returncode, 0, shown.stderr)
        self.assertEqual(
            sorted(item["device"] for item in json.loads(shown.stdout)["items"]),
            ["laptop", "phone", "tablet"],
        )

        inboxes: dict[str, list[cim_pb2.Message]] = {}
        clients = {}
        for device, takes, state in (
            ("phone", False, "background"),
            ("tablet", True, "background"),
            ("laptop", False, "foreground"),
        ):
            inbox = inboxes[device] = []
            chat = clients[device] = client(router, "bob", device, inbox)
            chat.on_message = lambda message, inbox=inbox, takes=takes: (  # type: ignore[misc]
                inbox.append(message) or takes
            )
            self.addCleanup(lambda chat=chat: ensureDeferred(chat.stop(logout=False)))
            await chat.start()
            if state == "background":
                answer = await chat.set_app_state(state)
                self.assertIsNotNone(answer)
        alice = client(router, "alice", "laptop", [])
        self.addCleanup(lambda: ensureDeferred(alice.stop(logout=False)))
        await alice.start()
        await sleep(1.5)  # past the node's start-up window (collapse_window)

        def pushed(device: str) -> list[dict[str, Any]]:
            hooks = [hook.json() for hook in providers.http.webhooks]
            return [hook for hook in hooks if hook["token"] == f"bob-{device}"]

        outcome = await alice.send_text("bob", f"{TEXT_MARK}are you there")
        self.assertIn(outcome.status, ("delivered", "stored"))
        await eventually(lambda: len(pushed("phone")) >= 1, 15, "the phone's push")
        await eventually(lambda: len(inboxes["tablet"]) >= 1, 10, "the tablet's copy")
        await eventually(lambda: len(inboxes["laptop"]) >= 1, 10, "the laptop's copy")
        await sleep(3.0)  # past the grace: nothing more comes
        [phone_push] = pushed("phone")
        self.assertEqual((phone_push["kind"], phone_push["urgent"]), ("message", False))
        self.assertEqual(pushed("tablet"), [])  # acknowledged within the grace
        self.assertEqual(pushed("laptop"), [])  # in the foreground

        # An SOS: both background devices at once (no grace, even for the one that
        # acknowledges), the foreground laptop not.
        watch = await login(router, "watch1", "watch")
        status, raised = await logic(logic_port, "POST", "/sos", watch, {"lat": 1.0, "lon": 2.0})
        self.assertEqual(status, 201, raised)
        await eventually(
            lambda: (
                any(p["urgent"] for p in pushed("tablet"))
                and any(p["urgent"] for p in pushed("phone"))
            ),
            15,
            "the SOS pushes",
        )
        await sleep(1.5)
        self.assertEqual(pushed("laptop"), [])
        self.assertEqual([p["kind"] for p in pushed("tablet")], ["sos"])
        self.assertEqual(pushed("old"), [])
        no_text(self, providers.captured())

        with open(os.path.join(workdir, "data", "operations.log"), encoding="utf-8") as handle:
            events = [json.loads(line) for line in handle]
        removed = [e for e in events if e["event"] == "push.removed"]
        self.assertEqual(
            [(e["user"], e["detail"]["device"], e["detail"]["reason"]) for e in removed],
            [("bob", "old", "logout")],
        )
        for chat in (*clients.values(), alice):
            await chat.stop(logout=False)
        self.assertIn(node.stop(), (0, -15))
        log = node.log()
        self.assertNotIn("Traceback", log)
        self.assertNotIn("Unhandled", log)
