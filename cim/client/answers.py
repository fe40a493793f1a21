"""The session's questions to the node that wait for an answer frame.

Who is online, group and contact requests, history pages, offline pages and
summaries: each sends one request frame and fires when its answer comes, or fails
when the connection goes before it does. Answers without a request id (all but
GROUP_A and CONTACTS_A) come in the order the requests went, except history, which
the node may answer out of order: history requests go one at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from google.protobuf.message import Message as ProtobufMessage
from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

from cim.protocols import cim_pb2

__all__ = ["Answers"]


class Sender(Protocol):
    def send(self, frame_type: int, message: ProtobufMessage) -> None: ...


class Answers:
    """Requests in flight on the session's current connection, matched to answers.

    ``connection`` returns the current connection (None while offline) and
    ``not_connected`` the error a request made while offline fails with.
    """

    def __init__(
        self, connection: Callable[[], Sender | None], not_connected: Callable[[], Exception]
    ) -> None:
        self._connection = connection
        self._not_connected = not_connected
        self._online: list[Deferred[cim_pb2.OnlineA]] = []
        self._groups: dict[int, Deferred[cim_pb2.GroupAnswer]] = {}
        self._contacts: dict[int, Deferred[cim_pb2.ContactsAnswer]] = {}
        self._offline: list[Deferred[cim_pb2.OfflineA]] = []
        self._summaries: list[Deferred[cim_pb2.OfflineSummaryA]] = []
        self._history: list[Deferred[cim_pb2.HistoryA]] = []
        self._history_waiting: list[tuple[cim_pb2.HistoryR, Deferred[cim_pb2.HistoryA]]] = []
        self._next_request_id = 1

    def _ask(self, waiters: list[Any], frame_type: int, request: ProtobufMessage) -> Deferred[Any]:
        connection = self._connection()
        if connection is None:
            return fail(self._not_connected())
        waiter: Deferred[Any] = Deferred()
        waiters.append(waiter)
        connection.send(frame_type, request)
        return waiter

    def online(self, offset: int, limit: int) -> Deferred[cim_pb2.OnlineA]:
        request = cim_pb2.OnlineR(offset=offset, limit=limit)
        return self._ask(self._online, cim_pb2.ONLINE_R, request)

    def offline_page(self, request: cim_pb2.OfflineR) -> Deferred[cim_pb2.OfflineA]:
        return self._ask(self._offline, cim_pb2.OFFLINE_R, request)

    def offline_summary(self) -> Deferred[cim_pb2.OfflineSummaryA]:
        request = cim_pb2.OfflineSummaryR()
        return self._ask(self._summaries, cim_pb2.OFFLINE_SUMMARY_R, request)

    def group(self, request: cim_pb2.GroupRequest) -> Deferred[cim_pb2.GroupAnswer]:
        return self._ask_by_id(self._groups, cim_pb2.GROUP_R, request)

    def contacts(self, request: cim_pb2.ContactsRequest) -> Deferred[cim_pb2.ContactsAnswer]:
        return self._ask_by_id(self._contacts, cim_pb2.CONTACTS_R, request)

    def _ask_by_id(
        self, waiters: dict[int, Deferred[Any]], frame_type: int, request: Any
    ) -> Deferred[Any]:
        """A request whose answer carries its ``request_id`` (numbered here)."""
        connection = self._connection()
        if connection is None:
            return fail(self._not_connected())
        waiter: Deferred[Any] = Deferred()
        request.request_id = self._next_request_id
        self._next_request_id += 1
        waiters[request.request_id] = waiter
        connection.send(frame_type, request)
        return waiter

    def history(self, request: cim_pb2.HistoryR) -> Deferred[cim_pb2.HistoryA]:
        if self._connection() is None:
            return fail(self._not_connected())
        waiter: Deferred[cim_pb2.HistoryA] = Deferred()
        self._history_waiting.append((request, waiter))
        self._send_history()
        return waiter

    def _send_history(self) -> None:
        # HISTORY_A carries no request id and the node may answer two requests out of
        # order (each is a database query): one at a time keeps answers matched.
        connection = self._connection()
        if self._history or not self._history_waiting or connection is None:
            return
        request, waiter = self._history_waiting.pop(0)
        self._history.append(waiter)
        connection.send(cim_pb2.HISTORY_R, request)

    def answer(self, frame_type: int, message: ProtobufMessage) -> bool:
        """Hand an answer frame to its request; False if the frame is not an answer."""
        by_id: dict[int, dict[int, Deferred[Any]]] = {
            cim_pb2.GROUP_A: self._groups,
            cim_pb2.CONTACTS_A: self._contacts,
        }
        numbered = by_id.get(frame_type)
        if numbered is not None:
            waiter = numbered.pop(message.request_id, None)  # type: ignore[attr-defined]
            if waiter is not None:
                waiter.callback(message)
            return True
        queues: dict[int, list[Any]] = {
            cim_pb2.ONLINE_A: self._online,
            cim_pb2.OFFLINE_A: self._offline,
            cim_pb2.OFFLINE_SUMMARY_A: self._summaries,
            cim_pb2.HISTORY_A: self._history,
        }
        waiters = queues.get(frame_type)
        if waiters is None:
            return False
        if waiters:
            waiters.pop(0).callback(message)
        if frame_type == cim_pb2.HISTORY_A:
            self._send_history()
        return True

    def connection_lost(self, reason: Failure) -> None:
        """Every request in flight (or waiting its turn) fails with ``reason``."""
        waiters: list[Deferred[Any]] = [*self._online, *self._groups.values()]
        waiters += [*self._contacts.values(), *self._offline, *self._summaries, *self._history]
        waiters += [waiter for _, waiter in self._history_waiting]
        self._online, self._groups, self._offline, self._summaries = [], {}, [], []
        self._contacts = {}
        self._history, self._history_waiting = [], []
        for waiter in waiters:
            waiter.errback(reason)
