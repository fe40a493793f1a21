"""Files sent in messages: the IM node records which conversations a file was sent in.

A file on the file service is read by its holders and by the participants of the
conversations it was sent in (``cim.storage.files_access``). The IM node is where a
file is sent, so it records the share as it takes the message, before anyone
receives it: a message whose ``media`` names a file of this cluster (``file_id``, or
a URL under ``[files] public_url``) is taken only if its sender may read that file,
so nobody shares a file they cannot read; the receiver (both people, for a
one-to-one conversation) or the group then reads it too.

One small database transaction per media message; text messages never get here. A
database that does not answer is reported like the state store that does not: the
sender hears UNAVAILABLE and sends again.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Protocol

from sqlalchemy.exc import OperationalError
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from cim.backends.threads import PoolNotRunning
from cim.interfaces import StateUnavailable
from cim.protocols import cim_pb2
from cim.storage.database import Database
from cim.storage.files_access import share_txn

__all__ = ["FileShares", "NoFileShares", "RecordedShares", "named_files"]

_FILE_ID = re.compile(r"[A-Za-z0-9_-]{22}")
_FILE_PATH = re.compile(r"/files/([A-Za-z0-9_-]{22})(?:/thumbnail)?")
_UNREADABLE = "\x00"
"""Stands for a malformed ``file_id``: no file has it, so no sender may send it."""


class FileShares(Protocol):
    def share(self, sender: str, message: cim_pb2.Message) -> Deferred[bool]:
        """Record the files the message names; False: the sender may not send one."""


class NoFileShares:
    """A node without a database of files (unit tests): nothing to check or record."""

    def share(self, sender: str, message: cim_pb2.Message) -> Deferred[bool]:
        return succeed(True)


def named_files(message: cim_pb2.Message, public_url: str = "") -> list[str]:
    """The ids of the files of this cluster that the message's media names."""
    media = message.media
    ids: list[str] = []
    if media.file_id:
        ids.append(media.file_id if _FILE_ID.fullmatch(media.file_id) else _UNREADABLE)
    if public_url:
        base = urllib.parse.urlsplit(public_url)
        prefix = base.path.rstrip("/")
        for url in (media.url, media.thumbnail_url):
            parts = urllib.parse.urlsplit(url)
            same_service = (parts.scheme, parts.netloc) == (base.scheme, base.netloc)
            if not same_service or not parts.path.startswith(prefix + "/files/"):
                continue
            match = _FILE_PATH.fullmatch(parts.path[len(prefix) :])
            if match is not None:
                ids.append(match.group(1))
    return sorted(set(ids))


class RecordedShares:
    """Checks and records shares in the database the file service uses."""

    def __init__(self, database: Database, clock: IReactorTime, public_url: str = "") -> None:
        self._database = database
        self._clock = clock
        self._public_url = public_url

    def share(self, sender: str, message: cim_pb2.Message) -> Deferred[bool]:
        ids = named_files(message, self._public_url)
        if not ids:
            return succeed(True)
        if _UNREADABLE in ids:
            return succeed(False)
        d = self._database.run(
            share_txn, ids, sender, message.to, message.group, self._clock.seconds()
        )
        d.addErrback(_unavailable)
        return d


def _unavailable(failure: Failure) -> bool:
    if failure.check(OperationalError, PoolNotRunning):
        raise StateUnavailable("the database of files is unreachable")
    failure.raiseException()
    raise AssertionError("unreachable")
