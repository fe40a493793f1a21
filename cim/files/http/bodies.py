"""Request bodies of the file service: spooled to disk as they arrive, and bounded.

Request bodies never sit whole in memory: ``FileRequest`` spools each body into the
storage directory's ``tmp/`` as it arrives and stops storing it past the largest
body the service accepts, so a chunk becomes a stored file by a rename on the file
thread pool.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import tempfile
from typing import Any

from twisted.web import server

from cim.files.store import FileProblem, ReceivedBody, disk_full

__all__ = ["MEMORY_SPOOL", "FileRequest", "Spool", "claim_body"]

MEMORY_SPOOL = 64 * 1024
"""Bodies up to this size stay in memory; larger ones go to a file as they arrive."""


class Spool:
    """One request body: in memory while small, then in a temporary file in ``tmp/``.

    twisted.web closes a request's content when the request ends or its connection
    is lost; closing a spool also deletes its file unless ``claim`` handed the file
    over to whoever stores it.
    """

    def __init__(self, directory: str, memory_limit: int = MEMORY_SPOOL) -> None:
        self._directory = directory
        self._memory_limit = memory_limit
        self._active: Any = io.BytesIO()
        self._path: str | None = None
        self._claimed = False

    def _open_file(self) -> Any:
        fd, self._path = _mkstemp(self._directory)
        return os.fdopen(fd, "w+b")

    def write(self, data: bytes) -> None:
        if self._path is None and self._active.tell() + len(data) > self._memory_limit:
            buffered = self._active.getvalue()
            handle = self._open_file()
            self._active = handle
            handle.write(buffered)
        self._active.write(data)

    def tell(self) -> int:
        return int(self._active.tell())

    def seek(self, offset: int, whence: int = 0) -> int:
        return int(self._active.seek(offset, whence))

    def read(self, size: int = -1) -> bytes:
        return bytes(self._active.read(size))

    def claim(self) -> ReceivedBody:
        """Hand the body over; from now on its file is the claimer's to delete."""
        self._active.seek(0, os.SEEK_END)
        length = int(self._active.tell())
        self._claimed = True
        if self._path is None:
            return ReceivedBody(length, data=self._active.getvalue())
        self._active.close()
        return ReceivedBody(length, path=self._path)

    def close(self) -> None:
        self._active.close()
        if self._path is not None and not self._claimed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)


def _mkstemp(directory: str) -> tuple[int, str]:
    return tempfile.mkstemp(dir=directory, prefix=".body-")


class FileRequest(server.Request):
    """A request whose body is spooled to disk and bounded while it arrives.

    ``max_body_size`` and ``spool_dir`` are set on a subclass per site. Past the
    limit the body is dropped and ``body_too_large`` set; a write error (a full disk)
    is remembered in ``spool_error``; either way the route answers once the whole
    request is in, without the server having kept the bytes.
    """

    max_body_size = 1 << 20
    spool_dir = "."
    memory_limit = MEMORY_SPOOL
    body_too_large = False
    spool_error: OSError | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Form parsing would read a whole body into memory; nothing here uses forms.
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(*args, **kwargs)

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body_size:
            self.body_too_large = True
            self.content = io.BytesIO()
            return
        self.content = Spool(self.spool_dir, self.memory_limit)

    def handleContentChunk(self, data: bytes) -> None:
        content = self.content
        if self.body_too_large or self.spool_error is not None or content is None:
            return
        if content.tell() + len(data) > self.max_body_size:
            self.body_too_large = True
            self._drop_content()
            return
        try:
            content.write(data)
        except OSError as exc:
            self.spool_error = exc
            self._drop_content()

    def _drop_content(self) -> None:
        if self.content is not None:
            self.content.close()
        self.content = io.BytesIO()

    def claim_body(self) -> ReceivedBody:
        if self.body_too_large:
            raise FileProblem(
                413, "body_too_large", f"the request body exceeds {self.max_body_size} bytes"
            )
        if self.spool_error is not None:
            if self.spool_error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_full()
            raise OSError(self.spool_error.errno, "cannot spool the request body")
        content = self.content
        if isinstance(content, Spool):
            return content.claim()
        data = content.getvalue() if isinstance(content, io.BytesIO) else b""
        return ReceivedBody(len(data), data=data)


def claim_body(request: server.Request) -> ReceivedBody:
    """The body of a chunk request; any Request works, a FileRequest without copying."""
    if isinstance(request, FileRequest):
        return request.claim_body()
    content = request.content
    data = content.read() if content is not None else b""
    return ReceivedBody(len(data), data=data)
