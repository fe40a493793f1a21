"""Downloads from the file service: to a file (resumed from its ``.part``) or a stream.

Every download carries the user's token: a file is read by the users it belongs to.
A URL signed for someone else (an old message's URL) is fetched again without its
signature, so the token alone decides.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from typing import IO, Any

import treq
from twisted.internet.protocol import Protocol

from cim.client.file_http import FileHttp
from cim.client.file_values import DestinationExists, FileServiceError, NoProgress, ProgressSink
from cim.files.names import clean_name

__all__ = ["Downloads"]


class Downloads:
    """One user's downloads over the file service's connection."""

    def __init__(self, http: FileHttp) -> None:
        self._http = http

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
            return await self._http.get(url, offset)
        except FileServiceError as error:
            parts = urllib.parse.urlsplit(url)
            if error.code != "bad_signature" or not parts.query:
                raise
        return await self._http.get(urllib.parse.urlunsplit(parts._replace(query="")), offset)

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


def _filename_from_disposition(header: bytes | None) -> str | None:
    if not header:
        return None
    text = header.decode("latin-1")
    match = re.search(r"filename\*=UTF-8''([^;\s]+)", text, re.IGNORECASE)
    if match:
        return urllib.parse.unquote(match.group(1))
    match = re.search(r'filename="([^"]*)"', text)
    return match.group(1) if match else None


class _Abandon(Protocol):
    """Takes a response body only to drop the connection: nothing of it is wanted."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.stopProducing()  # type: ignore[attr-defined]
