"""Many devices per user (issue #15) on the node: sessions per device, the limit and
its policies, every device in sync, new devices at the present. In memory, on a fake
clock (the end to end versions are tests/integration/test_devices.py)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from cim.backends.state import token_hash
from cim.im.collaborators import Bounds, Connected
from cim.interfaces import AlreadyLoggedIn, SessionRecord
from cim.protocols import cim_pb2
from tests.fakes.node import ConnectedClient, NodeHarness
from tests.unit.test_delivery import FakeGroups, cluster, settle


def sent(client: ConnectedClient, to: str, text: str, seq: int, group: str = "") -> None:
    message = cim_pb2.Message(to=to, group=group, text=text, client_seq=seq)
    client.protocol.send(cim_pb2.MSG_R, message)


def texts(client: ConnectedClient) -> list[tuple[str, str]]:
    return [(getattr(m, "from"), m.text) for m in client.events.of_type(cim_pb2.MSG_N)]


class _Session:
    """Just what Connected reads of a session."""

    def __init__(self, user: str, device: str) -> None:
        self.record = SessionRecord("s-" + device, user, device, "n1", 0.0, 1.0)


class ConnectedTests(SynchronousTestCase):
    def test_user_to_devices(self) -> None:
        connected = Connected()
        phone, web, again = (
            _Session("alice", "phone"),
            _Session("alice", "web"),
            _Session("alice", "phone"),
        )
        self.assertIsNone(connected.add(phone))  # type: ignore[arg-type]
        self.assertIsNone(connected.add(web))  # type: ignore[arg-type]
        self.assertIn("alice", connected)
        self.assertNotIn("bob", connected)
        self.assertEqual(connected.devices_of("alice"), [phone, web])
        self.assertEqual(connected.devices_of("bob"), [])
        self.assertEqual(list(connected.other_devices("alice", "phone")), [web])
        self.assertEqual(list(connected.other_devices("alice", "watch")), [phone, web])
        self.assertEqual(list(connected.other_devices("bob", "phone")), [])
        self.assertIs(connected.add(again), phone)  # type: ignore[arg-type]
        self.assertIs(connected.session_of("alice", "phone"), again)
        self.assertEqual((len(connected), connected.user_count), (2, 1))
        self.assertFalse(connected.remove(phone))  # type: ignore[arg-type]  # replaced already
        self.assertTrue(connected.remove(again))  # type: ignore[arg-type]
        self.assertEqual(list(connected.other_devices("alice", "web")), [])  # only that one
        self.assertTrue(connected.remove(web))  # type: ignore[arg-type]
        self.assertNotIn("alice", connected)
        self.assertEqual((len(connected), connected.users()), (0, []))

    def test_one_device_is_the_session_itself_and_more_a_dict(self) -> None:
        """A user on one device maps to the session, not a dict of one (issue #20's idle
        memory); from the second device on to a dict in connecting order, and back."""
        connected: Connected = Connected()
        phone, web, tab, bob = (
            _Session("alice", "phone"),
            _Session("alice", "web"),
            _Session("alice", "tab"),
            _Session("bob", "phone"),
        )
        forms = connected._by_user
        for session in (phone, bob):
            connected.add(session)  # type: ignore[arg-type]
        self.assertIs(forms["alice"], phone)
        self.assertIsNone(connected.session_of("alice", "web"))
        self.assertIs(connected.session_of("alice", "phone"), phone)
        self.assertFalse(connected.remove(_Session("alice", "web")))  # type: ignore[arg-type]
        self.assertFalse(connected.remove(_Session("alice", "phone")))  # type: ignore[arg-type]
        connected.add(web)  # type: ignore[arg-type]
        connected.add(tab)  # type: ignore[arg-type]
        self.assertEqual(forms["alice"], {"phone": phone, "web": web, "tab": tab})
        self.assertEqual(
            connected.devices_of_all(["bob", "carol", "alice"]), [bob, phone, web, tab]
        )
        self.assertEqual(list(connected.sessions()), [phone, web, tab, bob])
        self.assertTrue(connected.remove(web))  # type: ignore[arg-type]
        self.assertEqual(connected.devices_of("alice"), [phone, tab])
        self.assertTrue(connected.remove(phone))  # type: ignore[arg-type]
        self.assertIs(forms["alice"], tab)
        self.assertEqual(list(connected.other_devices("alice", "phone")), [tab])
        again = _Session("alice", "tab")
        self.assertIs(connected.add(again), tab)  # type: ignore[arg-type]
        self.assertIs(forms["alice"], again)
        self.assertEqual((len(connected), connected.user_count), (2, 2))
        self.assertTrue(connected.remove(again))  # type: ignore[arg-type]
        self.assertEqual(connected.users(), ["bob"])


class EveryDeviceInSyncTests(SynchronousTestCase):
    def test_acceptance_1_phone_and_web_with_bob(self) -> None:
        """bob's message reaches both of alice's devices once; alice answers from the
        phone and the web shows it as hers; bob hears one DELIVERED per message."""
        node = NodeHarness()
        phone = node.connect("alice", device="phone", auto_ack=True)
        web = node.connect("alice", device="web", auto_ack=True)
        bob = node.connect("bob", device="phone", auto_ack=True)
        settle(node)
        sent(bob, "alice", "hi alice", 1)
        settle(node)
        self.assertEqual(texts(phone), [("bob", "hi alice")])
        self.assertEqual(texts(web), [("bob", "hi alice")])
        sent(phone, "bob", "hi bob", 1)
        settle(node)
        self.assertEqual(texts(bob), [("alice", "hi bob")])
        self.assertEqual(texts(web), [("bob", "hi alice"), ("alice", "hi bob")])
        [answer] = [m for m in web.events.of_type(cim_pb2.MSG_N) if m.text == "hi bob"]
        [taken] = phone.events.of_type(cim_pb2.MSG_A)
        self.assertEqual((answer.id, answer.device, answer.to), (taken.msg_id, "phone", "bob"))
        self.assertEqual(texts(phone), [("bob", "hi alice")])  # not handed back
        [ack] = bob.events.of_type(cim_pb2.ACK_N)
        self.assertEqual(ack.status, cim_pb2.DELIVERED)
        [ack] = phone.events.of_type(cim_pb2.ACK_N)
        self.assertEqual(ack.status, cim_pb2.DELIVERED)
        self.assertEqual(web.events.of_type(cim_pb2.ACK_N), [])  # the sender's device only

    def test_one_device_acknowledging_is_delivered_and_none_online_is_stored(self) -> None:
        node = NodeHarness(users=("alice",))
        bob = node.connect("bob")
        sent(bob, "alice", "nobody home", 1)
        settle(node)
        [stored] = bob.events.of_type(cim_pb2.ACK_N)
        self.assertEqual(stored.status, cim_pb2.STORED)
        node.connect("alice", device="phone")  # holds it, never acks
        web = node.connect("alice", device="web", auto_ack=True)
        sent(bob, "alice", "one of you", 2)
        settle(node)
        self.assertEqual(texts(web)[-1], ("bob", "one of you"))
        statuses = [a.status for a in bob.events.of_type(cim_pb2.ACK_N)]
        self.assertEqual(statuses, [cim_pb2.STORED, cim_pb2.DELIVERED])

    def test_stored_only_when_the_last_device_holding_it_leaves(self) -> None:
        node = NodeHarness()
        bob = node.connect("bob")
        phone = node.connect("alice", device="phone")
        web = node.connect("alice", device="web")
        sent(bob, "alice", "held", 1)
        settle(node)
        phone.protocol.transport.loseConnection()
        settle(node)
        self.assertEqual(bob.events.of_type(cim_pb2.ACK_N), [])  # the web still holds it
        web.protocol.transport.loseConnection()
        settle(node)
        [ack] = bob.events.of_type(cim_pb2.ACK_N)
        self.assertEqual(ack.status, cim_pb2.STORED)

    def test_group_posts_reach_every_device_and_the_senders_others(self) -> None:
        node = NodeHarness(groups=FakeGroups({"g1": ["alice", "bob"]}))
        phone = node.connect("alice", device="phone", auto_ack=True)
        web = node.connect("alice", device="web", auto_ack=True)
        bob_phone = node.connect("bob", device="phone", auto_ack=True)
        bob_pad = node.connect("bob", device="pad", auto_ack=True)
        settle(node)
        sent(phone, "", "hello group", 1, group="g1")
        settle(node)
        for device in (web, bob_phone, bob_pad):
            self.assertEqual(texts(device), [("alice", "hello group")])
        self.assertEqual(texts(phone), [])
        [accepted] = phone.events.of_type(cim_pb2.ACK_N)
        self.assertEqual(accepted.status, cim_pb2.ACCEPTED)

    def test_across_nodes_over_the_bus(self) -> None:
        one, two = cluster(FakeGroups({"g1": ["alice", "bob"]}))
        phone = two.connect("alice", device="phone", auto_ack=True)
        web = two.connect("alice", device="web", auto_ack=True)
        bob = one.connect("bob", auto_ack=True)
        settle(one, two)
        sent(bob, "alice", "over the bus", 1)
        sent(bob, "", "to the group", 2, group="g1")
        settle(one, two)
        for device in (phone, web):
            self.assertEqual(texts(device), [("bob", "over the bus"), ("bob", "to the group")])
        statuses = sorted(a.status for a in bob.events.of_type(cim_pb2.ACK_N))
        self.assertEqual(statuses, sorted([cim_pb2.DELIVERED, cim_pb2.ACCEPTED]))

    def test_devices_r_lists_the_users_devices(self) -> None:
        node = NodeHarness()
        phone = node.connect("alice", device="phone")
        node.connect("alice", device="web")
        node.connect("bob", device="pad")
        settle(node)
        phone.protocol.send(cim_pb2.DEVICES_R, cim_pb2.DevicesR(request_id=7))
        settle(node)
        [answer] = phone.events.of_type(cim_pb2.DEVICES_A)
        self.assertEqual(answer.request_id, 7)
        self.assertEqual(
            [(d.device, d.this_device) for d in answer.devices], [("phone", True), ("web", False)]
        )


class DeviceLimitTests(SynchronousTestCase):
    def test_acceptance_7_kick_old_ends_the_device_idle_longest(self) -> None:
        node = NodeHarness(policy="kick_old")
        devices = []
        for i in range(5):
            devices.append(node.connect("alice", device=f"d{i}"))
            node.clock.advance(1)
        settle(node)
        # d0 is the oldest, but it spoke last: d1 is the one idle longest.
        devices[0].protocol.send(cim_pb2.ONLINE_R, cim_pb2.OnlineR())
        settle(node)
        sixth = node.connect("alice", device="d5")
        settle(node)
        [kicked] = devices[1].events.of_type(cim_pb2.KICKED)
        self.assertEqual(kicked.code, cim_pb2.Kicked.TOO_MANY_DEVICES)
        self.assertIn("idle longest", kicked.reason)
        self.assertTrue(devices[1].server_transport.disconnecting)
        for other in devices[:1] + devices[2:] + [sixth]:
            self.assertEqual(other.events.of_type(cim_pb2.KICKED), [])
        self.assertEqual(node.im.sessions.connected_count, 5)
        # Its token is dead too: it cannot come back without logging in.
        record = self.successResultOf(
            node.state.sessions.session_for_token(token_hash(devices[1].token))
        )
        self.assertIsNone(record)

    def test_acceptance_7_refuse_new_refuses_the_sixth(self) -> None:
        node = NodeHarness(policy="refuse_new")
        for i in range(5):
            node.connect("alice", device=f"d{i}")
        settle(node)
        with self.assertRaises(AlreadyLoggedIn):
            node.login("alice", device="d5")
        self.assertEqual(node.im.sessions.connected_count, 5)

    def test_the_limit_is_configurable(self) -> None:
        node = NodeHarness(policy="kick_old", bounds=Bounds(max_devices_per_user=2))
        first = node.connect("alice", device="a")
        node.clock.advance(1)
        node.connect("alice", device="b")
        node.clock.advance(1)
        node.connect("alice", device="c")
        settle(node)
        [kicked] = first.events.of_type(cim_pb2.KICKED)
        self.assertEqual(kicked.code, cim_pb2.Kicked.TOO_MANY_DEVICES)


class NewDeviceTests(SynchronousTestCase):
    def test_acceptance_2_offline_device_catches_up_and_a_new_one_starts_now(self) -> None:
        node = NodeHarness()
        phone = node.connect("alice", device="phone", auto_ack=True)
        web = node.connect("alice", device="web", auto_ack=True)
        bob = node.connect("bob", auto_ack=True)
        sent(bob, "alice", "before", 1)
        settle(node)
        [before] = web.events.of_type(cim_pb2.MSG_N)
        ack = cim_pb2.AckR(msg_id=before.id, conversation=before.conversation, through_seq=1)
        web.protocol.send(cim_pb2.ACK_R, ack)
        settle(node)
        node.clock.advance(1)  # the cursor moves are batched
        web.protocol.transport.loseConnection()
        settle(node)
        for n in range(2, 12):
            sent(bob, "alice", f"m{n}", n)
        settle(node)
        self.assertEqual(len(texts(phone)), 11)
        # The web device's cursor is where it left: it pulls exactly the ten.
        web = node.connect("alice", device="web")
        web.protocol.send(cim_pb2.OFFLINE_SUMMARY_R, cim_pb2.OfflineSummaryR(request_id=1))
        web.protocol.send(cim_pb2.OFFLINE_R, cim_pb2.OfflineR(request_id=2, limit=100))
        settle(node)
        [summary] = web.events.of_type(cim_pb2.OFFLINE_SUMMARY_A)
        self.assertEqual(summary.total, 10)
        [page] = web.events.of_type(cim_pb2.OFFLINE_A)
        self.assertEqual([m.text for m in reversed(page.messages)], [f"m{n}" for n in range(2, 12)])
        # A device new to the account: nothing unread, history still there.
        pad = node.connect("alice", device="pad")
        pad.protocol.send(cim_pb2.OFFLINE_SUMMARY_R, cim_pb2.OfflineSummaryR(request_id=1))
        pad.protocol.send(cim_pb2.HISTORY_R, cim_pb2.HistoryR(request_id=3, peer="bob", limit=50))
        settle(node)
        [summary] = pad.events.of_type(cim_pb2.OFFLINE_SUMMARY_A)
        self.assertEqual((summary.total, list(summary.conversations)), (0, []))
        [history] = pad.events.of_type(cim_pb2.HISTORY_A)
        self.assertEqual(len(history.messages), 11)
