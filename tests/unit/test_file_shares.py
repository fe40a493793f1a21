"""The IM node records which conversations a file was sent in (cim.im.shares).

A whole node in memory (tests/fakes/node.py) with the group directory and the file
tables on a SQLite database, as the daemon builds them: a media message naming a file
is taken only when its sender may read that file, and its receivers then may too.
"""

from __future__ import annotations

from sqlalchemy import insert
from sqlalchemy.engine import Connection
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cim.groups.directory import GroupDirectory
from cim.im.shares import RecordedShares, named_files
from cim.protocols import cim_pb2
from cim.storage.files_access import may_read_txn
from cim.storage.schema import file_refs, files
from tests.fakes.node import ConnectedClient, NodeHarness
from tests.unit.test_delivery import settle
from tests.unit.test_groups import GroupTestsMixin
from tests.unit.test_storage import sqlite_url

FILE_ID = "F" * 22
PUBLIC = "https://files.example.com/cim"


def add_file_txn(connection: Connection, file_id: str, holder: str) -> None:
    connection.execute(
        insert(files).values(
            id=file_id,
            sha256=file_id.lower().ljust(64, "0")[:64],
            md5="0" * 32,
            size=5,
            mime="image/png",
            name="cat.png",
            created_by=holder,
            created_at=1.0,
        )
    )
    connection.execute(insert(file_refs).values(file_id=file_id, user_name=holder, created_at=1.0))


def image(file_id: str = FILE_ID, url: str = "", seq: int = 1, **where: str) -> cim_pb2.Message:
    media = cim_pb2.Media(url=url or f"{PUBLIC}/files/{file_id}", file_id=file_id, size=5)
    return cim_pb2.Message(type=cim_pb2.IMAGE, media=media, client_seq=seq, **where)


class FileShareNodeTests(GroupTestsMixin, TestCase):
    def database_url(self) -> str:
        return sqlite_url(self)

    def setUp(self) -> None:
        super().setUp()
        self.node = NodeHarness()
        self.groups = GroupDirectory(self.db, self.node.clock)
        self.node.im.directory.groups = self.groups
        self.node.im.stores.file_shares = RecordedShares(self.db, self.node.clock, PUBLIC)
        self.ok(self.db.run(add_file_txn, FILE_ID, "alice"))

    def reads(self, user: str, file_id: str = FILE_ID) -> bool:
        return bool(self.ok(self.db.run(may_read_txn, file_id, user)))

    def send(self, client: ConnectedClient, message: cim_pb2.Message) -> None:
        client.protocol.send(cim_pb2.MSG_R, message)
        settle(self.node)

    def test_the_receiver_of_a_file_may_read_it(self) -> None:
        alice = self.node.connect("alice")
        bob = self.node.connect("bob", auto_ack=True)
        self.assertFalse(self.reads("bob"))
        self.send(alice, image(to="bob"))
        [received] = bob.events.of_type(cim_pb2.MSG_N)
        self.assertEqual(received.media.file_id, FILE_ID)
        self.assertEqual(len(alice.events.of_type(cim_pb2.MSG_A)), 1)
        self.assertTrue(self.reads("bob"))
        self.assertFalse(self.reads("carol"))

    def test_nobody_sends_a_file_they_cannot_read(self) -> None:
        """Else a stranger could share someone's file with themselves as participant."""
        erin = self.node.connect("erin")
        bob = self.node.connect("bob", auto_ack=True)
        for message in (
            image(to="bob", seq=1),
            image(file_id="", url=f"{PUBLIC}/files/{FILE_ID}", to="bob", seq=2),  # the URL only
            image(file_id="../../etc", url="https://elsewhere.example/x", to="bob", seq=3),
            image(file_id="G" * 22, to="bob", seq=4),  # no such file: the same answer
        ):
            self.send(erin, message)
        errors = erin.events.of_type(cim_pb2.ERROR)
        self.assertEqual(len(errors), 4)
        for error in errors:
            self.assertEqual(error.code, cim_pb2.Error.BAD_REQUEST)
            self.assertIn("may not send", error.message)
        self.assertEqual(erin.events.of_type(cim_pb2.MSG_A), [])
        self.assertEqual(bob.events.of_type(cim_pb2.MSG_N), [])
        self.assertFalse(self.reads("bob"))
        self.assertFalse(self.reads("erin"))

    def test_a_file_sent_to_a_group_is_read_by_its_members(self) -> None:
        team = self.team()
        alice = self.node.connect("alice")
        bob = self.node.connect("bob", auto_ack=True)
        self.send(alice, image(group=team.id))
        [received] = bob.events.of_type(cim_pb2.MSG_N)
        self.assertEqual((received.group, received.media.file_id), (team.id, FILE_ID))
        for member in ("bob", "carol", "dave"):
            self.assertTrue(self.reads(member), member)
        self.assertFalse(self.reads("erin"))
        self.ok(self.groups.add("alice", team.id, ["erin"]))
        self.assertTrue(self.reads("erin"))  # members of the moment

    def test_messages_without_files_are_not_affected(self) -> None:
        alice = self.node.connect("alice")
        bob = self.node.connect("bob", auto_ack=True)
        before = self.runner.runs
        self.send(alice, cim_pb2.Message(to="bob", text="no file", client_seq=1))
        self.assertEqual(len(bob.events.of_type(cim_pb2.MSG_N)), 1)
        self.assertEqual(self.runner.runs, before)  # no database work
        outside = image(
            file_id="", url="https://elsewhere.example/files/" + "H" * 22, to="bob", seq=2
        )
        self.send(alice, outside)
        self.assertEqual(len(bob.events.of_type(cim_pb2.MSG_N)), 2)

    def test_a_database_that_does_not_answer_asks_the_sender_to_retry(self) -> None:
        alice = self.node.connect("alice")
        self.ok(self.db.stop())
        self.send(alice, image(to="bob"))
        [error] = alice.events.of_type(cim_pb2.ERROR)
        self.assertEqual((error.code, error.client_seq), (cim_pb2.Error.UNAVAILABLE, 1))
        self.assertEqual(alice.events.of_type(cim_pb2.MSG_A), [])


class NamedFilesTests(SynchronousTestCase):
    def test_the_files_a_message_names(self) -> None:
        other = "E" * 22
        message = image(url=f"{PUBLIC}/files/{other}?expires=1&sig=x", to="bob")
        message.media.thumbnail_url = f"{PUBLIC}/files/{other}/thumbnail"
        self.assertEqual(named_files(message, PUBLIC), sorted([FILE_ID, other]))
        self.assertEqual(named_files(message), [FILE_ID])
        for url in (
            f"https://files.example.com/files/{other}",  # not under the public path
            f"http://files.example.com/cim/files/{other}",  # another scheme
            f"https://evil.example/cim/files/{other}",
            f"{PUBLIC}/files/{other}/more",
        ):
            elsewhere = image(file_id="", url=url, to="bob")
            self.assertEqual(named_files(elsewhere, PUBLIC), [], url)
        self.assertEqual(named_files(image(file_id="short", to="bob")), ["\x00"])
