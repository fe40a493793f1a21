"""Migration 0008 (file access) on SQLite: nobody loses a file they were sent.

A database at the revision before is filled as a running node would have filled it
(accounts, a group, files, a holding of an account that is gone, media messages in
the history and in an offline box); after the upgrade the receivers of those
messages read the files, and what belonged to the vanished account is gone.
"""

from __future__ import annotations

from typing import Any

from alembic import command
from sqlalchemy import insert, select
from sqlalchemy.engine import Connection
from twisted.trial.unittest import TestCase

from cim.history.store import direct_conversation, group_conversation
from cim.protocols import cim_pb2
from cim.storage.database import (
    _sqlite_foreign_keys,
    alembic_config,
    create_engine_for,
    upgrade_engine,
)
from cim.storage.files_access import may_read_txn
from cim.storage.schema import (
    file_group_shares,
    file_refs,
    file_shares,
    files,
    group_members,
    groups,
    uploads,
    users,
)
from tests.unit.test_storage import sqlite_url
from tests.unit.test_timeline_migration import history, offline_msgs

GROUP = "g" * 26
SENT, TO_GROUP, WAITING, TO_GONE = ("A" * 22, "B" * 22, "C" * 22, "D" * 22)


def media(file_id: str, kind: int = cim_pb2.IMAGE, **where: Any) -> bytes:
    message = cim_pb2.Message(type=kind, media=cim_pb2.Media(url="u", file_id=file_id), **where)
    return message.SerializeToString()


def fill_txn(connection: Connection) -> None:
    for name in ("alice", "bob", "carol"):
        connection.execute(
            insert(users).values(name=name, password_hash="x", kind="person", created_at=1.0)
        )
    connection.execute(insert(groups).values(id=GROUP, name="team", owner="alice", created_at=1))
    for name in ("alice", "carol"):
        connection.execute(
            insert(group_members).values(group_id=GROUP, user_name=name, role="member", joined_at=1)
        )
    for n, file_id in enumerate((SENT, TO_GROUP, WAITING, TO_GONE)):
        connection.execute(
            insert(files).values(
                id=file_id,
                sha256=f"{n:064x}",
                md5="0" * 32,
                size=1,
                mime="image/png",
                name="x.png",
                created_by="alice",
                created_at=1.0,
            )
        )
        connection.execute(
            insert(file_refs).values(file_id=file_id, user_name="alice", created_at=1)
        )
    # An account deleted before the upgrade still "holds" a file and has an upload.
    connection.execute(insert(file_refs).values(file_id=SENT, user_name="ghost", created_at=1))
    connection.execute(
        insert(uploads).values(
            id="U" * 22,
            user_name="ghost",
            name="x",
            size=1,
            md5="0" * 32,
            mime="image/png",
            chunk_size=1,
            chunk_count=1,
            created_at=1,
            expires_at=2e9,
        )
    )
    rows = [
        (direct_conversation("alice", "bob"), 1, "alice", "bob", None, media(SENT)),
        (group_conversation(GROUP), 2, "alice", None, GROUP, media(TO_GROUP, group=GROUP)),
        (direct_conversation("alice", "bob"), 3, "alice", "bob", None, b"\xff\xff not protobuf"),
        (direct_conversation("alice", "ghost"), 4, "alice", "ghost", None, media(TO_GONE)),
    ]
    for conversation, msg_id, sender, receiver, group_id, payload in rows:
        connection.execute(
            insert(history).values(
                conversation=conversation,
                msg_id=msg_id,
                sender=sender,
                receiver=receiver,
                group_id=group_id,
                sent_at=10.0 + msg_id,
                msg_type=cim_pb2.IMAGE,
                payload=payload,
            )
        )
    connection.execute(
        insert(offline_msgs).values(
            receiver_uid="carol",
            msg_id=5,
            send_time=20.0,
            sender_uid="alice",
            msg_type=cim_pb2.FILE,
            msg_content="",
            group_id=None,
            payload=media(WAITING, kind=cim_pb2.FILE, to="carol"),
        )
    )


class FileAccessMigrationTests(TestCase):
    def test_receivers_keep_reading_what_they_were_sent(self) -> None:
        engine = create_engine_for(sqlite_url(self))
        self.addCleanup(engine.dispose)
        with engine.connect() as connection:
            _sqlite_foreign_keys(connection, False)
            with connection.begin():
                config = alembic_config()
                config.attributes["connection"] = connection
                command.upgrade(config, "0006_logic")
                fill_txn(connection)
        self.assertEqual(upgrade_engine(engine)[0], "0006_logic")
        with engine.connect() as connection:
            shares = connection.execute(
                select(file_shares.c.file_id, file_shares.c.user_name, file_shares.c.peer)
            ).all()
            self.assertEqual(
                sorted(tuple(row) for row in shares),
                [
                    (SENT, "alice", "bob"),
                    (SENT, "bob", "alice"),
                    (WAITING, "alice", "carol"),
                    (WAITING, "carol", "alice"),
                    # Sent to an account that is gone: only the sender's side remains.
                    (TO_GONE, "alice", "ghost"),
                ],
            )
            [group_share] = connection.execute(select(file_group_shares)).all()
            self.assertEqual(
                (group_share.file_id, group_share.group_id, group_share.shared_by),
                (TO_GROUP, GROUP, "alice"),
            )
            self.assertEqual(group_share.shared_at, 12.0)
            self.assertTrue(may_read_txn(connection, SENT, "bob"))
            self.assertTrue(may_read_txn(connection, TO_GROUP, "carol"))
            self.assertFalse(may_read_txn(connection, TO_GROUP, "bob"))
            self.assertTrue(may_read_txn(connection, WAITING, "carol"))
            self.assertFalse(may_read_txn(connection, TO_GONE, "bob"))
            holders = connection.execute(select(file_refs.c.user_name).distinct()).scalars()
            self.assertEqual(sorted(holders), ["alice"])
            self.assertEqual(connection.execute(select(uploads)).all(), [])
