"""The edge: every number a client frame carries is checked before any room sees it.

protobuf decodes a ``uint64`` up to 2^64-1, but the stores keep ids and sequence
numbers in signed 64-bit columns (SQLite INTEGER, PostgreSQL BIGINT): a value above
2^63-1 that reached one would fail deep inside the database driver (OverflowError,
a traceback, a request never answered). So the connection checks each decoded frame
here first, in one place, and a frame with a number out of range is answered
BAD_REQUEST and goes no further.

The check is generic: it walks every field of the frame, nested and repeated
messages (and maps) included, by its protobuf type, from a plan made once per
message type from the descriptors. A field added to cim.proto later is covered
without touching this module.

    uint64, fixed64              0 .. 2^63-1 (the stores' bound, not protobuf's 2^64-1)
    enum                         one of the enum's declared values (proto3 decodes any)
    other integer types          in range by decoding already (int64 is 64 signed bits,
                                 32-bit types are cut to 32 bits): nothing to check
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from cim.protocols import cim_pb2

__all__ = ["STORE_MAX", "checker_for", "out_of_range", "refusal"]

STORE_MAX = 2**63 - 1
"""The largest integer the stores take: a signed 64-bit column."""

_WIDE = frozenset((FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64))
"""Types protobuf decodes past the stores' bound (2^64-1 > 2^63-1): the ones checked.

