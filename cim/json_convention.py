"""The one JSON convention of cim's HTTP APIs and tools, as code (docs/protocol.md,
"JSON conventions").

Everything cim writes as JSON for people and programs (the router, logic, files and
admin APIs, the logic service's notices, ``cim-client`` and ``cimctl --json``) is built
with these, so a reader learns one set of rules:

- a timestamp is an ISO 8601 string in UTC with milliseconds, ``2026-12-06T09:07:37.290Z``,
  in a key named ``at`` or ending in ``_at``; timestamps sent to cim are ISO 8601 too;
- a list of things is ``{"items": [...]}``, with counts or cursors beside ``items``;
- a value that is not there is left out: no ``null`` and no ``""`` placeholders.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["ISO_TIME_PATTERN", "epoch_seconds", "iso_time", "listing", "present"]

ISO_TIME_PATTERN = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})$"
"""An RFC 3339 time with its offset: what cim accepts (it answers with ``Z`` and ms)."""
_ISO_TIME = re.compile(ISO_TIME_PATTERN)


def iso_time(seconds: float) -> str:
    """Epoch seconds as the convention's timestamp: ``2026-12-06T09:07:37.290Z``."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def epoch_seconds(text: str) -> float:
    """An ISO 8601 time with its offset (``Z`` or ``+02:00``) as epoch seconds.

    ValueError for anything else: a time without an offset is ambiguous, so it is
    refused rather than guessed.
    """
    if _ISO_TIME.fullmatch(text) is None:
        raise ValueError(f"{text!r} is not an ISO 8601 time with an offset, e.g. {iso_time(0)}")
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def present(fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` without the values that are not there (None, "")."""
    return {key: value for key, value in fields.items() if value is not None and value != ""}


def listing(items: Sequence[Any], **beside: Any) -> dict[str, Any]:
    """A list as the convention writes it: ``{"items": [...], ...counts or cursors}``."""
    return {"items": list(items), **beside}
