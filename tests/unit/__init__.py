"""The unit suite (`make test-unit`): no processes, no services, no sleeps.

Time is a ``task.Clock`` or ``MemoryReactorClock``, connections are ``StringTransport`` or
iosim, databases are SQLite files run inline; the shared fakes are in ``tests.fakes``.
"""
