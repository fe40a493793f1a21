"""One device catching up through the client library, watched frame by frame.

``ObservedClient`` is the library's ``ChatClient`` with a note of every frame it sends
and receives and of every message it hands to the application, each with the time.
``observe_catch_up`` logs a user in with it, waits (bounded) for the catch-up to end
and returns what happened as plain data: when the summary came and what it held, when
the first page reached the application and what that page was, when everything was
pulled, how many frames of each kind went each way, which messages were handed over.

Two users, so the figures and the assertions come from the same observations:

- the benchmark's ``catch_up`` scenario (``bench.catch_up``) runs it in a process of
  its own pinned to the generator's core: ``python -m bench.catch_up_client`` prints
  ``{"ready": true}``, waits for a line on stdin (the parent samples the daemon
  meanwhile), runs, prints the result as one JSON line;
- ``tests/integration/test_catch_up.py`` runs it in the test's reactor and asserts on
  the result (acceptance 5 of issue 14).

Frames sent are counted at the connection's ``send`` (every request, ack and message;
heartbeats are not frames of the catch-up and are left out).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from google.protobuf.message import Message as ProtobufMessage
from twisted.internet.defer import Deferred, ensureDeferred

from cim.client.connection import ImClientProtocol
from cim.client.session import ChatClient
from cim.protocols import cim_pb2
from cim.reactor import ICimReactor

__all__ = ["CatchUpObservation", "ObservedClient", "observe_catch_up"]


def frame_name(frame_type: int) -> str:
    values = cim_pb2.FrameType.values()
    return cim_pb2.FrameType.Name(frame_type) if frame_type in values else str(frame_type)


@dataclass
class CatchUpObservation:
    """What one catch-up looked like from the device. Times are seconds since the
    client was started (router login, handshake and all)."""

    online_seconds: float | None = None
    summary_seconds: float | None = None
    first_message_seconds: float | None = None
    first_page_seconds: float | None = None
    """When the last message of the first OFFLINE_A page reached the application."""
    all_handed_seconds: float | None = None
    done_seconds: float | None = None
    """When OFFLINE_ACK_A came: the pull ended and the cursors moved."""
    summaries: int = 0
    """OFFLINE_SUMMARY_A frames received during the catch-up."""
    summary_conversations: list[str] = field(default_factory=list)
    """The summary's conversations, in its order (newest activity first)."""
    summary_counts: list[int] = field(default_factory=list)
    summary_total: int = 0
    summary_more: bool = False
    summary_bytes: int = 0
    first_page: list[int] = field(default_factory=list)
    """The ids of the first OFFLINE_A page."""
    first_page_conversation: str = ""
    pages_received_at_first_message: int | None = None
    pulls_sent_at_first_message: int | None = None
    handed: list[tuple[str, int, int]] = field(default_factory=list)
    """(conversation, seq, id) of every message handed to the application, in order."""
    received: dict[str, int] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)
    page_bytes: int = 0
    """Protobuf bytes of the OFFLINE_A pages (before sealing and framing)."""
    left_after: int | None = None
    """The total of a summary asked again after the pull (0: nothing left)."""
    timed_out: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ObservedClient(ChatClient):
    """A ``ChatClient`` that notes the frames of a catch-up and what it hands over."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen = CatchUpObservation()
        self.started_at = time.monotonic()
        self._received: Counter[str] = Counter()
        self._sent: Counter[str] = Counter()
        self.finished: Deferred[None] = Deferred()
        self.on_message = self._take
        self.on_state = self._state

    def _now(self) -> float:
        return time.monotonic() - self.started_at

    def _state(self, state: str, detail: str) -> None:
        if state == "online" and self.seen.online_seconds is None:
            self.seen.online_seconds = self._now()

    def _online(self, protocol: ImClientProtocol, where: str) -> None:
        send = protocol.send

        def counted(frame_type: int, message: ProtobufMessage) -> None:
            self._sent[frame_name(frame_type)] += 1
            send(frame_type, message)

        protocol.send = counted  # type: ignore[method-assign]
        super()._online(protocol, where)

    def frame_received(self, frame_type: int, message: Any) -> None:
        self._received[frame_name(frame_type)] += 1
        seen = self.seen
        if frame_type == cim_pb2.OFFLINE_SUMMARY_A and not self.finished.called:
            seen.summaries += 1
            if seen.summary_seconds is None:
                seen.summary_seconds = self._now()
                seen.summary_conversations = [c.conversation for c in message.conversations]
                seen.summary_counts = [c.count for c in message.conversations]
                seen.summary_total = message.total
                seen.summary_more = message.more
                seen.summary_bytes = message.ByteSize()
        elif frame_type == cim_pb2.OFFLINE_A:
            seen.page_bytes += message.ByteSize()
            if not seen.first_page and message.messages:
                seen.first_page = [m.id for m in message.messages]
                seen.first_page_conversation = message.messages[0].conversation
        super().frame_received(frame_type, message)
        if frame_type == cim_pb2.OFFLINE_ACK_A and not self.finished.called:
            seen.done_seconds = self._now()
            seen.received = dict(self._received)
            seen.sent = dict(self._sent)
            self.finished.callback(None)

    def _take(self, message: cim_pb2.Message) -> bool:
        seen = self.seen
        now = self._now()
        if not seen.handed:
            seen.first_message_seconds = now
            seen.pages_received_at_first_message = self._received["OFFLINE_A"]
            seen.pulls_sent_at_first_message = self._sent["OFFLINE_R"]
        seen.handed.append((message.conversation, message.seq, message.id))
        if seen.first_page_seconds is None and len(seen.handed) == len(seen.first_page):
            seen.first_page_seconds = now
        seen.all_handed_seconds = now
        return True


async def observe_catch_up(
    reactor: ICimReactor,
    router_url: str,
    user: str,
    password: str,
    device: str,
    timeout: float,
    on_finished: Callable[[CatchUpObservation], object] = lambda seen: None,
) -> CatchUpObservation:
    """Log ``user``'s ``device`` in, let the library catch up, return what it did.

    Waits at most ``timeout`` seconds for the pull's end (OFFLINE_ACK_A); on the
    deadline the observation so far comes back with ``timed_out``. ``on_finished`` is
    told at the pull's end (the benchmark samples the daemon there). Then a summary is
    asked again to see what is left, and the client logs out.
    """
    client = ObservedClient(reactor, router_url, user, password, device=device)
    deadline = reactor.callLater(timeout, _expire, client)
    try:
        await client.start(deadline=timeout)
        await client.finished
        seen = client.seen
        on_finished(seen)
        if not seen.timed_out:
            left = await client.offline_summary()
            seen.left_after = left.total
        return seen
    finally:
        if deadline.active():
            deadline.cancel()
        await client.stop(logout=True)


def _expire(client: ObservedClient) -> None:
    if not client.finished.called:
        client.seen.timed_out = True
        client.seen.received = dict(client._received)
        client.seen.sent = dict(client._sent)
        client.finished.callback(None)


# ------------------------------------------------------------------ the process


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.catch_up_client")
    parser.add_argument("--router", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--device", default="bench")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()  # the parent has sampled the daemon: go
    cpu_at_go = time.process_time()
    outcome: dict[str, Any] = {}

    def finished(seen: CatchUpObservation) -> None:
        # The pull ended: the parent samples the daemon now, before the check below.
        done = {"done": True, "client_cpu_seconds": time.process_time() - cpu_at_go}
        print(json.dumps(done), flush=True)

    async def run() -> None:
        try:
            seen = await observe_catch_up(
                reactor,
                args.router,
                args.user,
                args.password,
                args.device,
                args.timeout,
                finished,
            )
            outcome.update(seen.as_dict(), ok=True)
        except Exception as exc:
            outcome.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        finally:
            reactor.stop()

    reactor.callWhenRunning(lambda: ensureDeferred(run()))
    reactor.run()
    if "ok" not in outcome:
        outcome.update(ok=False, error="the reactor stopped before the catch-up ended")
    print(json.dumps(outcome), flush=True)


if __name__ == "__main__":
    main()
