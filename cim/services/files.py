"""The file service over HTTP: uploads in chunks, downloads with ranges, thumbnails.

Request bodies never sit whole in memory: ``FileRequest`` spools each body into the
storage directory's ``tmp/`` as it arrives and stops storing it past the largest
body the service accepts, so a chunk becomes a stored file by a rename on the file
thread pool. Downloads are read on that pool too, one block at a time, paused while
the client's connection is full.

Every call is authenticated with the router's token (``Authorization: Bearer``);
downloads also accept a signed URL, which is what messages carry. The access log
shows paths without query strings, so signatures never reach it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email.utils
import errno
import functools
import io
import os
import re
import socket
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.resource import Resource
from zope.interface import implementer

from cim.backends.state import token_hash
from cim.config import FilesConfig
from cim.files.blobs import BlobStore
from cim.files.names import content_disposition, is_inline
from cim.files.records import FileRecord
from cim.files.signing import UrlSigner, load_or_create_key
from cim.files.store import (
    VARIANT_FILE,
    VARIANT_THUMBNAIL,
    FileProblem,
    FileStore,
    ReceivedBody,
    disk_full,
    not_found,
)
from cim.files.thumbnails import THUMBNAIL_MIME, set_pixel_limit
from cim.http.site import (
    HttpError,
    Reply,
    client_host,
    internal_error,
    json_reply,
    read_json_object,
    write_reply,
)
from cim.interfaces import IStateBackend, StateUnavailable
from cim.storage.database import Database, Runner, ThreadPoolRunner

JSON_MAX_BODY = 16384
MEMORY_SPOOL = 64 * 1024
"""Bodies up to this size stay in memory; larger ones go to a file as they arrive."""
SEND_BLOCK = 256 * 1024
DOWNLOAD_MAX_AGE = 86400

_ID = r"(?P<id>[A-Za-z0-9_-]{1,64})"
_BEARER = re.compile(r"(?i)bearer\s+(\S+)")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


# --- request bodies ----------------------------------------------------------------------


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


def _redacted_access_log(timestamp: str, request: server.Request) -> str:
    """The combined log format without the query string, where signatures travel."""
    escape = http._escape
    path = (request.uri or b"").split(b"?", 1)[0]
    agent = escape(request.getHeader(b"user-agent") or b"-")
    return '"{}" - - {} "{} {} {}" {} {} "-" "{}"'.format(
        escape(client_host(request)),
        timestamp,
        escape(request.method or b"-"),
        escape(path),
        escape(request.clientproto or b"-"),
        request.code,
        request.sentLength or "-",
        agent,
    )


# --- downloads -----------------------------------------------------------------------------


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
    allows ignoring Range): media players ask for one range at a time.
    """
    if header is None:
        return None
    match = _RANGE.fullmatch(header.decode("latin-1").strip().replace(" ", ""))
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    if not first and not last:
        return None
    if not first:
        suffix = int(last)
        if suffix == 0:
            return "unsatisfiable"
        return ByteRange(max(0, size - suffix), size - 1) if size else "unsatisfiable"
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size:
        return "unsatisfiable"
    if end < start:
        return None
    return ByteRange(start, min(end, size - 1))


# --- the resource --------------------------------------------------------------------------

Route = Callable[..., Awaitable["Reply | None"]]


