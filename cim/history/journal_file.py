"""The timeline journal's files: numbered messages appended before they are promised.

A record is ``length (4 bytes) | CRC-32 of the body (4 bytes) | body``; the body is
the message's fixed fields, then its strings and payload, each length-prefixed. A
process killed in the middle of a write leaves a torn tail: the first record whose
length runs past the end or whose CRC does not match ends the file, and what follows
is dropped (it was never promised: the promise comes after the write returns).

Files are ``<stem>.<generation>`` in one directory. Records go to the newest file with
one ``os.write`` of everything taken in a reactor turn; a file whose records are all
in the database is deleted (``JournalFiles.committed``), and the newest one is rolled
when it grows past ``roll_bytes``, so the journal holds roughly what is not written
yet. The writes are not fsync'ed: a record survives the process being killed, not the
machine losing power, which is what SQLite in WAL with ``synchronous=NORMAL`` promises
for the commit it stands in for (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from cim.storage.timeline import NewMessage
from cim.storage.timeline_journal import CopyRow, Numbered, Readers

__all__ = ["JournalFiles", "decode", "encode", "read_records"]

_FRAME = struct.Struct(">II")
_FIXED = struct.Struct(">qqqdHHHBI")
"""msg_id, seq, client_seq, sent_at, then the lengths of conversation, sender, device,
the count of readers and the length of the payload."""
_PAIR = struct.Struct(">HH")
_MAX_RECORD = 1 << 28
"""A length beyond this is garbage (a torn header), not a record."""


def encode(row: CopyRow, readers: Readers) -> bytes:
    """One record, framed: a message as the copy writes it (``row_of``), and its readers."""
    conversation, seq, msg_id, sender, device, client_seq, sent_at, payload, size = row
    nc, ns, nd, names = _names(conversation, sender, device, readers)
    body = b"".join(
        (
            _FIXED.pack(msg_id, seq, client_seq, sent_at, nc, ns, nd, len(readers), size),
            names,
            payload,
        )
    )
    return _FRAME.pack(len(body), zlib.crc32(body)) + body


@functools.lru_cache(maxsize=16384)
def _names(
    conversation: str, sender: str, device: str, readers: tuple[tuple[str, str], ...]
) -> tuple[int, int, int, bytes]:
    """The lengths of conversation, sender and device, and the encoded names that
    follow the fixed fields (those three, then each reader pair, length-prefixed).

    Cached: a conversation's messages repeat them (the same sender, device and
    readers), and encoding them is most of a record's cost.
    """
    c, s, d = conversation.encode(), sender.encode(), device.encode()
    parts = [c, s, d]
    for user, peer in readers:
        a, b = user.encode(), peer.encode()
        parts += (_PAIR.pack(len(a), len(b)), a, b)
    return len(c), len(s), len(d), b"".join(parts)


def decode(body: bytes) -> Numbered:
    """A record's body (checked already) back into its message."""
    msg_id, seq, client_seq, sent_at, nc, ns, nd, nr, np = _FIXED.unpack_from(body)
    at = _FIXED.size
    texts = []
    for n in (nc, ns, nd):
        texts.append(body[at : at + n].decode())
        at += n
    readers = []
    for _ in range(nr):
        a, b = _PAIR.unpack_from(body, at)
        at += _PAIR.size
        readers.append((body[at : at + a].decode(), body[at + a : at + a + b].decode()))
        at += a + b
    payload = body[at : at + np]
    if len(payload) != np or at + np != len(body):
        raise ValueError("a journal record's lengths do not add up")
    message = NewMessage(
        texts[0], msg_id, texts[1], texts[2], client_seq, sent_at, payload, tuple(readers)
    )
    return Numbered(seq, message)


def read_records(data: bytes) -> tuple[list[Numbered], int]:
    """The whole records at the start of ``data``, and how many bytes they take (a
    torn or damaged tail ends the reading)."""
    records: list[Numbered] = []
    at = 0
    while at + _FRAME.size <= len(data):
        length, crc = _FRAME.unpack_from(data, at)
        end = at + _FRAME.size + length
        if length > _MAX_RECORD or end > len(data):
            break
        body = data[at + _FRAME.size : end]
        if zlib.crc32(body) != crc:
            break
        try:
            records.append(decode(body))
        except (ValueError, struct.error, UnicodeDecodeError):
            break
        at = end
    return records, at


@dataclass(eq=False)
class _File:
    generation: int
    path: str
    fd: int | None
    size: int = 0
    unwritten: int = 0
    """Its records not yet in the database."""


