"""JSON Schema for declared endpoints: building schemas, and checking input against them.

Input is checked before any endpoint code runs: a body must be a JSON object that
matches the endpoint's schema (JSON Schema 2020-12, the dialect of OpenAPI 3.1), and
strings that no database stores faithfully (lone surrogates) or that would reach
another person's screen as a terminal command (control characters other than newline
and tab: ``cim.content``), and numbers that are not finite, are refused with a 400,
so bad input never becomes a 500 and no client has to clean what it reads. Path and
query parameters are converted to their schema's type the same way (an endpoint that
reads a ``json_body`` without a schema checks its fields itself: the file service
cleans the file names it is given).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from cim.content import control_characters_in
from cim.http.site import HttpError
from cim.json_convention import ISO_TIME_PATTERN, epoch_seconds

if TYPE_CHECKING:
    # jsonschema costs ~10 MiB: imported only where a body schema is declared.
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import ValidationError

__all__ = [
    "ERROR_SCHEMA",
    "MAX_DIGITS",
    "MAX_ID",
    "TIMESTAMP",
    "TIME_INPUT",
    "array_of",
    "body_problem",
    "body_validator",
    "convert_param",
    "convert_query",
    "listing_of",
    "object_schema",
    "time_value",
    "whole_number",
]

MAX_ID = 2**63 - 1
"""Ids are 64-bit database keys; a larger number in a path is simply not found."""

MAX_DIGITS = 19
"""The most digits of a whole number taken from a request: any 64-bit value fits."""

_DIGITS = re.compile(rf"[0-9]{{1,{MAX_DIGITS}}}")
_INTEGER = re.compile(rf"[+-]?[0-9]{{1,{MAX_DIGITS}}}")
_MAX_NUMBER_TEXT = 64


def whole_number(raw: str | bytes, name: str) -> int | None:
    """``raw`` as a whole number of ASCII digits; None when it is not one.

    Checked before ``int()`` sees it: ``int()`` of thousands of digits is slow and
    raises past 4,300 of them (Python's limit), and ``"²".isdigit()`` is true of a
    string ``int()`` refuses. More than ``MAX_DIGITS`` digits is a 400 naming ``name``.
    """
    text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    if _DIGITS.fullmatch(text):
        return int(text)
    if text.isascii() and text.isdigit():
        raise HttpError(400, "bad_request", f"{name}: at most {MAX_DIGITS} digits")
    return None


def object_schema(
    properties: Mapping[str, Mapping[str, Any]],
    required: Iterable[str] = (),
    *,
    description: str = "",
) -> dict[str, Any]:
    """A closed JSON object: unknown keys are refused, so a typo is an error, not a no-op."""
    schema: dict[str, Any] = {
        "type": "object",
        "properties": dict(properties),
        "additionalProperties": False,
    }
    required = list(required)
    if required:
        schema["required"] = required
    if description:
        schema["description"] = description
    return schema


def array_of(items: Mapping[str, Any], max_items: int | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "array", "items": dict(items)}
    if max_items is not None:
        schema["maxItems"] = max_items
    return schema


def listing_of(
    items: Mapping[str, Any],
    max_items: int | None = None,
    beside: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """A list answer as the JSON convention writes it: ``{"items": [...], ...beside}``."""
    beside = dict(beside or {})
    return object_schema({"items": array_of(items, max_items), **beside}, ["items", *beside])


TIMESTAMP: dict[str, Any] = {
    "type": "string",
    "format": "date-time",
    "description": "ISO 8601 in UTC with milliseconds, e.g. 2026-12-06T09:07:37.290Z",
}
"""A time in an answer."""
TIME_INPUT: dict[str, Any] = {
    "type": "string",
    "format": "date-time",
    "pattern": ISO_TIME_PATTERN,
    "maxLength": 40,
    "description": "ISO 8601 with an offset, e.g. 2026-12-06T09:07:37.290Z",
}
"""A time in a request (a body field or a query parameter), from 1970 on."""


def time_value(text: str, where: str) -> float:
    """A request's ``TIME_INPUT`` as epoch seconds, or a 400 naming ``where``."""
    try:
        seconds = epoch_seconds(text)
    except (ValueError, OverflowError):
        seconds = -1.0
    if seconds < 0:
        raise HttpError(
            400,
            "bad_request",
            f"{where}: expected an ISO 8601 time from 1970 on, e.g. 2026-12-06T09:07:37.290Z",
        )
    return seconds


ERROR_SCHEMA = object_schema(
    {
        "error": {"type": "string", "description": "a stable machine-readable code"},
        "message": {"type": "string", "description": "what went wrong, for people"},
    },
    ["error", "message"],
)


# --- bodies -------------------------------------------------------------------------------


def body_validator(schema: Mapping[str, Any]) -> Draft202012Validator:
    """The checker of a declared body schema (refused at declaration when invalid)."""
    from jsonschema import Draft202012Validator

    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def body_problem(validator: Draft202012Validator, body: Any) -> str | None:
    """What is wrong with a decoded body for the endpoint ``validator`` checks, or None."""
    return _storable_problem(body, "body") or _schema_problem(validator, body)


def _storable_problem(value: Any, where: str) -> str | None:
    """Why a decoded JSON value cannot be stored as given, or None."""
    if isinstance(value, str):
        if control_characters_in(value):
            return f"{where}: text may not contain control characters (newline and tab are fine)"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{where}: text is not valid Unicode"
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where}: numbers must be finite"
    if isinstance(value, dict):
        for key, item in value.items():
            problem = _storable_problem(key, where) or _storable_problem(item, f"{where}.{key}")
            if problem:
                return problem
    elif isinstance(value, list):
        for index, item in enumerate(value):
            problem = _storable_problem(item, f"{where}[{index}]")
            if problem:
                return problem
    return None