class FilesResource(Resource):
    """Every file service path; answers JSON for everything but file bytes."""

    isLeaf = True
    _log = Logger()

    def __init__(self, store: FileStore, state: IStateBackend, clock: IReactorTime) -> None:
        super().__init__()
        self.store = store
        self.state = state
        self.clock = clock
        routes: list[tuple[bytes, str, Route]] = [
            (b"POST", r"/api/v1/files/check", self._check),
            (b"GET", rf"/api/v1/files/{_ID}", self._describe),
            (b"POST", r"/api/v1/uploads", self._create_upload),
            (b"GET", rf"/api/v1/uploads/{_ID}", self._upload_status),
            (b"DELETE", rf"/api/v1/uploads/{_ID}", self._abort_upload),
            (b"PUT", rf"/api/v1/uploads/{_ID}/chunks/(?P<chunk>\d{{1,9}})", self._put_chunk),
            (b"POST", rf"/api/v1/uploads/{_ID}/complete", self._complete),
            (b"GET", rf"/files/{_ID}", self._download),
            (b"GET", rf"/files/{_ID}/thumbnail", self._download_thumbnail),
        ]
        self._routes = [(method, re.compile(path), route) for method, path, route in routes]

    def render(self, request: server.Request) -> bytes | int:
        path = request.path.decode("latin-1")
        method = b"GET" if request.method == b"HEAD" else request.method
        allowed: list[bytes] = []
        for route_method, pattern, route in self._routes:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if route_method != method:
                allowed.append(route_method)
                continue
            self._run(request, route(request, **match.groupdict()))
            return server.NOT_DONE_YET
        if allowed:
            methods = b", ".join(sorted(set(allowed)))
            error = HttpError(
                405, "method_not_allowed", "method not allowed here", ((b"Allow", methods),)
            )
            return write_reply(request, error.reply())
        return write_reply(request, HttpError(404, "not_found", "no such resource").reply())

    def _run(self, request: server.Request, work: Awaitable[Reply | None]) -> None:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        async def answer() -> None:
            try:
                reply = await work
            except FileProblem as problem:
                self.store.metrics.refused[problem.code] += 1
                payload = {"error": problem.code, "message": problem.message, **problem.extra}
                reply = json_reply(problem.status, payload)
            except HttpError as error:
                reply = error.reply()
            except Exception:
                reply = internal_error(request)
            if reply is None or gone:
                return
            if request.startedWriting:
                # A download failed halfway: all one can do is cut the connection.
                request.loseConnection()
                return
            body = write_reply(request, reply)
            if request.method != b"HEAD":
                request.write(body)
            request.finish()

        Deferred.fromCoroutine(answer()).addErrback(
            lambda failure: self._log.failure("could not send a reply", failure)
        )

    # --- authentication ------------------------------------------------------------------

    async def _user(self, request: server.Request) -> str:
        token = _bearer(request)
        record = None
        if token is not None:
            try:
                record = await self.state.sessions.session_for_token(token_hash(token))
            except StateUnavailable:
                raise HttpError(
                    503,
                    "state_unavailable",
                    "the session store is unreachable; try again shortly",
                    ((b"Retry-After", b"5"),),
                ) from None
        if record is None:
            raise HttpError(
                401,
                "invalid_token",
                "send the router's token as Authorization: Bearer TOKEN",
                ((b"WWW-Authenticate", b'Bearer realm="cim"'),),
            )
        return record.user

    # --- uploads ---------------------------------------------------------------------------

    async def _check(self, request: server.Request) -> Reply:
        body = read_json_object(request, JSON_MAX_BODY)
        user = await self._user(request)
        record = await self.store.check(user, body.get("md5"), body.get("size"))
        if record is None:
            return json_reply(200, {"exists": False})
        return json_reply(200, {"exists": True, **self.store.describe(record)})

    async def _describe(self, request: server.Request, id: str) -> Reply:
        await self._user(request)
        record = await self.store.file(id)
        if record is None:
            raise not_found()
        return json_reply(200, self.store.describe(record))

    async def _create_upload(self, request: server.Request) -> Reply:
        body = read_json_object(request, JSON_MAX_BODY)
        user = await self._user(request)
        upload = await self.store.create_upload(
            user, body.get("name"), body.get("size"), body.get("md5"), body.get("mime")
        )
        return json_reply(
            201,
            {
                "upload_id": upload.id,
                "chunk_size": upload.chunk_size,
                "chunk_count": upload.chunk_count,
                "name": upload.name,
                "expires_at": upload.expires_at,
            },
            ((b"Location", f"/api/v1/uploads/{upload.id}".encode()),),
        )

    async def _upload_status(self, request: server.Request, id: str) -> Reply:
        user = await self._user(request)
        upload, received = await self.store.upload_status(user, id)
        return json_reply(
            200,
            {
                "upload_id": upload.id,
                "name": upload.name,
                "size": upload.size,
                "md5": upload.md5,
                "mime": upload.mime,
                "chunk_size": upload.chunk_size,
                "chunk_count": upload.chunk_count,
                "received": received,
                "expires_at": upload.expires_at,
            },
        )

    async def _abort_upload(self, request: server.Request, id: str) -> Reply:
        user = await self._user(request)
        await self.store.abort(user, id)
        return json_reply(200, {"ok": True})

    async def _put_chunk(self, request: server.Request, id: str, chunk: str) -> Reply:
        # Claimed first, so the spooled file is ours to store or delete from here on.
        body = claim_body(request)
        stored = False
        try:
            user = await self._user(request)
            content_md5 = _content_md5(request)
            stored = True  # store_chunk takes the body over, whatever it decides
            upload, count = await self.store.store_chunk(user, id, int(chunk), body, content_md5)
        finally:
            if not stored:
                await self.store.discard(body)
        return json_reply(
            200,
            {
                "upload_id": upload.id,
                "chunk": int(chunk),
                "received": count,
                "chunk_count": upload.chunk_count,
            },
        )

    async def _complete(self, request: server.Request, id: str) -> Reply:
        user = await self._user(request)
        record = await self.store.complete(user, id)
        return json_reply(200, self.store.describe(record))

    # --- downloads -------------------------------------------------------------------------

    async def _download(self, request: server.Request, id: str) -> None:
        await self._serve(request, id, VARIANT_FILE)

    async def _download_thumbnail(self, request: server.Request, id: str) -> None:
        await self._serve(request, id, VARIANT_THUMBNAIL)

    async def _authorize_download(
        self, request: server.Request, file_id: str, variant: str
    ) -> None:
        args = request.args or {}
        signature = (args.get(b"sig") or [b""])[0].decode("latin-1")
        expires_raw = (args.get(b"expires") or [b""])[0]
        if (
            signature
            and expires_raw.isdigit()
            and self.store.signer.check(
                file_id, variant, int(expires_raw), signature, self.clock.seconds()
            )
        ):
            return
        if _bearer(request) is not None or not signature:
            await self._user(request)
            return
        raise HttpError(
            403, "bad_signature", "the signed URL is not valid or has expired; ask for a new one"
        )

    async def _serve(self, request: server.Request, file_id: str, variant: str) -> None:
        await self._authorize_download(request, file_id, variant)
        record = await self.store.file(file_id)
        if record is None:
            raise not_found()
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


