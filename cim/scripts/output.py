"""What cim-client and cimctl print: the JSON convention, exit statuses, the version.

The JSON convention (docs/protocol.md, "JSON conventions"), the same for every command:

- a command prints one JSON object, never a bare array or scalar; a command that lists
  things prints ``{"items": [...]}``, with any counts or cursors beside ``items``;
  the message streams (``listen``, ``history``) print one such object per line;
- every timestamp is an ISO 8601 string in UTC with milliseconds,
  ``"2026-12-06T09:07:37.290Z"``, in a key named ``at`` or ending in ``_at``;
- numbers are JSON numbers (sizes, counts, coordinates, durations); only 64-bit
  message ids are strings (``"msg_id"``), because many JSON readers round integers
  past 2^53;
- a value that is not there is left out: no ``""`` and no ``null`` placeholders.

Exit statuses (cim-client; cimctl uses 0, 1, 2 and 3 with the same meanings):
0 done, 1 the operation itself failed, 2 usage, 3 unreachable, 4 refused (login,
permission), 5 ``listen --no-reconnect`` lost its connection.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_REFUSED = 4
EXIT_CONNECTION_LOST = 5


class ClientExit(Exception):
    """Ends the command: ``message`` (if any) as one line on stderr, then ``status``."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message


class OutputClosed(Exception):
    """Whoever read stdout went away (``| head``): the command ends quietly, status 0."""


def iso_time(seconds: float) -> str:
    """Epoch seconds as the convention's timestamp: ``2026-12-06T09:07:37.290Z``."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def is_timestamp_key(key: str) -> bool:
    return key == "at" or key.endswith("_at")


def conventional(value: Any) -> Any:
    """A JSON-ready value following the convention: placeholders ("" and None) left
    out, epoch timestamps (numbers under ``at``/``*_at`` keys) as ISO strings."""
    if isinstance(value, Mapping):
        record: dict[str, Any] = {}
        for key, item in value.items():
            if item is None or (isinstance(item, str) and not item):
                continue
            if is_timestamp_key(key) and _is_number(item):
                record[key] = iso_time(float(item))
            else:
                record[key] = conventional(item)
        return record
    if isinstance(value, list | tuple):
        return [conventional(item) for item in value]
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def listing(items: Sequence[Any], **beside: Any) -> dict[str, Any]:
    """A list as the convention prints it: ``{"items": [...], ...counts or cursors}``."""
    return {"items": list(items), **beside}


def write_line(text: str, stream: TextIO | None = None) -> None:
    """One line to stdout, flushed; OutputClosed when nobody reads it any more."""
    out = stream if stream is not None else sys.stdout
    try:
        out.write(text + "\n")
        out.flush()
    except BrokenPipeError:
        silence(out)
        raise OutputClosed() from None


def emit(document: Any, stream: TextIO | None = None) -> None:
    """One JSON document (or one line of a stream) following the convention."""
    write_line(json.dumps(conventional(document), ensure_ascii=False), stream)


def silence(stream: Any) -> None:
    """Point a closed stdout at /dev/null, so the interpreter's final flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, AttributeError, ValueError):
        pass  # not a real file (a test's StringIO): nothing will flush it at exit


class _Version(argparse.Action):
    """``--version``, computed only when asked (it may run git)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("help", "print the cim version (and git commit) and exit")
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        from cim.version import version_string

        sys.stdout.write(f"{parser.prog} {version_string()}\n")
        parser.exit(EXIT_OK)


def add_version_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action=_Version, default=argparse.SUPPRESS)
