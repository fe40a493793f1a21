"""A daemon started with a bad config refuses to start (a real twistd process)."""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from tests.unit.test_config import MINIMAL, ROOT


class DaemonRefusesBadConfigTests(SynchronousTestCase):
    """twistd stops with the one-line message and a non-zero status, no traceback."""

    def test_twistd_exits_with_one_line(self) -> None:
        path = os.path.abspath(self.mktemp())
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(MINIMAL + "[im]\nmax_frame_size = huge\n")
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        result = subprocess.run(
            [twistd, "--nodaemon", "--pidfile=", "cim", "--config", path],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(
            result.stderr.strip(),
            "cim: config error: [im] max_frame_size = 'huge': "
            "expected a size such as 65536, 64KiB or 1MiB",
        )
        self.assertNotIn("Traceback", result.stdout + result.stderr)
