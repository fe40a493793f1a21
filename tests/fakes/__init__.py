"""The fakes the unit tests share: a whole node in memory, and the logic service on it.

``tests.fakes.node``: an IM node on a ``MemoryReactorClock`` with clients over iosim.
``tests.fakes.logic``: the logic service's HTTP API through ``StubTreq`` on that node,
with SQLite run inline. Fakes that one test module needs stay in that module.
"""
