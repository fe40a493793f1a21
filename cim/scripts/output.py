"""What cim-client and cimctl print: JSON documents, exit statuses, the version.

The JSON convention (docs/protocol.md, "JSON conventions") is the one of the HTTP APIs
too, so their answers are printed as they come; what the tools build themselves (IM
messages, group records, database rows) is built with ``cim.json_convention``:

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
import json
import os
import sys
from collections.abc import Sequence
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
    """One JSON document (or one line of a stream), built in the convention."""
    write_line(json.dumps(document, ensure_ascii=False), stream)


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
