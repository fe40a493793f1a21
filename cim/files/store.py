"""The file service's rules: instant upload, chunked upload, completion, expiry, access.

A file belongs to someone: it is read by its holders and by the participants of the
conversations it was sent in (``cim.storage.files_access``), whatever URL or MD5 the
caller knows; an instant upload links a stored file only after a proof of
possession (``cim.files.proof``); a holder deletes it for themselves, and the purge
(``cim.files.purge``) removes what nobody may read any more.

Used from the reactor thread; every call returns quickly and leaves the blocking work
to two pools: the database pool for records, the file pool for bytes (moving chunks,
MD5 and SHA-256, assembling, thumbnails). Refusals are ``FileProblem``
(``cim.files.outcomes``), with the HTTP status and error code the service answers with.
"""

from __future__ import annotations

import errno
import functools
import math
import re
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from cim.config import FilesConfig
from cim.files import records
from cim.files.blobs import (
    Assembled,
    BlobStore,
    ChunkMismatch,
    DiskFull,
    MissingChunk,
    is_server_id,
)
from cim.files.ids import new_file_id
from cim.files.names import clean_mime, clean_name
from cim.files.outcomes import (
    CheckAnswer,
    Deletion,
    FileMetrics,
    FileProblem,
    ReceivedBody,
    account_gone,
    disk_full,
    not_found,
)
from cim.files.proof import (
    ChallengeRefused,
    Challenges,
    check_proof_format,
    proof_of,
    same_proof,
)
from cim.files.purge import Purge, PurgeReport
from cim.files.records import (
    FileRecord,
    NoSuchAccount,
    QuotaExceeded,
    TooManyUploads,
    UploadRecord,
)
from cim.files.signing import UrlSigner
from cim.files.thumbnails import ImageRefused, ThumbnailBudget, Thumbnailer
from cim.json_convention import iso_time, present
from cim.storage import files_access
from cim.storage.database import Database, ThreadPoolRunner

MAX_PENDING_UPLOADS = 64
"""Unfinished uploads one user may have at once; each also reserves its size."""

SWEEP_BATCH = 500
VARIANT_FILE = "file"
VARIANT_THUMBNAIL = "thumbnail"
_MD5_HEX = re.compile(r"[0-9a-f]{32}")


def _check_md5(value: Any) -> str:
    if not isinstance(value, str) or not _MD5_HEX.fullmatch(value.lower()):
        raise FileProblem(400, "bad_request", "'md5' must be 32 hexadecimal digits")
    return value.lower()


