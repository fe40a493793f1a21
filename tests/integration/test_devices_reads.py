"""Read receipts across several real devices of one user (#15 acceptance 3 and 8).

alice has a phone and a web device (two ``ChatClient`` sessions, the real library, the
real daemons), bob one device:

- alice reads on the phone: the web device's unread count for bob drops to 0 at once
  (it gets READ_N: the library's ``reads`` and ``on_read``), and bob sees "read up to
  n" (his ``on_read``, his ``reads.peer_read``);
- the web device, offline while she reads on the phone, shows 0 unread for bob in its
  summary at its next login, though messages came meanwhile;
- with alice's read receipts off (her privacy setting), her web device still syncs and
  bob hears nothing;
- acceptance 8: the same with alice's node killed between the steps: her devices log
  in again through the library and land on another node, bob's on a third, so her
  marks reach him over the bus (``tests.integration.support.devices.split_cluster``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from cim.history.store import direct_conversation
from cim.protocols import cim_pb2
from tests.integration.support.cluster import eventually, sleep
from tests.integration.support.daemons import PASSWORD, DaemonProcess
from tests.integration.support.devices import Device, moved, split_cluster

AB = direct_conversation("alice", "bob")


class ReadSteps(TestCase):
    """The steps, on whatever nodes the test gives them (no tests itself)."""

    async def bob_sends(self, bob: Device, texts: list[str], *alice: Device) -> int:
        """bob's texts reach every online device of alice; the conversation's newest seq."""
        before = {device: len(device.messages) for device in alice}
        for text in texts:
            outcome = await bob.client.send_text("alice", text)
            self.assertIn(outcome.status, ("delivered", "stored"), outcome)
        for device in alice:
            await device.has(before[device] + len(texts), f"bob's {texts}")
            self.assertEqual(device.texts()[before[device] :], texts)
        return max(m.seq for m in alice[0].messages if m.conversation == AB)

    async def read_on_the_phone(
        self, phone: Device, web: Device, bob: Device, receipts: bool = True
    ) -> int:
        """alice marks the conversation read on her phone; the web device's count drops
        at once; bob sees it (``receipts``) or nothing. Returns the mark."""
        newest = phone.client.reads.newest(AB)
        self.assertGreater(web.unread(AB), 0)  # there is something to drop
        web_heard, bob_heard = len(web.read_events), len(bob.read_events)
        bob_mark = bob.client.reads.peer_read(AB)
        answer = await phone.client.mark_read(AB)
        self.assertEqual((answer.conversation, answer.seq, answer.moved), (AB, newest, True))
        self.assertEqual(phone.unread(AB), 0)
        await eventually(lambda: len(web.read_events) > web_heard, 20, "READ_N on the web")
        [own] = web.read_events[web_heard:]
        self.assertEqual((own.reader, own.seq, own.own, own.unread), ("alice", newest, True, 0))
        self.assertEqual(web.unread(AB), 0)
        if receipts:
            await eventually(lambda: len(bob.read_events) > bob_heard, 20, "READ_N at bob's")
            [seen] = bob.read_events[bob_heard:]
            self.assertEqual(
                (seen.conversation, seen.reader, seen.seq, seen.own, seen.peer),
                (AB, "alice", newest, False, "alice"),
            )
            self.assertEqual(bob.client.reads.peer_read(AB), newest)
        else:
            # A READ_N would be at bob's before alice's next message is (one node), or
            # soon after (the bus): her message, then a while, and still none.
            outcome = await phone.client.send_text("bob", "after reading")
            self.assertEqual(outcome.status, "delivered", outcome)
            await eventually(lambda: bob.texts()[-1:] == ["after reading"], 20, "alice's")
            await sleep(1.0)
            self.assertEqual(bob.read_events[bob_heard:], [])
            self.assertEqual(bob.client.reads.peer_read(AB), bob_mark)
        return newest

    async def web_comes_back(
        self, web: Device, routers: list[str], mark: int, after: Sequence[str] = ()
    ) -> Device:
        """The web device, offline while alice read on the phone, logs in again: its
        summary shows nothing unread for bob but what came ``after`` the mark, and its
        library agrees (the read messages are in history, not pulled again)."""
        back = await Device(routers, "alice", web.name).start()
        [summary] = back.summaries
        counts = {entry.conversation: entry.count for entry in summary.conversations}
        self.assertEqual(counts.get(AB, 0), len(after), summary)
        self.assertEqual(summary.total, len(after), summary)
        self.assertEqual(back.client.reads.newest(AB), mark + len(after))  # it knows...
        self.assertEqual(back.unread(AB), len(after))  # ...which are read
        self.assertEqual(back.texts(), list(after))
        return back

    async def receipts_off(self, phone: Device, web: Device, bob: Device) -> None:
        """alice turns read receipts off: her devices still sync, bob hears nothing."""
        request = cim_pb2.ContactsRequest()
        request.settings.read_receipts = "off"
        answer = await phone.client.contacts_request(request)
        self.assertTrue(answer.ok, answer)
        self.assertEqual(answer.settings.read_receipts, "off")
        await self.bob_sends(bob, ["while she hides her reading"], phone, web)
        await self.read_on_the_phone(phone, web, bob, receipts=False)


class OneNodeTests(ReadSteps):
    timeout = 180

    def test_acceptance_3(self) -> None:
        return ensureDeferred(self._three())

    async def _three(self) -> None:
        daemon = DaemonProcess(os.path.abspath(self.mktemp()))
        for user in ("alice", "bob"):
            added = daemon.cimctl("user", "add", user, stdin=PASSWORD + "\n")
            self.assertEqual(added.returncode, 0, added.stderr)
        daemon.start()
        self.addCleanup(daemon.stop)
        routers = [daemon.router_url]
        phone = await Device(routers, "alice", "phone").start()
        web = await Device(routers, "alice", "web").start()
        bob = await Device(routers, "bob", "phone").start()
        laptop = await Device(routers, "bob", "laptop").start()
        for device in (phone, web, bob, laptop):
            self.addCleanup(device.stop)

        await self.bob_sends(bob, ["one", "two", "three"], phone, web)
        self.assertEqual((phone.unread(AB), web.unread(AB)), (3, 3))
        await self.read_on_the_phone(phone, web, bob)
        # Every device of bob's sees it, not only the one that wrote.
        await eventually(lambda: laptop.client.reads.peer_read(AB) == 3, 20, "the laptop's ✓✓")
        self.assertEqual([(e.reader, e.seq) for e in laptop.read_events], [("alice", 3)])

        # The web device is away while two more come and alice reads them on the phone;
        # bob's laptop is away too: it finds her mark at its next login (stored).
        await web.stop()
        await laptop.stop()
        await self.bob_sends(bob, ["four", "five"], phone)
        mark = await self.read_on_the_phone_alone(phone, bob)
        await self.bob_sends(bob, ["six"], phone)  # after her mark: unread on the web
        web = await self.web_comes_back(web, routers, mark, ["six"])
        self.addCleanup(web.stop)
        laptop = await Device(routers, "bob", "laptop").start()
        self.addCleanup(laptop.stop)
        self.assertEqual(laptop.client.reads.peer_read(AB), mark)

        heard = len(laptop.read_events)
        await self.receipts_off(phone, web, bob)
        self.assertEqual(laptop.read_events[heard:], [])

    async def read_on_the_phone_alone(self, phone: Device, bob: Device) -> int:
        heard = len(bob.read_events)
        answer = await phone.client.mark_read(AB)
        await eventually(lambda: len(bob.read_events) > heard, 20, "READ_N at bob's")
        self.assertEqual(bob.read_events[-1].seq, answer.seq)
        return int(answer.seq)


class CrossNodeTests(ReadSteps):
    timeout = 300

    def test_acceptance_8_reads_with_alice_moved(self) -> None:
        return ensureDeferred(self._moving())

    async def _moving(self) -> None:
        split = split_cluster(self)
        routers = split.routers(split.home)
        phone = await Device(routers, "alice", "phone").start()
        web = await Device(routers, "alice", "web").start()
        bob = await Device(routers, "bob", "phone").start()
        for device in (phone, web, bob):
            self.addCleanup(device.stop)
        await moved(phone, split.home, 5)

        await self.bob_sends(bob, ["one", "two"], phone, web)
        self.assertEqual(web.unread(AB), 2)
        # Between the steps: the web device goes away, the node dies; alice's phone
        # logs in again by itself and lands on her next node, bob's on another.
        await web.stop()
        split.home.kill()
        await moved(phone, split.alice_next)
        await moved(bob, split.bob_next)
        heard = len(bob.read_events)
        answer = await phone.client.mark_read(AB)
        self.assertEqual(answer.seq, 2)
        await eventually(lambda: len(bob.read_events) > heard, 30, "READ_N at bob's")
        self.assertEqual((bob.read_events[-1].seq, bob.client.reads.peer_read(AB)), (2, 2))
        web = await self.web_comes_back(web, routers, 2)
        self.addCleanup(web.stop)
        await moved(web, split.alice_next, 5)

        # Both of alice's devices on her new node, bob on his: the live steps again.
        await self.bob_sends(bob, ["three", "four"], phone, web)
        await self.read_on_the_phone(phone, web, bob)
        await self.receipts_off(phone, web, bob)
