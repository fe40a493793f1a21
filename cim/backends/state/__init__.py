"""Session, route and online state behind IStateStore; the embedded backend is in memory."""

from __future__ import annotations

import hashlib
from typing import Any

from cim.config import StateConfig
from cim.interfaces import IStateStore


def token_hash(token: str) -> str:
    """The key a session is stored under.

    Only the hash is ever stored, so a dump of the state store holds nothing a client
    could log in with. The router (which issues tokens) and the IM node (which checks
    them) must agree on this exact formula.
    """
    return hashlib.sha256(token.encode()).hexdigest()


def make_state_store(config: StateConfig, reactor: Any) -> IStateStore:
    """The backend the [state] section names, not yet started.

    The Redis backend is imported only when configured: txredisapi installs the
    default reactor as a side effect of being imported, which must not happen before
    twistd has installed the one it was asked for.
    """
    if config.backend == "redis":
        from cim.backends.state.redis import RedisStateStore

        return RedisStateStore(
            reactor,
            config.redis_url,
            config.redis_timeout,
            config.route_ttl,
            dedup_window=config.dedup_window,
        )
    from cim.backends.state.memory import MemoryStateStore

    return MemoryStateStore(reactor, dedup_window=config.dedup_window)
