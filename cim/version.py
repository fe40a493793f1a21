"""Which cim this is: the release, and the git commit when it runs from a checkout.

A bug report that says "cim 0.1.0" is ambiguous between every commit since 0.1.0 was
set; the commit (and whether the tree had local changes) pins it down. Only a checkout
of cim itself counts: an installed copy that happens to sit inside some other git
repository reports no commit rather than that repository's.
"""

from __future__ import annotations

import functools
import os
import subprocess

from cim import __version__

__all__ = ["__version__", "git_commit", "version_string"]

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""The directory holding the ``cim`` package: a checkout's root when run from one."""


@functools.cache
def git_commit(root: str = CHECKOUT) -> str | None:
    """The checkout's commit (12 hex digits, "+modified" with local changes), or None.

    None when ``root`` is not a git checkout of cim, or git is missing or slow.
    """
    if not (
        os.path.exists(os.path.join(root, ".git"))
        and os.path.exists(os.path.join(root, "setup.cfg"))
    ):
        return None
    try:
        described = subprocess.run(
            [
                "git",
                "-C",
                root,
                "describe",
                "--always",
                "--exclude=*",  # a tag name is not a commit: always the hash
                "--abbrev=12",
                "--dirty=+modified",
            ],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = described.stdout.strip()
    return commit or None


def version_string() -> str:
    """``0.1.0`` or ``0.1.0 (git 1a2b3c4d5e6f)``: what ``--version`` prints after the name."""
    commit = git_commit()
    return f"{__version__} (git {commit})" if commit else __version__
