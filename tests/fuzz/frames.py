"""What the frame fuzzer sends after the handshake, drawn from any source of choices.

The same generator serves hypothesis (the bounded CI run, which can shrink a failure
to a small example) and a plain seeded ``random.Random`` (``make fuzz``: a million
inputs, where hypothesis' bookkeeping per example would cost more than the node).
Both implement ``Draws``; the generator only ever asks it for numbers, choices and
bytes.

An input is one ``Action``: a frame of a type the node answers with every field
filled from protobuf's own descriptors (huge and edge-case integers, unknown enum
values, long and odd strings, NaN, deep and repeated messages), a valid type byte
followed by junk, an unknown type, an empty frame, and frames broken below the
crypto: unsealed bytes, a sealed frame cut short, a length prefix past the limit,
heartbeats.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from cim.protocols import cim_pb2

__all__ = [
    "KNOWN_USERS",
    "REQUEST_TYPES",
    "Action",
    "Draws",
    "RandomDraws",
    "draw_action",
]

T = TypeVar("T")

KNOWN_USERS = ("alice", "bob", "carol")

REQUEST_TYPES: dict[int, type[Message]] = {
    cim_pb2.MSG_R: cim_pb2.Message,
    cim_pb2.ACK_R: cim_pb2.AckR,
    cim_pb2.ONLINE_R: cim_pb2.OnlineR,
    cim_pb2.OFFLINE_R: cim_pb2.OfflineR,
    cim_pb2.OFFLINE_ACK_R: cim_pb2.OfflineAckR,
    cim_pb2.OFFLINE_SUMMARY_R: cim_pb2.OfflineSummaryR,
    cim_pb2.HISTORY_R: cim_pb2.HistoryR,
    cim_pb2.GROUP_R: cim_pb2.GroupRequest,
    cim_pb2.CONTACTS_R: cim_pb2.ContactsRequest,
    cim_pb2.TYPING_R: cim_pb2.TypingR,
    cim_pb2.APP_STATE_R: cim_pb2.AppStateR,
    cim_pb2.CHANGE_R: cim_pb2.ChangeR,
    cim_pb2.READ_R: cim_pb2.ReadR,
    cim_pb2.READERS_R: cim_pb2.ReadersR,
    cim_pb2.PUSH_R: cim_pb2.PushRequest,
    cim_pb2.DEVICES_R: cim_pb2.DevicesR,
}
"""What a client may send once logged in (the test checks it is the connection's
table: the rooms' and the connection's own)."""

_EDGE_INTEGERS = (
    0,
    1,
    2,
    127,
    128,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**53 + 1,
    2**63 - 2,
    2**63 - 1,
    2**63,
    2**63 + 1,
    2**64 - 2,
    2**64 - 1,
)
_ODD_TEXT = (
    "",
    "alice",
    "bob",
    "carol",
    "@system",
    "nobody-here",
    "\x00",
    "\x1b[2J",
    "\u202e",
    "é" * 3,
    "😀",
    "javascript:alert(1)",
    "https://files.example/x",
    "http://127.0.0.1:8082/files/abc",
    "a" * 300,
    "everyone",
    "contacts",
    "nobody",
    "guardians",
)
_FLOATS = (0.0, -0.0, 1.5, -91.0, 181.0, 1e308, float("inf"), float("-inf"), float("nan"))

_U64 = (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64)
_I64 = (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64)
_U32 = (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32)
_I32 = (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32)


class Draws(Protocol):
    """A source of choices: hypothesis' ``data.draw`` or a seeded ``random.Random``."""

    def integer(self, low: int, high: int) -> int: ...

    def choice(self, options: Sequence[T]) -> T: ...

    def raw(self, max_size: int) -> bytes: ...

    def text(self, max_size: int) -> str: ...


_BMP = range(0xD800)


