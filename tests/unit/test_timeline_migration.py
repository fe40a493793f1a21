"""Migration 0010 (timelines): ``history`` and ``offline_msgs`` become one timeline per
conversation, nothing lost, nothing doubled, and what was waiting stays unread.

A database made by migration 0009 is filled as a release-1 node would have filled it:
delivered 1:1 messages in the history, one also still waiting in its receiver's box, a
message only in a box, a group message in the history with copies for two members'
boxes, a group without messages. After the upgrade every message is in its timeline
once, numbered in id order, and each reader's unread are exactly what waited for it.
The same runs on a scratch PostgreSQL database.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command
from sqlalchemy import insert, select
from sqlalchemy.engine import Connection, Engine
from twisted.trial.unittest import TestCase

from cim.protocols import cim_pb2
from cim.storage.database import (
    _sqlite_foreign_keys,
    alembic_config,
    create_engine_for,
    upgrade_engine,
)
from cim.storage.schema import conversations, group_members, groups, timeline, users
from cim.storage.timeline_reads import summary_txn, unread_page_txn
from tests.integration.test_storage import scratch_postgresql_url
from tests.unit.test_storage import sqlite_url

# The two tables as release 1 had them (gone from cim.storage.schema since 0010).
history = sa.table(
    "history",
    sa.column("conversation"),
    sa.column("msg_id"),
    sa.column("sender"),
    sa.column("receiver"),
    sa.column("group_id"),
    sa.column("sent_at"),
    sa.column("msg_type"),
    sa.column("payload"),
)
offline_msgs = sa.table(
    "offline_msgs",
    sa.column("receiver_uid"),
    sa.column("msg_id"),
    sa.column("send_time"),
    sa.column("sender_uid"),
    sa.column("msg_type"),
    sa.column("msg_content"),
    sa.column("group_id"),
    sa.column("payload"),
)

GROUP = "g" * 26
QUIET = "q" * 26


def payload(msg_id: int, sender: str, to: str = "", group: str = "") -> bytes:
    message = cim_pb2.Message(
        id=msg_id, to=to, group=group, text=f"m{msg_id}", client_seq=msg_id, device="phone"
    )
    setattr(message, "from", sender)
    return message.SerializeToString()


def in_history(
    connection: Connection, msg_id: int, sender: str, to: str = "", group: str = ""
) -> None:
    first, second = sorted((sender, to))
    connection.execute(
        insert(history).values(
            conversation=f"g:{group}" if group else f"u:{first}:{second}",
            msg_id=msg_id,
            sender=sender,
            receiver=to or None,
            group_id=group or None,
            sent_at=float(msg_id),
            msg_type=0,
            payload=payload(msg_id, sender, to, group),
        )
    )


def in_box(
    connection: Connection, receiver: str, msg_id: int, sender: str, group: str = ""
) -> None:
    connection.execute(
        insert(offline_msgs).values(
            receiver_uid=receiver,
            msg_id=msg_id,
            send_time=float(msg_id),
            sender_uid=sender,
            msg_type=0,
            msg_content=f"m{msg_id}",
            group_id=group or None,
            payload=payload(msg_id, sender, "" if group else receiver, group),
        )
    )


def fill_txn(connection: Connection) -> None:
    for name in ("alice", "bob", "carol"):
        connection.execute(
            insert(users).values(name=name, password_hash="x", kind="person", created_at=1.0)
        )
    for group_id in (GROUP, QUIET):
        connection.execute(
            insert(groups).values(id=group_id, name="team", owner="alice", created_at=1)
        )
        for name in ("alice", "bob", "carol"):
            connection.execute(
                insert(group_members).values(
                    group_id=group_id, user_name=name, role="member", joined_at=1
                )
            )
    # alice <-> bob: 10 and 11 delivered; 12 delivered to history and still in bob's box.
    in_history(connection, 10, "alice", "bob")
    in_history(connection, 11, "bob", "alice")
    in_history(connection, 12, "alice", "bob")
    in_box(connection, "bob", 12, "alice")
    # carol -> bob: only in bob's box (release 1 archived at delivery).
    in_box(connection, "bob", 13, "carol")
    in_box(connection, "bob", 14, "carol")
    # The group: 20 delivered to everyone, 21 waiting for bob and carol (two copies).
    in_history(connection, 20, "alice", group=GROUP)
    in_history(connection, 21, "alice", group=GROUP)
    in_box(connection, "bob", 21, "alice", GROUP)
    in_box(connection, "carol", 21, "alice", GROUP)


class TimelineMigrationTests(TestCase):
    def engine(self) -> Engine:
        return create_engine_for(sqlite_url(self))

    def test_every_message_once_and_what_waited_stays_unread(self) -> None:
        engine = self.engine()
        self.addCleanup(engine.dispose)
        with engine.connect() as connection:
            if engine.dialect.name == "sqlite":
                _sqlite_foreign_keys(connection, False)
            with connection.begin():
                config = alembic_config()
                config.attributes["connection"] = connection
                command.upgrade(config, "0009_limits")
                fill_txn(connection)
        self.assertEqual(upgrade_engine(engine)[0], "0009_limits")
        with engine.begin() as connection:
            rows = connection.execute(
                select(timeline.c.conversation, timeline.c.seq, timeline.c.msg_id).order_by(
                    timeline.c.conversation, timeline.c.seq
                )
            ).all()
            self.assertEqual(
                [tuple(row) for row in rows],
                [
                    ("d:alice:bob", 1, 10),
                    ("d:alice:bob", 2, 11),
                    ("d:alice:bob", 3, 12),
                    ("d:bob:carol", 1, 13),
                    ("d:bob:carol", 2, 14),
                    (f"g:{GROUP}", 1, 20),
                    (f"g:{GROUP}", 2, 21),
                ],
            )
            lasts = dict(tuple(row) for row in connection.execute(select(conversations)))
            self.assertEqual(
                lasts,
                {"d:alice:bob": 3, "d:bob:carol": 2, f"g:{GROUP}": 2, f"g:{QUIET}": 0},
            )
            # A new device of each user: exactly what waited in its box is unread.
            unread = {
                user: {
                    state.conversation: state.unread
                    for state in summary_txn(connection, user, "phone")
                    if state.unread
                }
                for user in ("alice", "bob", "carol")
            }
            self.assertEqual(
                unread,
                {
                    "alice": {},
                    "bob": {"d:alice:bob": 1, "d:bob:carol": 2, f"g:{GROUP}": 1},
                    "carol": {f"g:{GROUP}": 1},
                },
            )
            page = unread_page_txn(connection, "bob", "phone", None, None, 100)
            self.assertEqual([r.msg_id for r in page.records], [21, 14, 13, 12])
            # The message as it was sent, and the device it came from for resends.
            [twelve] = [r for r in page.records if r.msg_id == 12]
            self.assertEqual(cim_pb2.Message.FromString(twelve.payload).text, "m12")
            device = connection.execute(
                select(timeline.c.sender_device, timeline.c.client_seq).where(
                    timeline.c.msg_id == 12
                )
            ).one()
            self.assertEqual(tuple(device), ("phone", 12))
            tables = set(sa.inspect(connection).get_table_names())
            self.assertFalse({"history", "offline_msgs"} & tables)


class PostgresqlTimelineMigrationTests(TimelineMigrationTests):
    def engine(self) -> Engine:
        return create_engine_for(scratch_postgresql_url(self))
