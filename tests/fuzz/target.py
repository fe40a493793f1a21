"""The node the frame fuzzer talks to, and the three things it checks per input.

One node for the whole run (memory state, the real SQLite offline store and history,
a fake clock), as a real node lives through many hostile sessions. Each session is a
real handshake: the node's own protocol on a StringTransport, the client's side
done with ``ClientHandshake`` and the ciphers it returns, so every fuzz frame is
sealed correctly and reaches the dispatch. A session that the node closes is ended
(``connectionLost``) and the next input gets a new one.

Per input:

- no traceback: nothing logged as a failure or at error level (``tracebacks``);
- every request answered (its A frame, or an ERROR) unless the node closed the
  connection (``unanswered``); a TYPING_R without a request_id asks for no answer;
- memory: the caller measures it around the run (tracemalloc), since the node's
  state must stay bounded across sessions, not just within one.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from cim.protocols import cim_pb2
from cim.protocols.crypto import FrameOpener, FrameSealer
from cim.protocols.handshake import ClientHandshake
from cim.protocols.im import ConnectionState, ImServerProtocol
from cim.protocols.wire import HEARTBEAT_FRAME
from cim.storage.database import Database
from tests.fakes.node import NodeHarness
from tests.fuzz.frames import KNOWN_USERS, Action

__all__ = ["FrameFuzzTarget", "Tally"]

_LENGTH = struct.Struct(">I")
_ERROR = cim_pb2.ERROR
_SUITES = ("chacha20-poly1305", "rc4-hmac-sha256")


def _run_now(work: Callable[[], Any]) -> Deferred[Any]:
    return maybeDeferred(work)


@dataclass
class Tally:
    """What a run found; ``examples`` keeps the first few failures in full."""

    inputs: int = 0
    requests: int = 0
    answered: int = 0
    closed: int = 0
    sessions: int = 0
    tracebacks: int = 0
    unanswered: int = 0
    examples: list[str] = field(default_factory=list)

    def failed(self) -> bool:
        return bool(self.tracebacks or self.unanswered)

    def summary(self) -> str:
        return (
            f"inputs={self.inputs} requests={self.requests} answered={self.answered} "
            f"closed={self.closed} sessions={self.sessions} tracebacks={self.tracebacks} "
            f"unanswered={self.unanswered}"
        )


class _Session:
    """One logged-in connection: the node's protocol and the client's ciphers."""

    def __init__(
        self,
        server: ImServerProtocol,
        transport: StringTransport,
        sealer: FrameSealer,
        opener: FrameOpener,
    ) -> None:
        self.server = server
        self.transport = transport
        self.sealer = sealer
        self.opener = opener

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting) or self.server.state is not (
            ConnectionState.ESTABLISHED
        )

    def answers(self) -> list[tuple[int, bytes]]:
        """The frames the node wrote since the last call, opened: (type, body)."""
        data = self.transport.value()
        self.transport.clear()
        frames = []
        offset = 0
        while len(data) - offset >= 4:
            (length,) = _LENGTH.unpack_from(data, offset)
            body = data[offset + 4 : offset + 4 + length]
            offset += 4 + length
            if not body:
                continue  # a heartbeat
            plaintext = self.opener.open(body)
            frames.append((plaintext[0], plaintext[1:]))
        return frames


class FrameFuzzTarget:
    """A node, and sessions on it that the fuzzer's actions are sent through."""

    def __init__(self, directory: str, suite: str) -> None:
        if suite not in _SUITES:
            raise ValueError(f"unknown suite {suite!r}")
        self.suite = suite
        os.makedirs(directory, exist_ok=True)
        self.db = Database(f"sqlite:///{directory}/fuzz.db", None, runner=_run_now)
        failures: list[Failure] = []
        self.db.start().addErrback(failures.append)
        if failures:
            failures[0].raiseException()
        clock = MemoryReactorClock()
        clock.advance(1_800_000_000)
        self.node = NodeHarness(users=KNOWN_USERS, clock=clock, database=self.db)
        self.max_frame_size = self.node.config.max_frame_size
        self.tally = Tally()
        self._session: _Session | None = None
        self._port = 20000
        self._errors: list[LogEvent] = []
        globalLogPublisher.addObserver(self._observe)

    def close(self) -> None:
        globalLogPublisher.removeObserver(self._observe)
        self._end_session()
        self.db.stop()

    def _observe(self, event: LogEvent) -> None:
        level = event.get("log_level")
        if "log_failure" in event or (level is not None and level.name in ("error", "critical")):
            self._errors.append(event)

    # --- sessions ---------------------------------------------------------------------

    def _new_session(self) -> _Session:
        node = self.node
        self._port = 20000 + (self._port - 19999) % 40000
        address = IPv4Address("TCP", "10.1.2.3", self._port)
        server = node.factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        server.makeConnection(transport)
        user = KNOWN_USERS[self.tally.sessions % len(KNOWN_USERS)]
        token, _ = node.login(user)
        handshake = ClientHandshake(
            node.key.public_der,
            token,
            "fuzz",
            self.suite,
            _SUITES,
            int(node.clock.seconds() * 1000),
        )
        body = handshake.hello_body()
        server.dataReceived(_LENGTH.pack(len(body)) + body)
        reply = transport.value()
        transport.clear()
        (length,) = _LENGTH.unpack_from(reply, 0)
        sealer, opener, first = handshake.finish(reply[4 : 4 + length])
        result = cim_pb2.LoginResult.FromString(first[1:])
        if (
            result.status != cim_pb2.LoginResult.OK
            or server.state is not ConnectionState.ESTABLISHED
        ):
            raise RuntimeError(f"the fuzz session did not log in: {result}")
        self.tally.sessions += 1
        return _Session(server, transport, sealer, opener)

    def _end_session(self) -> None:
        session = self._session
        self._session = None
        if session is not None:
            session.transport.loseConnection()
            session.server.connectionLost(Failure(ConnectionDone()))

    # --- one input --------------------------------------------------------------------

    def send(self, action: Action) -> None:
        """Send one input and check what came of it (into ``tally``)."""
        if self._session is None:
            self._session = self._new_session()
        session = self._session
        tally = self.tally
        tally.inputs += 1
        wire = self._wire(session, action)
        start = 0
        for split in action.splits:
            end = len(wire) * split // 1000
            if end > start:
                session.server.dataReceived(wire[start:end])
                start = end
        session.server.dataReceived(wire[start:])
        self.node.clock.advance(0.1)
        answers = session.answers() if not session.transport.disconnecting else []
        if session.closed:
            tally.closed += 1
        elif action.request_type and _expects_answer(action):
            tally.requests += 1
            answer_type = action.request_type + 1
            if any(
                kind == answer_type or (kind == _ERROR and _about(body, action.request_type))
                for kind, body in answers
            ):
                tally.answered += 1
            else:
                tally.unanswered += 1
                self._example("unanswered", action, "")
        if self._errors:
            tally.tracebacks += len(self._errors)
            text = "\n".join(formatEvent(event) + _traceback_of(event) for event in self._errors)
            self._errors.clear()
            self._example("traceback", action, text)
        if session.closed:
            self._end_session()

    def _wire(self, session: _Session, action: Action) -> bytes:
        kind = action.kind
        if kind == "frame":
            body = session.sealer.seal(action.plaintext)
            return _LENGTH.pack(len(body)) + body
        if kind == "unsealed":
            return _LENGTH.pack(len(action.payload)) + action.payload
        if kind == "truncated":
            body = session.sealer.seal(action.plaintext)[: -action.cut] or b"\x00"
            return _LENGTH.pack(len(body)) + body
        if kind == "oversized":
            return _LENGTH.pack(action.length) + action.payload
        if kind == "heartbeat":
            return HEARTBEAT_FRAME
        raise ValueError(f"unknown action kind {kind!r}")

    def _example(self, what: str, action: Action, detail: str) -> None:
        if len(self.tally.examples) < 20:
            self.tally.examples.append(f"{what}: {action.describe()}\n{detail[:4000]}".rstrip())


def _expects_answer(action: Any) -> bool:
    """A TYPING_R without a request_id is answered only when refused (docs/protocol.md):
    an app's notices cost no answer frames."""
    if action.request_type != cim_pb2.TYPING_R:
        return True
    try:
        return bool(cim_pb2.TypingR.FromString(action.plaintext[1:]).request_id)
    except Exception:
        return True  # not a TypingR: the node closes the connection


def _about(body: bytes, request_type: int) -> bool:
    error = cim_pb2.Error.FromString(body)
    return error.request_type in (0, request_type)


def _traceback_of(event: LogEvent) -> str:
    failure = event.get("log_failure")
    return "\n" + failure.getTraceback() if failure is not None else ""
