"""Issue 16 with real processes: a daemon with [limits], the client library as the
sender and `cim-client listen` as the receiver.

- a sender over the message limit is refused RATE_LIMITED and the library still
  delivers everything, in order, to a receiver running `cim-client listen`;
- `cimctl limits` raises the sender's limit and the running node honours it;
- the poisoned box: 20 messages of 64 KB and an ordinary one to an offline user, who
  then runs `cim-client listen` and gets all 21.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import time
from typing import Any

from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.trial.unittest import TestCase

from cim.client.session import Backoff, ChatClient, DeliveryOutcome
from tests.integration.support.cluster import eventually, reactor
from tests.integration.support.daemons import PASSWORD, DaemonProcess, client


def library_client(daemon: DaemonProcess, user: str) -> ChatClient:
    client = ChatClient(
        reactor,
        daemon.router_url,
        user,
        PASSWORD,
        device="lib",
        backoff=Backoff(initial=0.2, maximum=1.0),
        rng=random.Random(user),
    )
    # An application that takes what comes (the library's default takes nothing), so
    # its senders hear "delivered".
    client.on_message = lambda message: True
    return client


def rate_limited(daemon: DaemonProcess) -> int:
    match = re.search(
        r'^cim_messages_total\{outcome="rate_limited"\} (\S+)$', daemon.metrics(), re.M
    )
    return int(float(match.group(1))) if match else 0


def finished(process: subprocess.Popen[str]) -> tuple[str, str]:
    try:
        return process.communicate(timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


class LimitsDaemonTests(TestCase):
    timeout = 180

    def start_daemon(self, limits: str) -> DaemonProcess:
        daemon = DaemonProcess(os.path.abspath(self.mktemp()), extra=limits)
        for user in ("alice", "bob"):
            added = daemon.cimctl("user", "add", user, stdin=PASSWORD + "\n")
            self.assertEqual(added.returncode, 0, added.stderr)
        daemon.start()
        self.addCleanup(daemon.stop)
        return daemon

    async def sender(self, daemon: DaemonProcess) -> ChatClient:
        alice = library_client(daemon, "alice")
        self.addCleanup(lambda: ensureDeferred(alice.stop(logout=False)))
        await alice.start(deadline=30)
        return alice

    def test_a_rate_limited_sender_delivers_everything_in_order(self) -> None:
        return ensureDeferred(self._rate_limited_in_order())

    async def _rate_limited_in_order(self) -> None:
        daemon = self.start_daemon("[limits]\nmessages = 10/s\nmessages_burst = 10\n")
        count = 60
        listener = client(
            daemon, "bob", "listen", "--count", str(count), "--timeout", "120", background=True
        )
        self.addCleanup(lambda: finished(listener))
        daemon.wait_connections(1)
        alice = await self.sender(daemon)
        started = time.monotonic()
        sends = [alice.send_text("bob", f"m{n:03d}") for n in range(count)]
        results = await DeferredList(sends)
        elapsed = time.monotonic() - started
        outcomes: list[DeliveryOutcome] = [result for _, result in results]
        self.assertEqual({o.status for o in outcomes}, {"delivered"})
        await eventually(lambda: listener.poll() is not None, 60, "listen to get them all")
        out, err = finished(listener)
        self.assertEqual(listener.returncode, 0, err)
        texts = [json.loads(line)["text"] for line in out.strip().splitlines()]
        self.assertEqual(texts, [f"m{n:03d}" for n in range(count)])
        refused = rate_limited(daemon)
        self.assertGreater(refused, 0)
        # 60 messages at 10/s with a burst of 10: about 5 s, not a burst.
        self.assertGreater(elapsed, 4.0)
        print(
            f"\n{count} messages at 10/s (burst 10): {refused} refusals RATE_LIMITED, "
            f"all delivered in order in {elapsed:.1f} s"
        )

    def test_cimctl_limits_raises_a_users_limit_on_the_running_node(self) -> None:
        return ensureDeferred(self._raised())

    async def _raised(self) -> None:
        daemon = self.start_daemon(
            "[limits]\nmessages = 2/s\nmessages_burst = 2\noverride_refresh = 1s\n"
        )
        bob = library_client(daemon, "bob")
        self.addCleanup(lambda: ensureDeferred(bob.stop(logout=False)))
        await bob.start(deadline=30)
        alice = await self.sender(daemon)
        await alice.send_text("bob", "warm-up")
        before = rate_limited(daemon)
        raised = daemon.cimctl(
            "limits", "alice", "--messages-per-second", "1000", "--burst", "1000"
        )
        self.assertEqual(raised.returncode, 0, raised.stderr)
        self.assertIn("1000/s", raised.stdout)
        await sleep(2.5)  # override_refresh = 1s
        results = await DeferredList([alice.send_text("bob", f"n{n}") for n in range(100)])
        self.assertEqual({result.status for _, result in results}, {"delivered"})
        self.assertEqual(rate_limited(daemon), before)  # none of the 100 was refused
        reset = daemon.cimctl("limits", "alice", "--reset", "--json")
        self.assertEqual(reset.returncode, 0, reset.stderr)
        own = [item["own"] for item in json.loads(reset.stdout)["items"]]
        self.assertEqual(own, [False] * len(own))
        await sleep(2.5)
        await DeferredList([alice.send_text("bob", f"o{n}") for n in range(10)])
        self.assertGreater(rate_limited(daemon), before)

    def test_the_poisoned_box(self) -> None:
        """Acceptance 1: 20 messages of 16,000 x U+1F4A3 (64 KB frames) to an offline
        user; the user logs in with `cim-client listen` and sees all 20 and a later
        ordinary one."""
        return ensureDeferred(self._poisoned_box())

    async def _poisoned_box(self) -> None:
        daemon = self.start_daemon("")
        alice = await self.sender(daemon)
        bomb = "\U0001f4a3" * 16_000
        outcomes = []
        for _ in range(20):
            outcomes.append(await alice.send_text("bob", bomb))
        outcomes.append(await alice.send_text("bob", "an ordinary one"))
        self.assertEqual([o.status for o in outcomes], ["stored"] * 21)
        started = time.monotonic()
        listened = await _run(client, daemon, "bob", "listen", "--count", "21", "--timeout", "60")
        elapsed = time.monotonic() - started
        self.assertEqual(listened.returncode, 0, listened.stderr)
        lines = [json.loads(line) for line in listened.stdout.strip().splitlines()]
        self.assertEqual([line["text"] for line in lines], [bomb] * 20 + ["an ordinary one"])
        self.assertEqual([line["msg_id"] for line in lines], [str(o.msg_id) for o in outcomes])
        self.assertNotIn("reconnect", listened.stderr)
        print(
            f"\npoisoned box: 21 messages (1.28 MB) shown by cim-client listen in {elapsed:.1f} s"
        )


async def sleep(seconds: float) -> None:
    from twisted.internet.task import deferLater

    await deferLater(reactor, seconds, lambda: None)


async def _run(function: Any, *args: Any) -> Any:
    from twisted.internet.threads import deferToThread

    return await deferToThread(function, *args)
