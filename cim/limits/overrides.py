"""The limits an operator raised for single users, as every node reads them.

``cimctl limits`` writes ``user_limits``; each node reads the whole table every
``[limits] override_refresh`` (the table holds the few users an operator chose, so
one small query beats a lookup per message) and answers from memory in between. A
read that fails keeps the rates read before, and the next one tries again.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.limits.buckets import Rate
from cim.storage.database import Database
from cim.storage.limits import UserLimitRow, all_user_limits_txn

__all__ = ["StoredOverrides"]


class StoredOverrides:
    """Per-user rates from the database, at most ``refresh`` seconds old."""

    log = Logger()

    def __init__(self, database: Database, clock: IReactorTime, refresh: float) -> None:
        self._database = database
        self._clock = clock
        self._refresh = refresh
        self._rates: dict[tuple[str, str], Rate] = {}
        self._loop: LoopingCall | None = None
        self._failing = False

    def __len__(self) -> int:
        return len(self._rates)

    def rate(self, user: str, kind: str) -> Rate | None:
        return self._rates.get((user, kind))

    def start(self) -> Deferred[None]:
        """Read now and then every ``refresh``; fires after the first read (which may
        fail: the node then starts with the configured limits and reads again)."""
        first = self.reload()
        loop = self._loop = LoopingCall(self.reload)
        loop.clock = self._clock
        loop.start(self._refresh, now=False).addErrback(
            lambda failure: self.log.failure("limits: the reload loop ended", failure)
        )
        return first

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def reload(self) -> Deferred[None]:
        """Read the table again; never fails (a failure keeps the old rates)."""
        return self._database.run(all_user_limits_txn).addCallbacks(self._loaded, self._load_failed)

    def _loaded(self, rows: list[UserLimitRow]) -> None:
        self._rates = {(row.user, row.kind): Rate(row.per_second, row.burst) for row in rows}
        if self._failing:
            self._failing = False
            self.log.info("limits: per-user limits read again ({count})", count=len(rows))

    def _load_failed(self, failure: Failure) -> None:
        if not self._failing:
            self._failing = True
            self.log.warn(
                "limits: cannot read the per-user limits ({why}); keeping the ones read before",
                why=failure.getErrorMessage(),
            )