def _bearer(request: server.Request) -> str | None:
    header = request.getHeader(b"authorization")
    if header is None:
        return None
    match = _BEARER.fullmatch(header.decode("latin-1").strip())
    return match.group(1) if match else None


def _content_md5(request: server.Request) -> bytes:
    header = request.getHeader(b"content-md5")
    if header is None:
        raise FileProblem(
            400, "bad_request", "send the chunk's MD5 in a Content-MD5 header (RFC 1864, base64)"
        )
    try:
        digest = base64.b64decode(header.strip(), validate=True)
    except (binascii.Error, ValueError):
        digest = b""
    if len(digest) != 16:
        raise FileProblem(400, "bad_request", "Content-MD5 must be the base64 of a 16-byte MD5")
    return digest


def files_site(
    store: FileStore,
    state: IStateBackend,
    clock: IReactorTime,
    max_body_size: int,
    memory_limit: int = MEMORY_SPOOL,
) -> server.Site:
    """The service's Site; no request body may be larger than a chunk (or a JSON call)."""
    request_class = type(
        "FileRequest",
        (FileRequest,),
        {
            "max_body_size": max(max_body_size, JSON_MAX_BODY),
            "spool_dir": store.blobs.tmp_dir,
            "memory_limit": memory_limit,
        },
    )
    site = server.Site(
        FilesResource(store, state, clock),
        requestFactory=request_class,
        reactor=clock,
        logFormatter=_redacted_access_log,
    )
    site.displayTracebacks = False
    return site


# --- the listener --------------------------------------------------------------------------


class FilesListener:
    """The file service in the daemon: storage, key, thread pool, port and sweeper."""

    _log = Logger()

    def __init__(
        self,
        config: FilesConfig,
        data_dir: str,
        database: Database,
        state: IStateBackend,
        reactor: Any,
        runner: Runner | None = None,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.storage_dir = config.storage_dir or os.path.join(data_dir, "files")
        self.key_path = config.url_key or os.path.join(data_dir, "files_url_key")
        self.work = ThreadPoolRunner("cim-files", config.threads, reactor, runner)
        self.blobs = BlobStore(self.storage_dir)
        self.database = database
        self.state = state
        self.store: FileStore | None = None
        self.port: IListeningPort | None = None
        self._sweeper: LoopingCall | None = None

    def prepare(self) -> None:
        """Blocking, once at start-up: directories, the signing key, Pillow's limit."""
        self.blobs.prepare()
        signer = UrlSigner(load_or_create_key(self.key_path))
        set_pixel_limit(self.config.max_image_pixels)
        self.store = FileStore(
            self.config, self.database, self.blobs, self.work, signer, self.reactor
        )

    async def start(self) -> None:
        if self.store is None:
            self.prepare()
        store = self.store
        assert store is not None
        self.work.start()
        site = files_site(store, self.state, self.reactor, self.config.chunk_size)
        endpoint = serverFromString(self.reactor, self.config.listen)
        try:
            self.port = await endpoint.listen(site)
        except BaseException:
            await self.work.stop()
            raise
        store.public_url = self.config.public_url or self._derived_url()
        self._sweeper = LoopingCall(self._sweep)
        self._sweeper.clock = self.reactor
        self._sweeper.start(min(300.0, self.config.upload_expiry / 4), now=True)
        self._log.info(
            "files listening on {listen}, storage in {storage}, URLs under {url}",
            listen=self.config.listen,
            storage=self.storage_dir,
            url=store.public_url,
        )

    def _derived_url(self) -> str:
        assert self.port is not None
        address = self.port.getHost()
        host = getattr(address, "host", "127.0.0.1")
        if host in ("0.0.0.0", "::", ""):
            host = socket.getfqdn()
            self._log.warn(
                "[files] listens on every interface; URLs name {host}: set [files] public_url "
                "to the address clients should use",
                host=host,
            )
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if self.config.listen.startswith("ssl:") else "http"
        return f"{scheme}://{host}:{getattr(address, 'port', 0)}"

    async def _sweep(self) -> None:
        if self.store is None:
            return
        try:
            await self.store.sweep()
        except Exception:
            self._log.failure("sweeping expired uploads failed; trying again later")

    async def stop(self) -> None:
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        if self.port is not None:
            await maybeDeferred(self.port.stopListening)
            self.port = None
        await self.work.stop()
