"""A small test driver that speaks the timelines' frames to a real daemon, without the
client library (which its own branch rewrites): log in through a router, connect with
the low-level connection (``cim.client.connection``), record every frame, and ask for
the summary, pages and cursor moves by request id.

It never acknowledges anything by itself: a test says what the device has shown.
"""

from __future__ import annotations

import json
from typing import Any

import treq
from google.protobuf.message import Message as ProtobufMessage
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol

from cim.client.connection import ImClientProtocol
from cim.client.router import LoginTicket, parse_ticket
from cim.protocols import cim_pb2
from tests.integration.support.cluster import eventually, reactor, sleep
from tests.integration.support.daemons import PASSWORD, DaemonProcess

__all__ = ["FrameClient", "connect", "login_ticket"]

SUITE = "chacha20-poly1305"


class FrameClient:
    """One device's connection: ``frames`` holds what arrived, oldest first."""

    def __init__(self, user: str, device: str) -> None:
        self.user = user
        self.device = device
        self.frames: list[tuple[int, Any]] = []
        self.closed = False
        self.protocol: ImClientProtocol | None = None
        self._next_request = 0
        self._next_seq = 0

    # --- ConnectionEvents ---------------------------------------------------------------

    def frame_received(self, frame_type: int, message: ProtobufMessage) -> None:
        self.frames.append((frame_type, message))

    def connection_closed(self, reason: Any) -> None:
        self.closed = True

    # --- what arrived ----------------------------------------------------------------------

    def of_type(self, frame_type: int) -> list[Any]:
        return [message for kind, message in self.frames if kind == frame_type]

    def live(self, conversation: str | None = None) -> list[cim_pb2.Message]:
        return [
            m
            for m in self.of_type(cim_pb2.MSG_N)
            if conversation is None or m.conversation == conversation
        ]

    # --- sending ---------------------------------------------------------------------------

    def send(self, frame_type: int, message: ProtobufMessage) -> None:
        assert self.protocol is not None
        self.protocol.send(frame_type, message)  # type: ignore[attr-defined]

    def post(self, text: str, to: str = "", group: str = "") -> int:
        """msg:R; returns its client_seq."""
        self._next_seq += 1
        self.send(
            cim_pb2.MSG_R,
            cim_pb2.Message(to=to, group=group, text=text, client_seq=self._next_seq),
        )
        return self._next_seq

    async def answer(self, frame_type: int, request_id: int, timeout: float = 20) -> Any:
        """The answer of that type carrying ``request_id``, or the ERROR refusing it."""
        found: list[Any] = []

        def arrived() -> bool:
            for kind, message in self.frames:
                if getattr(message, "request_id", None) != request_id:
                    continue
                if kind in (frame_type, cim_pb2.ERROR):
                    found.append(message)
                    return True
            return False

        await eventually(arrived, timeout, f"answer {request_id} for {self.user}")
        return found[0]

    def _request_id(self) -> int:
        self._next_request += 1
        return self._next_request

    async def summary(self) -> cim_pb2.OfflineSummaryA:
        request_id = self._request_id()
        self.send(cim_pb2.OFFLINE_SUMMARY_R, cim_pb2.OfflineSummaryR(request_id=request_id))
        answer = await self.answer(cim_pb2.OFFLINE_SUMMARY_A, request_id)
        assert isinstance(answer, cim_pb2.OfflineSummaryA), answer
        return answer

    async def pull(self, conversation: str = "") -> list[cim_pb2.Message]:
        """Every page past the device's cursor, newest first, without acknowledging."""
        messages: list[cim_pb2.Message] = []
        before = 0
        for _ in range(1000):
            request_id = self._request_id()
            request = cim_pb2.OfflineR(
                conversation=conversation, before=before, request_id=request_id
            )
            self.send(cim_pb2.OFFLINE_R, request)
            page = await self.answer(cim_pb2.OFFLINE_A, request_id)
            assert isinstance(page, cim_pb2.OfflineA), page
            messages.extend(page.messages)
            if not page.more:
                return messages
            before = page.next_before
        raise AssertionError("more than 1000 pages")

    async def acknowledge(self, messages: list[cim_pb2.Message]) -> int:
        """OFFLINE_ACK_R: this device has every message up to the newest of each
        conversation among ``messages``."""
        marks: dict[str, int] = {}
        for m in messages:
            marks[m.conversation] = max(marks.get(m.conversation, 0), m.seq)
        request_id = self._request_id()
        self.send(
            cim_pb2.OFFLINE_ACK_R,
            cim_pb2.OfflineAckR(
                cursors=[cim_pb2.Cursor(conversation=c, seq=s) for c, s in marks.items()],
                request_id=request_id,
            ),
        )
        answer = await self.answer(cim_pb2.OFFLINE_ACK_A, request_id)
        assert isinstance(answer, cim_pb2.OfflineAckA), answer
        return int(answer.acknowledged)

    def drop(self) -> None:
        """The connection goes away without a word (a phone losing its network)."""
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.abortConnection()


async def login_ticket(
    node: DaemonProcess, user: str, device: str = "phone", on: str | None = None
) -> LoginTicket:
    """Log in through ``node``'s router; with ``on``, log in again (bounded) until the
    router names that node (the registry changed)."""
    for _ in range(300):
        response = await treq.post(
            f"{node.router_url}/api/v1/login",
            data=json.dumps({"user": user, "password": PASSWORD, "device": device}).encode(),
            headers={"Content-Type": "application/json"},
            persistent=False,
        )
        body = await treq.json_content(response)
        assert response.code == 200, body
        ticket = parse_ticket(body)
        if on is None or ticket.node.node_id == on:
            break
        await sleep(0.1)
    else:
        raise AssertionError(f"the router never sent {user} to {on}")
    return ticket


async def connect(
    node: DaemonProcess, user: str, device: str = "phone", on: str | None = None
) -> FrameClient:
    """Log in through ``node``'s router and connect to the node it names (``on``: see
    login_ticket)."""
    ticket = await login_ticket(node, user, device, on)
    client = FrameClient(user, device)
    protocol = ImClientProtocol(
        reactor, client, ticket.server_key, ticket.token, device, SUITE, (SUITE,)
    )
    client.protocol = protocol
    await connectProtocol(HostnameEndpoint(reactor, ticket.node.host, ticket.node.port), protocol)
    await protocol.logged_in
    return client
