"""The storage directory: content-addressed blobs, upload chunks, temporary files.

Every path here is built from server-generated values only: a SHA-256 in hex, an
upload id the server drew (checked against ``[A-Za-z0-9_-]{22}`` before use), a chunk
number. Nothing a client names ever becomes part of a path.

Layout under ``[files] storage_dir``::

    blobs/ab/cd/abcd...        one file per distinct content, named by its SHA-256
    thumbs/ab/cd/abcd....jpeg  its thumbnail, when it is an image
    uploads/<upload id>/<n>    chunk n of an unfinished upload
    tmp/                       request bodies being received, files being assembled,
                               purged blobs for the moment before they are deleted

Several nodes may share the directory (a shared mount): a file only appears under
its final name by ``os.replace`` from ``tmp/`` on the same filesystem, which is
atomic, so a reader on another node sees the whole file or none of it.

All functions here block; they run on the file thread pool.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import BinaryIO

READ_BLOCK = 1 << 20
_ID = re.compile(r"[A-Za-z0-9_-]{22}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NO_SPACE = frozenset((errno.ENOSPC, errno.EDQUOT))


class DiskFull(Exception):
    """The storage directory's filesystem has no room (or the disk quota is used up)."""


class ChunkMismatch(Exception):
    """A chunk's bytes do not have the MD5 its request claimed."""


class MissingChunk(Exception):
    """A chunk recorded as received is not on disk (removed, or another node's disk)."""


@dataclass(frozen=True)
class Assembled:
    """A whole upload written to a temporary file, not yet a blob."""

    path: str
    size: int
    md5: str
    sha256: str


def is_server_id(value: str) -> bool:
    return _ID.fullmatch(value) is not None


def _no_space(exc: OSError) -> bool:
    return exc.errno in _NO_SPACE


