"""Accounts: who may log in, and how their passwords are kept.

Passwords are hashed with scrypt (memory-hard, in the standard library) into a
self-describing string ``scrypt$n$r$p$salt$hash``: raising the cost in ``[accounts]``
applies to new passwords while old hashes still verify with the parameters they carry.

A KDF run costs tens of milliseconds by design, so it never runs on the reactor
thread: ``AccountStore`` runs it on its own small "cim-kdf" pool, apart from the
database pool, so a burst of logins cannot starve message storage of database threads.
``BlockingAccountStore`` applies the same rules inline for ``cimctl``.

Some names are never given to a new account, whoever creates it (cimctl, the logic
service's registration, any other path through ``add_user``): ``system``, ``admin``,
``root``, every name starting with ``@`` (the server's own senders, such as
``@system``) and ``[accounts] reserved_names``, without regard to case, so nobody
can pass for the service in a child's contact list. An existing account with such a
name (made before the rule) keeps working; only creating one is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar

from sqlalchemy.engine import Connection, Engine
from twisted.internet.defer import Deferred, fail, succeed

from cim.backends.threads import BELOW_THE_REACTOR
from cim.config import AccountsConfig
from cim.reactor import ICimReactor
from cim.storage.accounts import (
    UserRecord,
    delete_user_txn,
    insert_user_txn,
    list_users_txn,
    password_hash_txn,
    set_password_hash_txn,
    user_exists_txn,
    user_txn,
)
from cim.storage.database import Database, Runner, ThreadPoolRunner
from cim.storage.schema import USER_KINDS

__all__ = [
    "RESERVED_NAMES",
    "AccountStore",
    "BlockingAccountStore",
    "InvalidUserKind",
    "InvalidUserName",
    "NoSuchUser",
    "ReservedUserName",
    "UserExists",
    "UserRecord",
    "WeakPassword",
    "check_new_password",
    "check_new_user_name",
    "check_user_kind",
    "check_user_name",
    "hash_password",
    "is_reserved_name",
    "verify_password",
]

T = TypeVar("T")
P = ParamSpec("P")

USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
RESERVED_NAMES = frozenset({"system", "admin", "root"})
"""Reserved whatever the config says; names starting with '@' are reserved too."""
MAX_PASSWORD_LENGTH = 1024
"""Longer passwords are refused: scrypt's first pass is linear in the input length."""

KDF_THREADS = 2
SCHEME = "scrypt"
SALT_BYTES = 16
HASH_BYTES = 32

# Bounds for parameters read back from a stored hash: the config's own limits, so a
# tampered row cannot make one verification allocate gigabytes.
_MAX_N = 1 << 20
_MAX_R = 32
_MAX_P = 16
_SCRYPT_MAXMEM_LIMIT = 2**31 - 1  # hashlib.scrypt refuses more


