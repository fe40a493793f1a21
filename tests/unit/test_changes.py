"""Recall and edit on the node (#15 acceptance 4): the change is an entry in the
timeline; live copies reach the other side (here and across nodes), a device that was
away finds it at catch-up, history shows the result, and every bad value is refused
with an ERROR naming its reason and changes nothing. Real timelines on SQLite, fake
clock, in-memory transports."""

from __future__ import annotations

import itertools
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from cim.groups.directory import GroupDirectory
from cim.protocols import cim_pb2
from cim.storage.schema import timeline
from tests.fakes.node import ConnectedClient, NodeHarness
from tests.fakes.timelines import fresh_database
from tests.unit.test_delivery import cluster, settle
from tests.unit.test_groups import add_users_txn
from tests.unit.test_rate_limits import bounds as rate_bounds

_SEQ = itertools.count(1)
RECALL = cim_pb2.RECALL
EDIT = cim_pb2.EDIT


def wait(node: NodeHarness, seconds: float, *others: NodeHarness) -> None:
    """Let time pass in 10 s steps: heartbeats keep the connections up on the way."""
    steps = max(1, round(seconds / 10))
    for _ in range(steps):
        node.clock.advance(seconds / steps)
        settle(node, *others)


def send(node: NodeHarness, sender: ConnectedClient, text: str, **where: Any) -> cim_pb2.MsgA:
    message = cim_pb2.Message(text=text, client_seq=next(_SEQ), **where)
    sender.protocol.send(cim_pb2.MSG_R, message)
    settle(node)
    return sender.events.of_type(cim_pb2.MSG_A)[-1]


def change(
    node: NodeHarness, client: ConnectedClient, msg_id: int, kind: int, text: str = "", rid: int = 1
) -> Any:
    """CHANGE_R, answered: the ChangeA, or the ERROR."""
    client.protocol.send(
        cim_pb2.CHANGE_R,
        cim_pb2.ChangeR(request_id=rid, msg_id=msg_id, kind=kind, text=text),  # type: ignore[arg-type]
    )
    settle(node)
    for kind_, frame in reversed(client.events.frames):
        if kind_ in (cim_pb2.CHANGE_A, cim_pb2.ERROR) and frame.request_id == rid:
            return frame
    raise AssertionError("CHANGE_R was not answered")


def history(node: NodeHarness, client: ConnectedClient, **where: Any) -> list[cim_pb2.Message]:
    client.protocol.send(cim_pb2.HISTORY_R, cim_pb2.HistoryR(request_id=99, **where))
    settle(node)
    return list(client.events.of_type(cim_pb2.HISTORY_A)[-1].messages)


def stored(node: NodeHarness, msg_id: int) -> cim_pb2.Message:
    def read(connection: Any) -> bytes:
        row = connection.execute(timeline.select().where(timeline.c.msg_id == msg_id)).one()
        return bytes(row.payload)

    results: list[Any] = []
    assert node.database is not None
    node.database.run(read).addBoth(results.append)
    return cim_pb2.Message.FromString(results[0])


def every_payload(node: NodeHarness) -> bytes:
    """Every stored message's bytes, entries included: what the database keeps."""

    results: list[Any] = []
    assert node.database is not None
    node.database.run(lambda c: [bytes(r.payload) for r in c.execute(timeline.select())]).addBoth(
        results.append
    )
    return b"".join(results[0])


class DirectChangeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.node = NodeHarness(users=("alice", "bob", "carol"))
        self.alice = self.node.connect("alice")
        self.bob = self.node.connect("bob", auto_ack=True)
        settle(self.node)
        self.sent = send(self.node, self.alice, "secret plan", to="bob")

    def test_recall_inside_the_window_reaches_the_other_side_and_empties_storage(self) -> None:
        wait(self.node, 60)
        answer = change(self.node, self.alice, self.sent.msg_id, RECALL)
        self.assertIsInstance(answer, cim_pb2.ChangeA)
        self.assertEqual(
            (answer.msg_id, answer.kind, answer.conversation, answer.seq),
            (self.sent.msg_id, RECALL, self.sent.conversation, self.sent.seq + 1),
        )
        [_, entry] = self.bob.events.of_type(cim_pb2.MSG_N)
        self.assertEqual(
            (entry.change, entry.replaces, entry.replaces_seq, entry.seq, entry.text),
            (RECALL, self.sent.msg_id, self.sent.seq, answer.seq, ""),
        )
        self.assertEqual(getattr(entry, "from"), "alice")
        self.assertEqual(entry.to, "bob")
        # Nothing of the text is stored any more; the row keeps its place and sender.
        row = stored(self.node, self.sent.msg_id)
        self.assertEqual((row.text, row.recalled, row.changed_by), ("", True, "alice"))
        self.assertNotIn(b"secret plan", every_payload(self.node))
        # History shows it recalled, and the entry after it.
        newest, original = history(self.node, self.bob, peer="alice")
        self.assertEqual(
            (original.id, original.recalled, original.text), (self.sent.msg_id, True, "")
        )
        self.assertEqual((newest.change, newest.replaces), (RECALL, self.sent.msg_id))

    def test_edit_inside_the_window_replaces_the_text_everywhere(self) -> None:
        wait(self.node, 600)
        answer = change(self.node, self.alice, self.sent.msg_id, EDIT, "public plan")
        self.assertIsInstance(answer, cim_pb2.ChangeA)
        [_, entry] = self.bob.events.of_type(cim_pb2.MSG_N)
        self.assertEqual((entry.change, entry.text), (EDIT, "public plan"))
        row = stored(self.node, self.sent.msg_id)
        self.assertEqual((row.text, row.edited), ("public plan", True))
        _, original = history(self.node, self.alice, peer="bob")
        self.assertEqual((original.text, original.edited), ("public plan", True))

    def test_recall_takes_the_text_of_earlier_edits_too(self) -> None:
        edited = change(self.node, self.alice, self.sent.msg_id, EDIT, "second thoughts")
        change(self.node, self.alice, self.sent.msg_id, RECALL, rid=2)
        self.assertEqual(stored(self.node, edited.entry_id).text, "")
        self.assertEqual(stored(self.node, self.sent.msg_id).text, "")

    def refused(self, client: ConnectedClient, reason: str, *args: Any) -> cim_pb2.Error:
        before = len(self.bob.events.of_type(cim_pb2.MSG_N))
        payload = stored(self.node, self.sent.msg_id).SerializeToString()
        answer = change(self.node, client, *args)
        self.assertIsInstance(answer, cim_pb2.Error)
        self.assertEqual((answer.request_type, answer.reason), (cim_pb2.CHANGE_R, reason))
        # Nothing changed: no entry went out, the stored message is as it was.
        self.assertEqual(len(self.bob.events.of_type(cim_pb2.MSG_N)), before)
        self.assertEqual(stored(self.node, self.sent.msg_id).SerializeToString(), payload)
        return answer

    def test_recall_after_the_window_is_refused(self) -> None:
        wait(self.node, 121)
        self.refused(self.alice, "too_late", self.sent.msg_id, RECALL)

    def test_edit_after_the_window_is_refused(self) -> None:
        wait(self.node, 901)
        self.refused(self.alice, "too_late", self.sent.msg_id, EDIT, "late")

    def test_recall_and_edit_of_another_users_message_are_refused(self) -> None:
        error = self.refused(self.bob, "not_yours", self.sent.msg_id, RECALL)
        self.assertEqual(error.code, cim_pb2.Error.FORBIDDEN)
        self.refused(self.bob, "not_yours", self.sent.msg_id, EDIT, "mine now")

    def test_unknown_message_and_outsiders_get_the_same_refusal(self) -> None:
        self.refused(self.alice, "unknown_message", self.sent.msg_id + 12345, RECALL)
        carol = self.node.connect("carol")
        self.refused(carol, "unknown_message", self.sent.msg_id, RECALL)

    def test_edit_of_a_non_text_message_is_refused(self) -> None:
        self.alice.protocol.send(
            cim_pb2.MSG_R,
            cim_pb2.Message(
                to="bob",
                type=cim_pb2.LOCATION,
                location=cim_pb2.Location(lat=1, lon=2),
                client_seq=99,
            ),
        )
        settle(self.node)
        where = self.alice.events.of_type(cim_pb2.MSG_A)[-1]
        answer = change(self.node, self.alice, where.msg_id, EDIT, "text now")
        self.assertEqual(answer.reason, "not_text")

    def test_a_recalled_message_is_not_changed_again_nor_is_an_entry(self) -> None:
        first = change(self.node, self.alice, self.sent.msg_id, RECALL)
        self.refused(self.alice, "recalled", self.sent.msg_id, EDIT, "back")
        answer = change(self.node, self.alice, first.entry_id, RECALL, rid=3)
        self.assertEqual(answer.reason, "unknown_message")

    def test_malformed_requests_are_refused(self) -> None:
        for args in ((0, RECALL), (self.sent.msg_id, 0), (self.sent.msg_id, EDIT, "  ")):
            answer = change(self.node, self.alice, *args)
            self.assertEqual(
                (answer.code, answer.reason), (cim_pb2.Error.BAD_REQUEST, "bad_request")
            )


