"""The ids the file service makes for files and uploads: words a command line takes as such.

An id is 16 random bytes in URL-safe base64 without padding: 22 characters of
``[A-Za-z0-9_-]``, which go into URLs unescaped and name an upload's directory on disk.
People type file ids (``cim-client delete-file ID``) and operators upload ids (``rm -r
ID`` inside the uploads directory), and a word beginning with '-' is taken for an option:
argparse answered "the following arguments are required: file_id". Encoded plainly,
one id in 64 began with '-' (its first character carries the first 6 random bits).

So an encoding that begins with '-' is thrown away and 16 fresh bytes are drawn
(rejection sampling). What stays is a uniform choice among the 63 * 2**122 encodings
that do not begin with '-': log2(2**128 * 63/64), about 127.98 bits of the 128 bits
drawn, the same length, and no id likelier than another (mapping '-' onto another
first character would have made that character twice as likely). A draw is kept
63 times in 64, so a call reads 16 * 64/63 (about 16.25) bytes on average.

Ids made before may begin with '-' and stay valid (``cim.files.blobs.is_server_id``
still accepts them); a command line takes such an id after ``--``
(``cim-client delete-file -- -Xy...``).
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable

__all__ = ["ID_BYTES", "ID_LENGTH", "MAX_DRAWS", "RandomSourceStuck", "new_file_id"]

ID_BYTES = 16
ID_LENGTH = 22
"""Characters of an id: 16 bytes in base64 without its two '=' of padding."""

MAX_DRAWS = 32
"""Draws before giving up: a working source needs more with probability 64**-32
(2**-192), so only a broken one (a stub that always yields the same bytes) gets there."""


class RandomSourceStuck(RuntimeError):
    """Every draw began with '-': the random source is not random."""


def new_file_id(random_bytes: Callable[[int], bytes] = secrets.token_bytes) -> str:
    """A fresh id for a file or an upload: 22 characters, never beginning with '-'.

    ``random_bytes(n)`` gives n random bytes; tests pass a stub to force a leading
    '-' and watch the id drawn again.
    """
    for _ in range(MAX_DRAWS):
        raw = random_bytes(ID_BYTES)
        if len(raw) != ID_BYTES:
            raise ValueError(f"the random source gave {len(raw)} bytes, not {ID_BYTES}")
        candidate = base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
        if not candidate.startswith("-"):
            return candidate
    raise RandomSourceStuck(f"{MAX_DRAWS} draws in a row began with '-'")
