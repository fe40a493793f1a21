"""Read deadlines for HTTP connections: a slow request is cut in seconds, not kept.

twisted.web times a connection out only when it has been *silent* for a while
(12 hours by default), so a peer sending half a request and then a byte every few
seconds holds its connection, and a file descriptor, for ever. ``BoundedChannel``
gives each phase of a request its own deadline, counted from the start of the
phase and never pushed back by trickling bytes:

- waiting for a request: the first request's head must be complete within
  ``header_timeout`` of connecting; between keep-alive requests the connection may
  sit silent for ``idle_timeout``, and once the next request's first byte arrives
  its head has ``header_timeout`` to complete;
- the body: ``body_timeout`` seconds of grace, then it must have kept up an average
  of ``min_body_rate`` bytes a second, so a slow but honest upload of a big chunk
  still gets through while a trickle is cut;
- the answer: a client that reads nothing of a response for ``send_timeout`` is cut.

A cut request whose head had begun is answered ``408`` before the connection
closes; a request head over 16 KiB is answered ``431``, a malformed one ``400``.
Each of these answers is JSON and is followed by a short lingering close (the
write side is shut, what the peer still sends is read and dropped for up to
``LINGER`` seconds), so the peer reads the answer instead of a connection reset.

Whoever admits connections (``cim.http.limits``) watches each channel's phases
through a ``ConnectionWatch``: a connection waiting for a request is one it may
close to make room; one reading a body or being answered is not.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

__all__ = [
    "DEFAULT_DEADLINES",
    "LINGER",
    "MAX_HEAD_SIZE",
    "BoundedChannel",
    "BoundedSite",
    "ConnectionWatch",
    "Phase",
    "RequestDeadlines",
]

MAX_HEAD_SIZE = 16384
"""The largest request line plus headers accepted; more is answered 431."""

LINGER = 2.0
"""Seconds a connection that was answered with an error is read (and dropped) from
before it is aborted, so the answer is not lost to a reset."""


@dataclass(frozen=True)
class RequestDeadlines:
    """``[http]``'s deadlines, in seconds (``min_body_rate`` in bytes a second)."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    min_body_rate: float = 1024.0
    idle_timeout: float = 60.0
    send_timeout: float = 60.0


DEFAULT_DEADLINES = RequestDeadlines()


class Phase(Enum):
    WAITING = "waiting"
    """No byte of the next request yet."""
    HEAD = "head"
    """Reading a request line and headers."""
    BODY = "body"
    SERVING = "serving"
    """The request is in; the resource is answering it."""
    CLOSING = "closing"
    """Answered with an error; dropping what the peer still sends."""


class ConnectionWatch(Protocol):
    """What a channel tells whoever admitted it about its life."""

    def waiting(self) -> None:
        """The connection waits for a request (or reads its head): it may be closed."""

    def busy(self) -> None:
        """A request's body is arriving or it is being answered: leave it alone."""

    def cut(self, reason: str) -> None:
        """The connection was cut for ``reason`` (a deadline, an oversized head)."""

    def closed(self) -> None:
        """The connection is gone."""


class _Unwatched:
    def waiting(self) -> None:
        pass

    def busy(self) -> None:
        pass

    def cut(self, reason: str) -> None:
        pass

    def closed(self) -> None:
        pass


UNWATCHED: ConnectionWatch = _Unwatched()

_REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
}

MAX_LENGTH_DIGITS = 19
"""The most digits a Content-Length may have (any 64-bit size)."""


