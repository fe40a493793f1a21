"""Likes racing each other on PostgreSQL, where the row lock decides."""

from __future__ import annotations

import threading
import time
from typing import Any

from twisted.trial.unittest import TestCase

from cim.storage.accounts import insert_user_txn
from cim.storage.database import create_engine_for
from cim.storage.posts import (
    LikeOutcome,
    create_post_txn,
    like_post_txn,
    likers_txn,
    unlike_post_txn,
    visible_posts_txn,
)
from cim.storage.schema import metadata
from tests.integration.test_storage import scratch_postgresql_url


class PostgresqlLikeTests(TestCase):
    """The storage on PostgreSQL: the savepoint, and likes racing for the goal."""

    def test_repeated_and_racing_likes(self) -> None:
        engine = create_engine_for(scratch_postgresql_url(self))
        self.addCleanup(engine.dispose)
        metadata.create_all(engine)
        with engine.begin() as connection:
            for name in ("author", "u1", "u2", "u3"):
                insert_user_txn(connection, name, "hash", "person", 1.0)
            post = create_post_txn(connection, "author", "hi", None, "everyone", 2, 1.0)
        with engine.begin() as connection:
            first = like_post_txn(connection, post.id, "u1", 2.0)
            # A unique violation inside the same transaction: the savepoint keeps it usable.
            again = like_post_txn(connection, post.id, "u1", 2.5)
            self.assertEqual(visible_posts_txn(connection, "u3", None, None, 10)[0].likes, 1)
        assert isinstance(first, LikeOutcome) and isinstance(again, LikeOutcome)
        self.assertEqual((first.added, again.added, again.likes), (True, False, 1))
        with engine.begin() as connection:
            unlike_post_txn(connection, post.id, "u1", 2.8)

        # u2 holds the post's row; u3's like must wait for it, then count both.
        outcomes: dict[str, Any] = {}
        holder = engine.connect()
        self.addCleanup(holder.close)
        transaction = holder.begin()
        outcomes["u2"] = like_post_txn(holder, post.id, "u2", 3.0)

        def like_u3() -> None:
            with engine.begin() as connection:
                outcomes["u3"] = like_post_txn(connection, post.id, "u3", 4.0)

        racer = threading.Thread(target=like_u3)
        racer.start()
        self.assertTrue(wait_for_a_lock_wait(engine), "the second like did not wait")
        transaction.commit()
        racer.join(10)
        self.assertFalse(racer.is_alive())
        self.assertEqual(
            [(outcomes[u].likes, outcomes[u].goal_reached_now) for u in ("u2", "u3")],
            [(1, False), (2, True)],
        )
        with engine.begin() as connection:
            likers = likers_txn(connection, post.id, "author", 10, 0)
        self.assertEqual((likers.likes, likers.names), (2, ["u2", "u3"]))


def wait_for_a_lock_wait(engine: Any, seconds: float = 10.0) -> bool:
    """Whether some session of this database waits on a lock within ``seconds``."""
    deadline = time.monotonic() + seconds
    with engine.connect() as connection:
        while time.monotonic() < deadline:
            waiting = connection.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ).scalar_one()
            connection.rollback()
            if waiting:
                return True
    return False