def _field_path(error: ValidationError) -> str:
    parts = [str(part) for part in error.absolute_path]
    return ".".join(parts) if parts else "body"


def _schema_problem(validator: Draft202012Validator, body: Any) -> str | None:
    error = next(iter(sorted(validator.iter_errors(body), key=lambda e: e.path)), None)
    if error is None:
        return None
    where = _field_path(error)
    if error.schema.get("writeOnly") if isinstance(error.schema, dict) else False:
        # A password's value never goes back in an error message (nor into a log).
        return f"{where}: does not satisfy the rule '{error.validator}'"
    text = error.message
    if len(text) > 200:
        text = text[:200] + "..."
    return f"{where}: {text}"


# --- path and query parameters --------------------------------------------------------------


def convert_param(name: str, raw: str, schema: Mapping[str, Any]) -> Any:
    """A path parameter as its schema's type; a malformed one names nothing that exists."""
    if schema.get("type") == "integer":
        if not _DIGITS.fullmatch(raw) or not 1 <= int(raw) <= MAX_ID:
            raise HttpError(404, "not_found", f"no such {name}")
        return int(raw)
    pattern = schema.get("pattern")
    if pattern is not None and re.fullmatch(pattern, raw) is None:
        raise HttpError(404, "not_found", f"no such {name}")
    return raw


def convert_query(name: str, raw: bytes, schema: Mapping[str, Any]) -> Any:
    text = raw.decode("utf-8", "replace")
    kind = schema.get("type")
    if schema.get("format") == "date-time":
        return time_value(text, f"query {name}")
    if kind in ("integer", "number"):
        text = text.strip()
        shaped = _INTEGER.fullmatch(text) if kind == "integer" else len(text) <= _MAX_NUMBER_TEXT
        try:
            if not shaped:
                raise ValueError(text)
            value: Any = int(text) if kind == "integer" else float(text)
        except ValueError:
            raise HttpError(400, "bad_request", f"query {name}: expected a {kind}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise HttpError(400, "bad_request", f"query {name}: expected a finite number")
        low, high = schema.get("minimum"), schema.get("maximum")
        if (low is not None and value < low) or (high is not None and value > high):
            raise HttpError(400, "bad_request", f"query {name}: must be between {low} and {high}")
        return value
    if "enum" in schema and text not in schema["enum"]:
        choices = ", ".join(schema["enum"])
        raise HttpError(400, "bad_request", f"query {name}: expected one of {choices}")
    if control_characters_in(text) or len(text) > int(schema.get("maxLength", 256)):
        raise HttpError(400, "bad_request", f"query {name}: not an acceptable value")
    return text
