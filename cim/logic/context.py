"""What every logic feature is built from, passed as one object; and who calls it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from cim.accounts.store import AccountStore
from cim.config import AccountsConfig, LogicConfig
from cim.content import MediaUrls
from cim.interfaces import ISessionStore
from cim.limits.policy import NO_LIMITS, RateLimits
from cim.logic.contacts import ContactBook
from cim.logic.notices import Notices
from cim.storage.database import Database

__all__ = ["NO_GROUP_CACHES", "Caller", "GroupCaches", "LogicContext"]


@dataclass(frozen=True)
class Caller:
    """Who is calling, from the router's token: never from anything in the request."""

    user: str
    kind: str
    device: str = ""
    """The session's device (a push registration belongs to it)."""

    @property
    def is_device(self) -> bool:
        return self.kind == "device"


class GroupCaches(Protocol):
    """The node's group directory, as far as the logic service changes memberships."""

    def forget(self, group_id: str) -> None: ...


class _NoGroupCaches:
    """For a context without a node (the OpenAPI writer): there is nothing to forget."""

    def forget(self, group_id: str) -> None:
        pass


NO_GROUP_CACHES: GroupCaches = _NoGroupCaches()


@dataclass(frozen=True)
class LogicContext:
    config: LogicConfig
    accounts_config: AccountsConfig
    database: Database
    accounts: AccountStore
    sessions: ISessionStore
    """The state backend's sessions facet: a deleted account's session ends at once."""
    notices: Notices
    clock: IReactorTime
    groups: GroupCaches
    """The node's group directory, whose member caches a deleted account leaves."""
    contacts: ContactBook
    """The node's contact book, shared with its IM rooms (one cache of decisions)."""
    media_urls: MediaUrls = field(default_factory=MediaUrls)
    """Which URLs a post or a profile may carry for others to open (cim.content)."""
    limits: RateLimits = NO_LIMITS
    """The node's rate limits ([limits] logic per caller, sos, posts)."""
    settled: Callable[[], Deferred[None]] = lambda: succeed(None)
    """The timelines' read barrier (``Timelines.settled``): deleting an account deletes
    its 1:1 timelines, which must hold every message promised before."""

    def now(self) -> float:
        return float(self.clock.seconds())
