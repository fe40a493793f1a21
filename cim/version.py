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
from dataclasses import dataclass

from cim import __version__

__all__ = ["RELEASE", "Build", "__version__", "current_build", "git_commit", "version_string"]

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


@dataclass(frozen=True)
class Build:
    """The release and, from a checkout, the commit: what /health and cim_build_info show."""

    version: str = __version__
    commit: str | None = None

    def __str__(self) -> str:
        return f"{self.version} (git {self.commit})" if self.commit else self.version

    def as_json(self) -> dict[str, str]:
        """``{"version", "commit"}``; no commit key when it is not known."""
        return {"version": self.version} | ({"commit": self.commit} if self.commit else {})


RELEASE = Build()
"""The release alone, for code that must not run git (tests, a node made in a test)."""


def current_build() -> Build:
    """This cim: the release and the checkout's commit (runs git once per process)."""
    return Build(__version__, git_commit())


def version_string() -> str:
    """``0.1.0`` or ``0.1.0 (git 1a2b3c4d5e6f)``: what ``--version`` prints after the name."""
    return str(current_build())