class ChangeRateTests(SynchronousTestCase):
    def test_changes_count_in_the_senders_message_rate(self) -> None:
        first = NodeHarness()
        node = NodeHarness(
            clock=first.clock, bounds=rate_bounds(first.clock, messages=1.0, messages_burst=3)
        )
        alice = node.connect("alice")
        settle(node)
        sent = send(node, alice, "draft", to="bob")
        answers = [change(node, alice, sent.msg_id, EDIT, f"draft {n}", rid=n) for n in (1, 2, 3)]
        self.assertIsInstance(answers[0], cim_pb2.ChangeA)
        self.assertIsInstance(answers[1], cim_pb2.ChangeA)
        self.assertEqual(
            (answers[2].code, answers[2].reason), (cim_pb2.Error.RATE_LIMITED, "rate_limited")
        )
        self.assertGreater(answers[2].retry_after_ms, 0)
        self.assertEqual(stored(node, sent.msg_id).text, "draft 2")


class ForgedChangeTests(SynchronousTestCase):
    def test_a_message_cannot_pose_as_a_change(self) -> None:
        """msg:R carrying change fields would let anyone "recall" someone else's message
        on the receiver's device: refused, nothing delivered."""
        node = NodeHarness(users=("alice", "bob"))
        alice = node.connect("alice")
        bob = node.connect("bob", auto_ack=True)
        settle(node)
        for fields in (
            {"change": RECALL, "replaces": 5},
            {"replaces_seq": 1},
            {"recalled": True},
            {"edited": True},
            {"changed_by": "carol"},
        ):
            message = cim_pb2.Message(to="bob", text="x", client_seq=next(_SEQ), **fields)
            alice.protocol.send(cim_pb2.MSG_R, message)
            settle(node)
            error = alice.events.of_type(cim_pb2.ERROR)[-1]
            self.assertEqual(
                (error.code, error.client_seq), (cim_pb2.Error.BAD_REQUEST, message.client_seq)
            )
        self.assertEqual(bob.events.of_type(cim_pb2.MSG_N), [])


