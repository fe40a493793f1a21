"""The daemon's log: twistd's text lines by default, or JSON lines (``[log] format``).

The observer is chosen from the config in ``makeService`` and handed to twistd as the
application's ``ILogObserver``, so ``twistd -n cim --config ...`` needs no extra flag.
A file (``[log] file``, or twistd's ``--logfile``) is reopened on SIGHUP, after
logrotate moved it.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile
from zope.interface import implementer

from cim.config import LogConfig

# Event keys copied into every JSON line when the event has them.
CONTEXT_FIELDS = ("user", "node", "peer", "session_id", "reason")


@implementer(ILogObserver)
class JsonLinesObserver:
    """One compact JSON object per line: time, level, namespace, text and context."""

    def __init__(self, out: IO[str], node: str | None = None) -> None:
        self._out = out
        self._node = node

    def __call__(self, event: LogEvent) -> None:
        level = event.get("log_level")
        when = event.get("log_time")
        line: dict[str, Any] = {
            "time": (
                datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")
                if isinstance(when, int | float)
                else None
            ),
            "level": getattr(level, "name", "info"),
            "namespace": event.get("log_namespace", ""),
            "text": formatEvent(event),
        }
        for key in CONTEXT_FIELDS:
            value = event.get(key)
            if value is not None:
                line[key] = value if isinstance(value, int | float | bool) else str(value)
        if "node" not in line and self._node is not None:
            line["node"] = self._node
        failure = event.get("log_failure")
        if failure is not None:
            try:
                line["traceback"] = failure.getTraceback()
            except Exception:
                line["traceback"] = repr(failure)
        self._out.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
        self._out.flush()


class DaemonLog:
    """The observer for a config, and the file behind it (if any) to reopen."""

    def __init__(
        self,
        config: LogConfig,
        node: str,
        twistd_logfile: str | None = None,
        nodaemon: bool = True,
    ) -> None:
        path = config.file or twistd_logfile
        if path in (None, "", "-"):
            path = None if nodaemon else "twistd.log"
        self.file: LogFile | None = None
        out: IO[str]
        if path is None:
            out = sys.stdout
        else:
            directory = os.path.dirname(os.path.abspath(path))
            os.makedirs(directory, exist_ok=True)
            # Rotation is logrotate's job (then SIGHUP); LogFile never rotates by size here.
            self.file = LogFile.fromFullPath(path, rotateLength=None)
            out = self.file  # type: ignore[assignment]
        inner: ILogObserver
        if config.format == "json":
            inner = JsonLinesObserver(out, node)
        else:
            inner = textFileLogObserver(out)
        predicate = LogLevelFilterPredicate(LogLevel.levelWithName(config.level))
        self.observer: ILogObserver = FilteringLogObserver(inner, [predicate])

    def reopen(self) -> None:
        if self.file is not None:
            self.file.reopen()
