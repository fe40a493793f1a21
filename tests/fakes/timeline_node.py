"""A node's timelines in memory, speaking the client's wire (docs/TIMELINES design).

For the client library's tests: ``TimelineNode`` holds conversations (messages numbered
1, 2, 3, ...), one device's cursors, and answers the frames a ``ChatClient`` sends over
a ``FakeConnection`` the way the design says (summary, pulls newest first past the
cursor, OFFLINE_ACK_R, HISTORY_R by seq, ack:R moving the cursor, msg:R appended then
msg:A). Answers wait in a queue until ``pump`` delivers them, so a test can look
between a request and its answer, refuse a request with an ERROR, or drop it.

``session(node)`` makes the ``ChatClient`` these tests drive (a ``Clock``, a router that
never answers, what the application was shown); ``texts`` lists the shown texts.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from cim.client.session import ChatClient
from cim.protocols import cim_pb2


class FakeTransport:
    def __init__(self, connection: FakeConnection) -> None:
        self.connection = connection
        self.closed = False

    def loseConnection(self) -> None:
        self.closed = True


class FakeConnection:
    """What the session sees as its connection: ``send`` goes to the node."""

    def __init__(self, node: TimelineNode) -> None:
        self.node = node
        self.transport = FakeTransport(self)

    def send(self, frame_type: int, message: Any) -> None:
        copy = type(message)()
        copy.CopyFrom(message)
        self.node.received(self, frame_type, copy)

    def lose_connection(self) -> None:
        self.transport.closed = True


class TimelineNode:
    """One user's device's view of the node: timelines, cursors, answers."""

    def __init__(self, user: str = "bob", page: int = 3) -> None:
        self.user = user
        self.page = page
        self.timelines: dict[str, list[cim_pb2.Message]] = {}
        self.where: dict[str, tuple[str, str]] = {}  # conversation -> (peer, group)
        self.cursors: dict[str, int] = {}
        self.read_marks: dict[str, int] = {}
        self.readers: list[str] = []
        """Who READERS_A says read the message asked about."""
        """The user's read marks (READ_R), per conversation."""
        self.sent: list[tuple[int, Any]] = []
        self.queue: list[tuple[FakeConnection, int, Any]] = []
        self.swallow: set[int] = set()
        """Request types the node never answers (a lost request, a stuck database)."""
        self.refusals: dict[int, list[cim_pb2.Error]] = {}
        """Per request type, ERRORs to answer the next requests with (instead of answering)."""
        self.next_id = 1000
        self.client: Any = None
        self.connection: FakeConnection | None = None

    # --- the timelines ----------------------------------------------------------------

    def append(self, sender: str, text: str, peer: str = "", group: str = "") -> cim_pb2.Message:
        """A message written to a conversation (seq assigned); not sent to anyone."""
        conversation = f"g:{group}" if group else "d:" + ":".join(sorted((sender, peer)))
        timeline = self.timelines.setdefault(conversation, [])
        other = peer if sender == self.user else sender
        self.where[conversation] = ("", group) if group else (other, "")
        self.cursors.setdefault(conversation, 0)
        self.next_id += 1
        message = cim_pb2.Message(
            id=self.next_id,
            to="" if group else peer,
            group=group,
            text=text,
            conversation=conversation,
            seq=len(timeline) + 1,
            sent_at_ms=1_700_000_000_000 + self.next_id,
            device="web",
        )
        setattr(message, "from", sender)
        timeline.append(message)
        return message

    def live(self, message: cim_pb2.Message) -> None:
        """The node's live copy (msg:N) reaches the client."""
        self.client.frame_received(cim_pb2.MSG_N, _copy(message))

    def connect(self, client: Any) -> FakeConnection:
        """The client logs in here (the dialer's part is tested elsewhere)."""
        self.client = client
        self.connection = FakeConnection(self)
        client._online(self.connection, "fake:1")
        return self.connection

    def of_type(self, frame_type: int) -> list[Any]:
        return [message for kind, message in self.sent if kind == frame_type]

    # --- answering --------------------------------------------------------------------

    def received(self, connection: FakeConnection, frame_type: int, message: Any) -> None:
        self.sent.append((frame_type, message))
        if frame_type in self.swallow:
            return
        self.queue.append((connection, frame_type, message))

    def pump(self, rounds: int | None = None) -> None:
        """Answer what the client asked: ``rounds`` requests, or (None) until it asks
        nothing more (bounded)."""
        for _ in range(rounds or 200):
            if not self.queue:
                return
            connection, frame_type, message = self.queue.pop(0)
            if connection is not self.connection or connection.transport.closed:
                continue  # the connection went: so did its requests
            for answer_type, answer in self.answer(frame_type, message):
                self.client.frame_received(answer_type, answer)
        if rounds is None:
            raise AssertionError("the client kept asking")

    def answer(self, frame_type: int, message: Any) -> list[tuple[int, Any]]:
        refusals = self.refusals.get(frame_type)
        if refusals:
            error = refusals.pop(0)
            error.request_type = frame_type  # type: ignore[assignment]
            error.request_id = getattr(message, "request_id", 0)
            error.client_seq = getattr(message, "client_seq", 0)
            return [(cim_pb2.ERROR, error)]
        handler: Callable[[Any], list[tuple[int, Any]]] | None = {
            cim_pb2.OFFLINE_SUMMARY_R: self._summary,
            cim_pb2.OFFLINE_R: self._pull,
            cim_pb2.OFFLINE_ACK_R: self._end_pull,
            cim_pb2.HISTORY_R: self._history,
            cim_pb2.ACK_R: self._ack,
            cim_pb2.MSG_R: self._message,
            cim_pb2.ONLINE_R: lambda r: [(cim_pb2.ONLINE_A, cim_pb2.OnlineA(total=1))],
            cim_pb2.READ_R: self._read,
            cim_pb2.READERS_R: lambda r: [
                (
                    cim_pb2.READERS_A,
                    cim_pb2.ReadersA(
                        request_id=r.request_id,
                        conversation=r.conversation,
                        seq=r.seq,
                        count=len(self.readers),
                        readers=self.readers,
                        members=2,
                    ),
                )
            ],
        }.get(frame_type)
        return handler(message) if handler is not None else []

    def _move(self, cursors: Any) -> int:
        moved = 0
        for cursor in cursors:
            if cursor.seq > self.cursors.get(cursor.conversation, 0):
                self.cursors[cursor.conversation] = cursor.seq
                moved += 1
        return moved

    def _read(self, request: cim_pb2.ReadR) -> list[tuple[int, Any]]:
        """READ_R: the user's mark moves forward only, never past the end."""
        last = len(self.timelines.get(request.conversation, []))
        if not 0 < request.seq <= last:
            error = cim_pb2.Error(
                code=cim_pb2.Error.BAD_REQUEST,
                message="past the end",
                request_type=cim_pb2.READ_R,
                request_id=request.request_id,
            )
            return [(cim_pb2.ERROR, error)]
        before = self.read_marks.get(request.conversation, 0)
        mark = self.read_marks[request.conversation] = max(before, request.seq)
        answer = cim_pb2.ReadA(
            request_id=request.request_id,
            conversation=request.conversation,
            seq=mark,
            moved=mark > before,
            last_seq=last,
        )
        return [(cim_pb2.READ_A, answer)]

    def _summary(self, request: cim_pb2.OfflineSummaryR) -> list[tuple[int, Any]]:
        answer = cim_pb2.OfflineSummaryA(request_id=request.request_id)
        newest_first = sorted(self.timelines, key=lambda c: -self.timelines[c][-1].id)
        for conversation in newest_first:
            timeline = self.timelines[conversation]
            cursor = self.cursors.get(conversation, 0)
            if cursor >= len(timeline):
                answer.caught_up.add(conversation=conversation, seq=cursor)
                continue
            peer, group = self.where[conversation]
            answer.conversations.add(
                conversation=conversation,
                peer=peer,
                group=group,
                count=len(timeline) - cursor,
                last_seq=len(timeline),
                cursor=cursor,
                newest=timeline[-1],
            )
            answer.total += len(timeline) - cursor
        return [(cim_pb2.OFFLINE_SUMMARY_A, answer)]

    def _pull(self, request: cim_pb2.OfflineR) -> list[tuple[int, Any]]:
        moved = self._move(request.acks)
        conversation = request.conversation
        timeline = self.timelines.get(conversation, [])
        cursor = self.cursors.get(conversation, 0)
        top = request.before - 1 if request.before else len(timeline)
        low = max(cursor, top - self.page)
        page = [_copy(m) for m in reversed(timeline[low:top])]
        answer = cim_pb2.OfflineA(
            messages=page,
            more=low > cursor,
            next_before=low + 1 if low > cursor else 0,
            acknowledged=moved,
            conversation=conversation,
            request_id=request.request_id,
        )
        return [(cim_pb2.OFFLINE_A, answer)]

    def _end_pull(self, request: cim_pb2.OfflineAckR) -> list[tuple[int, Any]]:
        moved = self._move(request.cursors)
        answer = cim_pb2.OfflineAckA(acknowledged=moved, request_id=request.request_id)
        return [(cim_pb2.OFFLINE_ACK_A, answer)]

    def _history(self, request: cim_pb2.HistoryR) -> list[tuple[int, Any]]:
        if request.group:
            conversation = f"g:{request.group}"
        else:
            conversation = "d:" + ":".join(sorted((self.user, request.peer)))
        timeline = self.timelines.get(conversation, [])
        top = request.before - 1 if request.before else len(timeline)
        limit = request.limit or self.page
        low = max(request.after, top - limit)
        page = [_copy(m) for m in reversed(timeline[low:top])]
        more = low > request.after and low > 0
        answer = cim_pb2.HistoryA(
            messages=page,
            more=more,
            next_before=low + 1 if more else 0,
            request_id=request.request_id,
        )
        return [(cim_pb2.HISTORY_A, answer)]

    def _ack(self, request: cim_pb2.AckR) -> list[tuple[int, Any]]:
        self._move([cim_pb2.Cursor(conversation=request.conversation, seq=request.through_seq)])
        return [(cim_pb2.ACK_A, cim_pb2.AckA(msg_id=request.msg_id))]

    def _message(self, request: cim_pb2.Message) -> list[tuple[int, Any]]:
        peer = request.to
        stored = self.append(self.user, request.text, peer=peer, group=request.group)
        stored.client_seq = request.client_seq
        stored.device = getattr(self.client, "device", stored.device)  # the sender's
        answer = cim_pb2.MsgA(
            client_seq=request.client_seq,
            msg_id=stored.id,
            conversation=stored.conversation,
            seq=stored.seq,
        )
        ack = cim_pb2.AckN(
            msg_id=stored.id, client_seq=request.client_seq, status=cim_pb2.STORED, to=peer
        )
        return [(cim_pb2.MSG_A, answer), (cim_pb2.ACK_N, ack)]


def _copy(message: cim_pb2.Message) -> cim_pb2.Message:
    copy = cim_pb2.Message()
    copy.CopyFrom(message)
    return copy


# --- the client under test ---------------------------------------------------------


class SilentRouter:
    """A router that never answers: the dialer's reconnects go nowhere in these tests."""

    async def login(self, user: str, password: str, device: str) -> Any:
        await Deferred()

    async def logout(self, token: str) -> None:
        return None


def session(
    node: TimelineNode, ordered: bool = False, receiving: bool = True, **options: Any
) -> tuple[ChatClient, Clock, list[cim_pb2.Message]]:
    clock = Clock()
    client = ChatClient(
        clock,  # type: ignore[arg-type]
        "http://router.invalid",
        node.user,
        "pw",
        device="phone",
        router=SilentRouter(),  # type: ignore[arg-type]
        rng=random.Random(3),
        receiving=receiving,
        ordered=ordered,
        **options,
    )
    shown: list[cim_pb2.Message] = []

    def take(message: cim_pb2.Message) -> bool:
        shown.append(message)
        return True

    client.on_message = take
    return client, clock, shown


def texts(messages: list[cim_pb2.Message]) -> list[str]:
    return [message.text for message in messages]
