"""Every rate limit of a node, made from ``[limits]``, and the user's own raised ones.

One ``Limits`` serves the whole daemon: the IM room asks it about messages and
hellos, the router about logins, the logic and file services about their calls. Each
kind is one set of token buckets (``cim.limits.buckets``) keyed by what it limits: a
user, an address or a group. For the per-user kinds an operator may give one user a
rate of its own (``cimctl limits``), which ``overrides`` supplies.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.interfaces import IReactorTime

from cim.config import LimitsConfig
from cim.limits.buckets import Rate, TokenBuckets
from cim.storage.schema import LIMIT_KINDS

__all__ = [
    "ADDRESS_KINDS",
    "FILES",
    "GROUP_MESSAGES",
    "GROUP_POSTS",
    "HELLOS",
    "LOGIC",
    "LOGINS",
    "MESSAGES",
    "NO_LIMITS",
    "NO_OVERRIDES",
    "POSTS",
    "SOS",
    "USER_KINDS",
    "Limits",
    "NoLimits",
    "Overrides",
    "RateLimits",
    "configured_rate",
]

MESSAGES = "messages"
"""Every msg:R of a user."""
GROUP_POSTS = "group_posts"
"""A user's posts to groups (on top of ``MESSAGES``)."""
GROUP_MESSAGES = "group_messages"
"""Posts into one group, keyed by the group."""
HELLOS = "hellos"
"""IM handshakes, keyed by address."""
LOGINS = "logins"
"""Router logins, keyed by address."""
SOS = "sos"
"""SOS alarms, keyed by the device."""
POSTS = "posts"
"""Posts (集赞) created, keyed by the author."""
LOGIC = "logic"
"""Logic service calls, keyed by user."""
FILES = "files"
"""File service calls, keyed by user."""

USER_KINDS: tuple[str, ...] = LIMIT_KINDS
"""The kinds keyed by user: the ones an operator can raise for one user."""
ADDRESS_KINDS = (HELLOS, LOGINS)
ALL_KINDS = (*USER_KINDS, GROUP_MESSAGES, *ADDRESS_KINDS)


def configured_rate(config: LimitsConfig, kind: str) -> Rate:
    """``[limits] KIND`` and ``KIND_burst`` as a Rate."""
    return Rate(float(getattr(config, kind)), int(getattr(config, f"{kind}_burst")))


class Overrides(Protocol):
    """The rates an operator set for single users (cim.limits.overrides)."""

    def rate(self, user: str, kind: str) -> Rate | None: ...


class _NoOverrides:
    def rate(self, user: str, kind: str) -> Rate | None:
        return None


NO_OVERRIDES: Overrides = _NoOverrides()


class RateLimits(Protocol):
    """What the services ask: may ``key`` do a ``kind`` now?"""

    def take(self, kind: str, key: str) -> float:
        """0.0 when allowed (and counted), else the seconds until it would be."""

    def give_back(self, kind: str, key: str) -> None:
        """An allowed action did not happen after all (a later check refused it)."""


class Limits:
    """The node's limits: one set of buckets per kind, at the configured rate or the
    user's own."""

    def __init__(
        self, clock: IReactorTime, config: LimitsConfig, overrides: Overrides = NO_OVERRIDES
    ) -> None:
        self.config = config
        self.overrides = overrides
        self._buckets = {
            kind: TokenBuckets(clock, configured_rate(config, kind), config.max_keys)
            for kind in ALL_KINDS
        }

    def buckets(self, kind: str) -> TokenBuckets:
        """The buckets of one kind (for tests and memory checks)."""
        return self._buckets[kind]

    def rate(self, kind: str, key: str) -> Rate:
        """The rate ``key`` gets: its own for a user with one, else the configured one."""
        if kind in USER_KINDS:
            own = self.overrides.rate(key, kind)
            if own is not None:
                return own
        return self._buckets[kind].rate

    def take(self, kind: str, key: str) -> float:
        own = self.overrides.rate(key, kind) if kind in USER_KINDS else None
        return self._buckets[kind].take(key, own)

    def give_back(self, kind: str, key: str) -> None:
        self._buckets[kind].give_back(key)


class NoLimits:
    """A node without limits (the unit tests' default): everything is allowed."""

    def take(self, kind: str, key: str) -> float:
        return 0.0

    def give_back(self, kind: str, key: str) -> None:
        pass


NO_LIMITS: RateLimits = NoLimits()
