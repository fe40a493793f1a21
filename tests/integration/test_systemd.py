"""etc/systemd/cim.service: systemd accepts it, and its command line starts a node.

``systemd-analyze verify`` checks that ExecStart's binary exists and is executable,
so the test verifies a copy whose ExecStart points at this checkout's twistd (and
whose User is root, since the ``cim`` user need not exist here); every other line is
the shipped unit's. CI installs systemd's tools when missing (.ci/tools.sh).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.integration.support.daemons import BIN, ROOT, DaemonProcess

UNIT = os.path.join(ROOT, "etc", "systemd", "cim.service")
INSTALLED_TWISTD = "/opt/cim/.venv/bin/twistd"
INSTALLED_CONFIG = "/etc/cim/cim.ini"


def unit_values(text: str, key: str) -> list[str]:
    prefix = key + "="
    return [line[len(prefix) :] for line in text.splitlines() if line.startswith(prefix)]


def local_copy(text: str) -> str:
    """The unit as this machine can verify and run it."""
    lines = []
    for line in text.splitlines():
        if line.startswith(("User=", "Group=")):
            line = line.split("=", 1)[0] + "=root"
        lines.append(line.replace(INSTALLED_TWISTD, os.path.join(BIN, "twistd")))
    return "\n".join(lines) + "\n"


class UnitFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        with open(UNIT, encoding="utf-8") as handle:
            self.text = handle.read()

    def test_shape(self) -> None:
        [exec_start] = unit_values(self.text, "ExecStart")
        self.assertEqual(
            shlex.split(exec_start),
            [INSTALLED_TWISTD, "--nodaemon", "--pidfile=", "cim", "--config", INSTALLED_CONFIG],
        )
        for key, value in (
            ("User", "cim"),
            ("Restart", "on-failure"),
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("PrivateTmp", "yes"),
            ("ProtectHome", "yes"),
            ("ReadWritePaths", "/var/lib/cim /var/log/cim"),
        ):
            self.assertEqual(unit_values(self.text, key), [value], key)

    def test_systemd_analyze_verify_accepts_it(self) -> None:
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            if os.environ.get("CIM_REQUIRE_SERVICES"):
                self.fail("systemd-analyze is missing (.ci/tools.sh installs it)")
            raise SkipTest("systemd-analyze is not installed")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "cim.service")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(local_copy(self.text))
        result = subprocess.run(
            [analyze, "verify", path], capture_output=True, text=True, timeout=60
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        # Warnings about this unit (not about unrelated units on the host) are failures.
        problems = [line for line in result.stderr.splitlines() if "cim.service" in line]
        self.assertEqual(problems, [])

    def test_the_exec_start_command_line_starts_a_node(self) -> None:
        """Acceptance 2: exactly the unit's command, with only the config path swapped."""
        daemon = DaemonProcess(os.path.abspath(self.mktemp()))
        [exec_start] = unit_values(local_copy(self.text), "ExecStart")
        argv = [
            daemon.config if arg == INSTALLED_CONFIG else arg for arg in shlex.split(exec_start)
        ]
        workdir = os.path.join(daemon.workdir, "state")  # WorkingDirectory=/var/lib/cim
        os.makedirs(workdir)
        process = subprocess.Popen(
            argv, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        daemon.process = process
        try:
            deadline = time.monotonic() + 60
            status = None
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    status = daemon.health()["status"]
                except (OSError, ValueError):
                    status = None
                if status == "ok":
                    break
                time.sleep(0.1)
            self.assertEqual(status, "ok")
            # --pidfile= leaves nothing behind; --nodaemon logs to stdout (the journal).
            self.assertEqual(os.listdir(workdir), [])
        finally:
            daemon.stop()
        output = process.stdout.read() if process.stdout else ""
        if process.stdout:
            process.stdout.close()
        # twistd ends by re-raising the SIGTERM, which systemd counts as a clean stop.
        self.assertIn(process.returncode, (0, -15), output)
        self.assertIn("cim node e2e started", output)
