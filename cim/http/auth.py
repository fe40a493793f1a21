"""Bearer tokens: reading one from a request, and the session it names.

Every HTTP service but admin authenticates with the router's token, sent as
``Authorization: Bearer TOKEN`` (RFC 6750). Only its hash ever reaches the session
store (``cim.backends.state.token_hash``). When the store cannot answer, every service
says so the same way: a 503 ``state_unavailable`` with ``Retry-After``, so clients
retry instead of logging in again.
"""

from __future__ import annotations

import re

from twisted.web import server

from cim.backends.state import token_hash
from cim.http.site import HttpError
from cim.interfaces import ISessionStore, SessionRecord, StateUnavailable

__all__ = [
    "BEARER_CHALLENGE",
    "SEND_TOKEN",
    "BearerSessions",
    "bearer_token",
    "invalid_token",
    "state_unavailable",
]

BEARER_CHALLENGE = (b"WWW-Authenticate", b'Bearer realm="cim"')
SEND_TOKEN = "send the router's token as Authorization: Bearer TOKEN"
"""What a 401 tells a client that sent no token, or one naming no session."""

_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9._~+/=-]{1,512})")
"""RFC 6750's ``Bearer 1*SP b64token``, bounded: the router's tokens are 43 characters."""


def bearer_token(request: server.Request) -> str | None:
    """The token of an ``Authorization: Bearer`` header; None when absent or malformed."""
    header = request.getHeader(b"authorization")
    if header is None:
        return None
    match = _BEARER.fullmatch(header.decode("latin-1").strip())
    return match.group(1) if match else None


def invalid_token(message: str = SEND_TOKEN) -> HttpError:
    """The 401 for a missing, malformed, expired or unknown token."""
    return HttpError(401, "invalid_token", message, (BEARER_CHALLENGE,))


def state_unavailable() -> HttpError:
    """The 503 for a session store that did not answer (``StateUnavailable``)."""
    return HttpError(
        503,
        "state_unavailable",
        "the session store is unreachable; try again shortly",
        ((b"Retry-After", b"5"),),
    )


class BearerSessions:
    """Token to session, through the state backend's ``sessions`` facet."""

    def __init__(self, sessions: ISessionStore) -> None:
        self._sessions = sessions

    async def session(self, request: server.Request) -> SessionRecord:
        """The caller's live session; a 401 without one, a 503 when the store is down."""
        token = bearer_token(request)
        if token is None:
            raise invalid_token()
        try:
            record = await self._sessions.session_for_token(token_hash(token))
        except StateUnavailable:
            raise state_unavailable() from None
        if record is None:
            raise invalid_token()
        return record

    async def user(self, request: server.Request) -> str:
        """The name of the caller's user (see ``session``)."""
        return (await self.session(request)).user

    async def end_session(self, request: server.Request, reason: str) -> SessionRecord | None:
        """Log the caller out: the session ended, or None when the token names none."""
        token = bearer_token(request)
        if token is None:
            return None
        try:
            return await self._sessions.end_session(token_hash(token), reason)
        except StateUnavailable:
            raise state_unavailable() from None
