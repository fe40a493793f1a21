"""The session's requests to the node that wait for an answer: deadlines, retries, refusals.

Every request the library makes (the catch-up summary, pulls and their end, ack:R, history
pages, group and contact requests, who is online) has a deadline. A request that has no
answer by then is sent again after a wait from the one backoff policy
(``cim.backends.backoff``), a few times, then fails with ``RequestTimedOut``: a node that
lost the request, or a database that answers slowly, costs a retry, never a session that
waits forever.

An ERROR frame naming a request (``request_type`` and ``request_id``) ends its wait at
once: ``UNAVAILABLE``, ``RATE_LIMITED`` and ``INTERNAL`` (the node could not do it now)
are retried after the node's ``retry_after_ms`` or the backoff, whichever is longer;
anything else fails the request with ``RequestRefused``. A history answer with
``error == "unavailable"`` is the same refusal in the answer's own field.

Answers are matched by ``request_id`` (numbered here), ack:A by the message id, and
ONLINE_A, which carries no id, by order. An answer with request id 0 (a release-1 node)
goes to the oldest request of its type, as release 1 matched them.

Requests are not idempotent everywhere: creating a group twice makes two groups, so a
``create`` that passes its deadline fails instead of going again (an ERROR refusal still
retries it: the node did not do it).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from google.protobuf.message import Message as ProtobufMessage
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.backends.backoff import Backoff
from cim.protocols import cim_pb2

__all__ = ["Answers", "RequestFailed", "RequestPolicy", "RequestRefused", "RequestTimedOut"]

_ERROR = cim_pb2.Error

ANSWER_TYPES: dict[int, int] = {
    cim_pb2.ONLINE_R: cim_pb2.ONLINE_A,
    cim_pb2.OFFLINE_R: cim_pb2.OFFLINE_A,
    cim_pb2.OFFLINE_ACK_R: cim_pb2.OFFLINE_ACK_A,
    cim_pb2.OFFLINE_SUMMARY_R: cim_pb2.OFFLINE_SUMMARY_A,
    cim_pb2.HISTORY_R: cim_pb2.HISTORY_A,
    cim_pb2.GROUP_R: cim_pb2.GROUP_A,
    cim_pb2.CONTACTS_R: cim_pb2.CONTACTS_A,
    cim_pb2.PUSH_R: cim_pb2.PUSH_A,
    cim_pb2.DEVICES_R: cim_pb2.DEVICES_A,
    cim_pb2.ACK_R: cim_pb2.ACK_A,
    cim_pb2.APP_STATE_R: cim_pb2.APP_STATE_A,
    cim_pb2.TYPING_R: cim_pb2.TYPING_A,
    cim_pb2.CHANGE_R: cim_pb2.CHANGE_A,
    cim_pb2.READ_R: cim_pb2.READ_A,
    cim_pb2.READERS_R: cim_pb2.READERS_A,
}
"""Each request frame and the frame that answers it."""

_BY_ORDER = frozenset((cim_pb2.ONLINE_A,))
"""Answers without any key: matched to the oldest request of their type."""

_BY_MESSAGE = frozenset((cim_pb2.ACK_A,))
"""Answers keyed by the message id they acknowledge."""

RETRYABLE = frozenset((_ERROR.UNAVAILABLE, _ERROR.RATE_LIMITED, _ERROR.INTERNAL))
"""Refusals that say "not now": the same request goes again."""


class RequestFailed(Exception):
    """A request got no usable answer (refused, or silent past its retries)."""

    def __init__(self, what: str, why: str, code: int = 0, reason: str = "") -> None:
        super().__init__(f"{what}: {why}")
        self.what = what
        self.why = why
        self.code = code
        self.reason = reason
        """The ERROR's machine-readable ``reason`` (CHANGE_R's), if it gave one."""


class RequestRefused(RequestFailed):
    """The node refused the request with an ERROR that a retry cannot change."""


class RequestTimedOut(RequestFailed):
    """No answer within the deadline, however many times the request went."""


REQUEST_BACKOFF = Backoff(initial=0.5, maximum=8.0, jitter=0.5)
"""The wait before a request goes again: 0.25-0.5 s, doubling, at most 8 s."""


@dataclass(frozen=True)
class RequestPolicy:
    """How long a request waits for its answer, and how often it goes again.

    ``deadline`` is per attempt; after ``attempts`` sends the request fails. The waits
    between attempts come from ``backoff`` (attempt 0 waits ``initial``).
    """

    deadline: float = 10.0
    attempts: int = 4
    backoff: Backoff = REQUEST_BACKOFF

    def __post_init__(self) -> None:
        if self.deadline <= 0 or self.attempts < 1:
            raise ValueError("a request needs a positive deadline and at least one attempt")


class Sender(Protocol):
    def send(self, frame_type: int, message: ProtobufMessage) -> None: ...


@dataclass(eq=False)
class _Pending:
    frame_type: int
    request: Any
    answer_type: int
    key: int
    waiter: Deferred[Any]
    retry_on_deadline: bool
    attempts: int = 0
    timer: IDelayedCall | None = None
    in_flight: bool = field(default=False)


def _name(frame_type: int) -> str:
    return cim_pb2.FrameType.Name(frame_type) if frame_type in cim_pb2.FrameType.values() else "?"


class Answers:
    """Requests in flight on the session's current connection, matched to answers.

    ``connection`` returns the current connection (None while offline) and
    ``not_connected`` the error a request made while offline fails with. A lost
    connection fails every request at once (the session asks again when it is back).
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        connection: Callable[[], Sender | None],
        not_connected: Callable[[], Exception],
        policy: RequestPolicy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.clock = clock
        self.policy = policy or RequestPolicy()
        self._rng = rng
        self._connection = connection
        self._not_connected = not_connected
        self._pending: dict[int, dict[int, _Pending]] = {}
        self._next_id = 1
        self.retries = 0
        """How many times a request went again (deadline or refusal): for tests, metrics."""

    def __len__(self) -> int:
        return sum(len(pending) for pending in self._pending.values())

    @property
    def connected(self) -> bool:
        return self._connection() is not None

    # --- asking -----------------------------------------------------------------------

    def ask(
        self, frame_type: int, request: ProtobufMessage, retry_on_deadline: bool = True
    ) -> Deferred[Any]:
        """Send ``request``; fires with its answer, or fails with a ``RequestFailed``
        (or the connection's loss)."""
        if self._connection() is None:
            return fail(self._not_connected())
        answer_type = ANSWER_TYPES[frame_type]
        if answer_type in _BY_MESSAGE:
            key = int(request.msg_id)  # type: ignore[attr-defined]
        else:
            key = self._next_id
            self._next_id += 1
            if answer_type not in _BY_ORDER:
                request.request_id = key  # type: ignore[attr-defined]
        queue = self._pending.setdefault(answer_type, {})
        previous = queue.pop(key, None)
        pending = _Pending(frame_type, request, answer_type, key, Deferred(), retry_on_deadline)
        if previous is not None:  # the same ack:R again: the newer one supersedes it
            self._cancel_timer(previous)
            pending.waiter.chainDeferred(previous.waiter)
        queue[key] = pending
        self._send(pending)
        return pending.waiter

    def online(self, offset: int, limit: int) -> Deferred[cim_pb2.OnlineA]:
        return self.ask(cim_pb2.ONLINE_R, cim_pb2.OnlineR(offset=offset, limit=limit))

    def devices(self) -> Deferred[cim_pb2.DevicesA]:
        return self.ask(cim_pb2.DEVICES_R, cim_pb2.DevicesR())

    def group(self, request: cim_pb2.GroupRequest) -> Deferred[cim_pb2.GroupAnswer]:
        creating = request.WhichOneof("op") == "create"
        return self.ask(cim_pb2.GROUP_R, request, retry_on_deadline=not creating)

    def contacts(self, request: cim_pb2.ContactsRequest) -> Deferred[cim_pb2.ContactsAnswer]:
        return self.ask(cim_pb2.CONTACTS_R, request)

    def push(self, request: cim_pb2.PushRequest) -> Deferred[cim_pb2.PushAnswer]:
        return self.ask(cim_pb2.PUSH_R, request)

    def history(self, request: cim_pb2.HistoryR) -> Deferred[cim_pb2.HistoryA]:
        return self.ask(cim_pb2.HISTORY_R, request)

    def change(self, request: cim_pb2.ChangeR) -> Deferred[cim_pb2.ChangeA]:
        """Not sent again past its deadline: an edit made twice is two entries (a
        refusal that says "not now" still goes again: the node did nothing)."""
        return self.ask(cim_pb2.CHANGE_R, request, retry_on_deadline=False)

    # --- sending and waiting ----------------------------------------------------------

    def _send(self, pending: _Pending) -> None:
        connection = self._connection()
        if connection is None:
            self._fail(pending, Failure(self._not_connected()))
            return
        pending.attempts += 1
        pending.in_flight = True
        pending.timer = self.clock.callLater(self.policy.deadline, self._expired, pending)
        connection.send(pending.frame_type, pending.request)

    def _expired(self, pending: _Pending) -> None:
        pending.timer = None
        pending.in_flight = False
        what = _name(pending.frame_type)
        if not pending.retry_on_deadline:
            why = f"no answer within {self.policy.deadline:g} s (not repeated: not idempotent)"
            self._fail(pending, Failure(RequestTimedOut(what, why)))
            return
        if pending.attempts >= self.policy.attempts:
            why = f"no answer within {self.policy.deadline:g} s, {pending.attempts} times"
            self._fail(pending, Failure(RequestTimedOut(what, why)))
            return
        self._again(pending, 0.0, f"unanswered after {self.policy.deadline:g} s")

    def _again(self, pending: _Pending, at_least: float, why: str) -> None:
        """Send ``pending`` again after the backoff (or ``at_least``, if longer)."""
        self.retries += 1
        wait = max(at_least, self.policy.backoff.delay(pending.attempts - 1, self._rng))
        self.log.info(
            "{what} {why}; asking again in {wait:.1f} s",
            what=_name(pending.frame_type),
            why=why,
            wait=wait,
        )
        pending.timer = self.clock.callLater(wait, self._resend, pending)

    def _resend(self, pending: _Pending) -> None:
        pending.timer = None
        if self._pending.get(pending.answer_type, {}).get(pending.key) is pending:
            self._send(pending)

    # --- the node's answers -----------------------------------------------------------

    def answer(self, frame_type: int, message: ProtobufMessage) -> bool:
        """Hand an answer frame to its request; False if the frame is not an answer."""
        if frame_type not in ANSWER_TYPES.values():
            return False
        if frame_type in _BY_MESSAGE:
            pending = self._find(frame_type, int(message.msg_id))  # type: ignore[attr-defined]
        elif frame_type in _BY_ORDER:
            pending = self._oldest(frame_type)
        else:
            key = int(message.request_id)  # type: ignore[attr-defined]
            pending = self._find(frame_type, key) if key else self._oldest(frame_type)
        if pending is None:
            return True  # a late answer to a request that ended: nothing waits for it
        if frame_type == cim_pb2.HISTORY_A and message.error == "unavailable":  # type: ignore[attr-defined]
            self._refused_now(pending, _ERROR.UNAVAILABLE, message.message, 0)  # type: ignore[attr-defined]
            return True
        self._succeed(pending, message)
        return True

    def refused(self, error: cim_pb2.Error) -> bool:
        """An ERROR frame: ends the wait of the request it names; False if it names none
        (a msg:R's refusal is the outbox's)."""
        answer_type = ANSWER_TYPES.get(error.request_type)
        if answer_type is None:
            return False
        if error.request_id and answer_type not in _BY_ORDER | _BY_MESSAGE:
            pending = self._find(answer_type, error.request_id)
        else:
            pending = self._oldest(answer_type, in_flight=True)
        if pending is None:
            return True
        self._refused_now(pending, error.code, error.message, error.retry_after_ms, error.reason)
        return True

    def _refused_now(
        self, pending: _Pending, code: int, message: str, retry_ms: int, reason: str = ""
    ) -> None:
        self._cancel_timer(pending)
        pending.in_flight = False
        code_name = _ERROR.Code.Name(code) if code in _ERROR.Code.values() else str(code)
        why = f"{code_name}: {message}" if message else code_name
        if code in RETRYABLE and pending.attempts < self.policy.attempts:
            self._again(pending, retry_ms / 1000, f"refused ({why})")
            return
        refused = RequestRefused(_name(pending.frame_type), why, code, reason)
        self._fail(pending, Failure(refused))

    def _find(self, answer_type: int, key: int) -> _Pending | None:
        return self._pending.get(answer_type, {}).get(key)

    def _oldest(self, answer_type: int, in_flight: bool = False) -> _Pending | None:
        for pending in self._pending.get(answer_type, {}).values():
            if pending.in_flight or not in_flight:
                return pending
        return None

    # --- ending -----------------------------------------------------------------------

    def _succeed(self, pending: _Pending, message: ProtobufMessage) -> None:
        self._forget(pending)
        pending.waiter.callback(message)

    def _fail(self, pending: _Pending, failure: Failure) -> None:
        self._forget(pending)
        pending.waiter.errback(failure)

    def _forget(self, pending: _Pending) -> None:
        self._cancel_timer(pending)
        queue = self._pending.get(pending.answer_type, {})
        if queue.get(pending.key) is pending:
            del queue[pending.key]

    def _cancel_timer(self, pending: _Pending) -> None:
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        pending.timer = None

    def connection_lost(self, reason: Failure) -> None:
        """Every request in flight (or waiting to go again) fails with ``reason``."""
        everything = [p for queue in self._pending.values() for p in queue.values()]
        for pending in everything:
            self._fail(pending, reason)
