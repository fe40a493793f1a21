"""The unit suite (`make test-unit`): no processes, no services, no sleeps.

Time is a ``task.Clock`` or ``MemoryReactorClock``, connections are ``StringTransport`` or
iosim, databases are SQLite files run inline; the shared fakes are in ``tests.fakes``.
An empty SQLite database is given the migrated schema as a copy of one migrated once
per process (``tests.fakes.schema``); the migrations' own tests migrate for real.
"""

from tests.fakes import schema

schema.install()
