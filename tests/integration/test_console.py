"""The console in a real terminal: tmux, a running daemon, the real client."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.support.daemons import BIN, PASSWORD, ROOT, DaemonProcess
from tests.integration.support.services import service_missing


class ConsoleInTmuxTests(SynchronousTestCase):
    """Issue 7, acceptance 1: two users chat in real terminals, one quits, the node restarts."""

    def setUp(self) -> None:
        if shutil.which("tmux") is None:
            service_missing(self, "tmux", "it is not installed (apt-get install tmux)")
        self.daemon = DaemonProcess(os.path.abspath(self.mktemp()))
        for user in ("alice", "bob"):
            added = self.daemon.cimctl("user", "add", user, stdin=PASSWORD + "\n")
            self.assertEqual(added.returncode, 0, added.stderr)
        self.daemon.start()
        self.addCleanup(self.daemon.stop)
        # A tmux server of our own: nothing to do with the user's, and easy to end.
        # Its socket lives in a short directory of ours (socket paths are limited in length).
        directory = tempfile.mkdtemp(prefix="cim-tmux-")
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        self.server = os.path.join(directory, "socket")
        self.addCleanup(self.tmux, "kill-server")
        self.cache = os.path.abspath(self.mktemp())

    def tmux(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["tmux", "-u", "-S", self.server, *args], capture_output=True, text=True, timeout=10
        )

    def open_console(self, user: str) -> None:
        command = shlex.join(
            [
                "env",
                f"CIM_PASSWORD={PASSWORD}",
                f"XDG_CACHE_HOME={self.cache}",
                "LANG=C.UTF-8",
                os.path.join(BIN, "cim-client"),
                "--router",
                self.daemon.router_url,
                "--user",
                user,
            ]
        )
        started = self.tmux(
            "new-session", "-d", "-s", user, "-x", "120", "-y", "30", "-c", ROOT, command,
            ";", "set-option", "-t", user, "remain-on-exit", "on",
        )  # fmt: skip
        self.assertEqual(started.returncode, 0, started.stderr)

    def screen(self, name: str) -> str:
        shown = self.tmux("capture-pane", "-p", "-J", "-S", "-1000", "-t", name)
        return shown.stdout

    def type_line(self, name: str, text: str) -> None:
        self.tmux("send-keys", "-t", name, "-l", text)
        self.tmux("send-keys", "-t", name, "Enter")

    def wait_for(self, name: str, text: str, timeout: float = 30, after: str = "") -> str:
        """The pane's text once ``text`` shows (after the last ``after``, if given)."""
        deadline = time.monotonic() + timeout
        while True:
            shown = self.screen(name)
            start = shown.rfind(after) if after else 0
            if start >= 0 and text in shown[start:]:
                return shown
            if time.monotonic() > deadline:
                self.fail(f"{text!r} did not show in {name}'s pane in {timeout:g} s:\n{shown}")
            time.sleep(0.1)

    def pane_dead(self, name: str) -> bool:
        shown = self.tmux("display-message", "-p", "-t", name, "#{pane_dead}")
        return shown.stdout.strip() == "1"

    def test_chat_quit_stored_and_node_restart(self) -> None:
        self.open_console("alice")
        self.open_console("bob")
        self.wait_for("alice", "logged in as alice")
        self.wait_for("bob", "logged in as bob")
        self.daemon.wait_connections(2)

        self.type_line("alice", "/to bob")
        self.wait_for("alice", "talking to bob")
        self.type_line("bob", "/to alice")
        self.wait_for("bob", "talking to alice")
        self.tmux("send-keys", "-t", "bob", "-l", "half a rep")  # typing, not sent yet
        self.wait_for("bob", "bob → alice> half a rep")
        self.type_line("alice", "hello bob, are you there?")
        shown = self.wait_for("bob", "alice: hello bob, are you there?")
        # The message printed above the prompt; what bob was typing is still there.
        self.assertIn("bob → alice> half a rep", shown.split("alice: hello bob")[1])
        self.wait_for("alice", 'delivered to bob: "hello bob, are you there?"')
        self.type_line("bob", "ly")
        self.wait_for("alice", "bob: half a reply")
        self.wait_for("bob", 'delivered to alice: "half a reply"')

        self.type_line("bob", "/quit")
        deadline = time.monotonic() + 30
        while not self.pane_dead("bob") or "bob" in self.daemon.online()["items"]:
            if time.monotonic() > deadline:
                self.fail(f"bob's console did not quit:\n{self.screen('bob')}")
            time.sleep(0.1)

        self.type_line("alice", "still around?")
        self.wait_for("alice", 'stored for bob (offline; delivered when they log in): "still')

        self.daemon.stop()
        self.wait_for("alice", "reconnecting")
        self.daemon.start()
        shown = self.wait_for("alice", "online again", timeout=60, after="connection lost")
        self.assertNotIn("Traceback", shown)
        self.assertFalse(self.pane_dead("alice"))
        if os.environ.get("CIM_SHOW_PANES"):
            print(shown)
        # Still usable: the node took her back and the message is stored again for bob.
        self.type_line("alice", "back again")
        self.wait_for("alice", 'stored for bob (offline; delivered when they log in): "back')

        # Bob comes back: the summary of what waited, then the messages themselves.
        self.tmux("kill-session", "-t", "bob")
        self.open_console("bob")
        self.wait_for("bob", "unread messages with alice")  # his own reply may count
        self.wait_for("bob", "alice: still around?")
        self.wait_for("bob", "alice: back again")
