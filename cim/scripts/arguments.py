"""cim-client's parser and argument types: each type turns one word of the command line
into a checked value, or a usage error (exit status 2) in one line."""

from __future__ import annotations

import argparse
import datetime
import math
from typing import Any, NoReturn


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (``cim-client send: ...``), exit status 2.

    ``usage_hint`` (a subcommand's keyword to ``add_parser``) follows every usage error
    of that subcommand: the likeliest cause there, when the message cannot name it
    (argparse reports an id that begins with '-' as a missing argument).
    """

    def __init__(self, *args: Any, usage_hint: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.usage_hint = usage_hint

    def error(self, message: str) -> NoReturn:
        hint = f"; {self.usage_hint}" if self.usage_hint else ""
        self.exit(2, f"{self.prog}: {message}{hint} (see {self.prog} --help)\n")


def positive(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {raw!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def message_id(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a msg_id, not {raw!r}") from None
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError("not a msg_id")
    return value


def finite(raw: str, what: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, not {raw!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {what}, not {raw!r}")
    return value


def bounded(raw: str, what: str, low: float, high: float) -> float:
    value = finite(raw, what)
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{what} must be between {low:g} and {high:g}")
    return value


def latitude(raw: str) -> float:
    return bounded(raw, "a latitude", -90, 90)


def longitude(raw: str) -> float:
    return bounded(raw, "a longitude", -180, 180)


def metres(raw: str) -> float:
    return bounded(raw, "a distance in metres", 0, 1e7)


def timestamp(raw: str) -> float:
    """Epoch seconds, or an ISO 8601 time (UTC unless it says otherwise)."""
    if "T" in raw or "-" in raw[1:]:
        try:
            moment = datetime.datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a time, not {raw!r}") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        raw = str(moment.timestamp())
    return bounded(raw, "epoch seconds or an ISO 8601 time", 0, 1e11)


def whole(raw: str, what: str, low: int, high: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, not {raw!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{what} must be between {low} and {high}")
    return value


def battery(raw: str) -> int:
    return whole(raw, "a percentage", 0, 100)


def record_id(raw: str) -> int:
    return whole(raw, "an id", 1, 2**63 - 1)


def offset(raw: str) -> int:
    return whole(raw, "an offset", 0, 1_000_000)


def point(raw: str) -> tuple[float, float]:
    parts = raw.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected LAT,LON, not {raw!r}")
    return latitude(parts[0]), longitude(parts[1])


def circle(raw: str) -> tuple[float, float, float]:
    parts = raw.split(",")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected LAT,LON,RADIUS_M, not {raw!r}")
    return latitude(parts[0]), longitude(parts[1]), metres(parts[2])