class FileStore:
    _log = Logger()

    def __init__(
        self,
        config: FilesConfig,
        database: Database,
        blobs: BlobStore,
        work: ThreadPoolRunner,
        signer: UrlSigner,
        clock: IReactorTime,
        new_id: Callable[[], str] = new_file_id,
        metrics: FileMetrics | None = None,
    ) -> None:
        self.config = config
        self.database = database
        self.blobs = blobs
        self.work = work
        self.signer = signer
        self.clock = clock
        self.metrics = metrics or FileMetrics()
        self.public_url = config.public_url
        self.challenges = Challenges(signer)
        self._purge = Purge(config, database, blobs, work, clock)
        self._new_id = new_id
        self._completing: set[str] = set()
        self.thumbnails = Thumbnailer(
            work,
            ThumbnailBudget(config.thumbnail_memory),
            config.thumbnail_size,
            config.max_image_pixels,
        )

    # --- validation -------------------------------------------------------------------

    def _check_size(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FileProblem(400, "bad_request", "'size' must be a whole number of bytes, > 0")
        if value > self.config.max_file_size:
            raise FileProblem(
                413,
                "file_too_large",
                f"the file has {value} bytes; at most {self.config.max_file_size} are accepted",
            )
        return value

    def _quota_problem(self, exc: QuotaExceeded) -> FileProblem:
        return FileProblem(
            403,
            "quota_exceeded",
            f"this would use {exc.used + exc.wanted} bytes of your {exc.quota}-byte quota",
            {"used": exc.used, "quota": exc.quota},
        )

    # --- instant upload (闪电上传) ------------------------------------------------------

    async def check(
        self, user: str, md5: Any, size: Any, challenge: Any = None, proof: Any = None
    ) -> CheckAnswer:
        """Instant upload in two steps: a challenge, then the proof that links the file.

        A caller who holds the content already gets it at once. Anyone else gets a
        challenge, whether or not the content is stored, and with a right proof the
        stored file, now held by them too; a wrong proof is answered as for unknown
        content.
        """
        digest = _check_md5(md5)
        length = self._check_size(size)
        now = self.clock.seconds()
        if challenge is None and proof is None:
            held = await self.database.run(records.held_content_txn, user, digest, length)
            if held is not None:
                return CheckAnswer(record=held)
            return CheckAnswer(challenge=self.challenges.issue(user, digest, length, now))
        if challenge is None or proof is None:
            raise FileProblem(400, "bad_request", "send both 'challenge' and 'proof'")
        try:
            issued = self.challenges.verify(user, digest, length, challenge, now)
            given = check_proof_format(proof)
        except ChallengeRefused as refused:
            raise FileProblem(400, refused.code, refused.message) from None
        candidates = await self.database.run(records.files_by_content_txn, digest, length)
        for candidate in candidates:
            read = functools.partial(
                self.blobs.read_range, candidate.sha256, issued.offset, issued.length
            )
            data = await self.work.run(read)
            if data is None or not same_proof(proof_of(issued.nonce, data), given):
                continue
            try:
                record = await self.database.run(
                    records.hold_txn, candidate.id, user, self.config.user_quota, now
                )
            except QuotaExceeded as exc:
                raise self._quota_problem(exc) from None
            except NoSuchAccount:
                raise account_gone() from None
            if record is not None:
                self.metrics.instant_uploads += 1
                return CheckAnswer(record=record)
        if candidates:
            self.metrics.proofs_failed += 1
        return CheckAnswer()

    # --- chunked upload ---------------------------------------------------------------

    async def create_upload(
        self, user: str, name: Any, size: Any, md5: Any, mime: Any
    ) -> UploadRecord:
        if not isinstance(name, str):
            raise FileProblem(400, "bad_request", "'name' must be a string")
        if mime is not None and not isinstance(mime, str):
            raise FileProblem(400, "bad_request", "'mime' must be a string such as image/jpeg")
        media_type = clean_mime(mime)
        if media_type is None:
            raise FileProblem(400, "bad_request", "'mime' must be a type/subtype such as image/png")
        length = self._check_size(size)
        digest = _check_md5(md5)
        now = self.clock.seconds()
        chunk_size = self.config.chunk_size
        upload = UploadRecord(
            id=self._new_id(),
            user=user,
            name=clean_name(name),
            size=length,
            md5=digest,
            mime=media_type,
            chunk_size=chunk_size,
            chunk_count=math.ceil(length / chunk_size),
            created_at=now,
            expires_at=now + self.config.upload_expiry,
        )
        try:
            await self.database.run(
                records.create_upload_txn, upload, self.config.user_quota, MAX_PENDING_UPLOADS
            )
        except QuotaExceeded as exc:
            raise self._quota_problem(exc) from None
        except NoSuchAccount:
            raise account_gone() from None
        except TooManyUploads:
            raise FileProblem(
                429,
                "too_many_uploads",
                f"you have {MAX_PENDING_UPLOADS} unfinished uploads; finish or abort some first",
            ) from None
        self.metrics.uploads_created += 1
        return upload

    async def _owned_upload(self, user: str, upload_id: str) -> UploadRecord:
        if not is_server_id(upload_id):
            raise not_found("upload")
        upload = await self.database.run(records.upload_txn, upload_id, self.clock.seconds())
        # Someone else's upload is "not found" too: ids are not to be probed.
        if upload is None or upload.user != user:
            raise not_found("upload")
        return upload

    async def upload_status(self, user: str, upload_id: str) -> tuple[UploadRecord, list[int]]:
        upload = await self._owned_upload(user, upload_id)
        received = await self.database.run(records.received_chunks_txn, upload_id)
        return upload, received

    async def store_chunk(
        self, user: str, upload_id: str, chunk: int, body: ReceivedBody, content_md5: bytes
    ) -> tuple[UploadRecord, int]:
        """Store one chunk; the upload and how many of its chunks the server has."""
        pending: ReceivedBody | None = body
        try:
            upload = await self._owned_upload(user, upload_id)
            if not 0 <= chunk < upload.chunk_count:
                raise FileProblem(
                    400,
                    "bad_chunk",
                    f"this upload has chunks 0 to {upload.chunk_count - 1}",
                )
            expected = upload.chunk_length(chunk)
            if body.length > upload.chunk_size:
                raise FileProblem(
                    413,
                    "chunk_too_large",
                    f"a chunk has at most {upload.chunk_size} bytes, not {body.length}",
                )
            if body.length != expected:
                raise FileProblem(
                    400,
                    "bad_chunk_size",
                    f"chunk {chunk} must have {expected} bytes, not {body.length}",
                )
            pending = None  # store_chunk consumes the spooled file, whatever happens
            try:
                await self.work.run(
                    lambda: self.blobs.store_chunk(
                        upload_id, chunk, body.path, body.data, content_md5
                    )
                )
            except ChunkMismatch:
                raise FileProblem(
                    400, "md5_mismatch", f"chunk {chunk} does not match its Content-MD5; resend it"
                ) from None
            except DiskFull:
                raise disk_full() from None
            now = self.clock.seconds()
            count = await self.database.run(
                records.record_chunk_txn,
                upload_id,
                chunk,
                expected,
                now,
                now + self.config.upload_expiry,
            )
            if count is None:
                await self.work.run(lambda: self.blobs.remove_upload(upload_id))
                raise not_found("upload")
            self.metrics.chunks_stored += 1
            self.metrics.chunk_bytes += expected
            return upload, count
        finally:
            if pending is not None:
                await self.discard(pending)

    async def discard(self, body: ReceivedBody) -> None:
        path = body.path
        if path is not None:
            await self.work.run(lambda: self.blobs.discard(path))

    async def complete(self, user: str, upload_id: str) -> FileRecord:
        upload = await self._owned_upload(user, upload_id)
        if upload_id in self._completing:
            raise FileProblem(409, "busy", "this upload is being completed already")
        self._completing.add(upload_id)
        try:
            return await self._complete(upload)
        finally:
            self._completing.discard(upload_id)

    async def _complete(self, upload: UploadRecord) -> FileRecord:
        received = set(await self.database.run(records.received_chunks_txn, upload.id))
        missing = [n for n in range(upload.chunk_count) if n not in received]
        if missing:
            raise self._incomplete(upload, missing)
        try:
            assembled = await self.work.run(
                lambda: self.blobs.assemble(upload.id, upload.chunk_count)
            )
        except DiskFull:
            raise disk_full() from None
        except MissingChunk as exc:
            raise self._incomplete(upload, [int(exc.args[0])]) from None
        try:
            if assembled.size != upload.size or assembled.md5 != upload.md5:
                await self._drop_upload(upload.id)
                what = "size" if assembled.size != upload.size else "MD5"
                raise FileProblem(
                    400,
                    "md5_mismatch" if what == "MD5" else "size_mismatch",
                    f"the uploaded bytes do not have the declared {what}; "
                    "the upload is discarded, start again",
                )
            existing = await self.database.run(records.file_by_sha256_txn, assembled.sha256)
            record = existing or await self._new_file(upload, assembled)
            placed = await self._place(assembled)
            stored = await self.database.run(
                records.finish_upload_txn, upload.id, record, upload.user, self.clock.seconds()
            )
            if not placed:
                # The blob was there, but the purge may have taken it since: the
                # upload's own copy is kept until the file's row holds the content.
                await self._place(assembled)
        finally:
            await self.work.run(lambda: self.blobs.discard(assembled.path))
        await self.work.run(lambda: self.blobs.remove_upload(upload.id))
        self.metrics.uploads_completed += 1
        self._log.info(
            "upload {upload} by {user!r} complete: file {file}, {size} bytes",
            upload=upload.id,
            user=upload.user,
            file=stored.id,
            size=stored.size,
        )
        return stored

    async def _place(self, assembled: Assembled) -> bool:
        try:
            return bool(await self.work.run(lambda: self.blobs.place(assembled)))
        except DiskFull:
            raise disk_full() from None

    def _incomplete(self, upload: UploadRecord, missing: list[int]) -> FileProblem:
        return FileProblem(
            409,
            "incomplete",
            f"{len(missing)} of {upload.chunk_count} chunks are missing",
            {"missing": missing[:1000]},
        )

    async def _new_file(self, upload: UploadRecord, assembled: Assembled) -> FileRecord:
        """The record of content seen for the first time, with its thumbnail made."""
        try:
            image = await self.thumbnails.make(
                assembled.path,
                lambda fmt: self.blobs.thumbnail_path(assembled.sha256, fmt),
                upload.mime,
            )
        except ImageRefused as refused:
            await self._drop_upload(upload.id)
            raise FileProblem(
                422, refused.code, refused.message + "; the upload is discarded"
            ) from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_full() from None
            raise
        return FileRecord(
            id=self._new_id(),
            sha256=assembled.sha256,
            md5=assembled.md5,
            size=assembled.size,
            mime=image.mime if image else upload.mime,
            name=upload.name,
            width=image.width if image else None,
            height=image.height if image else None,
            thumbnail=image.thumbnail if image else None,
            created_by=upload.user,
            created_at=self.clock.seconds(),
        )

    async def _drop_upload(self, upload_id: str) -> None:
        await self.database.run(records.delete_upload_txn, upload_id)
        await self.work.run(lambda: self.blobs.remove_upload(upload_id))

    async def abort(self, user: str, upload_id: str) -> None:
        await self._owned_upload(user, upload_id)
        await self._drop_upload(upload_id)

    # --- expiry -----------------------------------------------------------------------

    async def sweep(self) -> int:
        """Delete expired uploads and their chunks, then leftovers of crashes.

        Safe on several nodes at once: each step deletes only what is past its time,
        and deleting twice is harmless.
        """
        now = self.clock.seconds()
        expired = 0
        while True:
            ids = await self.database.run(records.expire_uploads_txn, now, SWEEP_BATCH)
            for upload_id in ids:
                await self.work.run(functools.partial(self.blobs.remove_upload, upload_id))
            expired += len(ids)
            if len(ids) < SWEEP_BATCH:
                break
        self.metrics.uploads_expired += expired
        threshold = now - self.config.upload_expiry
        on_disk = await self.work.run(self.blobs.upload_ids_on_disk)
        unknown: list[str] = []
        for start in range(0, len(on_disk), SWEEP_BATCH):
            batch = on_disk[start : start + SWEEP_BATCH]
            known = await self.database.run(records.known_uploads_txn, batch)
            unknown.extend(upload_id for upload_id in batch if upload_id not in known)
        if unknown:
            await self.work.run(lambda: self.blobs.remove_orphans(unknown, threshold))
        await self.work.run(lambda: self.blobs.remove_stale_temporaries(threshold))
        if expired:
            self._log.info("removed {count} expired uploads", count=expired)
        return expired

    async def purge(self) -> PurgeReport:
        """Forget deleted holdings past the grace period, then purge unreferenced files."""
        report = await self._purge()
        self.metrics.files_purged += report.files
        self.metrics.bytes_purged += report.bytes
        return report

    # --- reading and deleting -------------------------------------------------------------

    async def readable(self, user: str, file_id: str) -> FileRecord | None:
        """The file if ``user`` may read it; None otherwise, as for no such file."""
        if not is_server_id(file_id):
            return None
        return await self.database.run(records.readable_file_txn, file_id, user)

    async def delete(self, user: str, file_id: str) -> Deletion:
        """Delete the file for ``user``: their holding and their one-to-one copies."""
        if not is_server_id(file_id):
            raise not_found()
        now = self.clock.seconds()
        released = await self.database.run(files_access.release_txn, file_id, user, now)
        if released is None:
            raise FileProblem(
                404,
                "not_found",
                "you have no such file (a file sent to a group stays with the group)",
            )
        self.metrics.files_deleted += 1
        self._log.info("file {file} deleted by {user!r}", file=file_id, user=user)
        freed_at = now + self.config.purge_grace if released.held else None
        return Deletion(file_id, freed_at, released.readable, released.shared)

    def file_url(self, file_id: str, variant: str) -> str:
        """The file's address: what messages carry; it takes a reader's token."""
        suffix = "/thumbnail" if variant == VARIANT_THUMBNAIL else ""
        return f"{self.public_url}/files/{file_id}{suffix}"

    def signed_url(self, file_id: str, variant: str, user: str, expires: int) -> str:
        """The address signed for ``user`` until ``expires``; it still takes their token."""
        signature = self.signer.signature(file_id, variant, user, expires)
        return f"{self.file_url(file_id, variant)}?expires={expires}&sig={signature}"

    def describe(self, record: FileRecord, user: str) -> dict[str, Any]:
        """What ``user`` is told about a file they may read, with fresh signed URLs."""
        expires = int(self.clock.seconds() + self.config.url_ttl)
        # The JSON convention (cim.json_convention): no thumbnail, no dimensions of a
        # file that is not an image: the keys are left out. ``url`` is the file's own
        # address (its readers fetch it with their token); the signed ones are bound
        # to ``user`` and expire.
        thumbnail = record.thumbnail is not None
        return present(
            {
                "file_id": record.id,
                "url": self.file_url(record.id, VARIANT_FILE),
                "thumbnail_url": (
                    self.file_url(record.id, VARIANT_THUMBNAIL) if thumbnail else None
                ),
                "signed_url": self.signed_url(record.id, VARIANT_FILE, user, expires),
                "signed_thumbnail_url": (
                    self.signed_url(record.id, VARIANT_THUMBNAIL, user, expires)
                    if thumbnail
                    else None
                ),
                "expires_at": iso_time(expires),
                "size": record.size,
                "mime": record.mime,
                "name": record.name,
                "md5": record.md5,
                "width": record.width or None,
                "height": record.height or None,
            }
        )