class RandomDraws:
    """``Draws`` from a seeded ``random.Random``: fast, for the long run."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)

    def integer(self, low: int, high: int) -> int:
        return self._random.randint(low, high)

    def choice(self, options: Sequence[T]) -> T:
        return options[self._random.randrange(len(options))]

    def raw(self, max_size: int) -> bytes:
        return self._random.randbytes(self._random.randint(0, max_size))

    def text(self, max_size: int) -> str:
        size = self._random.randint(0, max_size)
        if self._random.random() < 0.5:
            # Any byte as a code point: controls, DEL, C1, Latin-1.
            return self._random.randbytes(size).decode("latin-1")
        # The Basic Multilingual Plane below the surrogates, CJK and all.
        return "".join(map(chr, self._random.choices(_BMP, k=size)))


@dataclass(frozen=True)
class Action:
    """One fuzz input. ``kind`` says how it goes on the wire:

    frame      ``plaintext`` sealed with the session's sealer (a request if
               ``request_type`` is set: it must be answered or close the connection)
    unsealed   ``payload`` with a correct length prefix, not sealed
    truncated  ``plaintext`` sealed, then its last ``cut`` bytes dropped
    oversized  a length prefix of ``length`` (past the node's limit) and ``payload``
    heartbeat  the four zero bytes

    ``splits`` (per mille of the wire bytes) cut the bytes into reads the node gets one
    by one, as TCP may deliver them: inside the length prefix, inside the body.
    """

    kind: str
    plaintext: bytes = b""
    payload: bytes = b""
    request_type: int = 0
    cut: int = 0
    length: int = 0
    splits: tuple[int, ...] = ()

    def describe(self) -> str:
        """A short, loggable account of the input (for the report of a failure)."""
        body = self.plaintext or self.payload
        head = body[:48].hex()
        more = f"...(+{len(body) - 48} bytes)" if len(body) > 48 else ""
        return (
            f"{self.kind} request_type={self.request_type} cut={self.cut} "
            f"length={self.length} splits={self.splits} body={head}{more}"
        )


def draw_action(draws: Draws, max_frame_size: int) -> Action:
    """One input; a quarter of them arrive in several reads."""
    action = _draw_kind(draws, max_frame_size)
    if draws.integer(0, 3) == 0:
        count = draws.integer(1, 3)
        splits = tuple(sorted(draws.integer(0, 1000) for _ in range(count)))
        return replace(action, splits=splits)
    return action


def _draw_kind(draws: Draws, max_frame_size: int) -> Action:
    roll = draws.integer(0, 99)
    if roll < 70:
        frame_type = draws.choice(tuple(REQUEST_TYPES))
        message = draw_message(draws, REQUEST_TYPES[frame_type], depth=0)
        plaintext = bytes((frame_type,)) + message.SerializeToString()
        return Action("frame", plaintext=plaintext, request_type=frame_type)
    if roll < 78:
        # A valid type byte and junk: protobuf may reject it (the node closes) or
        # find fields in it, possibly unknown ones (then it is a request like any).
        frame_type = draws.choice(tuple(REQUEST_TYPES))
        junk = draws.raw(draws.choice((8, 64, 512)))
        return Action("frame", plaintext=bytes((frame_type,)) + junk, request_type=frame_type)
    if roll < 82:
        frame_type = draws.integer(0, 255)
        kind = frame_type if frame_type not in REQUEST_TYPES else 0
        return Action("frame", plaintext=bytes((kind,)) + draws.raw(64))
    if roll < 84:
        return Action("frame", plaintext=b"")
    if roll < 88:
        return Action("unsealed", payload=draws.raw(200) or b"\x0a")
    if roll < 92:
        frame_type = draws.choice(tuple(REQUEST_TYPES))
        message = draw_message(draws, REQUEST_TYPES[frame_type], depth=0)
        plaintext = bytes((frame_type,)) + message.SerializeToString()
        return Action("truncated", plaintext=plaintext, cut=draws.integer(1, 40))
    if roll < 95:
        length = draws.choice((max_frame_size + 1, 2**31, 2**32 - 1))
        return Action("oversized", payload=draws.raw(32), length=length)
    return Action("heartbeat")


def draw_message(draws: Draws, message_class: type[Message], depth: int) -> Message:
    """Any message of this type: each field set or not, with values from its type."""
    message = message_class()
    descriptor = message.DESCRIPTOR
    oneofs_done: set[str] = set()
    for field in descriptor.fields:
        if draws.integer(0, 2) == 0:
            continue
        oneof = field.containing_oneof
        if oneof is not None:
            if oneof.name in oneofs_done:
                continue
            oneofs_done.add(oneof.name)
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 3:
                continue
            count = _count(draws) if field.is_repeated else 1
            for _ in range(count):
                child = draw_message(draws, _class_of(field), depth + 1)
                if field.is_repeated:
                    getattr(message, field.name).add().CopyFrom(child)
                else:
                    getattr(message, field.name).CopyFrom(child)
            continue
        if field.is_repeated:
            values = [_scalar(draws, field) for _ in range(_count(draws))]
            getattr(message, field.name).extend(values)
        else:
            setattr(message, field.name, _scalar(draws, field))
    return message


def _class_of(field: Any) -> type[Message]:
    return message_factory.GetMessageClass(field.message_type)  # type: ignore[no-any-return]


def _count(draws: Draws) -> int:
    return draws.choice((0, 1, 2, 3, 5, draws.integer(0, 400)))


def _scalar(draws: Draws, field: Any) -> Any:
    kind = field.type
    if kind in _U64:
        return _integer(draws, 0, 2**64 - 1)
    if kind in _U32:
        return _integer(draws, 0, 2**32 - 1)
    if kind in _I64:
        return _integer(draws, -(2**63), 2**63 - 1)
    if kind in _I32:
        return _integer(draws, -(2**31), 2**31 - 1)
    if kind == FieldDescriptor.TYPE_ENUM:
        known = tuple(field.enum_type.values_by_number)
        return draws.choice((*known, *known, draws.integer(-(2**31), 2**31 - 1)))
    if kind == FieldDescriptor.TYPE_BOOL:
        return draws.integer(0, 1) == 1
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        value = draws.choice(_FLOATS)
        if kind == FieldDescriptor.TYPE_FLOAT and abs(value) == 1e308:
            return float("inf") if value > 0 else float("-inf")
        return value
    if kind == FieldDescriptor.TYPE_STRING:
        return _string(draws)
    if kind == FieldDescriptor.TYPE_BYTES:
        return draws.raw(draws.choice((0, 16, 300)))
    raise AssertionError(f"a field type the fuzzer does not know: {kind}")


def _integer(draws: Draws, low: int, high: int) -> int:
    pick = draws.integer(0, 3)
    if pick == 0:
        return draws.integer(low, high)
    if pick == 1:
        return draws.integer(max(low, 0), min(high, 1000))
    candidates = [value for value in _EDGE_INTEGERS if low <= value <= high]
    candidates += [value for value in (-1, -(2**31), -(2**63)) if low <= value]
    return draws.choice(candidates)


def _string(draws: Draws) -> str:
    pick = draws.integer(0, 9)
    if pick < 5:
        return draws.choice(_ODD_TEXT)
    if pick < 8:
        return draws.text(40)
    if pick < 9:
        return draws.text(2000)
    # Long enough that the frame may pass the node's 64 KiB limit (then it closes).
    return draws.choice(("x", "é", "😀")) * draws.integer(10_000, 70_000)
