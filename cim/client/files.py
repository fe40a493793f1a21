"""Talking to the file service: instant, chunked and resumable uploads, downloads.

An upload first asks whether the server holds the content already (design: 闪电上传,
by MD5 and size), answering the server's challenge with a keyed hash of the range of
the file it names (proof of possession: the MD5 alone gets nobody a file); otherwise
it sends the file in chunks, several at once (design:
pipeline), each with its MD5 so a damaged chunk is refused and sent again. The
upload id is written to a small state file before the first chunk leaves, so a client
that was killed or lost the network resumes with only the chunks the server does not
list as received (design: 断点续传).

Downloads are ``cim.client.downloads``; the HTTP calls beneath both, with the user's
token, are ``cim.client.file_http``; the answers and errors are
``cim.client.file_values``. ``FileClient`` puts them together for one user.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable
from typing import IO, Any

from treq.client import HTTPClient
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool

from cim.client.downloads import Downloads
from cim.client.file_http import FileHttp
from cim.client.file_values import (
    DestinationExists,
    FileServiceError,
    NoProgress,
    ProgressSink,
    ProofChallenge,
    StoredFile,
    UploadReport,
)
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
from cim.files.proof import proof_of
from cim.reactor import ICimReactor

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


class FileClient:
    """One user's calls to the file service, with the router's token.

    The token is a secret: it goes only into the Authorization header and never
    into a repr, a log line or the state file.
    """

    def __init__(
        self,
        reactor: ICimReactor,
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
        self.user = user
        self.parallel = max(1, parallel)
        self.rate_limit = rate_limit
        self._http = FileHttp(reactor, base_url, token, self.parallel, http)
        self.base_url = self._http.base_url
        self.downloads = Downloads(self._http)
        self._next_send_at = 0.0

    def __repr__(self) -> str:
        return f"FileClient({self.base_url!r}, user={self.user!r})"

    async def close(self) -> None:
        await self._http.close()

    def _in_thread(self, work: Callable[[], Any]) -> Deferred[Any]:
        if self._blocking is not None:
            return self._blocking(work)
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), work)

    # --- the API, call by call -----------------------------------------------------------

    async def check(self, md5: str, size: int) -> StoredFile | ProofChallenge | None:
        """The file when the caller holds it already, else the challenge to answer."""
        body = await self._http.call("POST", "/api/v1/files/check", {"md5": md5, "size": size})
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
        body = await self._http.call("POST", "/api/v1/files/check", payload)
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
        return StoredFile.from_json(await self._http.call("GET", f"/api/v1/files/{file_id}"))

    async def delete(self, file_id: str) -> dict[str, Any]:
        """Delete a file for this user; copies sent to others stay theirs."""
        return await self._http.call("DELETE", f"/api/v1/files/{file_id}")

    async def create_upload(self, name: str, size: int, md5: str, mime: str) -> dict[str, Any]:
        return await self._http.call(
            "POST", "/api/v1/uploads", {"name": name, "size": size, "md5": md5, "mime": mime}
        )

    async def upload_status(self, upload_id: str) -> dict[str, Any] | None:
        try:
            return await self._http.call("GET", f"/api/v1/uploads/{upload_id}")
        except FileServiceError as error:
            if error.status == 404:
                return None
            raise

    async def put_chunk(self, upload_id: str, chunk: int, data: bytes) -> dict[str, Any]:
        content_md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        return await self._http.call(
            "PUT",
            f"/api/v1/uploads/{upload_id}/chunks/{chunk}",
            data=data,
            headers={"Content-MD5": content_md5, "Content-Type": "application/octet-stream"},
        )

    async def complete(self, upload_id: str) -> StoredFile:
        return StoredFile.from_json(
            await self._http.call("POST", f"/api/v1/uploads/{upload_id}/complete")
        )

    async def abort(self, upload_id: str) -> None:
        await self._http.call("DELETE", f"/api/v1/uploads/{upload_id}")

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

    # --- downloads (``cim.client.downloads``) ------------------------------------------------

    async def download(
        self,
        url: str,
        destination: str | None = None,
        progress: ProgressSink | None = None,
        overwrite: bool = False,
    ) -> tuple[str, int]:
        """Save a file, continuing a ``.part``: ``Downloads.download``."""
        return await self.downloads.download(url, destination, progress, overwrite)

    async def download_to(
        self, url: str, output: IO[bytes], progress: ProgressSink | None = None
    ) -> int:
        """Write a file into an open stream: ``Downloads.download_to``."""
        return await self.downloads.download_to(url, output, progress)
