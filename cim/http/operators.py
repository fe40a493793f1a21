"""Operators: who may use the admin API, and how they prove it.

Every operator request (the router's online list and kick, the admin service's
``/metrics`` and full ``/health``) carries ``Authorization: Bearer TOKEN``, from
loopback or not: a reverse proxy on the same host makes every caller local, so where a
request comes from proves nothing. The tokens live in one file (``[admin]
token_file``, default ``<data_dir>/admin_token``), one operator per line::

    # name:token
    ops1:8d0mVZ0c3R1cGlkLWJ1dC1yYW5kb20tMzItYnl0ZXMtaGVyZQ
    prometheus:...

``cimctl keygen --admin --name NAME`` adds the line (or replaces that name's token):
32 random bytes, URL-safe base64, the file kept at mode 0600. The name is who the
operation log says did a thing; deleting a line revokes that operator. The daemon
looks at the file's identity (one ``stat``) on each operator request, which are rare,
and reads it again when it changed, so neither adding nor revoking needs a restart.
A file that cannot be read or parsed refuses everyone until it is fixed: an admin API
that fails open is the bug this module exists to prevent.

Tokens are compared with ``hmac.compare_digest`` against every line, without stopping
at the first match, so the time taken says nothing about any token.
"""

from __future__ import annotations

import base64
import hmac
import os
import re
import stat
from collections.abc import Mapping
from typing import Protocol

from twisted.logger import Logger
from twisted.web import server

from cim.http.auth import bearer_token, invalid_token

__all__ = [
    "DEFAULT_OPERATOR",
    "NO_OPERATORS",
    "OPERATOR_NAME",
    "NoOperators",
    "OperatorTokens",
    "Operators",
    "TokenFileError",
    "choose_token",
    "new_token",
    "parse_tokens",
    "read_tokens",
    "with_token",
]

OPERATOR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DEFAULT_OPERATOR = "admin"
"""The name ``cimctl keygen --admin`` gives a token when it is not told one."""
TOKEN_BYTES = 32
_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]{32,512}")
"""RFC 6750's b64token (what a Bearer header can carry), and at least 32 characters."""

SEND_ADMIN_TOKEN = (
    "send an operator's token as Authorization: Bearer TOKEN "
    "(cimctl keygen --admin writes one to [admin] token_file)"
)


class TokenFileError(ValueError):
    """The token file is malformed; the message names the line, never a token."""


def new_token() -> str:
    """32 random bytes, URL-safe base64 without padding (43 characters)."""
    return base64.urlsafe_b64encode(os.urandom(TOKEN_BYTES)).rstrip(b"=").decode()


def _line_name(line: str) -> str | None:
    """The operator a line is about, or None for a blank line or a comment."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    return text.partition(":")[0].strip()


def parse_tokens(text: str, path: str) -> dict[str, str]:
    """name -> token from the file's text; TokenFileError for the first bad line."""
    tokens: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        name = _line_name(line)
        if name is None:
            continue
        _, colon, token = line.strip().partition(":")
        token = token.strip()
        where = f"{path}, line {number}"
        if not colon or OPERATOR_NAME.fullmatch(name) is None:
            raise TokenFileError(
                f"{where}: expected NAME:TOKEN, NAME 1-64 letters, digits, '.', '_' or '-'"
            )
        if _TOKEN.fullmatch(token) is None:
            raise TokenFileError(
                f"{where}: the token of {name!r} must be 32 to 512 characters of "
                "letters, digits and -._~+/= (cimctl keygen --admin makes one)"
            )
        if name in tokens:
            raise TokenFileError(f"{where}: {name!r} is named twice")
        if token in tokens.values():
            raise TokenFileError(f"{where}: {name!r} has another operator's token")
        tokens[name] = token
    return tokens


def read_tokens(path: str) -> dict[str, str]:
    """The file's tokens; OSError (FileNotFoundError when absent) or TokenFileError."""
    with open(path, encoding="utf-8") as handle:
        return parse_tokens(handle.read(), path)


