"""How a timeline append is answered: a Deferred, or two plain calls.

An append is answered once, after the journal's write (or the database's commit).
Most callers hold the Deferred ``Timelines.append`` returns. The 1:1 hot path
(``cim.im.direct``) instead hands ``Timelines.append_then`` the two methods to call:
a Deferred, its two callbacks and its firing cost about 2.5 µs a message here, a
tenth of what the journal adds to a message. Either kind is an ``Answer``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.storage.timeline import Appended

__all__ = ["Answer", "Then"]

_log = Logger(namespace="cim.timeline")


class Answer(Protocol):
    """What the journal answers through: ``Deferred`` is one, ``Then`` the other."""

    called: Any

    def callback(self, result: Appended) -> object: ...

    def errback(self, fail: Any = None) -> object: ...


class Then:
    """Answers by calling ``done(appended, *args)``, or ``failed(failure, *args)``.

    As a Deferred chain ``addCallback(done); addErrback(failed)`` would: an exception
    raised by ``done`` goes to ``failed``; one raised by ``failed`` is logged. Neither
    reaches the journal, which is answering a whole turn's messages in a loop.
    """

    __slots__ = ("_args", "_done", "_failed", "called")

    def __init__(
        self,
        done: Callable[..., object],
        failed: Callable[..., object],
        args: tuple[Any, ...],
    ) -> None:
        self.called = False
        self._done = done
        self._failed = failed
        self._args = args

    def callback(self, result: Appended) -> None:
        self.called = True
        try:
            self._done(result, *self._args)
        except Exception:
            self._fail(Failure())

    def errback(self, fail: Any = None) -> None:
        self.called = True
        self._fail(fail if isinstance(fail, Failure) else Failure(fail))

    def _fail(self, failure: Failure) -> None:
        try:
            self._failed(failure, *self._args)
        except Exception:
            _log.failure("answering a message the timeline could not take")
