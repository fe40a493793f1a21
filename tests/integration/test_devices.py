"""Many devices per user (issue #15) with real daemons.

- Acceptance 1: alice on a phone and a web device, bob on one device: bob's message
  reaches both of alice's devices once; alice answers from the phone and her web device
  shows the answer as hers; bob hears one "delivered" per message.
- Acceptance 2: alice's web device offline while 100 messages arrive catches up exactly
  those 100, in order, each once; a third device logged in for the first time shows none
  of them as unread and pages back to them.
- Acceptance 7: six devices of one user: with kick_old the one idle longest is ended
  with KICKED TOO_MANY_DEVICES; with refuse_new the sixth login is refused (HTTP 409).
- Acceptance 8: 1 and 2 across nodes: alice's node is killed between the steps, her
  devices log in again on the other node and carry on from their cursors.

The devices are driven frame by frame (tests.integration.support.frames): a device
acknowledges what the test says it showed, with ``through_seq`` as the library does.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from cim.history.store import direct_conversation
from cim.protocols import cim_pb2
from cim.ring import HashRing
from tests.integration.support.cluster import (
    Cluster,
    eventually,
    own_prefix_where,
    ring_of,
    sleep,
)
from tests.integration.support.daemons import PASSWORD, DaemonProcess, client
from tests.integration.support.frames import FrameClient, connect
from tests.integration.test_reliability import shared_broker

BURST = 100


def show(device: FrameClient, messages: list[cim_pb2.Message]) -> None:
    """What a device does with live copies it showed: ack:R each, cursor through it."""
    for message in messages:
        device.send(
            cim_pb2.ACK_R,
            cim_pb2.AckR(
                msg_id=message.id, conversation=message.conversation, through_seq=message.seq
            ),
        )


def alice_and_bob_together(ring: HashRing) -> bool:
    return ring.node_for("alice") == ring.node_for("bob")


def resumed(old: FrameClient, new: FrameClient) -> FrameClient:
    """The same device connected again: its client sequence goes on (as the client
    library's outbox does), or its next message would be taken for a resend."""
    new._next_seq = old._next_seq
    return new


def texts(device: FrameClient) -> list[tuple[str, str]]:
    return [(getattr(m, "from"), m.text) for m in device.live()]


def statuses(device: FrameClient) -> list[int]:
    return [ack.status for ack in device.of_type(cim_pb2.ACK_N)]


class DeviceSteps(TestCase):
    """The acceptance steps, on whatever nodes the test gives them (no tests itself)."""

    async def step_1(
        self,
        phone: FrameClient,
        web: FrameClient,
        bob: FrameClient,
        round_: int,
    ) -> None:
        """Acceptance 1 (``round_`` numbers the texts, so steps can be repeated)."""
        asked = f"question {round_}"
        answered = f"answer {round_}"
        before = {d: len(d.live()) for d in (phone, web, bob)}
        bob_acks, phone_acks = len(statuses(bob)), len(statuses(phone))
        bob.post(asked, to=phone.user)

        def arrived() -> bool:
            return len(phone.live()) > before[phone] and len(web.live()) > before[web]

        await eventually(arrived, 30, "bob's message on both of alice's devices")
        for device in (phone, web):
            new = device.live()[before[device] :]
            self.assertEqual([(getattr(m, "from"), m.text) for m in new], [("bob", asked)])
            show(device, new)
        await eventually(lambda: len(statuses(bob)) > bob_acks, 30, "bob's ack:N")
        phone.post(answered, to="bob")
        await eventually(lambda: len(web.live()) > before[web] + 1, 30, "the answer on the web")
        await eventually(lambda: len(bob.live()) > before[bob], 30, "the answer at bob's")
        mine = web.live()[before[web] + 1 :]
        self.assertEqual(
            [(getattr(m, "from"), m.to, m.text) for m in mine], [("alice", "bob", answered)]
        )
        [taken] = [a for a in phone.of_type(cim_pb2.MSG_A) if a.seq == mine[0].seq]
        self.assertEqual((mine[0].id, mine[0].device), (taken.msg_id, phone.device))
        show(web, mine)
        show(bob, bob.live()[before[bob] :])
        self.assertEqual(texts(bob)[before[bob] :], [("alice", answered)])
        await eventually(lambda: len(statuses(phone)) > phone_acks, 30, "alice's ack:N")
        await sleep(0.5)  # a second ack:N would have come by now
        self.assertEqual(statuses(bob)[bob_acks:], [cim_pb2.DELIVERED])
        self.assertEqual(statuses(phone)[phone_acks:], [cim_pb2.DELIVERED])
        self.assertEqual(len(phone.live()), before[phone] + 1)  # not handed back

    async def burst(self, phone: FrameClient, bob: FrameClient) -> list[int]:
        """bob sends BURST messages while the web device is away; the phone shows them
        (live, or from its catch-up when a live copy could not go: a live copy is best
        effort, the timeline is not). Returns their ids in seq order."""
        outcomes, taken = len(statuses(bob)), len(bob.of_type(cim_pb2.MSG_A))
        start = len(phone.live())
        for n in range(BURST):
            bob.post(f"burst {n}", to="alice")
        await eventually(lambda: len(statuses(bob)) == outcomes + BURST, 60, "the outcomes")
        answers = sorted(bob.of_type(cim_pb2.MSG_A)[taken:], key=lambda a: a.seq)
        self.assertEqual(len(answers), BURST)
        show(phone, phone.live()[start:])
        pulled = await phone.pull()
        if pulled:
            await phone.acknowledge(pulled)
        shown = {m.id for m in phone.live()[start:]} | {m.id for m in pulled}
        self.assertEqual(shown, {a.msg_id for a in answers})
        return [a.msg_id for a in answers]

    async def step_2_catch_up(self, web: FrameClient, burst: list[int]) -> None:
        """The web device is back: exactly the burst, in order, each once."""
        summary = await web.summary()
        self.assertEqual(summary.total, BURST)
        pulled = await web.pull()
        ordered = sorted(pulled, key=lambda m: m.seq)
        self.assertEqual([m.id for m in ordered], burst)
        self.assertEqual([m.text for m in ordered], [f"burst {n}" for n in range(BURST)])
        self.assertEqual(len({m.id for m in pulled}), BURST)
        self.assertEqual(await web.acknowledge(pulled), 1)
        self.assertEqual((await web.summary()).total, 0)

    async def step_2_new_device(self, pad: FrameClient, burst: list[int]) -> None:
        """A device new to the account: nothing unread, and the burst in its history."""
        summary = await pad.summary()
        self.assertEqual((summary.total, list(summary.conversations)), (0, []))
        self.assertEqual(await pad.pull(), [])
        seen: list[int] = []
        before = 0
        for request_id in range(1, 20):
            pad.send(
                cim_pb2.HISTORY_R,
                cim_pb2.HistoryR(peer="bob", before=before, limit=50, request_id=request_id),
            )
            page = await pad.answer(cim_pb2.HISTORY_A, request_id)
            self.assertEqual(page.error, "")
            seen.extend(m.id for m in page.messages)
            if not page.more:
                break
            before = page.next_before
        self.assertTrue(set(burst) <= set(seen))


class OneNodeTests(DeviceSteps):
    timeout = 240

    def daemon(self, extra: str = "") -> DaemonProcess:
        daemon = DaemonProcess(os.path.abspath(self.mktemp()), extra=extra)
        for user in ("alice", "bob"):
            added = daemon.cimctl("user", "add", user, stdin=PASSWORD + "\n")
            self.assertEqual(added.returncode, 0, added.stderr)
        daemon.start()
        self.addCleanup(daemon.stop)
        return daemon

    def test_acceptance_1_and_2(self) -> None:
        return ensureDeferred(self._one_and_two())

    async def _one_and_two(self) -> None:
        daemon = self.daemon()
        phone = await connect(daemon, "alice", "phone")
        web = await connect(daemon, "alice", "web")
        bob = await connect(daemon, "bob", "phone")
        for device in (phone, web, bob):
            await device.summary()  # enrolled: known to the account
        await self.step_1(phone, web, bob, 1)
        # cim-client devices lists both of alice's devices (and itself, a third).
        listed = client(daemon, "alice", "--device", "cli", "devices")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        names = [entry["device"] for entry in json.loads(listed.stdout)["items"]]
        self.assertEqual(names, ["cli", "phone", "web"])
        await sleep(1.0)  # the web device's cursor moves are written
        web.drop()
        await eventually(lambda: web.closed, 10, "the web device's drop")
        burst = await self.burst(phone, bob)
        web = await connect(daemon, "alice", "web")
        await self.step_2_catch_up(web, burst)
        pad = await connect(daemon, "alice", "pad")
        await self.step_2_new_device(pad, burst)
        # cimctl sees the devices and kicks one of them; the others stay.
        online = json.loads(daemon.cimctl("online", "--json").stdout)
        self.assertEqual(online["devices"]["alice"], ["pad", "phone", "web"])
        self.assertIn("alice  (pad, phone, web)", daemon.cimctl("online").stdout.splitlines())
        kicked = daemon.cimctl("kick", "alice", "--device", "pad")
        self.assertEqual(kicked.returncode, 0, kicked.stderr)
        self.assertIn("kicked alice on pad", kicked.stdout)
        await eventually(lambda: pad.closed, 20, "the pad's end")
        [notice] = pad.of_type(cim_pb2.KICKED)
        self.assertEqual(notice.code, cim_pb2.Kicked.BY_ADMIN)
        self.assertFalse(phone.closed or web.closed)

    def test_acceptance_7_kick_old(self) -> None:
        return ensureDeferred(self._kick_old())

    async def _kick_old(self) -> None:
        daemon = self.daemon("[router]\nduplicate_login = kick_old\n")
        devices = [await connect(daemon, "alice", f"d{n}") for n in range(5)]
        await sleep(0.2)
        # The oldest speaks last: the second one is idle longest.
        await devices[0].summary()
        sixth = await connect(daemon, "alice", "d5")
        await eventually(lambda: devices[1].closed, 20, "the idle one's end")
        [kicked] = devices[1].of_type(cim_pb2.KICKED)
        self.assertEqual(kicked.code, cim_pb2.Kicked.TOO_MANY_DEVICES)
        self.assertIn("idle longest", kicked.reason)
        await sleep(0.5)
        for other in devices[:1] + devices[2:] + [sixth]:
            self.assertFalse(other.closed)
            self.assertEqual(other.of_type(cim_pb2.KICKED), [])

    def test_acceptance_7_refuse_new(self) -> None:
        return ensureDeferred(self._refuse_new())

    async def _refuse_new(self) -> None:
        daemon = self.daemon("[router]\nduplicate_login = refuse_new\n")
        devices = [await connect(daemon, "alice", f"d{n}") for n in range(5)]
        daemon.wait_connections(5)
        body = json.dumps({"user": "alice", "password": PASSWORD, "device": "d5"}).encode()
        request = urllib.request.Request(
            f"{daemon.router_url}/api/v1/login",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with self.assertRaises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(request, timeout=10)
        self.assertEqual(raised.exception.code, 409)
        refusal = json.loads(raised.exception.read())
        self.assertEqual(refusal["error"], "too_many_devices")
        self.assertIn("5 devices", refusal["message"])
        # The command line says it clearly too.
        refused = client(daemon, "alice", "--device", "d5", "online")
        self.assertNotEqual(refused.returncode, 0)
        self.assertIn("5 devices", refused.stderr)
        for device in devices:
            self.assertFalse(device.closed)


class CrossNodeTests(DeviceSteps):
    timeout = 300

    def test_acceptance_8_alice_moves_between_the_steps(self) -> None:
        return ensureDeferred(self._moving())

    async def _moving(self) -> None:
        # Node ids of this cluster's own (queues are named by them on the shared
        # broker), placing alice and bob together as node1 and node2 did: both move.
        prefix = own_prefix_where("d", 2, alice_and_bob_together)
        cluster = Cluster(self, count=2, amqp_url=shared_broker(self), prefix=prefix)
        cluster.start(["alice", "bob", "carol", "dave"])
        ring = ring_of(cluster.nodes)
        home = cluster.by_id(ring.node_for("alice").node_id)  # type: ignore[union-attr]
        other = next(node for node in cluster.nodes if node is not home)
        phone = await connect(other, "alice", "phone")
        web = await connect(other, "alice", "web")
        bob = await connect(other, "bob", "phone", on=None)
        for device in (phone, web, bob):
            await device.summary()
        await self.step_1(phone, web, bob, 1)
        await sleep(1.0)  # the cursor moves are written
        # alice's node dies; her devices log in again and land on the other node.
        web.drop()
        home.kill()
        if ring.node_for("bob").node_id == home.node_id:  # type: ignore[union-attr]
            bob = resumed(bob, await connect(other, "bob", "phone", on=other.node_id))
        phone = resumed(phone, await connect(other, "alice", "phone", on=other.node_id))
        await eventually(
            lambda: other.online()["devices"].get("alice") == ["phone"], 30, "alice's route"
        )
        burst = await self.burst(phone, bob)
        web = await connect(other, "alice", "web", on=other.node_id)
        await self.step_2_catch_up(web, burst)
        await self.step_1(phone, web, bob, 2)
        await self.step_2_new_device(await connect(other, "alice", "pad", on=other.node_id), burst)
        conversation = direct_conversation("alice", "bob")
        self.assertTrue(all(m.conversation == conversation for m in web.live()))
