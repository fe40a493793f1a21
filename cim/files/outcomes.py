"""What the file service's rules answer: refusals, counters, and the shapes of answers.

``cim.files.store`` decides; its callers (the HTTP layer, the daemon's health) read
these. A refusal is a ``FileProblem`` carrying the HTTP status and error code the
service answers with, so the rules and their answers are tested together.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from cim.files.proof import Challenge
from cim.files.records import FileRecord

__all__ = [
    "CheckAnswer",
    "Deletion",
    "FileMetrics",
    "FileProblem",
    "ReceivedBody",
    "account_gone",
    "disk_full",
    "not_found",
]


class FileProblem(Exception):
    """A refusal with the HTTP status and error code to answer it with."""

    def __init__(
        self, status: int, code: str, message: str, extra: dict[str, Any] | None = None
    ) -> None:
        super().__init__(status, code, message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra or {}


def not_found(what: str = "file") -> FileProblem:
    return FileProblem(404, "not_found", f"no such {what}")


def account_gone() -> FileProblem:
    return FileProblem(401, "invalid_token", "the account of this session no longer exists")


def disk_full() -> FileProblem:
    return FileProblem(
        507,
        "insufficient_storage",
        "the server's storage is full; the upload is kept, try again later to resume it",
    )


@dataclass
class FileMetrics:
    """Plain counters, reported in the admin service's /health."""

    chunks_stored: int = 0
    chunk_bytes: int = 0
    uploads_created: int = 0
    uploads_completed: int = 0
    instant_uploads: int = 0
    proofs_failed: int = 0
    uploads_expired: int = 0
    downloads: int = 0
    files_deleted: int = 0
    files_purged: int = 0
    bytes_purged: int = 0
    refused: Counter[str] = field(default_factory=Counter)

    def snapshot(self) -> dict[str, Any]:
        return {
            "chunks_stored": self.chunks_stored,
            "chunk_bytes": self.chunk_bytes,
            "uploads_created": self.uploads_created,
            "uploads_completed": self.uploads_completed,
            "instant_uploads": self.instant_uploads,
            "proofs_failed": self.proofs_failed,
            "uploads_expired": self.uploads_expired,
            "downloads": self.downloads,
            "files_deleted": self.files_deleted,
            "files_purged": self.files_purged,
            "bytes_purged": self.bytes_purged,
            "refused": dict(sorted(self.refused.items())),
        }


@dataclass(frozen=True)
class ReceivedBody:
    """A request body as the HTTP layer received it: spooled to ``path``, or in ``data``.

    Whoever holds it must either store it or discard it: a spooled file is a
    temporary file in the storage directory.
    """

    length: int
    path: str | None = None
    data: bytes | None = None


@dataclass(frozen=True)
class CheckAnswer:
    """What ``files/check`` answers: the file, a challenge, or neither (upload it)."""

    record: FileRecord | None = None
    challenge: Challenge | None = None


@dataclass(frozen=True)
class Deletion:
    """What DELETE /api/v1/files/{id} tells its caller."""

    file_id: str
    quota_freed_at: float | None
    """When the purge gives the caller's quota back; None: it never counted."""
    readable: bool
    shared: bool
