"""Downloads: a file or its thumbnail, for a reader with a token, with ranges.

Every download names its user with the router's token, and the user must be one who
may read the file (its holders, the participants of the conversations it was sent
in): a file anyone else asks for is "not found", whatever else they know of it. A
signed URL adds a check, never a right: its signature must be for that same user
and must not have expired.

Files are read on the file thread pool one block at a time, paused while the
client's connection is full. Conditional requests (ETag, Last-Modified) and a single
byte range are honoured, so media players can seek and caches revalidate.
"""

from __future__ import annotations

import email.utils
import functools
import os
import re
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.web import http, server
from zope.interface import implementer

from cim.files.names import content_disposition, is_inline
from cim.files.records import FileRecord
from cim.files.store import VARIANT_FILE, VARIANT_THUMBNAIL, FileStore, not_found
from cim.files.thumbnails import THUMBNAIL_MIME
from cim.http.endpoints import Call, Endpoint
from cim.http.schema import whole_number
from cim.http.site import HttpError
from cim.storage.database import ThreadPoolRunner

__all__ = ["BlobSender", "ByteRange", "Downloads", "parse_range"]

SEND_BLOCK = 256 * 1024
DOWNLOAD_MAX_AGE = 86400

_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)")


@implementer(IPushProducer)
class BlobSender:
    """Streams part of a file to a request, reading each block on the file pool."""

    def __init__(self, request: server.Request, work: ThreadPoolRunner) -> None:
        self._request = request
        self._work = work
        self._paused = False
        self._stopped = False
        self._resumed: Deferred[None] | None = None

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._wake()

    def stopProducing(self) -> None:
        self._stopped = True
        self._wake()

    def _wake(self) -> None:
        waiter, self._resumed = self._resumed, None
        if waiter is not None:
            waiter.callback(None)

    async def send(self, path: str, offset: int, length: int) -> None:
        handle = await self._work.run(lambda: _open_at(path, offset))
        self._request.registerProducer(self, True)
        try:
            remaining = length
            while remaining > 0 and not self._stopped:
                if self._paused:
                    self._resumed = Deferred()
                    await self._resumed
                    continue
                read = functools.partial(handle.read, min(SEND_BLOCK, remaining))
                block = await self._work.run(read)
                if not block:
                    raise OSError(f"{path} is shorter than expected")
                if self._stopped:
                    break
                self._request.write(block)
                remaining -= len(block)
        finally:
            await self._work.run(handle.close)
            if not self._stopped:
                self._request.unregisterProducer()
        if not self._stopped:
            self._request.finish()


def _open_at(path: str, offset: int) -> Any:
    handle = open(path, "rb")  # noqa: SIM115 - closed by BlobSender.send
    handle.seek(offset)
    return handle


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1


def parse_range(header: bytes | None, size: int) -> ByteRange | str | None:
    """A single satisfiable range, None to send everything, or "unsatisfiable".

    Several ranges in one request are answered with the whole file (RFC 9110
    allows ignoring Range): media players ask for one range at a time. A number of
    more than 19 digits (past any file's size) is a 400.
    """
    if header is None:
        return None
    match = _RANGE.fullmatch(header.decode("latin-1").strip().replace(" ", ""))
    if match is None:
        return None
    first = whole_number(match.group(1), "Range") if match.group(1) else None
    last = whole_number(match.group(2), "Range") if match.group(2) else None
    if first is None and last is None:
        return None
    if first is None:
        assert last is not None
        if last == 0:
            return "unsatisfiable"
        return ByteRange(max(0, size - last), size - 1) if size else "unsatisfiable"
    start = first
    end = last if last is not None else size - 1
    if start >= size:
        return "unsatisfiable"
    if end < start:
        return None
    return ByteRange(start, min(end, size - 1))


