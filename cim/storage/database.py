"""The database behind cim: SQLAlchemy Core on a named thread pool, schema by Alembic.

SQLAlchemy blocks, so nothing here touches a connection on the reactor thread. Work is
a plain function ending in ``_txn`` that takes a ``Connection`` and returns plain data;
``Database.run`` runs it inside one transaction on the "cim-db" pool (the one
thread-pool runner, ``cim.backends.threads``), in the style of Buildbot's
``db/pool.py`` and Synapse's ``runInteraction``.

The schema belongs to Alembic from the first table on. The embedded SQLite file
migrates itself when the daemon starts, because nobody else administers it; a
PostgreSQL database is shared by many nodes and is upgraded on purpose with
``cimctl db upgrade``, so a node only checks it and refuses to run against an old one.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.pool import StaticPool
from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

from cim.backends.threads import BELOW_THE_REACTOR, PoolNotRunning, Runner, ThreadPoolRunner
from cim.reactor import ICimReactor

T = TypeVar("T")
P = ParamSpec("P")

MIGRATIONS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrations")

SQLITE_BUSY_TIMEOUT = 15.0
"""Seconds a SQLite writer waits for another process (say ``cimctl``) to let go."""

POSTGRESQL_CONNECT_TIMEOUT = 10
"""Seconds before an unreachable PostgreSQL is reported instead of hanging start-up."""

_MIGRATION_LOCK_KEY = 0x63696D  # "cim": one upgrade at a time on a shared PostgreSQL


class DatabaseRevisionError(Exception):
    """The database schema is not the one this code was written for."""

    def __init__(self, current: str | None, head: str, message: str) -> None:
        super().__init__(message)
        self.current = current
        self.head = head


class DatabaseBehind(DatabaseRevisionError):
    """An older schema: an operator has to run the migrations."""

    def __init__(self, current: str | None, head: str) -> None:
        super().__init__(
            current,
            head,
            f"database is at revision {current or 'none'}, the code needs {head}: "
            "run `cimctl db upgrade`",
        )


class DatabaseAhead(DatabaseRevisionError):
    """A revision this code does not know: a newer cim upgraded the database."""

    def __init__(self, current: str | None, head: str) -> None:
        super().__init__(
            current,
            head,
            f"database is at revision {current}, which this code (at {head}) does not know: "
            "it was upgraded by a newer cim",
        )


class DatabaseNotRunning(PoolNotRunning):
    """Work was handed to a Database that is not started or is stopping."""


# --- engines ------------------------------------------------------------------------


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def _sqlite_is_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:")


def with_pinned_driver(url: str | URL) -> URL:
    """Pin a bare ``postgresql://`` to psycopg2, the driver cim pins.

    SQLAlchemy 2.1 made psycopg (3) the default for a bare ``postgresql://``; an
    operator who wants it can still say ``postgresql+psycopg://``.
    """
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        return parsed.set(drivername="postgresql+psycopg2")
    return parsed


def create_engine_for(url: str, *, pool_size: int = 5) -> Engine:
    """An engine set up the way cim needs it; creates the SQLite file's directory.

    SQLite is put in WAL mode (readers do not block the writer), with a busy timeout,
    with foreign keys enforced, and with SQLAlchemy's documented recipe that makes
    pysqlite begin transactions when SQLAlchemy says so. ``BEGIN IMMEDIATE`` takes the
    write lock at the start: a transaction that read first and then tries to write
    would otherwise fail at once with "database is locked" when ``cimctl`` wrote in
    between, instead of waiting for the busy timeout.
    """
    parsed = with_pinned_driver(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(
            parsed,
            pool_size=pool_size,
            max_overflow=0,
            pool_pre_ping=True,
            connect_args={"connect_timeout": POSTGRESQL_CONNECT_TIMEOUT},
        )
    memory = _sqlite_is_memory(parsed)
    connect_args = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT}
    if memory:
        # One shared connection, or every checkout would see a new empty database.
        engine = create_engine(parsed, poolclass=StaticPool, connect_args=connect_args)
    else:
        assert parsed.database is not None
        directory = os.path.dirname(os.path.abspath(parsed.database))
        os.makedirs(directory, exist_ok=True)
        engine = create_engine(parsed, connect_args=connect_args)

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        if not memory:
            cursor.execute("PRAGMA journal_mode=WAL")
            # In WAL mode NORMAL syncs the log at checkpoints, not at every commit: a
            # commit survives the node's crash (kill -9: the log is in the kernel's
            # cache), and only a crash of the machine itself can take the last
            # moments' commits. FULL cost an fsync per group commit, ~4 ms of every
            # message's latency here; PostgreSQL is the engine for machine crashes
            # (docs/operations.md, "SQLite and durability").
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _sqlite_foreign_keys(connection: Connection, enabled: bool) -> None:
    """Outside any transaction, where SQLite honours the pragma at all."""
    driver = connection.connection.driver_connection
    assert driver is not None
    driver.execute(f"PRAGMA foreign_keys={'ON' if enabled else 'OFF'}")


# --- migrations ---------------------------------------------------------------------


def alembic_config(url: str | None = None) -> Config:
    """Alembic's configuration without an alembic.ini, for code and for developers.

    A developer writing a migration can run, for example,
    ``command.revision(alembic_config(url), "groups", rev_id="0002", autogenerate=True)``
    against a database upgraded to the current head.
    """
    config = Config()
    config.set_main_option("script_location", MIGRATIONS_DIR)
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


@functools.cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The revision the code needs: the newest migration in ``migrations/versions``."""
    head = _scripts().get_current_head()
    assert head is not None, "no migrations found"
    return head