class BlobStore:
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.tmp_dir = os.path.join(self.root, "tmp")
        self.uploads_dir = os.path.join(self.root, "uploads")

    def prepare(self) -> None:
        for name in ("blobs", "thumbs", "uploads", "tmp"):
            os.makedirs(os.path.join(self.root, name), mode=0o750, exist_ok=True)

    # --- paths ----------------------------------------------------------------------

    def blob_path(self, sha256: str) -> str:
        if not _SHA256.fullmatch(sha256):
            raise ValueError("not a SHA-256 hex digest")
        return os.path.join(self.root, "blobs", sha256[:2], sha256[2:4], sha256)

    def thumbnail_path(self, sha256: str, fmt: str) -> str:
        if not _SHA256.fullmatch(sha256) or fmt not in ("jpeg", "png"):
            raise ValueError("not a thumbnail of a blob")
        return os.path.join(self.root, "thumbs", sha256[:2], sha256[2:4], f"{sha256}.{fmt}")

    def upload_dir(self, upload_id: str) -> str:
        if not is_server_id(upload_id):
            raise ValueError("not a server-generated upload id")
        return os.path.join(self.uploads_dir, upload_id)

    def chunk_path(self, upload_id: str, chunk: int) -> str:
        return os.path.join(self.upload_dir(upload_id), str(int(chunk)))

    # --- writing --------------------------------------------------------------------

    def _write(self, handle: BinaryIO, data: bytes) -> None:
        """Every byte this store writes goes through here (tests simulate a full disk)."""
        handle.write(data)

    def new_temporary(self, prefix: str) -> tuple[int, str]:
        try:
            return tempfile.mkstemp(dir=self.tmp_dir, prefix=prefix)
        except OSError as exc:
            if _no_space(exc):
                raise DiskFull() from None
            raise

    def store_chunk(
        self,
        upload_id: str,
        chunk: int,
        spooled_path: str | None,
        data: bytes | None,
        expected_md5: bytes,
    ) -> None:
        """Check a received chunk and move it into its upload's directory.

        The body arrives either as a file already in ``tmp/`` (moved, never copied)
        or as bytes (a small body that stayed in memory). Whatever happens, the
        spooled file does not survive this call except as the stored chunk.
        """
        try:
            if spooled_path is None:
                fd, spooled_path = self.new_temporary(".chunk-")
                with os.fdopen(fd, "wb") as handle:
                    self._write(handle, data or b"")
            digest = _file_md5(spooled_path)
            if digest != expected_md5:
                raise ChunkMismatch()
            directory = self.upload_dir(upload_id)
            os.makedirs(directory, exist_ok=True)
            os.replace(spooled_path, self.chunk_path(upload_id, chunk))
            spooled_path = None
        except OSError as exc:
            if _no_space(exc):
                raise DiskFull() from None
            raise
        finally:
            if spooled_path is not None:
                _unlink(spooled_path)

    def assemble(self, upload_id: str, chunk_count: int) -> Assembled:
        """Concatenate the chunks into one temporary file, hashing as it goes.

        The chunks stay where they are: if the disk fills up here, or the whole-file
        MD5 is wrong, the upload is exactly as it was before.
        """
        md5 = hashlib.md5(usedforsecurity=False)
        sha256 = hashlib.sha256()
        size = 0
        fd, path = self.new_temporary(".assembly-")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in range(chunk_count):
                    try:
                        source = open(self.chunk_path(upload_id, chunk), "rb")  # noqa: SIM115
                    except FileNotFoundError:
                        raise MissingChunk(chunk) from None
                    with source:
                        while block := source.read(READ_BLOCK):
                            md5.update(block)
                            sha256.update(block)
                            size += len(block)
                            self._write(out, block)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            _unlink(path)
            if _no_space(exc):
                raise DiskFull() from None
            raise
        except BaseException:
            _unlink(path)
            raise
        return Assembled(path, size, md5.hexdigest(), sha256.hexdigest())

    def place(self, assembled: Assembled) -> bool:
        """Give an assembled file its content address, unless the blob is there already.

        True when the copy became the blob. When the blob exists (the same content
        uploaded twice, maybe by another node at the same moment) the copy stays
        where it is, for its owner to place again or discard: same name, same bytes.
        """
        final = self.blob_path(assembled.sha256)
        try:
            if os.path.exists(final):
                return False
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.chmod(assembled.path, 0o640)
            os.replace(assembled.path, final)
        except OSError as exc:
            if _no_space(exc):
                raise DiskFull() from None
            raise
        return True

    def read_range(self, sha256: str, offset: int, length: int) -> bytes | None:
        """``length`` bytes of a blob from ``offset``; None when the blob is not (all) there."""
        try:
            with open(self.blob_path(sha256), "rb") as handle:
                handle.seek(offset)
                data = handle.read(length)
        except FileNotFoundError:
            return None
        return data if len(data) == length else None

    # --- purging ----------------------------------------------------------------------

    def set_aside(self, sha256: str, thumbnail: str | None) -> list[tuple[str, str]]:
        """Move a purged file's blob (and thumbnail) into ``tmp/``: (final, aside) pairs.

        A rename, so the bytes can be put back if the content turns out to be wanted
        again after all (``put_back``); ``tmp/`` is on the same filesystem.
        """
        paths = [self.blob_path(sha256)]
        if thumbnail is not None:
            paths.append(self.thumbnail_path(sha256, thumbnail))
        moved = []
        for final in paths:
            aside = os.path.join(self.tmp_dir, f".purge-{os.path.basename(final)}")
            try:
                os.replace(final, aside)
            except FileNotFoundError:
                continue
            moved.append((final, aside))
        return moved

    def put_back(self, moved: list[tuple[str, str]]) -> None:
        """Undo ``set_aside``; where the content was stored again meanwhile, keep that."""
        for final, aside in moved:
            if os.path.exists(final):
                _unlink(aside)
                continue
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.replace(aside, final)

    def remove_aside(self, moved: list[tuple[str, str]]) -> None:
        for _, aside in moved:
            _unlink(aside)

    def discard(self, path: str) -> None:
        _unlink(path)

    def remove_upload(self, upload_id: str) -> None:
        shutil.rmtree(self.upload_dir(upload_id), ignore_errors=True)

    # --- cleaning up ----------------------------------------------------------------

    def upload_ids_on_disk(self) -> list[str]:
        try:
            names = os.listdir(self.uploads_dir)
        except FileNotFoundError:
            return []
        return [name for name in names if is_server_id(name)]

    def remove_orphans(self, upload_ids: list[str], older_than: float) -> int:
        """Remove upload directories the database no longer knows, once they are old.

        The age check spares a directory another node just created for an upload
        whose row this node has not seen yet.
        """
        removed = 0
        for upload_id in upload_ids:
            directory = self.upload_dir(upload_id)
            try:
                if os.stat(directory).st_mtime >= older_than:
                    continue
            except FileNotFoundError:
                continue
            shutil.rmtree(directory, ignore_errors=True)
            removed += 1
        return removed

    def remove_stale_temporaries(self, older_than: float) -> int:
        """Temporary files left by a crash (this node's or another's) once they are old."""
        removed = 0
        try:
            entries = list(os.scandir(self.tmp_dir))
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < older_than:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed


def _file_md5(path: str) -> bytes:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while block := handle.read(READ_BLOCK):
            digest.update(block)
    return digest.digest()


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