class InvalidUserName(ValueError):
    def __init__(self, name: str) -> None:
        shown = name if len(name) <= 80 else name[:80] + "..."
        super().__init__(
            f"invalid user name {shown!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
        self.name = name


class ReservedUserName(InvalidUserName):
    """A well-formed name no new account may take (see the module's docstring)."""

    def __init__(self, name: str) -> None:
        ValueError.__init__(self, f"the user name {name!r} is reserved")
        self.name = name


class InvalidUserKind(ValueError):
    def __init__(self, kind: str) -> None:
        super().__init__(f"invalid user kind {kind!r}: expected one of {', '.join(USER_KINDS)}")
        self.kind = kind


class WeakPassword(ValueError):
    """The password breaks a rule; the message states the rule, never the password."""


class UserExists(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(f"user {name!r} already exists")
        self.name = name


class NoSuchUser(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(f"no such user: {name!r}")
        self.name = name


# --- rules ----------------------------------------------------------------------------


def check_user_name(name: str) -> None:
    if USER_NAME.fullmatch(name) is None:
        raise InvalidUserName(name)


def is_reserved_name(name: str, config: AccountsConfig) -> bool:
    folded = name.casefold()
    return (
        folded.startswith("@")
        or folded in RESERVED_NAMES
        or any(folded == other.casefold() for other in config.reserved_names)
    )


def check_new_user_name(name: str, config: AccountsConfig) -> None:
    """The rule for a name a new account takes: well-formed and not reserved."""
    if is_reserved_name(name, config):
        raise ReservedUserName(name[:80])
    check_user_name(name)


def check_user_kind(kind: str) -> None:
    if kind not in USER_KINDS:
        raise InvalidUserKind(kind)


def check_new_password(password: str, config: AccountsConfig) -> None:
    if len(password) < config.min_password_length:
        raise WeakPassword(
            f"password too short: at least {config.min_password_length} characters needed"
        )
    if len(password) > MAX_PASSWORD_LENGTH:
        raise WeakPassword(f"password too long: at most {MAX_PASSWORD_LENGTH} characters")


# --- hashing --------------------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _encode(n: int, r: int, p: int, salt: bytes, digest: bytes) -> str:
    return f"{SCHEME}${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    # OpenSSL needs 128*r*(n+2) bytes for V plus 128*r*p for B; its default cap
    # (32 MiB) is below what the allowed parameters can ask for.
    needed = 128 * r * (n + 2 + p)
    if needed > _SCRYPT_MAXMEM_LIMIT:
        raise ValueError(
            f"scrypt n={n} r={r} p={p} needs {needed >> 20} MiB, more than the 2 GiB allowed"
        )
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=needed, dklen=length
    )


def hash_password(password: str, config: AccountsConfig, salt: bytes | None = None) -> str:
    """``scrypt$n$r$p$salt_b64$hash_b64`` with the config's cost; blocking."""
    if salt is None:
        salt = os.urandom(SALT_BYTES)
    n, r, p = config.scrypt_n, config.scrypt_r, config.scrypt_p
    return _encode(n, r, p, salt, _scrypt(password, salt, n, r, p, HASH_BYTES))


def _decode(encoded: str) -> tuple[int, int, int, bytes, bytes] | None:
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != SCHEME or not all(x.isdigit() for x in parts[1:4]):
        return None
    n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
    try:
        salt = base64.b64decode(parts[4], validate=True)
        digest = base64.b64decode(parts[5], validate=True)
    except binascii.Error:
        return None
    if not (2 <= n <= _MAX_N and n & (n - 1) == 0 and 1 <= r <= _MAX_R and 1 <= p <= _MAX_P):
        return None
    if not salt or not 16 <= len(digest) <= 64:
        return None
    return n, r, p, salt, digest


def verify_password(password: str, encoded: str) -> bool:
    """Whether password matches; a malformed hash matches nothing. Blocking."""
    decoded = _decode(encoded)
    if decoded is None:
        return False
    n, r, p, salt, expected = decoded
    try:
        actual = _scrypt(password, salt, n, r, p, len(expected))
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


def _dummy_hash(config: AccountsConfig) -> str:
    """A hash nobody's password matches, with today's cost, built without running the KDF.

    Verifying an unknown user against it costs what verifying a real user costs, so
    the answer time does not tell an attacker which user names exist.
    """
    n, r, p = config.scrypt_n, config.scrypt_r, config.scrypt_p
    return _encode(n, r, p, os.urandom(SALT_BYTES), os.urandom(HASH_BYTES))


def _check_new_account(name: str, password: str, kind: str, config: AccountsConfig) -> None:
    check_new_user_name(name, config)
    check_user_kind(kind)
    check_new_password(password, config)


# --- the daemon's store ---------------------------------------------------------------


class AccountStore:
    """Accounts for the daemon: database work on the db pool, KDF work on "cim-kdf".

    Rule violations (InvalidUserName, InvalidUserKind, WeakPassword) fail the returned
    Deferred before any KDF or database work is done.
    """

    def __init__(
        self,
        db: Database,
        config: AccountsConfig,
        reactor: ICimReactor,
        kdf_runner: Runner | None = None,
    ) -> None:
        self._db = db
        self._config = config
        self._reactor = reactor
        self._kdf = ThreadPoolRunner(
            "cim-kdf", KDF_THREADS, reactor, kdf_runner, nice=BELOW_THE_REACTOR
        )
        self._dummy_hash = _dummy_hash(config)

    def start(self) -> None:
        self._kdf.start()

    def stop(self) -> Deferred[None]:
        """Let running hash checks finish, then stop the KDF threads."""
        return self._kdf.stop()

    def _now(self) -> float:
        return float(self._reactor.seconds())

    def check_password(self, name: str, password: str) -> Deferred[bool]:
        """True only for an existing user with this password.

        An unknown user still costs one KDF run on a dummy hash, so the timing does
        not reveal whether the user exists.
        """
        if USER_NAME.fullmatch(name) is None:
            lookup: Deferred[str | None] = succeed(None)
        else:
            lookup = self._db.run(password_hash_txn, name)

        def verify(stored: str | None) -> Deferred[bool]:
            against = self._dummy_hash if stored is None else stored
            return self._kdf.run(lambda: verify_password(password, against) and stored is not None)

        return lookup.addCallback(verify)

    def exists(self, name: str) -> Deferred[bool]:
        if USER_NAME.fullmatch(name) is None:
            return succeed(False)
        return self._db.run(user_exists_txn, name)

    def get_user(self, name: str) -> Deferred[UserRecord | None]:
        if USER_NAME.fullmatch(name) is None:
            return succeed(None)
        return self._db.run(user_txn, name)

    def add_user(self, name: str, password: str, kind: str = "person") -> Deferred[None]:
        """Fails with InvalidUserName (ReservedUserName), InvalidUserKind, WeakPassword
        or UserExists."""
        try:
            _check_new_account(name, password, kind, self._config)
        except ValueError as exc:
            return fail(exc)
        hashed = self._kdf.run(lambda: hash_password(password, self._config))

        def insert(encoded: str) -> Deferred[int | None]:
            return self._db.run(insert_user_txn, name, encoded, kind, self._now())

        def inserted(user_id: int | None) -> None:
            if user_id is None:
                raise UserExists(name)

        return hashed.addCallback(insert).addCallback(inserted)

    def delete_user(self, name: str) -> Deferred[bool]:
        """False when there was no such user."""
        if USER_NAME.fullmatch(name) is None:
            return succeed(False)
        return self._db.run(delete_user_txn, name)

    def set_password(self, name: str, password: str) -> Deferred[None]:
        """Fails with NoSuchUser or WeakPassword."""
        if USER_NAME.fullmatch(name) is None:
            return fail(NoSuchUser(name))
        try:
            check_new_password(password, self._config)
        except WeakPassword as exc:
            return fail(exc)
        hashed = self._kdf.run(lambda: hash_password(password, self._config))

        def store(encoded: str) -> Deferred[bool]:
            return self._db.run(set_password_hash_txn, name, encoded)

        def stored(found: bool) -> None:
            if not found:
                raise NoSuchUser(name)

        return hashed.addCallback(store).addCallback(stored)

    def list_users(self) -> Deferred[list[str]]:
        def names(records: list[UserRecord]) -> list[str]:
            return [record.name for record in records]

        return self._db.run(list_users_txn).addCallback(names)


# --- cimctl's store -------------------------------------------------------------------


class BlockingAccountStore:
    """The same rules and transactions, run inline: for cimctl, a short-lived CLI."""

    def __init__(self, engine: Engine, config: AccountsConfig, clock: Callable[[], float]) -> None:
        """``clock`` gives seconds since the epoch (cimctl passes ``time.time``)."""
        self._engine = engine
        self._config = config
        self._clock = clock

    def _run(
        self, txn: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        with self._engine.begin() as connection:
            return txn(connection, *args, **kwargs)

    def check_password(self, name: str, password: str) -> bool:
        stored = self._run(password_hash_txn, name) if USER_NAME.fullmatch(name) else None
        against = _dummy_hash(self._config) if stored is None else stored
        return verify_password(password, against) and stored is not None

    def exists(self, name: str) -> bool:
        return USER_NAME.fullmatch(name) is not None and self._run(user_exists_txn, name)

    def add_user(self, name: str, password: str, kind: str = "person") -> None:
        _check_new_account(name, password, kind, self._config)
        encoded = hash_password(password, self._config)
        if self._run(insert_user_txn, name, encoded, kind, self._clock()) is None:
            raise UserExists(name)

    def delete_user(self, name: str) -> bool:
        return USER_NAME.fullmatch(name) is not None and self._run(delete_user_txn, name)

    def set_password(self, name: str, password: str) -> None:
        if USER_NAME.fullmatch(name) is None:
            raise NoSuchUser(name)
        check_new_password(password, self._config)
        encoded = hash_password(password, self._config)
        if not self._run(set_password_hash_txn, name, encoded):
            raise NoSuchUser(name)

    def list_users(self) -> list[UserRecord]:
        return self._run(list_users_txn)