class BoundedChannel(http.HTTPChannel):
    """An HTTP/1.1 channel whose request phases have deadlines; see the module.

    Its deadlines come from its site (``BoundedSite.deadlines``); ``watch`` is set by
    whoever admitted the connection.
    """

    MAX_LENGTH = MAX_HEAD_SIZE
    abortTimeout = int(LINGER)  # after the idle timeout's close, for a peer that reads nothing
    watch: ConnectionWatch = UNWATCHED
    site: BoundedSite
    callLater: Callable[..., IDelayedCall]
    """The site's reactor's ``callLater``, set by Twisted's ``HTTPFactory.buildProtocol``."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = Phase.WAITING
        self._deadline: IDelayedCall | None = None
        self._stall: IDelayedCall | None = None
        self._head_bytes = 0
        self._body_bytes = 0
        self._body_started = 0.0
        self._got_bytes = False

    @property
    def deadlines(self) -> RequestDeadlines:
        return self.site.deadlines

    # --- the phases -----------------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self._enter_waiting()
        # The first request is why the peer connected: its head has header_timeout
        # from now, whether or not a byte of it has arrived.
        self._set_deadline(self.deadlines.header_timeout, self._head_too_slow)

    def _enter_waiting(self) -> None:
        self.phase = Phase.WAITING
        self._head_bytes = 0
        self._got_bytes = False
        self.watch.waiting()

    def dataReceived(self, data: bytes) -> None:
        if self.phase is Phase.CLOSING:
            return
        if self.phase is Phase.WAITING and data:
            self.phase = Phase.HEAD
            self._got_bytes = True
            if self._deadline is None:
                self._set_deadline(self.deadlines.header_timeout, self._head_too_slow)
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self.phase is Phase.CLOSING:
            return
        self._head_bytes += len(line) + 2
        if self._head_bytes > MAX_HEAD_SIZE:
            self._head_too_large()
            return
        super().lineReceived(line)

    def headerReceived(self, line: bytes) -> bool:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and len(value.strip()) > MAX_LENGTH_DIGITS:
            # twisted.web would int() it: past 4,300 digits that raises out of the
            # protocol (a logged traceback, no answer); past 19 it is no body we take.
            self.watch.cut("bad_request")
            self._answer_and_close(413, "body_too_large", "the declared body is too large")
            return False
        return bool(super().headerReceived(line))

    def lineLengthExceeded(self, line: bytes) -> None:
        self._head_too_large()

    def allHeadersReceived(self) -> None:
        super().allHeadersReceived()
        if self.phase is Phase.CLOSING or self.length == 0:
            return  # no body: allContentReceived follows at once
        self.phase = Phase.BODY
        self._body_bytes = 0
        self._body_started = float(self.site.reactor.seconds())
        self.watch.busy()
        self._set_deadline(self.deadlines.body_timeout, self._check_body_rate)

    def rawDataReceived(self, data: bytes) -> None:
        if self.phase is Phase.CLOSING:
            return
        if self.phase is Phase.BODY:
            self._body_bytes += len(data)
        super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        self._deadline = _cancelled(self._deadline)
        self.phase = Phase.SERVING
        self.watch.busy()
        super().allContentReceived()

    def requestDone(self, request: server.Request) -> None:
        self._stall = _cancelled(self._stall)
        if self.persistent:
            pipelined = any(self._dataBuffer)
            self._enter_waiting()
            if pipelined:
                # The next request's head already began arriving while this one
                # was answered: its deadline runs from now.
                self.phase = Phase.HEAD
                self._set_deadline(self.deadlines.header_timeout, self._head_too_slow)
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._deadline = _cancelled(self._deadline)
        self._stall = _cancelled(self._stall)
        self.phase = Phase.CLOSING
        super().connectionLost(reason)
        self.watch.closed()

    # --- answers the resource never sees -----------------------------------------------

    def timeoutConnection(self) -> None:
        """twisted.web's idle timeout (a keep-alive connection silent for idle_timeout),
        without its log line per connection: the counters in /health say it."""
        self.watch.cut("idle_timeout")
        if self.abortTimeout is not None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)
        self.loseConnection()

    def _respondToBadRequestAndDisconnect(self) -> None:
        """twisted.web's answer to a malformed head, as JSON and with a lingering close."""
        self.watch.cut("bad_request")
        self._answer_and_close(400, "bad_request", "the request is not valid HTTP/1.1")

    def _head_too_large(self) -> None:
        self.watch.cut("head_too_large")
        self._answer_and_close(
            431,
            "request_header_fields_too_large",
            f"the request line and headers exceed {MAX_HEAD_SIZE} bytes",
        )

    def _head_too_slow(self) -> None:
        self._deadline = None
        self.watch.cut("header_timeout")
        if not self._got_bytes and self.phase is Phase.WAITING:
            # Nothing was asked: there is nobody to answer.
            self._close_now()
            return
        self._answer_and_close(
            408,
            "request_timeout",
            f"the request's head did not arrive within {self.deadlines.header_timeout:g} s",
        )

    def _check_body_rate(self) -> None:
        self._deadline = None
        deadlines = self.deadlines
        allowed = deadlines.body_timeout
        if deadlines.min_body_rate > 0:
            allowed += self._body_bytes / deadlines.min_body_rate
        remaining = self._body_started + allowed - float(self.site.reactor.seconds())
        if remaining > 0:
            self._set_deadline(remaining, self._check_body_rate)
            return
        self.watch.cut("body_timeout")
        if deadlines.min_body_rate > 0:
            message = (
                f"the request body arrived slower than {deadlines.min_body_rate:g} bytes/s "
                f"(after {deadlines.body_timeout:g} s)"
            )
        else:
            message = f"the request body did not arrive within {deadlines.body_timeout:g} s"
        self._answer_and_close(408, "request_timeout", message)

    def _answer_and_close(self, status: int, code: str, message: str) -> None:
        if self.phase is Phase.CLOSING or self.transport is None:
            return
        self.phase = Phase.CLOSING
        self._deadline = _cancelled(self._deadline)
        self.setTimeout(None)
        body = json.dumps({"error": code, "message": message}, separators=(",", ":")).encode()
        head = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n\r\n"
        ).encode("ascii")
        transport: Any = self.transport
        transport.write(head + body)
        transport.unregisterProducer()
        half_close = ITCPTransport.providedBy(transport)
        if half_close:
            # Half-close: the answer and a FIN go out; whatever the peer still sends
            # is read and dropped until it closes, or LINGER seconds have passed.
            transport.loseWriteConnection()
            transport.resumeProducing()
            self._deadline = self.callLater(LINGER, self._close_now)
        else:
            transport.loseConnection()

    def _close_now(self) -> None:
        self._deadline = None
        self.phase = Phase.CLOSING
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def evict(self) -> None:
        """Close a connection that is waiting for a request, to make room for another."""
        self.watch.cut("evicted")
        self._close_now()

    # --- a client that reads nothing of its answer -------------------------------------

    def pauseProducing(self) -> None:
        super().pauseProducing()
        if self.phase is Phase.SERVING and self._stall is None:
            self._stall = self.callLater(self.deadlines.send_timeout, self._not_reading)

    def resumeProducing(self) -> None:
        self._stall = _cancelled(self._stall)
        super().resumeProducing()

    def _not_reading(self) -> None:
        self._stall = None
        self.watch.cut("send_timeout")
        self._close_now()

    # --- timers ----------------------------------------------------------------------

    def _set_deadline(self, seconds: float, fire: Any) -> None:
        _cancelled(self._deadline)
        self._deadline = self.callLater(seconds, fire)


def _cancelled(call: IDelayedCall | None) -> IDelayedCall | None:
    """Cancels ``call`` if it is pending; always None, for ``x = _cancelled(x)``."""
    if call is not None and call.active():
        call.cancel()
    return None


class BoundedSite(server.Site):
    """A Site whose connections are ``BoundedChannel`` with ``deadlines``, for JSON."""

    reactor: IReactorTime

    def __init__(
        self,
        resource: Resource,
        reactor: IReactorTime,
        deadlines: RequestDeadlines = DEFAULT_DEADLINES,
        **kwargs: Any,
    ) -> None:
        # cim speaks JSON: form bodies are not parsed into request.args, which would
        # read a whole body into memory and can raise out of twisted.web (a
        # Content-Type with a \x1e in it), leaving a traceback and no answer.
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, reactor=reactor, timeout=deadlines.idle_timeout, **kwargs)
        self.deadlines = deadlines
        self.displayTracebacks = False

    protocol = BoundedChannel  # type: ignore[assignment]

    def apply(self, deadlines: RequestDeadlines) -> None:
        """Use ``deadlines`` (``[http]``) for connections made from now on."""
        self.deadlines = deadlines
        self.timeOut = deadlines.idle_timeout
