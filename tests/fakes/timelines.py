"""Real timelines for unit tests: SQLite files at the current schema, run inline.

The schema comes as the unit suite gives every empty SQLite database its schema: a
copy of one migrated once per process (``tests.fakes.schema``). Work runs inline
(``run_now``) and appends are written one at a time (``batch_size`` 1), so a message
is durable before the call that took it returns, on a fake clock that never needs
advancing for it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime

from cim.history.timeline import Timelines, TimelineSettings
from cim.storage.database import Database

T = TypeVar("T")

__all__ = ["INLINE", "fresh_database", "inline_timelines", "run_now"]

INLINE = TimelineSettings(batch_size=1, batch_wait=0.001)
"""Every append its own transaction, at once: nothing waits for the clock."""

_directory: list[str] = []


def run_now(work: Callable[[], T]) -> Deferred[T]:
    """The database runner tests inject: the work runs at once, on the test's thread."""
    return maybeDeferred(work)


def fresh_database(directory: str | None = None) -> Database:
    """A started database at head in ``directory`` (a fresh temporary one if None);
    the caller stops it (``addCleanup(db.stop)``) where it cares."""
    if directory is None:
        if not _directory:
            _directory.append(tempfile.mkdtemp(prefix="cim-test-db-"))
            atexit.register(shutil.rmtree, _directory[0], True)
        directory = tempfile.mkdtemp(dir=_directory[0])
    os.makedirs(directory, exist_ok=True)
    db = Database(f"sqlite:///{os.path.join(directory, 'cim.db')}", None, runner=run_now)
    failures: list[Any] = []
    db.start().addErrback(failures.append)
    if failures:
        failures[0].raiseException()
    return db


def inline_timelines(
    clock: IReactorTime, db: Database | None = None, settings: TimelineSettings = INLINE
) -> Timelines:
    """Timelines on ``db`` (a fresh test database if None), appending inline."""
    return Timelines(db if db is not None else fresh_database(), clock, settings)
