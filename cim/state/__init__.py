"""Session, route and online state behind IStateStore; the embedded backend is in memory."""

from __future__ import annotations

import hashlib


def token_hash(token: str) -> str:
    """The key a session is stored under.

    Only the hash is ever stored, so a dump of the state store holds nothing a client
    could log in with. The router (which issues tokens) and the IM node (which checks
    them) must agree on this exact formula.
    """
    return hashlib.sha256(token.encode()).hexdigest()