Every other integer type is already within its range once decoded (protobuf keeps
int64 within 64 signed bits and cuts 32-bit types to 32 bits), so checking them
would find nothing; they are still walked through when they hold messages.
"""


@dataclass(frozen=True, slots=True)
class _Plan:
    """What to look at in one message type: only fields that can be out of range."""

    wide: tuple[str, ...]
    read_wide: Callable[[Message], tuple[int, ...]]
    wide_lists: tuple[str, ...]
    enums: tuple[tuple[str, frozenset[int], str], ...]
    enum_lists: tuple[tuple[str, frozenset[int], str], ...]
    nested: tuple[str, ...]
    nested_lists: tuple[str, ...]
    maps: tuple[tuple[str, _Check, _Check], ...]
    """(name, key check, value check) of each map field."""


@dataclass(frozen=True, slots=True)
class _Check:
    """What one map key or value must satisfy (maps cannot use the plan's lists)."""

    wide: bool
    enum_values: frozenset[int] | None
    enum_name: str
    message: bool

    @classmethod
    def of(cls, field: Any) -> _Check:
        enum = field.enum_type if field.type == FieldDescriptor.TYPE_ENUM else None
        return cls(
            wide=field.type in _WIDE,
            enum_values=frozenset(enum.values_by_number) if enum is not None else None,
            enum_name=enum.name if enum is not None else "",
            message=field.type == FieldDescriptor.TYPE_MESSAGE,
        )

    def problem(self, item: Any, label: str) -> str | None:
        if self.wide and item > STORE_MAX:
            return f"{label} is out of range (0 to {STORE_MAX})"
        if self.enum_values is not None and item not in self.enum_values:
            return f"{label} is not a known {self.enum_name} value"
        if self.message:
            return _walk(item, label + ".")
        return None


_PLANS: dict[Any, _Plan] = {}
"""One plan per message type, made the first time a frame of that type is checked."""
_PLANNING: set[Any] = set()


def _may_fail(descriptor: Any) -> bool:
    """Whether a message of this type can hold anything out of range (e.g. Location:
    no, so a Message's location is not even looked at)."""
    if descriptor in _PLANNING:
        return True  # a recursive type: assume so, it is checked when walked
    plan = _plan_of(descriptor)
    return bool(
        plan.wide
        or plan.wide_lists
        or plan.enums
        or plan.enum_lists
        or plan.nested
        or plan.nested_lists
        or plan.maps
    )


def _plan_of(descriptor: Any) -> _Plan:
    plan = _PLANS.get(descriptor)
    if plan is not None:
        return plan
    _PLANNING.add(descriptor)
    try:
        plan = _PLANS[descriptor] = _make_plan(descriptor)
    finally:
        _PLANNING.discard(descriptor)
    return plan


def _make_plan(descriptor: Any) -> _Plan:
    wide: list[str] = []
    wide_lists: list[str] = []
    enums: list[tuple[str, frozenset[int], str]] = []
    enum_lists: list[tuple[str, frozenset[int], str]] = []
    nested: list[str] = []
    nested_lists: list[str] = []
    maps: list[tuple[str, _Check, _Check]] = []
    for field in descriptor.fields:
        entry: Any = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            fields = entry.fields_by_name
            maps.append((field.name, _Check.of(fields["key"]), _Check.of(fields["value"])))
        elif field.type in _WIDE:
            (wide_lists if field.is_repeated else wide).append(field.name)
        elif field.type == FieldDescriptor.TYPE_ENUM:
            enum: Any = field.enum_type
            known = (field.name, frozenset(enum.values_by_number), enum.name)
            (enum_lists if field.is_repeated else enums).append(known)
        elif field.type == FieldDescriptor.TYPE_MESSAGE and _may_fail(entry):
            (nested_lists if field.is_repeated else nested).append(field.name)
    return _Plan(
        tuple(wide),
        _reader(tuple(wide)),
        tuple(wide_lists),
        tuple(enums),
        tuple(enum_lists),
        tuple(nested),
        tuple(nested_lists),
        tuple(maps),
    )


def _reader(names: tuple[str, ...]) -> Callable[[Message], tuple[int, ...]]:
    """All the named fields in one C call (``attrgetter``), always as a tuple."""
    if not names:
        return lambda message: ()
    if len(names) == 1:
        get_one = operator.attrgetter(names[0])
        return lambda message: (get_one(message),)
    return operator.attrgetter(*names)


def out_of_range(message: Message) -> str | None:
    """What is wrong with the first number out of range in ``message``, or None.

    The text names the field's path (``ack_ids[2]``, ``media.size``) and the range,
    never any other content of the frame.
    """
    return _walk(message, "")


def checker_for(message_class: type[Message]) -> Callable[[Message], str | None]:
    """``out_of_range`` for frames of one type, its plan looked up once: the
    connection checks every frame it reads with one of these."""
    # A partial, not a closure: one Python call per frame instead of two.
    return partial(_walk_plan, _plan_of(message_class.DESCRIPTOR))


def _walk(message: Message, prefix: str) -> str | None:
    return _walk_plan(_plan_of(message.DESCRIPTOR), message, prefix)


def _walk_plan(plan: _Plan, message: Message, prefix: str = "") -> str | None:
    if plan.wide:
        values = plan.read_wide(message)
        if max(values) > STORE_MAX:
            name = plan.wide[next(i for i, value in enumerate(values) if value > STORE_MAX)]
            return f"{prefix}{name} is out of range (0 to {STORE_MAX})"
    for name in plan.wide_lists:
        values = getattr(message, name)
        if values and max(values) > STORE_MAX:
            index = next(i for i, value in enumerate(values) if value > STORE_MAX)
            return f"{prefix}{name}[{index}] is out of range (0 to {STORE_MAX})"
    for name, known, enum_name in plan.enums:
        if getattr(message, name) not in known:
            return f"{prefix}{name} is not a known {enum_name} value"
    for name, known, enum_name in plan.enum_lists:
        for index, value in enumerate(getattr(message, name)):
            if value not in known:
                return f"{prefix}{name}[{index}] is not a known {enum_name} value"
    for name in plan.nested:
        if message.HasField(name):
            problem = _walk(getattr(message, name), f"{prefix}{name}.")
            if problem is not None:
                return problem
    for name in plan.nested_lists:
        for index, item in enumerate(getattr(message, name)):
            problem = _walk(item, f"{prefix}{name}[{index}].")
            if problem is not None:
                return problem
    for name, key_check, value_check in plan.maps:
        for key, item in getattr(message, name).items():
            problem = key_check.problem(key, f"{prefix}{name} key") or value_check.problem(
                item, f"{prefix}{name}"
            )
            if problem is not None:
                return problem
    return None


# Requests whose answer carries its own error (and echoes request_id): refused with
# that answer, which the client already waits for. Every other request gets ERROR.
_ANSWERS_WITH_ERROR: dict[int, tuple[int, type[Message]]] = {
    cim_pb2.GROUP_R: (cim_pb2.GROUP_A, cim_pb2.GroupAnswer),
    cim_pb2.CONTACTS_R: (cim_pb2.CONTACTS_A, cim_pb2.ContactsAnswer),
    cim_pb2.HISTORY_R: (cim_pb2.HISTORY_A, cim_pb2.HistoryA),
}


def refusal(frame_type: int, request: Message, problem: str) -> tuple[int, Message]:
    """The answer to a request refused at the edge: (frame type, message).

    A request whose answer has an ``error`` field gets that answer, with its
    ``request_id`` echoed (whatever the request carries it); any other request gets
    ERROR BAD_REQUEST naming the request type, and for MSG_R its ``client_seq``, so
    the sender's outbox can match it.
    """
    answer = _ANSWERS_WITH_ERROR.get(frame_type)
    if answer is not None:
        answer_type, answer_class = answer
        reply = answer_class()
        _echo_request_id(request, reply)
        reply.error = "bad_request"  # type: ignore[attr-defined]
        reply.message = problem  # type: ignore[attr-defined]
        return answer_type, reply
    error = cim_pb2.Error(code=cim_pb2.Error.BAD_REQUEST, message=problem)
    if frame_type in cim_pb2.FrameType.values():
        error.request_type = frame_type  # type: ignore[assignment]
    client_seq = getattr(request, "client_seq", 0)
    if isinstance(client_seq, int):
        error.client_seq = client_seq
    _echo_request_id(request, error)  # so the client ends that request at once
    return cim_pb2.ERROR, error


def _echo_request_id(request: Message, reply: Message) -> None:
    request_fields = request.DESCRIPTOR.fields_by_name
    if "request_id" in request_fields and "request_id" in reply.DESCRIPTOR.fields_by_name:
        reply.request_id = request.request_id  # type: ignore[attr-defined]