def with_token(text: str, name: str, token: str) -> str:
    """The file's text with name's token set: its line replaced, or one appended.

    Every other line (other operators, comments) is kept as it was.
    """
    lines = text.splitlines()
    entry = f"{name}:{token}"
    replaced = [entry if _line_name(line) == name else line for line in lines]
    if entry not in replaced:
        if not lines:
            replaced.append("# cim operators' admin tokens, one NAME:TOKEN per line")
        replaced.append(entry)
    return "\n".join(replaced) + "\n"


def choose_token(tokens: Mapping[str, str], name: str | None, path: str) -> tuple[str, str]:
    """(name, token) for a client: the named operator's, or the file's only one."""
    if name is not None:
        if name not in tokens:
            raise TokenFileError(f"{path} has no token for {name!r}")
        return name, tokens[name]
    if len(tokens) == 1:
        return next(iter(tokens.items()))
    if not tokens:
        raise TokenFileError(f"{path} holds no token: cimctl keygen --admin writes one")
    raise TokenFileError(
        f"{path} holds the tokens of {', '.join(sorted(tokens))}: choose one with --operator"
    )


class Operators(Protocol):
    """What a site asks of its operators: who a request's token names."""

    async def authenticate(self, request: server.Request) -> str:
        """The operator's name; raises the 401 itself."""


class OperatorTokens:
    """The daemon's view of the token file: who a bearer token names, if anyone."""

    _log = Logger()

    def __init__(self, path: str) -> None:
        self.path = path
        self._tokens: dict[str, str] = {}
        self._identity: tuple[int, ...] | None = None
        self._problem: str | None = None

    def load(self) -> None:
        """Read the file at start-up: a malformed one raises TokenFileError (the node
        does not start); a missing one is said in the log, and refuses everyone."""
        self._refresh()
        if self._problem is not None and self._identity is not None:
            raise TokenFileError(self._problem)
        if not self._tokens:
            self._log.warn(
                "no admin token in {path}: the admin API refuses every operator request "
                "until cimctl keygen --admin writes one",
                path=self.path,
            )

    def _refresh(self) -> None:
        try:
            info = os.stat(self.path)
        except OSError as exc:
            self._forget(None, f"cannot read {self.path}: {exc.strerror}")
            return
        # ctime too: a chmod that makes an unreadable file readable changes only that.
        identity = (info.st_ino, info.st_dev, info.st_mtime_ns, info.st_ctime_ns, info.st_size)
        if identity == self._identity:
            return
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            self._log.warn(
                "{path} is readable by other users (mode {mode:o}): chmod 600 it",
                path=self.path,
                mode=stat.S_IMODE(info.st_mode),
            )
        try:
            tokens = read_tokens(self.path)
        except (OSError, UnicodeDecodeError, TokenFileError) as exc:
            problem = str(exc) if isinstance(exc, TokenFileError) else f"cannot read {self.path}"
            self._forget(identity, problem)
            self._log.error(
                "admin tokens: {problem}; every operator request is refused until it is fixed",
                problem=problem,
            )
            return
        self._tokens, self._identity, self._problem = tokens, identity, None
        self._log.info(
            "admin tokens: {count} operators in {path}", count=len(tokens), path=self.path
        )

    def _forget(self, identity: tuple[int, ...] | None, problem: str) -> None:
        self._tokens, self._identity, self._problem = {}, identity, problem

    def operator(self, token: str) -> str | None:
        """The name whose token this is, or None; the file is read again if it changed."""
        self._refresh()
        found = None
        presented = token.encode()
        for name, known in self._tokens.items():
            if hmac.compare_digest(presented, known.encode()):
                found = name
        return found

    async def authenticate(self, request: server.Request) -> str:
        """The operator the request's bearer token names; a 401 for anything else."""
        token = bearer_token(request)
        name = None if token is None else self.operator(token)
        if name is None:
            raise invalid_token(SEND_ADMIN_TOKEN)
        return name


class NoOperators:
    """For a site built without a token file (tests, tools): refuses every operator."""

    async def authenticate(self, request: server.Request) -> str:
        raise invalid_token(SEND_ADMIN_TOKEN)


NO_OPERATORS = NoOperators()
