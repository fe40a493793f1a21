"""What every logic feature is built from, passed as one object."""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

from cim.accounts.store import AccountStore
from cim.config import AccountsConfig, LogicConfig
from cim.groups.directory import GroupDirectory
from cim.interfaces import IStateBackend
from cim.logic.notices import Notices
from cim.storage.database import Database


@dataclass(frozen=True)
class LogicContext:
    config: LogicConfig
    accounts_config: AccountsConfig
    database: Database
    accounts: AccountStore
    state: IStateBackend
    notices: Notices
    clock: IReactorTime
    groups: GroupDirectory | None
    """The node's group directory, whose member caches a deleted account leaves."""

    def now(self) -> float:
        return float(self.clock.seconds())