def known_revisions() -> frozenset[str]:
    return frozenset(script.revision for script in _scripts().walk_revisions())


def revision_of(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def check_revision(connection: Connection) -> None:
    """Raise DatabaseBehind or DatabaseAhead unless the schema is exactly at head."""
    current = revision_of(connection)
    head = head_revision()
    if current == head:
        return
    if current is None or current in known_revisions():
        raise DatabaseBehind(current, head)
    raise DatabaseAhead(current, head)


def upgrade_engine(engine: Engine) -> tuple[str | None, str]:
    """Migrate to head in one transaction; returns the revisions before and after.

    On SQLite, foreign keys are off while migrating, because batch migrations rebuild
    a table by dropping it, and a cascade would empty the tables that refer to it;
    the result is checked with ``PRAGMA foreign_key_check`` before committing.
    """
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as connection:
        if sqlite:
            _sqlite_foreign_keys(connection, False)
        try:
            with connection.begin():
                if engine.dialect.name == "postgresql":
                    connection.exec_driver_sql(
                        f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_KEY})"
                    )
                before = revision_of(connection)
                if before is not None and before not in known_revisions():
                    raise DatabaseAhead(before, head_revision())
                config = alembic_config()
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
                if sqlite:
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise RuntimeError(f"migration broke foreign keys: {broken[:5]}")
                after = revision_of(connection)
        finally:
            if sqlite:
                _sqlite_foreign_keys(connection, True)
    assert after is not None
    return before, after


def upgrade(url: str) -> tuple[str | None, str]:
    """Blocking: migrate the database at url to head (``cimctl db upgrade``)."""
    engine = create_engine_for(url, pool_size=1)
    try:
        return upgrade_engine(engine)
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    """Blocking: the revision the database is at; None when empty or not created yet."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and not _sqlite_is_memory(parsed):
        assert parsed.database is not None
        if not os.path.exists(parsed.database):
            return None
    engine = create_engine_for(url, pool_size=1)
    try:
        with engine.connect() as connection:
            return revision_of(connection)
    finally:
        engine.dispose()


def prepare_schema(engine: Engine) -> None:
    """What the daemon and cimctl do before use: migrate SQLite, check PostgreSQL."""
    if engine.dialect.name == "sqlite":
        with engine.connect() as connection:
            current = revision_of(connection)
        if current != head_revision():  # at head already: nothing to load or run
            upgrade_engine(engine)
        return
    with engine.connect() as connection:
        check_revision(connection)


def open_engine(url: str) -> Engine:
    """Blocking, for short-lived tools: an engine whose schema is ready to use."""
    engine = create_engine_for(url, pool_size=1)
    try:
        prepare_schema(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine


# --- the database -------------------------------------------------------------------


class Database:
    """cim's database, used from the reactor thread; every call returns a Deferred."""

    def __init__(
        self,
        url: str,
        reactor: ICimReactor | None,
        threads: int = 4,
        runner: Runner | None = None,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        self.url = url
        # SQLite has one writer anyway; one thread turns lock waits into a queue.
        self._threads = 1 if is_sqlite(url) else threads
        self._work = ThreadPoolRunner(
            "cim-db", self._threads, reactor, runner, on_wait, nice=BELOW_THE_REACTOR
        )
        self._engine: Engine | None = None
        self._closing = False

    @property
    def backlog(self) -> int:
        """Transactions handed over and not finished (the node's backpressure reads it)."""
        return self._work.pending

    def start(self) -> Deferred[None]:
        """Open the engine and make the schema ready: migrate SQLite, check PostgreSQL.

        Fails with DatabaseBehind (or DatabaseAhead) for a PostgreSQL database at
        another revision; the pool is then stopped again, so a failed start-up does
        not leave threads behind.
        """
        self._work.start()
        d = self._work.run(self._open)
        d.addErrback(self._start_failed)
        return d

    def _open(self) -> None:
        engine = create_engine_for(self.url, pool_size=self._threads)
        try:
            prepare_schema(engine)
        except BaseException:
            engine.dispose()
            raise
        self._engine = engine

    def _start_failed(self, failure: Failure) -> Deferred[None]:
        self._closing = True
        d = self._work.stop()
        d.addCallback(lambda _: failure)
        return d

    def run(
        self, txn: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> Deferred[T]:
        """Run ``txn(connection, *args, **kwargs)`` in one transaction on the pool.

        The transaction commits when txn returns and rolls back when it raises; the
        Deferred fires with txn's result or fails with its exception.
        """
        engine = self._engine
        if engine is None or self._closing:
            return fail(DatabaseNotRunning("the database is not started or is stopping"))

        def transaction() -> T:
            with engine.begin() as connection:
                return txn(connection, *args, **kwargs)

        return self._work.run(transaction)

    def stop(self) -> Deferred[None]:
        """Refuse new work, let queued transactions finish, then stop the pool.

        This is the SIGTERM path: whatever the daemon handed over before stopping is
        committed before the process exits.
        """
        self._closing = True
        d = self._work.stop()
        d.addCallback(self._dispose)
        return d

    def _dispose(self, _: object) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
