"""Alembic's environment for cim, loaded by ``alembic.command`` functions.

cim has no alembic.ini: ``cim.storage.database`` builds the configuration in code and
hands over an open connection in ``config.attributes["connection"]``, so a migration
runs inside the caller's transaction and on an engine set up the cim way. A bare
``sqlalchemy.url`` main option works too (``--sql`` output, or a developer's
autogenerate run).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection, make_url

from cim.storage.database import create_engine_for
from cim.storage.schema import metadata


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things: batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        compare_server_default=True,
    )


def _run_offline(url: str) -> None:
    context.configure(
        url=url,
        target_metadata=metadata,
        literal_binds=True,
        render_as_batch=make_url(url).get_backend_name() == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError("cim migrations need a connection or sqlalchemy.url")
    engine = create_engine_for(url, pool_size=1)
    try:
        with engine.begin() as own_connection:
            _configure(own_connection)
            context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    offline_url = context.config.get_main_option("sqlalchemy.url")
    if offline_url is None:
        raise RuntimeError("offline (--sql) migrations need sqlalchemy.url")
    _run_offline(offline_url)
else:
    _run_online()