class Downloads:
    """GET /files/{id} and /files/{id}/thumbnail: the bytes, for a reader of the file.

    The caller is authenticated by the machinery (401 without a token); a signed
    URL that is not theirs or has expired is 403, a file they may not read 404.
    """

    _log = Logger()

    def __init__(self, store: FileStore, clock: IReactorTime) -> None:
        self.store = store
        self.clock = clock

    def endpoints(self, file_id: str) -> list[Endpoint[str]]:
        """``file_id``: the regular expression of a file id in a path."""
        return [
            Endpoint(
                "GET",
                "/files/{id}",
                "download",
                "A file's bytes (ranges, conditional requests)",
                "downloads",
                self._download,
                segments={"id": file_id},
            ),
            Endpoint(
                "GET",
                "/files/{id}/thumbnail",
                "download_thumbnail",
                "An image's or a video's thumbnail",
                "downloads",
                self._download_thumbnail,
                segments={"id": file_id},
            ),
        ]

    async def _download(self, call: Call[str]) -> None:
        await self._serve(call.request, call.user, str(call.params["id"]), VARIANT_FILE)

    async def _download_thumbnail(self, call: Call[str]) -> None:
        await self._serve(call.request, call.user, str(call.params["id"]), VARIANT_THUMBNAIL)

    async def _authorize_download(
        self, request: server.Request, user: str, file_id: str, variant: str
    ) -> FileRecord:
        args = request.args or {}
        signature = (args.get(b"sig") or [b""])[0].decode("latin-1")
        expires = whole_number((args.get(b"expires") or [b""])[0], "expires")
        if (signature or expires is not None) and not (
            signature
            and expires is not None
            and self.store.signer.check(
                file_id, variant, user, expires, signature, self.clock.seconds()
            )
        ):
            raise HttpError(
                403,
                "bad_signature",
                "the signed URL is not yours or has expired; ask for a new one, or fetch "
                "the file's address without it",
            )
        record = await self.store.readable(user, file_id)
        if record is None:
            raise not_found()
        return record

    async def _serve(self, request: server.Request, user: str, file_id: str, variant: str) -> None:
        record = await self._authorize_download(request, user, file_id, variant)
        blobs = self.store.blobs
        if variant == VARIANT_THUMBNAIL:
            if record.thumbnail is None:
                raise not_found("thumbnail")
            path = blobs.thumbnail_path(record.sha256, record.thumbnail)
            mime = THUMBNAIL_MIME[record.thumbnail]
            etag = f'"{record.sha256}-thumbnail"'.encode()
            inline = True
        else:
            path = blobs.blob_path(record.sha256)
            mime = record.mime
            etag = f'"{record.sha256}"'.encode()
            inline = is_inline(mime, record.thumbnail is not None)
        try:
            size = await self.store.work.run(lambda: os.stat(path).st_size)
        except FileNotFoundError:
            self._log.error("file {file} is missing from the storage directory", file=file_id)
            raise not_found() from None
        self._common_headers(request, record, variant, mime, etag, inline)
        if self._not_modified(request, etag, record.created_at):
            request.setResponseCode(304)
            request.finish()
            return
        wanted = parse_range(request.getHeader(b"range"), size)
        if_range = request.getHeader(b"if-range")
        if if_range is not None and if_range.strip() != etag:
            wanted = None
        if wanted == "unsatisfiable":
            raise HttpError(
                416,
                "range_not_satisfiable",
                f"the file has {size} bytes",
                ((b"Content-Range", f"bytes */{size}".encode()),),
            )
        if isinstance(wanted, ByteRange):
            request.setResponseCode(206)
            request.setHeader(
                b"Content-Range", f"bytes {wanted.start}-{wanted.end}/{size}".encode()
            )
            offset, length = wanted.start, wanted.length
        else:
            request.setResponseCode(200)
            offset, length = 0, size
        request.setHeader(b"Content-Length", str(length).encode())
        self.store.metrics.downloads += 1
        if request.method == b"HEAD" or length == 0:
            request.finish()
            return
        await BlobSender(request, self.store.work).send(path, offset, length)

    def _common_headers(
        self,
        request: server.Request,
        record: FileRecord,
        variant: str,
        mime: str,
        etag: bytes,
        inline: bool,
    ) -> None:
        name = record.name
        if variant == VARIANT_THUMBNAIL:
            stem = name.rsplit(".", 1)[0] if "." in name else name
            name = f"{stem}-thumbnail.{'png' if mime == 'image/png' else 'jpg'}"
        request.setHeader(b"Content-Type", mime.encode("ascii"))
        request.setHeader(b"Content-Disposition", content_disposition(name, inline))
        request.setHeader(b"ETag", etag)
        request.setHeader(b"Last-Modified", http.datetimeToString(int(record.created_at)))
        request.setHeader(b"Accept-Ranges", b"bytes")
        request.setHeader(b"Cache-Control", f"private, max-age={DOWNLOAD_MAX_AGE}".encode())
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Content-Security-Policy", b"default-src 'none'; sandbox")

    @staticmethod
    def _not_modified(request: server.Request, etag: bytes, created_at: float) -> bool:
        if_none_match = request.getHeader(b"if-none-match")
        if if_none_match is not None:
            tags = [tag.strip() for tag in if_none_match.split(b",")]
            return etag in tags or b"*" in tags
        since = request.getHeader(b"if-modified-since")
        if since is not None:
            try:
                parsed = email.utils.parsedate_to_datetime(since.decode("latin-1"))
            except (TypeError, ValueError):
                return False
            return int(created_at) <= parsed.timestamp()
        return False
