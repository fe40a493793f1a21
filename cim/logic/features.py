"""The logic service's features, built together from one context."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from cim.logic.accounts import Accounts
from cim.logic.bindings import Bindings
from cim.logic.contacts import ContactBook
from cim.logic.context import LogicContext
from cim.logic.fences import Fences
from cim.logic.posts import Posts
from cim.logic.sos import SosAlarms

__all__ = ["Housekeeping", "LogicFeatures"]


class Housekeeping(Protocol):
    """A feature with periodic work (expired binding codes, the location purge)."""

    async def housekeeping(self) -> None: ...


@dataclass(frozen=True)
class LogicFeatures:
    accounts: Accounts
    bindings: Bindings
    alarms: SosAlarms
    fences: Fences
    posts: Posts
    contacts: ContactBook

    @classmethod
    def build(cls, ctx: LogicContext) -> LogicFeatures:
        return cls(
            Accounts(ctx), Bindings(ctx), SosAlarms(ctx), Fences(ctx), Posts(ctx), ctx.contacts
        )

    def housekeeping(self) -> list[Housekeeping]:
        """The features with periodic work, in the order it runs."""
        return [self.bindings, self.fences]
