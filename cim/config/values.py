"""The value parsers of the configuration, and the one error it raises.

Each parser takes the raw string and returns the typed value or raises ValueError whose
text says what was expected; the loader (``cim.config.loading``) turns that into a
ConfigError naming the section and the key.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import field
from typing import Any

from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor

SUITE_CHACHA = "chacha20-poly1305"
SUITE_RC4 = "rc4-hmac-sha256"
KNOWN_SUITES = (SUITE_CHACHA, SUITE_RC4)


class ConfigError(Exception):
    """A configuration problem, rendered as one line naming where it is."""

    def __init__(self, section: str, key: str | None, value: str | None, reason: str) -> None:
        super().__init__(section, key, value, reason)
        self.section = section
        self.key = key
        self.value = value
        self.reason = reason

    def __str__(self) -> str:
        if not self.section:
            return f"config error: {self.reason}"
        where = f"[{self.section}]"
        if self.key is not None:
            where += f" {self.key}"
            if self.value is not None:
                where += f" = {self.value!r}"
        return f"config error: {where}: {self.reason}"


# --- value parsers -------------------------------------------------------------------
# Each takes the raw string and returns the typed value or raises ValueError whose text
# says what was expected; the loader turns that into a ConfigError with the path.


def parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise ValueError("expected true or false")


def parse_int(raw: str) -> int:
    try:
        return int(raw.strip().replace("_", ""))
    except ValueError:
        raise ValueError("expected a whole number") from None


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(raw: str) -> float:
    """Seconds; a bare number is seconds, or a suffix ms, s, m, h, d."""
    match = _DURATION.match(raw)
    if match is None:
        raise ValueError("expected a duration such as 30, 30s, 5m, 2h or 7d")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


_SIZE = re.compile(r"^\s*(\d+)\s*(b|k|kib|m|mib|g|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "b": 1, "k": 1024, "kib": 1024, "m": 1 << 20, "mib": 1 << 20}
_SIZE_UNITS.update({"g": 1 << 30, "gib": 1 << 30})


def parse_size(raw: str) -> int:
    """Bytes; a bare number is bytes, or a suffix KiB, MiB, GiB."""
    match = _SIZE.match(raw)
    if match is None:
        raise ValueError("expected a size such as 65536, 64KiB or 1MiB")
    unit = match.group(2).lower() if match.group(2) else None
    return int(match.group(1)) * _SIZE_UNITS[unit]


def parse_float(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError("expected a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("expected a finite number")
    return value


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|m|h))?\s*$")
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_rate(raw: str) -> float:
    """Per second; ``20/s``, ``30/m``, ``10/h`` (a bare number is per second), or
    ``off`` (also 0): no limit."""
    if raw.strip().lower() == "off":
        return 0.0
    match = _RATE.match(raw)
    if match is None:
        raise ValueError("expected a rate such as 20/s, 30/m or 10/h, or off")
    return float(match.group(1)) / _RATE_UNITS[match.group(2)]


def parse_str(raw: str) -> str:
    return raw.strip()


def parse_list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def parse_endpoint(raw: str) -> str:
    """A Twisted server endpoint description, checked without listening."""
    description = raw.strip()
    try:
        endpoint = serverFromString(MemoryReactor(), description)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"not a valid endpoint description ({exc})") from None
    port = getattr(endpoint, "_port", None)
    if port is not None and not 0 <= int(port) <= 65535:
        raise ValueError("port must be between 0 and 65535")
    return description


def parse_host_port(raw: str) -> str:
    """host:port, or empty for "derive it"."""
    if not raw.strip():
        return ""
    host, sep, port = raw.strip().rpartition(":")
    if not sep or not host:
        raise ValueError("expected host:port")
    try:
        number = int(port)
    except ValueError:
        raise ValueError("expected host:port with a numeric port") from None
    if not 1 <= number <= 65535:
        raise ValueError("port must be between 1 and 65535")
    return raw.strip()


REQUIRED: Any = object()
"""Default of a key the operator must set."""


def _opt(
    default: Any,
    parse: Callable[[str], Any],
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[str, ...] | None = None,
    doc: str = "",
) -> Any:
    return field(
        default=default,
        metadata={"parse": parse, "min": minimum, "max": maximum, "choices": choices, "doc": doc},
    )
