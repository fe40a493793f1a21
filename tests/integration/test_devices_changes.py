"""Recall and edit across several real devices of both users (#15 acceptance 4 and 8).

alice has a phone and a web device, bob a phone and a laptop (``ChatClient`` sessions,
the real library, real daemons). What each device shows is the library's own state:
``corrections`` (the messages handed over, with their recalls and edits applied) and
the ``on_change`` events.

- A recall inside ``[im] recall_window`` removes the message from every device of both
  users: live on the devices online (alice's other device among them, whichever of her
  devices recalls it), and at the next catch-up of a device that was offline then
  (alice's web, bob's laptop), where no copy with the content comes any more.
- An edit inside ``[im] edit_window`` likewise.
- bob cannot recall or edit alice's message (not_yours); past the windows (4 s here,
  waited out with a bounded wait) alice cannot either, from any device (too_late), and
  nothing changes.
- Acceptance 8: the same with alice's node killed between the message and its change:
  her devices land on another node, bob's on a third, so the changes reach him over
  the bus (``tests.integration.support.devices.split_cluster``).
"""

from __future__ import annotations

import os
import time

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from cim.client.answers import RequestRefused
from cim.history.store import direct_conversation
from tests.integration.support.cluster import eventually, sleep
from tests.integration.support.daemons import PASSWORD, DaemonProcess
from tests.integration.support.devices import Device, moved, split_cluster

AB = direct_conversation("alice", "bob")
WINDOW = 4.0


def windows(seconds: float) -> str:
    return f"[im]\nrecall_window = {seconds:g}s\nedit_window = {seconds:g}s\n"


class ChangeSteps(TestCase):
    """The steps, on whatever nodes the test gives them (no tests itself)."""

    async def alice_sends(self, sender: Device, text: str, *others: Device) -> int:
        """alice's text from ``sender`` reaches ``others`` (her other devices show it as
        hers, bob's as hers to them); its id."""
        before = {device: len(device.messages) for device in others}
        outcome = await sender.client.send_text("bob", text)
        self.assertEqual(outcome.status, "delivered", outcome)
        for device in others:
            await device.has(before[device] + 1, repr(text))
            [got] = device.messages[before[device] :]
            self.assertEqual(
                (got.id, getattr(got, "from"), got.text), (outcome.msg_id, "alice", text)
            )
        return outcome.msg_id

    async def recalled_live(self, msg_id: int, by: Device, *others: Device) -> None:
        change = await by.client.recall(msg_id)
        self.assertEqual((change.event, change.msg_id, change.by), ("recall", msg_id, "alice"))
        for device in others:
            await eventually(lambda d=device: d.changes_of(msg_id) == ["recall"], 20, f"{device}")
            shown = device.shown(msg_id)
            assert shown is not None, device
            self.assertTrue(shown.recalled, device)
            self.assertEqual(shown.text, "", device)

    async def edited_live(self, msg_id: int, text: str, by: Device, *others: Device) -> None:
        change = await by.client.edit(msg_id, text)
        self.assertEqual((change.event, change.text), ("edit", text))
        for device in others:
            await eventually(lambda d=device: d.changes_of(msg_id) == ["edit"], 20, f"{device}")
            [edit] = [c for c in device.changes if c.msg_id == msg_id]
            self.assertEqual(edit.text, text)
            shown = device.shown(msg_id)
            assert shown is not None, device
            self.assertEqual((shown.text, shown.edited), (text, True), device)

    def caught_up(self, device: Device, recalled: int, edited: int, text: str) -> None:
        """What a device offline during the changes shows after its catch-up: the
        recall and the edit (as changes, or already applied to a copy it was handed),
        and no copy with the recalled content."""
        for message in device.messages:
            if message.id == recalled:
                self.assertTrue(message.recalled, device)
                self.assertEqual(message.text, "", device)
            if message.id == edited:
                self.assertEqual(message.text, text, device)
        self.assertIn("recall", device.changes_of(recalled) + self.flags(device, recalled))
        self.assertIn("edit", device.changes_of(edited) + self.flags(device, edited))
        if device.shown(recalled) is not None:
            self.assertTrue(device.shown(recalled).recalled)  # type: ignore[union-attr]
        if device.shown(edited) is not None:
            self.assertEqual(device.shown(edited).text, text)  # type: ignore[union-attr]

    @staticmethod
    def flags(device: Device, msg_id: int) -> list[str]:
        """ "recall"/"edit" when a copy handed over already read as changed."""
        found = []
        for message in device.messages:
            if message.id == msg_id and message.recalled:
                found.append("recall")
            if message.id == msg_id and message.edited:
                found.append("edit")
        return found

    async def refused(self, call: object, reason: str) -> None:
        with self.assertRaises(RequestRefused) as raised:
            await call  # type: ignore[misc]
        self.assertEqual(raised.exception.reason, reason)

    async def nothing_changed(self, devices: list[Device], counts: list[int]) -> None:
        await sleep(1.0)  # a change would have come by now
        self.assertEqual([len(d.changes) for d in devices], counts)


