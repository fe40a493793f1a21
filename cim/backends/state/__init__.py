"""Sessions, routes, receipts and sequence numbers: the state backend and its four facets.

The contracts are in cim.interfaces (ISessionStore, IRouteStore, IReceiptStore,
ISequenceStore, and IStateBackend that holds one of each). Two backends keep them:
``memory`` (everything in this process, for a single node) and ``redis`` (shared by a
cluster). Each is a package with one module per facet and one small core the facets
share; ``make_state_store`` builds the one the [state] section names.
"""

from __future__ import annotations

import hashlib

from cim.config import StateConfig
from cim.interfaces import IStateBackend
from cim.reactor import ICimReactor

# Why a session ended, as listeners are told (the IM node maps them to Kicked codes).
REASON_LOGGED_IN_ELSEWHERE = "logged in elsewhere"
REASON_LOGGED_OUT = "logged out"
REASON_EXPIRED = "expired"
REASON_KICKED_BY_ADMIN = "kicked by an administrator"
REASON_PASSWORD_CHANGED = "the password was changed: log in with the new one"
"""A password change ends the sessions of the user's other devices (a stolen token or
ticket stops working with the old password); the device that changed it stays."""
REASON_LOGGED_IN_AGAIN = "logged in again on this device"
"""The same device logged in again (fast reconnect): its older session goes."""
REASON_MOVED = "the user's other devices are on another node now: log in again"
"""A node's refresh found the user's devices online on another node (the ring moved the
user while this node lives): the device logs in again (Kicked SESSION_EXPIRED) and
joins them, instead of two nodes taking the user's route from each other."""
REASON_TOO_MANY_DEVICES = "too many devices online: this one was idle longest"
"""[router] duplicate_login = kick_old past [im] max_devices_per_user (the IM node picks
the device idle longest; cim.im.sessions)."""

# The duplicate-login policies ([router] duplicate_login) create_session decides by.
KICK_OLD = "kick_old"
REFUSE_NEW = "refuse_new"


def token_hash(token: str) -> str:
    """The key a session is stored under.

    Only the hash is ever stored, so a dump of the state store holds nothing a client
    could log in with. The router (which issues tokens) and the IM node (which checks
    them) must agree on this exact formula.
    """
    return hashlib.sha256(token.encode()).hexdigest()


def make_state_store(config: StateConfig, reactor: ICimReactor) -> IStateBackend:
    """The backend the [state] section names, not yet started.

    The Redis backend is imported only when configured: txredisapi installs the
    default reactor as a side effect of being imported, which must not happen before
    twistd has installed the one it was asked for.
    """
    if config.backend == "redis":
        from cim.backends.state.redis import RedisState

        return RedisState(
            reactor,
            config.redis_url,
            config.redis_timeout,
            config.route_ttl,
            dedup_window=config.dedup_window,
        )
    from cim.backends.state.memory import MemoryState

    return MemoryState(reactor, dedup_window=config.dedup_window)
