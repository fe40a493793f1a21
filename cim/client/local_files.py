"""The client's side of files on its own disk: the resume state file, hashing, reading.

``cim.client.files`` talks to the file service; this module only touches local
files (blocking: the client runs these in a thread).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mimetypes
import os
import tempfile
import wave
from dataclasses import dataclass, field

__all__ = [
    "HASH_BLOCK",
    "STATE_ENV",
    "FileChanged",
    "UploadState",
    "default_state_path",
    "file_md5",
    "guess_mime",
    "read_chunk",
    "voice_duration_ms",
]

STATE_ENV = "CIM_UPLOAD_STATE"
HASH_BLOCK = 1 << 20


class FileChanged(Exception):
    """The file is shorter than it was when it was hashed."""


# --- the resume state file -------------------------------------------------------------


def default_state_path() -> str:
    configured = os.environ.get(STATE_ENV)
    if configured:
        return configured
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "cim", "uploads.json")


@dataclass
class UploadState:
    """Unfinished upload ids by (file service, user, MD5, size), in a JSON file.

    Written atomically (a temporary file renamed over the old one) and readable by
    its owner only; a damaged file is treated as empty: the worst case is an upload
    that starts again from the first chunk.
    """

    path: str = field(default_factory=default_state_path)

    @staticmethod
    def key(base_url: str, user: str, md5: str, size: int) -> str:
        return f"{base_url}|{user}|{md5}|{size}"

    def _load(self) -> dict[str, str]:
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(k): str(v) for k, v in data.items() if isinstance(v, str)}

    def _save(self, data: dict[str, str]) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=".uploads-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(data, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise

    def get(self, key: str) -> str | None:
        return self._load().get(key)

    def put(self, key: str, upload_id: str) -> None:
        data = self._load()
        data[key] = upload_id
        self._save(data)

    def drop(self, key: str) -> None:
        data = self._load()
        if data.pop(key, None) is not None:
            self._save(data)


# --- files on the client's disk ----------------------------------------------------------


def file_md5(path: str) -> tuple[str, int]:
    """Hex MD5 and size of a file, read in blocks (blocking: run it in a thread)."""
    digest = hashlib.md5(usedforsecurity=False)
    size = 0
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def read_chunk(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read(length)
    if len(data) != length:
        raise FileChanged(f"{path} changed while it was being sent")
    return data


def guess_mime(path: str) -> str:
    mime, _ = mimetypes.guess_type(path)
    return mime or "application/octet-stream"


def voice_duration_ms(path: str) -> int:
    """The length of a WAV recording; 0 when it is not one this code can read."""
    try:
        with wave.open(path, "rb") as recording:
            rate = recording.getframerate()
            return int(recording.getnframes() * 1000 / rate) if rate else 0
    except (wave.Error, EOFError, OSError):
        return 0
