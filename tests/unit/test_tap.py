"""twistd's view of cim: ``twistd cim --version`` names cim, not only Twisted."""

from __future__ import annotations

import io
import sys

from twisted.trial.unittest import SynchronousTestCase

from cim import __version__, version
from cim.tap import Options
from twisted import copyright


class VersionOptionTests(SynchronousTestCase):
    def version_output(self) -> tuple[int | str | None, str]:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        with self.assertRaises(SystemExit) as exited:
            Options().parseOptions(["--version"])
        return exited.exception.code, out.getvalue()

    def test_version_names_cim_and_its_commit(self) -> None:
        self.patch(version, "git_commit", lambda: "1a2b3c4d5e6f")
        code, printed = self.version_output()
        self.assertEqual(code, 0)
        self.assertEqual(
            printed, f"cim {__version__} (git 1a2b3c4d5e6f)\nTwisted {copyright.version}\n"
        )

    def test_an_installed_copy_names_the_release(self) -> None:
        self.patch(version, "git_commit", lambda: None)
        code, printed = self.version_output()
        self.assertEqual(code, 0)
        self.assertEqual(printed.splitlines()[0], f"cim {__version__}")