class OneNodeTests(ChangeSteps):
    timeout = 180

    def test_acceptance_4(self) -> None:
        return ensureDeferred(self._four())

    async def _four(self) -> None:
        daemon = DaemonProcess(os.path.abspath(self.mktemp()), extra=windows(WINDOW))
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

        # Live: recalled on the phone, gone from her web and both of bob's devices;
        # recalled on the web, gone from her phone (the sender) too.
        secret = await self.alice_sends(phone, "a secret", web, bob, laptop)
        await self.recalled_live(secret, phone, web, bob, laptop)
        # Gone for every device of hers: her web device cannot recall or edit it again.
        await self.refused(web.client.recall(secret), "recalled")
        await self.refused(web.client.edit(secret, "back"), "recalled")
        oops = await self.alice_sends(phone, "oops", web, bob, laptop)
        await self.recalled_live(oops, web, bob, laptop)
        await eventually(lambda: phone.changes_of(oops) == ["recall"], 20, "the phone's recall")
        typo = await self.alice_sends(phone, "teh", web, bob, laptop)
        await self.edited_live(typo, "the", phone, web, bob, laptop)

        # At catch-up: alice's web and bob's laptop are away while she recalls one and
        # edits another, and sends a third and recalls it before they could see it.
        hidden = await self.alice_sends(phone, "hidden", web, bob, laptop)
        fixed = await self.alice_sends(phone, "fixd", web, bob, laptop)
        await web.stop()
        await laptop.stop()
        await self.recalled_live(hidden, phone, bob)
        await self.edited_live(fixed, "fixed", phone, bob)
        unseen = await self.alice_sends(phone, "never seen", bob)
        taken = time.monotonic()  # the node took it before this: its windows end by +4 s
        await self.recalled_live(unseen, phone, bob)
        rewritten = await self.alice_sends(phone, "nevr", bob)
        await self.edited_live(rewritten, "never", phone, bob)
        web = await Device(routers, "alice", "web").start()
        laptop = await Device(routers, "bob", "laptop").start()
        for device in (web, laptop):
            self.addCleanup(device.stop)
            self.caught_up(device, hidden, fixed, "fixed")
            self.assertNotIn("never seen", device.texts())
            [copy] = [m for m in device.messages if m.id == unseen]  # shown as recalled
            self.assertTrue(copy.recalled)
            [copy] = [m for m in device.messages if m.id == rewritten]  # shown as edited
            self.assertEqual((copy.text, copy.edited), ("never", True))
            self.assertNotIn("hidden", device.texts())
        page = await bob.client.history("alice")
        texts = {m.id: m.text for m in page.messages if not m.change}
        self.assertEqual((texts[hidden], texts[unseen], texts[fixed]), ("", "", "fixed"))

        # Refused, from every device, and nothing changes: bob's words on alice's
        # message; alice's past the windows.
        counts = [len(d.changes) for d in (phone, web, bob, laptop)]
        await self.refused(bob.client.recall(typo), "not_yours")
        await self.refused(laptop.client.edit(typo, "bob's words"), "not_yours")
        past = taken + WINDOW + 1 - time.monotonic()
        if past > 0:
            await sleep(past)  # until the windows of "never seen" and older have passed
        await self.refused(phone.client.recall(fixed), "too_late")
        await self.refused(web.client.recall(typo), "too_late")
        await self.refused(phone.client.edit(fixed, "too late"), "too_late")
        await self.refused(web.client.edit(typo, "too late"), "too_late")
        await self.nothing_changed([phone, web, bob, laptop], counts)
        # The device that made a change was told by its answer, not again as news.
        self.assertEqual(phone.changes_of(secret) + phone.changes_of(typo), [])
        page = await bob.client.history("alice")
        texts = {m.id: m.text for m in page.messages if not m.change}
        self.assertEqual((texts[typo], texts[fixed]), ("the", "fixed"))


class CrossNodeTests(ChangeSteps):
    timeout = 300

    def test_acceptance_8_changes_with_alice_moved(self) -> None:
        return ensureDeferred(self._moving())

    async def _moving(self) -> None:
        # Windows long enough for the move (a dead node's routes expire first).
        split = split_cluster(self, extra=windows(120))
        routers = split.routers(split.home)
        phone = await Device(routers, "alice", "phone").start()
        web = await Device(routers, "alice", "web").start()
        bob = await Device(routers, "bob", "phone").start()
        for device in (phone, web, bob):
            self.addCleanup(device.stop)
        await moved(phone, split.home, 5)

        # Sent on the home node; alice's web device goes away, the node dies; her phone
        # lands on her next node, bob's on another.
        secret = await self.alice_sends(phone, "a secret", web, bob)
        typo = await self.alice_sends(phone, "teh", web, bob)
        gone = await self.alice_sends(web, "on the web", phone, bob)
        await web.stop()
        split.home.kill()
        await moved(phone, split.alice_next)
        await moved(bob, split.bob_next)
        # Changed on alice's new node: live at bob's (over the bus), at the web's
        # catch-up.
        await self.recalled_live(secret, phone, bob)
        await self.edited_live(typo, "the", phone, bob)
        web = await Device(routers, "alice", "web").start()
        self.addCleanup(web.stop)
        await moved(web, split.alice_next, 5)
        self.caught_up(web, secret, typo, "the")
        # The web device, on the new node, recalls what it sent from the old one: live
        # on her phone and at bob's.
        await self.recalled_live(gone, web, bob)
        await eventually(lambda: phone.changes_of(gone) == ["recall"], 20, "the phone's recall")
        counts = [len(d.changes) for d in (phone, web, bob)]
        await self.refused(bob.client.recall(typo), "not_yours")
        await self.refused(bob.client.edit(typo, "bob's words"), "not_yours")
        await self.nothing_changed([phone, web, bob], counts)