class CatchUpTests(SynchronousTestCase):
    def test_a_device_that_was_away_catches_up_the_recall(self) -> None:
        node = NodeHarness(users=("alice", "bob"))
        alice = node.connect("alice")
        settle(node)
        kept = send(node, alice, "stays", to="bob")
        sent = send(node, alice, "oops", to="bob")
        edited = send(node, alice, "typo", to="bob")
        self.assertIsInstance(change(node, alice, sent.msg_id, RECALL), cim_pb2.ChangeA)
        self.assertIsInstance(
            change(node, alice, edited.msg_id, EDIT, "fixed", rid=2), cim_pb2.ChangeA
        )
        bob = node.connect("bob")
        settle(node)
        bob.protocol.send(
            cim_pb2.OFFLINE_R, cim_pb2.OfflineR(request_id=5, conversation=sent.conversation)
        )
        settle(node)
        [page] = bob.events.of_type(cim_pb2.OFFLINE_A)
        by_seq = {m.seq: m for m in page.messages}
        self.assertEqual(
            sorted(by_seq), [kept.seq, sent.seq, edited.seq, edited.seq + 1, edited.seq + 2]
        )
        self.assertEqual(by_seq[kept.seq].text, "stays")
        self.assertEqual((by_seq[sent.seq].text, by_seq[sent.seq].recalled), ("", True))
        self.assertEqual((by_seq[edited.seq].text, by_seq[edited.seq].edited), ("fixed", True))
        self.assertEqual(by_seq[edited.seq + 1].change, RECALL)
        self.assertEqual(
            (by_seq[edited.seq + 2].change, by_seq[edited.seq + 2].text), (EDIT, "fixed")
        )


class GroupChangeTests(SynchronousTestCase):
    def setUp(self) -> None:
        db = fresh_database(self.mktemp())
        self.addCleanup(db.stop)
        self.successResultOf(db.run(add_users_txn, ("alice", "bob", "carol")))
        node = NodeHarness(database=db)
        self.groups = GroupDirectory(db, node.clock)
        self.node = NodeHarness(database=db, clock=node.clock, groups=self.groups)
        info = self.successResultOf(self.groups.create("alice", "team", ["bob", "carol"]))
        self.group = info.id
        self.clients = {
            name: self.node.connect(name, auto_ack=True) for name in ("alice", "bob", "carol")
        }
        settle(self.node)
        self.post = send(self.node, self.clients["bob"], "bob's post", group=self.group)

    def test_the_owner_recalls_any_message_at_any_time_every_member_sees_it(self) -> None:
        wait(self.node, 3600)
        answer = change(self.node, self.clients["alice"], self.post.msg_id, RECALL)
        self.assertIsInstance(answer, cim_pb2.ChangeA)
        for name in ("bob", "carol"):
            entry = self.clients[name].events.of_type(cim_pb2.MSG_N)[-1]
            self.assertEqual(
                (entry.change, entry.replaces, entry.group), (RECALL, self.post.msg_id, self.group)
            )
        self.assertEqual(stored(self.node, self.post.msg_id).changed_by, "alice")

    def test_a_plain_member_cannot_recall_anothers_post(self) -> None:
        answer = change(self.node, self.clients["carol"], self.post.msg_id, RECALL)
        self.assertEqual(answer.reason, "not_yours")

    def test_an_admin_cannot_edit_anothers_post(self) -> None:
        answer = change(self.node, self.clients["alice"], self.post.msg_id, EDIT, "owner's words")
        self.assertEqual(answer.reason, "not_yours")


class AcrossNodesTests(SynchronousTestCase):
    def test_the_live_entry_crosses_the_bus(self) -> None:
        one, two = cluster()
        alice = one.connect("alice")
        bob = two.connect("bob", auto_ack=True)
        settle(one, two)
        alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="bob", text="hi", client_seq=1))
        settle(one, two)
        sent = alice.events.of_type(cim_pb2.MSG_A)[-1]
        alice.protocol.send(
            cim_pb2.CHANGE_R,
            cim_pb2.ChangeR(request_id=1, msg_id=sent.msg_id, kind=EDIT, text="hello"),
        )
        settle(one, two)
        [answer] = alice.events.of_type(cim_pb2.CHANGE_A)
        [_, entry] = bob.events.of_type(cim_pb2.MSG_N)
        self.assertEqual((entry.change, entry.text, entry.seq), (EDIT, "hello", answer.seq))
        # The entry is held for no ack: its sender hears no ack:N for it.
        self.assertEqual(len(alice.events.of_type(cim_pb2.ACK_N)), 1)
