"""`make run` stops cleanly: Ctrl-C, or SIGTERM to the daemon, ends with exit status 0
and no make error line (issue #21, Seen 8). make runs on the test's own virtualenv with
`-o install`, so nothing is installed, and `-o web` (the test's config serves no web app)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import shutil
import signal
import subprocess
import sys
import termios
import time

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.integration.support.daemons import ROOT, DaemonProcess

VENV = os.path.dirname(os.path.dirname(sys.executable))


def make_command(config: str) -> list[str]:
    make = shutil.which("make")
    if make is None:
        raise SkipTest("make is not installed")
    return [
        make,
        "--no-print-directory",
        "-o",
        "install",
        "-o",
        "web",
        "run",
        f"VENV={VENV}",
        f"CONFIG={config}",
    ]


def twistd_pid(config: str, timeout: float = 30) -> int:
    """The twistd process running on this config (not make, not the wrapper)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    argv = handle.read().split(b"\0")
            except OSError:
                continue
            if len(argv) > 2 and argv[1].endswith(b"/twistd") and config.encode() in argv:
                return int(entry)
        time.sleep(0.1)
    raise AssertionError("twistd did not start")


def stop_leftover_daemon(config: str) -> None:
    """Kill the twistd of a failed test, which killing make would leave running
    (holding its ports and loading the rest of the suite)."""
    with contextlib.suppress(AssertionError, ProcessLookupError):
        os.kill(twistd_pid(config, 1), signal.SIGKILL)


class MakeRunTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.daemon = DaemonProcess(os.path.abspath(self.mktemp()))

    def test_sigterm_to_the_daemon_is_a_clean_exit(self) -> None:
        make = subprocess.Popen(
            make_command(self.daemon.config),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            self.daemon.process = make  # for wait_healthy's "did it die" check
            self.daemon.wait_healthy()
            os.kill(twistd_pid(self.daemon.config), signal.SIGTERM)
            _, err = make.communicate(timeout=60)
        finally:
            if make.poll() is None:
                stop_leftover_daemon(self.daemon.config)
                make.kill()
                make.wait()
        self.assertEqual(make.returncode, 0, err)
        self.assertNotIn("make: ***", err)

    def test_ctrl_c_in_a_terminal_is_a_clean_exit(self) -> None:
        master, terminal = os.openpty()

        def own_terminal() -> None:
            os.setsid()
            fcntl.ioctl(terminal, termios.TIOCSCTTY, 0)
            # As a shell starts a background job (`make test &` in a CI script): the
            # test must not depend on how the suite was started, and the daemon must
            # still get the Ctrl-C (a Python started with SIGINT ignored keeps it so).
            signal.signal(signal.SIGINT, signal.SIG_IGN)

        make = subprocess.Popen(
            make_command(self.daemon.config),
            cwd=ROOT,
            stdin=terminal,
            stdout=terminal,
            stderr=terminal,
            preexec_fn=own_terminal,
            text=True,  # no pipes: only so that it types as DaemonProcess.process
        )
        os.close(terminal)
        shown = b""

        def read_for(seconds: float) -> None:
            nonlocal shown
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                ready, _, _ = select.select([master], [], [], 0.1)
                if ready:
                    try:
                        shown += os.read(master, 4096)
                    except OSError:
                        return

        try:
            self.daemon.process = make
            self.daemon.wait_healthy()
            read_for(0.5)
            os.write(master, b"\x03")  # the terminal turns it into SIGINT
            deadline = time.monotonic() + 60
            while make.poll() is None and time.monotonic() < deadline:
                read_for(0.2)
            read_for(0.3)
        finally:
            if make.poll() is None:
                stop_leftover_daemon(self.daemon.config)
                make.kill()
            make.wait()
            os.close(master)
        text = shown.decode(errors="replace")
        self.assertEqual(make.returncode, 0, text)
        self.assertNotIn("make: ***", text)
        self.assertIn("stopped", text)  # the daemon's own goodbye in its log


class GitIgnoreTests(SynchronousTestCase):
    def test_what_the_readme_commands_create_is_ignored(self) -> None:
        """A fresh clone's `git status` stays clean after the README's commands."""
        if not os.path.exists(os.path.join(ROOT, ".git")) or shutil.which("git") is None:
            raise SkipTest("not a git checkout")
        created = [
            "cim.log",
            "cim.log.1",
            "cim.pid",
            "twistd.log",
            "twistd.pid",
            "data/cim.db",
            "data/node_key.pem",
            "data/operations.log",
            "data/files/blobs/ab/cd/x",
            ".venv/bin/python",
            "_trial_temp/test.log",
            "bench/results/quick.json",
            "twisted/plugins/dropin.cache",
        ]
        checked = subprocess.run(
            ["git", "-C", ROOT, "check-ignore", "--no-index", "-v", "--non-matching", *created],
            capture_output=True,
            text=True,
            timeout=30,
        )
        not_ignored = [
            line.split("\t")[1] for line in checked.stdout.splitlines() if line.startswith("::")
        ]
        self.assertEqual(not_ignored, [])


class FreshInstallTests(SynchronousTestCase):
    """Seen 8: `make install` in a fresh copy of the checkout prints no setuptools
    deprecation warning (no "compat" editable mode), and the editable install still
    lets twistd find the cim plugin, from any directory. The copy is the working tree's
    tracked files, so uncommitted changes are what is tested; pip installs from its
    cache and the machine's wheel directories."""

    def test_make_install_is_quiet_and_twistd_finds_the_plugin(self) -> None:
        make, git = shutil.which("make"), shutil.which("git")
        if make is None or git is None or not os.path.exists(os.path.join(ROOT, ".git")):
            raise SkipTest("needs make, git and a git checkout")
        copy = os.path.abspath(self.mktemp())
        tracked = subprocess.run(
            [git, "-C", ROOT, "ls-files", "-z"], capture_output=True, timeout=60, check=True
        ).stdout.decode()
        for name in filter(None, tracked.split("\0")):
            source = os.path.join(ROOT, name)
            if os.path.isfile(source):
                os.makedirs(os.path.dirname(os.path.join(copy, name)), exist_ok=True)
                shutil.copy2(source, os.path.join(copy, name))
        python = f"python{sys.version_info.major}.{sys.version_info.minor}"
        installed = subprocess.run(
            [make, "--no-print-directory", "install", f"PYTHON={shutil.which(python) or python}"],
            cwd=copy,
            capture_output=True,
            text=True,
            timeout=900,
        )
        # pip's notes about the machine's package directories are not setuptools'.
        said = [
            line
            for line in (installed.stdout + installed.stderr).splitlines()
            if "is ignored: it is neither a file nor a directory" not in line
        ]
        self.assertEqual(installed.returncode, 0, "\n".join(said))
        text = "\n".join(said)
        for warning in ("Warning", "deprecated", "will be removed", "compat"):
            self.assertNotIn(warning, text)
        bin_dir = os.path.join(copy, ".venv", "bin")
        elsewhere = os.path.abspath(self.mktemp())
        os.makedirs(elsewhere)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        found = subprocess.run(
            [os.path.join(bin_dir, "twistd"), "cim", "--version"],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual((found.returncode, found.stderr), (0, ""))
        self.assertTrue(found.stdout.startswith("cim "), found.stdout)
        for tool in ("cim-client", "cimctl"):
            ran = subprocess.run(
                [os.path.join(bin_dir, tool), "--version"],
                cwd=elsewhere,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            self.assertEqual(ran.returncode, 0, ran.stderr)
        # The install is editable: the copy's own sources, not a copy in site-packages.
        where = subprocess.run(
            [os.path.join(bin_dir, "python"), "-c", "import cim; print(cim.__file__)"],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(where.stdout.strip(), os.path.join(copy, "cim", "__init__.py"))
