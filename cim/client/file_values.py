"""What the file service answers, as the client library hands it on.

The stored file, the instant-upload challenge, an upload's report, the errors, and
where progress goes: shared by uploads (``cim.client.files``), downloads
(``cim.client.downloads``) and the HTTP calls beneath both (``cim.client.file_http``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "DestinationExists",
    "FileServiceError",
    "NoProgress",
    "ProgressSink",
    "ProofChallenge",
    "StoredFile",
    "UploadReport",
]


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


class DestinationExists(FileExistsError):
    """A download would replace a file that is already there."""

    def __init__(self, path: str) -> None:
        super().__init__(f"{path} already exists")
        self.path = path