class JournalFiles:
    """The journal's files in one directory: append, count commits, roll, delete."""

    def __init__(self, directory: str, stem: str = "timeline.journal", roll_bytes: int = 8 << 20):
        self.directory = directory
        self.stem = stem
        self.roll_bytes = roll_bytes
        self._files: list[_File] = []
        """Oldest first; the last one is written."""
        self._lock: int | None = None

    # --- start ------------------------------------------------------------------------

    def existing(self) -> list[str]:
        """The journal files left by an earlier run, oldest first."""
        prefix = self.stem + "."
        found = []
        for name in os.listdir(self.directory):
            if name.startswith(prefix) and name[len(prefix) :].isdigit():
                found.append((int(name[len(prefix) :]), os.path.join(self.directory, name)))
        return [path for _, path in sorted(found)]

    def recover(self) -> Iterator[Numbered]:
        """Every whole record an earlier run left, oldest first (``open`` after they
        are in the database deletes their files)."""
        for path in self.existing():
            with open(path, "rb") as f:
                records, _ = read_records(f.read())
            yield from records

    def lock(self) -> None:
        """Hold ``<stem>.lock`` while running: a second node on the same directory
        would replay, roll and delete this one's files (``BlockingIOError`` then)."""
        fd = os.open(
            os.path.join(self.directory, self.stem + ".lock"), os.O_RDWR | os.O_CREAT, 0o600
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise
        self._lock = fd

    def unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the lock
            self._lock = None

    def open(self) -> None:
        """Delete what an earlier run left (replayed by now) and start a new file."""
        generation = 0
        for path in self.existing():
            generation = max(generation, int(path.rsplit(".", 1)[1]))
            os.unlink(path)
        self._start_file(generation + 1)

    def _start_file(self, generation: int) -> None:
        path = os.path.join(self.directory, f"{self.stem}.{generation}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
        self._files.append(_File(generation, path, fd))

    # --- running ----------------------------------------------------------------------

    def write(self, data: bytes, records: int) -> int:
        """Append ``records`` framed records in one write; returns the generation of the
        file they are in (``committed`` is told it back)."""
        if self._files[-1].fd is None:
            raise OSError(errno.EIO, "the journal file could not be cut back after a failure")
        if self._files[-1].size >= self.roll_bytes:
            self._roll()
        current = self._files[-1]
        assert current.fd is not None
        view = memoryview(data)
        try:
            while view:
                written = os.write(current.fd, view)
                view = view[written:]
        except OSError:
            # Nothing of a failed write may stay: its records were never promised.
            # Cut the file back and go on in a new one (or in this one, if no new one
            # can be made). A file that cannot be cut back may keep whole records of
            # the failed write, which the next start would copy, and a torn one, after
            # which nothing would be read back: the journal is not written again
            # (``writable``), and the caller stops taking messages, so that no seq
            # given back is given again before that start.
            try:
                os.ftruncate(current.fd, current.size)
            except OSError:
                os.close(current.fd)
                current.fd = None
                raise
            with contextlib.suppress(OSError):
                self._roll()
            raise
        current.size += len(data)
        current.unwritten += records
        return current.generation

    def committed(self, generation: int, records: int) -> None:
        """That many records of that file are in the database: delete the older files
        whose records all are."""
        for f in self._files:
            if f.generation == generation:
                f.unwritten -= records
                break
        for f in [f for f in self._files[:-1] if f.unwritten <= 0]:
            self._files.remove(f)
            os.unlink(f.path)

    def _roll(self) -> None:
        """Go on in a new file: the old one is deleted once its records are written.
        The new file is made first: if it cannot be, the old one stays the one written."""
        current = self._files[-1]
        self._start_file(current.generation + 1)
        if current.fd is not None:
            os.close(current.fd)
            current.fd = None
        if current.unwritten <= 0:
            self._files.remove(current)
            os.unlink(current.path)

    @property
    def writable(self) -> bool:
        """Whether a write has a file to go to."""
        return bool(self._files) and self._files[-1].fd is not None

    @property
    def files(self) -> int:
        return len(self._files)

    def size(self) -> int:
        """Bytes in the journal's files."""
        return sum(f.size for f in self._files)

    def close(self, *, clean: bool) -> None:
        """Close the files; ``clean``: every record is in the database, delete them."""
        for f in self._files:
            if f.fd is not None:
                os.close(f.fd)
                f.fd = None
            if clean:
                os.unlink(f.path)
        self._files = []
        self.unlock()
