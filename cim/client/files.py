"""Talking to the file service: instant, chunked and resumable uploads, downloads.

An upload first asks whether the server holds the content already (design: 闪电上传,
by MD5 and size), answering the server's challenge with a keyed hash of the range of
the file it names (proof of possession: the MD5 alone gets nobody a file); otherwise
it sends the file in chunks, several at once (design:
pipeline), each with its MD5 so a damaged chunk is refused and sent again. The
upload id is written to a small state file before the first chunk leaves, so a client
that was killed or lost the network resumes with only the chunks the server does not
list as received (design: 断点续传).

Every download carries the user's token: a file is read by the users it belongs to.
A URL signed for someone else (an old message's URL) is fetched again without its
signature, so the token alone decides.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, Protocol

import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import Protocol as ProtocolBase
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.web.client import Agent, HTTPConnectionPool

from cim.client.local_files import (
    STATE_ENV,
    FileChanged,
    UploadState,
    default_state_path,
    file_md5,
    guess_mime,
    voice_duration_ms,
)
from cim.client.local_files import read_chunk as read_local_chunk
from cim.files.names import clean_name
from cim.files.proof import proof_of

__all__ = [
    "STATE_ENV",
    "DestinationExists",
    "FileClient",
    "FileServiceError",
    "NoProgress",
    "ProgressSink",
    "ProofChallenge",
    "StoredFile",
    "UploadReport",
    "UploadState",
    "default_state_path",
    "file_md5",
    "guess_mime",
    "read_chunk",
    "voice_duration_ms",
]

CHUNK_ATTEMPTS = 4
RETRY_DELAY = 0.5
_RETRYABLE_CODES = frozenset(("md5_mismatch", "internal_error", "state_unavailable"))


def read_chunk(path: str, offset: int, length: int) -> bytes:
    """Bytes of a file being sent; a file that shrank meanwhile is a FileServiceError."""
    try:
        return read_local_chunk(path, offset, length)
    except FileChanged as changed:
        raise FileServiceError(0, "file_changed", str(changed)) from None


class FileServiceError(Exception):
    """The file service refused, or could not be reached (``status`` 0)."""

    def __init__(
        self, status: int, code: str, message: str, extra: dict[str, Any] | None = None
    ) -> None:
        super().__init__(status, code, message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra or {}

    def __str__(self) -> str:
        return f"{self.message} ({self.code}, HTTP {self.status})" if self.status else self.message


@dataclass(frozen=True)
class StoredFile:
    file_id: str
    url: str
    thumbnail_url: str
    size: int
    mime: str
    name: str
    md5: str = ""
    width: int = 0
    height: int = 0
    signed_url: str = ""
    """Short-lived and bound to this user (still with their token); ``url`` goes in messages."""

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> StoredFile:
        try:
            return cls(
                file_id=str(body["file_id"]),
                url=str(body["url"]),
                thumbnail_url=str(body.get("thumbnail_url") or ""),
                size=int(body["size"]),
                mime=str(body.get("mime") or "application/octet-stream"),
                name=str(body.get("name") or ""),
                md5=str(body.get("md5") or ""),
                width=int(body.get("width") or 0),
                height=int(body.get("height") or 0),
                signed_url=str(body.get("signed_url") or ""),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FileServiceError(
                0, "bad_response", f"malformed file description: {exc}"
            ) from None


@dataclass(frozen=True)
class ProofChallenge:
    """What the server asks before an instant upload: a keyed hash of one range."""

    token: str
    nonce: str
    offset: int
    length: int

    @classmethod
    def from_json(cls, body: Any) -> ProofChallenge:
        try:
            return cls(
                token=str(body["token"]),
                nonce=str(body["nonce"]),
                offset=int(body["offset"]),
                length=int(body["length"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FileServiceError(0, "bad_response", f"malformed challenge: {exc}") from None


@dataclass(frozen=True)
class UploadReport:
    file: StoredFile
    instant: bool
    resumed: bool
    chunks_sent: int
    chunk_count: int


class ProgressSink(Protocol):
    """Where an upload or download reports its progress (a progress bar, or nothing)."""

    def begin(self, total: int, done: int) -> None: ...

    def advance(self, count: int) -> None: ...

    def end(self) -> None: ...


class NoProgress:
    def begin(self, total: int, done: int) -> None:
        pass

    def advance(self, count: int) -> None:
        pass

    def end(self) -> None:
        pass


# --- the client ----------------------------------------------------------------------------


def _filename_from_disposition(header: bytes | None) -> str | None:
    if not header:
        return None
    text = header.decode("latin-1")
    match = re.search(r"filename\*=UTF-8''([^;\s]+)", text, re.IGNORECASE)
    if match:
        return urllib.parse.unquote(match.group(1))
    match = re.search(r'filename="([^"]*)"', text)
    return match.group(1) if match else None


class FileClient:
    """One user's calls to the file service, with the router's token.

    The token is a secret: it goes only into the Authorization header and never
    into a repr, a log line or the state file.
    """

    def __init__(
        self,
        reactor: Any,
        base_url: str,
        token: str | None,
        user: str = "",
        parallel: int = 4,
        rate_limit: float = 0.0,
        http: HTTPClient | None = None,
        blocking: Callable[[Callable[[], Any]], Deferred[Any]] | None = None,
    ) -> None:
        """``http`` and ``blocking`` (how file reads and hashing leave the reactor
        thread) are for tests; by default they are treq and the reactor's threads."""
        self._reactor = reactor
        self._blocking = blocking
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.user = user
        self.parallel = max(1, parallel)
        self.rate_limit = rate_limit
        self._pool: HTTPConnectionPool | None = None
        if http is None:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            self._pool.maxPersistentPerHost = self.parallel
            http = HTTPClient(Agent(reactor, pool=self._pool))
        self._http = http
        self._next_send_at = 0.0

    def __repr__(self) -> str:
        return f"FileClient({self.base_url!r}, user={self.user!r})"

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.closeCachedConnections()

    def _in_thread(self, work: Callable[[], Any]) -> Deferred[Any]:
        if self._blocking is not None:
            return self._blocking(work)
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), work)

    def _headers(
        self, extra: dict[bytes | str, bytes | str] | None = None
    ) -> dict[bytes | str, bytes | str]:
        headers: dict[bytes | str, bytes | str] = {}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        headers.update(extra or {})
        return headers

    async def _call(
        self,
        method: str,
        path: str,
        payload: dict[str, Any] | None = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        ok: tuple[int, ...] = (200, 201),
    ) -> dict[str, Any]:
        extra: dict[bytes | str, bytes | str] = {}
        extra.update(headers or {})
        body = data
        if payload is not None:
            body = json.dumps(payload).encode()
            extra["Content-Type"] = "application/json"
        try:
            response = await self._http.request(
                method, self.base_url + path, headers=self._headers(extra), data=body
            )
            raw = await treq.content(response)
        except Exception as exc:  # refused, reset, DNS: all mean "not reachable now"
            raise FileServiceError(
                0, "unreachable", f"cannot reach the file service at {self.base_url}: {exc}"
            ) from None
        try:
            parsed = json.loads(raw) if raw else {}
        except ValueError:
            parsed = {}
        if not isinstance(parsed, dict):
            parsed = {}
        if response.code not in ok:
            extra_fields = {k: v for k, v in parsed.items() if k not in ("error", "message")}
            raise FileServiceError(
                response.code,
                str(parsed.get("error", "http_error")),
                str(parsed.get("message", f"HTTP {response.code}")),
                extra_fields,
            )
        return parsed

    # --- the API, call by call -----------------------------------------------------------

    async def check(self, md5: str, size: int) -> StoredFile | ProofChallenge | None:
        """The file when the caller holds it already, else the challenge to answer."""
        body = await self._call("POST", "/api/v1/files/check", {"md5": md5, "size": size})
        if body.get("exists"):
            return StoredFile.from_json(body)
        if "challenge" in body:
            return ProofChallenge.from_json(body["challenge"])
        return None

    async def prove(
        self, md5: str, size: int, challenge: ProofChallenge, proof: str
    ) -> StoredFile | None:
        """The stored file, now held by the caller too; None: upload it after all."""
        payload = {"md5": md5, "size": size, "challenge": challenge.token, "proof": proof}
        body = await self._call("POST", "/api/v1/files/check", payload)
        return StoredFile.from_json(body) if body.get("exists") else None

    async def instant(self, path: str, md5: str, size: int) -> StoredFile | None:
        """Instant upload: the stored file if the server has the content, else None."""
        answer = await self.check(md5, size)
        if not isinstance(answer, ProofChallenge):
            return answer
        data = await self._in_thread(lambda: read_chunk(path, answer.offset, answer.length))
        try:
            return await self.prove(md5, size, answer, proof_of(answer.nonce, data))
        except FileServiceError as error:
            if error.code in ("challenge_expired", "bad_challenge"):
                return None  # a slow disk or clock: uploading works anyway
            raise

    async def describe(self, file_id: str) -> StoredFile:
        return StoredFile.from_json(await self._call("GET", f"/api/v1/files/{file_id}"))

    async def delete(self, file_id: str) -> dict[str, Any]:
        """Delete a file for this user; copies sent to others stay theirs."""
        return await self._call("DELETE", f"/api/v1/files/{file_id}")

    async def create_upload(self, name: str, size: int, md5: str, mime: str) -> dict[str, Any]:
        return await self._call(
            "POST", "/api/v1/uploads", {"name": name, "size": size, "md5": md5, "mime": mime}
        )

    async def upload_status(self, upload_id: str) -> dict[str, Any] | None:
        try:
            return await self._call("GET", f"/api/v1/uploads/{upload_id}")
        except FileServiceError as error:
            if error.status == 404:
                return None
            raise

    async def put_chunk(self, upload_id: str, chunk: int, data: bytes) -> dict[str, Any]:
        content_md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        return await self._call(
            "PUT",
            f"/api/v1/uploads/{upload_id}/chunks/{chunk}",
            data=data,
            headers={"Content-MD5": content_md5, "Content-Type": "application/octet-stream"},
        )

    async def complete(self, upload_id: str) -> StoredFile:
        return StoredFile.from_json(
            await self._call("POST", f"/api/v1/uploads/{upload_id}/complete")
        )

    async def abort(self, upload_id: str) -> None:
        await self._call("DELETE", f"/api/v1/uploads/{upload_id}")

    # --- a whole upload ------------------------------------------------------------------

    async def upload(
        self,
        path: str,
        name: str | None = None,
        mime: str | None = None,
        state: UploadState | None = None,
        progress: ProgressSink | None = None,
    ) -> UploadReport:
        """Upload a file, instantly when the server has it, resuming when possible."""
        sink = progress or NoProgress()
        md5, size = await self._in_thread(lambda: file_md5(path))
        name = name or os.path.basename(path)
        mime = mime or guess_mime(path)
        stored = await self.instant(path, md5, size)
        if stored is not None:
            sink.begin(size, size)
            sink.end()
            return UploadReport(stored, instant=True, resumed=False, chunks_sent=0, chunk_count=0)
        key = UploadState.key(self.base_url, self.user, md5, size)
        upload_id = state.get(key) if state else None
        status = await self.upload_status(upload_id) if upload_id else None
        resumed = status is not None
        if status is None:
            status = await self.create_upload(name, size, md5, mime)
            status.setdefault("received", [])
            upload_id = str(status["upload_id"])
            if state is not None:
                state.put(key, upload_id)
        assert upload_id is not None
        chunk_size = int(status["chunk_size"])
        chunk_count = int(status["chunk_count"])
        received = {int(n) for n in status.get("received", [])}
        missing = [n for n in range(chunk_count) if n not in received]
        done_bytes = sum(min(chunk_size, size - n * chunk_size) for n in received)
        sink.begin(size, done_bytes)
        try:
            sent = await self._send_chunks(path, upload_id, size, chunk_size, missing, sink)
            try:
                stored = await self.complete(upload_id)
            except FileServiceError as error:
                if error.code != "incomplete":
                    raise
                # Chunks the server lost (its disk, another node): send them once more.
                again = [int(n) for n in error.extra.get("missing", [])]
                sent += await self._send_chunks(path, upload_id, size, chunk_size, again, sink)
                stored = await self.complete(upload_id)
        except FileServiceError as error:
            if state is not None and error.code in ("md5_mismatch", "size_mismatch", "not_found"):
                state.drop(key)  # the server discarded the upload: start afresh next time
            raise
        finally:
            sink.end()
        if state is not None:
            state.drop(key)
        return UploadReport(stored, False, resumed, sent, chunk_count)

    async def _send_chunks(
        self,
        path: str,
        upload_id: str,
        size: int,
        chunk_size: int,
        chunks: list[int],
        sink: ProgressSink,
    ) -> int:
        """Send chunks with ``parallel`` requests in flight; how many were sent."""
        queue = iter(chunks)
        stop: list[BaseException] = []
        sent = 0

        async def worker() -> None:
            nonlocal sent
            for chunk in queue:
                if stop:
                    return
                offset = chunk * chunk_size
                length = min(chunk_size, size - offset)
                try:
                    await self._send_one(path, upload_id, chunk, offset, length)
                except BaseException as exc:
                    stop.append(exc)
                    return
                sent += 1
                sink.advance(length)

        workers: list[Deferred[None]] = [
            Deferred.fromCoroutine(worker()) for _ in range(self.parallel)
        ]
        await DeferredList(workers, consumeErrors=True)
        if stop:
            raise stop[0]
        return sent

    async def _send_one(
        self, path: str, upload_id: str, chunk: int, offset: int, length: int
    ) -> None:
        await self._pace(length)
        for attempt in range(CHUNK_ATTEMPTS):
            data = await self._in_thread(lambda: read_chunk(path, offset, length))
            try:
                await self.put_chunk(upload_id, chunk, data)
                return
            except FileServiceError as error:
                retryable = error.status == 0 or error.code in _RETRYABLE_CODES
                if not retryable or attempt == CHUNK_ATTEMPTS - 1:
                    raise
            await deferLater(self._reactor, RETRY_DELAY * 2**attempt)

    async def _pace(self, length: int) -> None:
        """Keep the average rate at ``rate_limit`` bytes a second, when one is set."""
        if self.rate_limit <= 0:
            return
        now = self._reactor.seconds()
        start = max(now, self._next_send_at)
        self._next_send_at = start + length / self.rate_limit
        if start > now:
            await deferLater(self._reactor, start - now)

    # --- downloads -----------------------------------------------------------------------

    async def download(
        self,
        url: str,
        destination: str | None = None,
        progress: ProgressSink | None = None,
        overwrite: bool = False,
    ) -> tuple[str, int]:
        """Save a file; a ``.part`` left by an interrupted run is continued with Range.

        ``destination`` may be a directory (the server's name for the file is used,
        stripped of any directory part) or None for the current directory. A file
        already there raises ``DestinationExists`` (before anything is written) unless
        ``overwrite``.
        """
        target = destination
        part = f"{target}.part" if target and not os.path.isdir(target) else None
        if target and part and not overwrite and os.path.exists(target):
            raise DestinationExists(target)
        offset = os.path.getsize(part) if part and os.path.exists(part) else 0
        response = await self._fetch(url, offset)
        if target is None or os.path.isdir(target):
            disposition = response.headers.getRawHeaders(b"content-disposition", [None])[0]
            name = clean_name(_filename_from_disposition(disposition) or "download")
            target = os.path.join(target or ".", name)
            part = f"{target}.part"
            if not overwrite and os.path.exists(target):
                response.deliverBody(_Abandon())
                raise DestinationExists(target)
        assert part is not None
        if response.code == 200:
            offset = 0
        mode = "ab" if response.code == 206 else "wb"
        with open(part, mode) as handle:
            await self._receive(response, handle, progress, offset)
        os.replace(part, target)
        return target, os.path.getsize(target)

    async def download_to(
        self, url: str, output: IO[bytes], progress: ProgressSink | None = None
    ) -> int:
        """Write a file into an open stream (such as stdout): no ``.part``, no resuming.

        Returns how many bytes were written.
        """
        response = await self._fetch(url, 0)
        return await self._receive(response, output, progress, 0)

    async def _fetch(self, url: str, offset: int) -> Any:
        """The download's response (206 from ``offset`` when the server resumes).

        With the token always; a signed URL the server refuses (made for another
        user, or expired) is asked for again without its signature.
        """
        try:
            return await self._get(url, offset)
        except FileServiceError as error:
            parts = urllib.parse.urlsplit(url)
            if error.code != "bad_signature" or not parts.query:
                raise
        return await self._get(urllib.parse.urlunsplit(parts._replace(query="")), offset)

    async def _get(self, url: str, offset: int) -> Any:
        headers: dict[bytes | str, bytes | str] = {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            response = await self._http.get(url, headers=self._headers(headers), unbuffered=True)
        except Exception as exc:
            where = url.split("?")[0]
            raise FileServiceError(0, "unreachable", f"cannot reach {where}: {exc}") from None
        if response.code not in (200, 206):
            raw = await treq.content(response)
            try:
                body = json.loads(raw)
            except ValueError:
                body = {}
            body = body if isinstance(body, dict) else {}
            raise FileServiceError(
                response.code,
                str(body.get("error", "http_error")),
                str(body.get("message", f"HTTP {response.code}")),
            )
        return response

    async def _receive(
        self, response: Any, output: IO[bytes], progress: ProgressSink | None, offset: int
    ) -> int:
        sink = progress or NoProgress()
        length = response.length if isinstance(response.length, int) else 0
        sink.begin(offset + length, offset)
        written = 0

        def write(data: bytes) -> None:
            nonlocal written
            output.write(data)
            written += len(data)
            sink.advance(len(data))

        try:
            await treq.collect(response, write)
        finally:
            sink.end()
        return written


class DestinationExists(FileExistsError):
    """A download would replace a file that is already there."""

    def __init__(self, path: str) -> None:
        super().__init__(f"{path} already exists")
        self.path = path


class _Abandon(ProtocolBase):
    """Takes a response body only to drop the connection: nothing of it is wanted."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.stopProducing()  # type: ignore[attr-defined]
