"""The timeline journal's files: numbered messages appended before they are promised.

A record is ``length (4 bytes) | CRC-32 of the body (4 bytes) | body``; the body is
the message's fixed fields, then its strings and payload, each length-prefixed. A
process killed in the middle of a write leaves a torn tail: the first record whose
length runs past the end, is 0, or whose CRC does not match ends the file, and what
follows is dropped (it was never promised: the promise comes after the write returns).

Files are ``<stem>.<generation>`` in one directory. Each file's space is reserved when
it is made (``posix_fallocate``) and mapped into memory, and the records a reactor
turn (or a read) numbered are copied into the mapping: no system call per write, and
no moment at which the reactor lets go of the GIL to another thread (the journal's
copy into SQLite runs on one) with every message of the read waiting. Only on a file
system where reserved blocks stay reserved (``MAPPABLE``: ext4, XFS, tmpfs; not
copy-on-write ones such as btrfs or ZFS, nor network ones), and only when the
reservation succeeds: a write into a mapping whose blocks are not there kills the
process (SIGBUS) on a full disk instead of raising an error. Anywhere else, and for a
file whose space could not be reserved (a full disk), the records are written with
``os.pwrite`` at the file's end, and a write that fails is cut back out. A file whose
records are all in the database is
deleted (``JournalFiles.committed``), and the newest one is rolled when the next
write does not fit (a mapped file holds ``MAPPED_BYTES``, so its pages cost the node
at most that much memory) or when it grows past ``roll_bytes``; a rolled file is cut
back to its records. The journal holds roughly what is not written yet. The records
are not fsync'ed: they survive the process being killed (the mapping is the page
cache's), not the machine losing power, which is what SQLite in WAL with
``synchronous=NORMAL`` promises for the commit it stands in for (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import mmap
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from cim.storage.timeline import NewMessage
from cim.storage.timeline_journal import CopyRow, Numbered, Readers

__all__ = ["MAPPED_BYTES", "JournalFiles", "decode", "encode", "read_records"]

MAPPED_BYTES = 1 << 20
"""The space of a mapped journal file: about 4,500 records of a short text."""
MAPPABLE = frozenset(("ext2", "ext3", "ext4", "xfs", "tmpfs", "overlay"))
"""File systems whose reserved blocks a mapped write cannot run out of."""


def file_system_of(path: str) -> str | None:
    """The type of the file system ``path`` is on (the deepest mount point above it in
    ``/proc/self/mounts``), or None where that cannot be read."""
    real = os.path.realpath(path)
    found, kind = "", None
    try:
        with open("/proc/self/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace("\\040", " ")
                inside = real == point or real.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(found):
                    found, kind = point, fields[2]
    except OSError:
        return None
    return kind


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
        if not length or length > _MAX_RECORD or end > len(data):
            break  # 0: the reserved space of a mapped file, never written
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
    mapping: mmap.mmap | None = None
    """The file's reserved space, mapped; None: written with ``os.pwrite``."""
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
        self.mapped = file_system_of(directory) in MAPPABLE
        """Whether files are reserved and mapped here (else written with pwrite)."""

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

    def _start_file(self, generation: int, at_least: int = 0) -> None:
        path = os.path.join(self.directory, f"{self.stem}.{generation}")
        # Not O_APPEND: glibc cannot emulate posix_fallocate on such a descriptor.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        mapping = None
        if self.mapped:
            mapping = self._reserve(fd, max(min(self.roll_bytes, MAPPED_BYTES), at_least))
        self._files.append(_File(generation, path, fd, mapping))

    @staticmethod
    def _reserve(fd: int, size: int) -> mmap.mmap | None:
        """The file's space, reserved and mapped; None where it cannot be reserved (a
        full disk: the file is written with pwrite, whose failures are reported)."""
        try:
            os.posix_fallocate(fd, 0, size)
            return mmap.mmap(fd, size)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # whatever was reserved of it
            return None

    # --- running ----------------------------------------------------------------------

    def write(self, data: bytes, records: int) -> int:
        """Append ``records`` framed records at once; returns the generation of the
        file they are in (``committed`` is told it back). Raises OSError, with nothing
        of ``data`` kept, when it cannot be written."""
        current = self._files[-1]
        if current.fd is None:
            raise OSError(errno.EIO, "the journal file could not be cut back after a failure")
        mapping = current.mapping
        end = current.size + len(data)
        if current.size >= self.roll_bytes or (mapping is not None and end > len(mapping)):
            self._roll(len(data))  # a new file that cannot be made raises: nothing written
            current = self._files[-1]
            mapping = current.mapping
            end = current.size + len(data)
        if mapping is not None:
            mapping[current.size : end] = data
        else:
            self._append(current, data)
        current.size = end
        current.unwritten += records
        return current.generation

    def _append(self, current: _File, data: bytes) -> None:
        """``os.pwrite`` at the file's end until all of ``data`` is in the file (a file
        not mapped), or nothing of it is."""
        assert current.fd is not None
        view = memoryview(data)
        at = current.size
        try:
            while view:
                written = os.pwrite(current.fd, view, at)
                view = view[written:]
                at += written
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

    def _roll(self, at_least: int = 0) -> None:
        """Go on in a new file: the old one is deleted once its records are written.
        The new file is made first: if it cannot be, the old one stays the one written."""
        current = self._files[-1]
        self._start_file(current.generation + 1, at_least)
        self._close(current, cut=True)
        if current.unwritten <= 0:
            self._files.remove(current)
            os.unlink(current.path)

    @staticmethod
    def _close(f: _File, *, cut: bool) -> None:
        """Unmap and close ``f``; ``cut``: back to its records (a mapped file's
        reserved space after them is given back)."""
        if f.mapping is not None:
            f.mapping.close()
            f.mapping = None
            if cut and f.fd is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(f.fd, f.size)
        if f.fd is not None:
            fd, f.fd = f.fd, None
            os.close(fd)

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
            self._close(f, cut=not clean)
            if clean:
                os.unlink(f.path)
        self._files = []
        self.unlock()
