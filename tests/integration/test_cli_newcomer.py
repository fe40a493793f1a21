"""What a newcomer trips over (issue #21), with real processes: cim-client and cimctl
against a real daemon, and against none.

Each test names the item of the issue's "Seen" list it covers.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.support.daemons import BIN, PASSWORD, ROOT, DaemonProcess, client, free_port


def cim_client(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    """cim-client without a daemon's defaults."""
    return subprocess.run(
        [os.path.join(BIN, "cim-client"), *args],
        env=dict(os.environ, CIM_PASSWORD=PASSWORD, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


class Lines:
    """A running process's stream, read line by line in a thread, waited on with a deadline."""

    def __init__(self, stream: Any) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.put(line)

    def next(self, timeout: float = 30) -> str:
        line = self.lines.get(timeout=timeout)
        self.seen.append(line)
        return line

    def rest(self, timeout: float = 1.0) -> list[str]:
        found = []
        while True:
            try:
                found.append(self.lines.get(timeout=timeout))
            except queue.Empty:
                return found


def started_daemon(test: SynchronousTestCase, extra: str = "", users: tuple[str, ...] = ()) -> Any:
    daemon = DaemonProcess(os.path.abspath(test.mktemp()), extra=extra)
    for user in users or ("alice", "bob"):
        added = daemon.cimctl("user", "add", user, stdin=PASSWORD + "\n")
        test.assertEqual(added.returncode, 0, added.stderr)
    daemon.start()
    test.addCleanup(daemon.stop)
    return daemon


def stop_listener(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)


class NoDaemonTests(SynchronousTestCase):
    """Seen 1: nothing listening. Seen 6: versions."""

    def test_an_unreachable_router_fails_in_ten_seconds_with_status_3(self) -> None:
        router = f"http://127.0.0.1:{free_port()}"
        began = time.monotonic()
        sent = cim_client("--router", router, "--user", "alice", "send", "bob", "x")
        elapsed = time.monotonic() - began
        self.assertEqual(sent.returncode, 3, sent)
        self.assertLess(elapsed, 15)
        self.assertEqual(sent.stdout, "")
        [line] = sent.stderr.splitlines()
        self.assertTrue(line.startswith(f"cim-client: cannot reach the router at {router}: "), line)
        self.assertTrue(line.endswith("(gave up after 10 s)"), line)

    def test_every_kind_of_command_says_unreachable_the_same_way(self) -> None:
        router = f"http://127.0.0.1:{free_port()}"
        for command in (["online"], ["sos", "list"], ["download", "http://127.0.0.1:1/f/x"]):
            ran = cim_client(
                "--router", router, "--connect-timeout", "2", "--user", "alice", *command
            )
            self.assertEqual(ran.returncode, 3, (command, ran))
            self.assertEqual(len(ran.stderr.splitlines()), 1, ran.stderr)
            self.assertIn("cannot reach", ran.stderr)

    def test_quiet_by_default_and_more_with_v(self) -> None:
        router = f"http://127.0.0.1:{free_port()}"
        common = ("--router", router, "--connect-timeout", "2", "--user", "alice")
        quiet = cim_client(*common, "online")
        self.assertEqual(len(quiet.stderr.splitlines()), 1, quiet.stderr)
        verbose = cim_client(*common, "-v", "online")
        self.assertEqual(verbose.returncode, 3, verbose.stderr)
        self.assertIn("cim-client: info: connecting failed", verbose.stderr)
        self.assertGreater(len(verbose.stderr.splitlines()), 1)

    def test_usage_errors_are_one_line_with_status_2(self) -> None:
        for args in (["--user", "alice", "send", "bob"], ["--user", "alice", "listen", "-x"]):
            ran = cim_client(*args)
            self.assertEqual(ran.returncode, 2, ran)
            self.assertEqual(len(ran.stderr.splitlines()), 1, ran.stderr)

    def test_version_of_every_tool(self) -> None:
        from cim import __version__

        for command, name in (
            (["cim-client", "--version"], "cim-client"),
            (["cimctl", "--version"], "cimctl"),
            (["twistd", "cim", "--version"], "cim"),
        ):
            ran = subprocess.run(
                [os.path.join(BIN, command[0]), *command[1:]],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=ROOT,
            )
            self.assertEqual((ran.returncode, ran.stderr), (0, ""), command)
            first = ran.stdout.splitlines()[0]
            self.assertTrue(first.startswith(f"{name} {__version__}"), ran.stdout)
            if os.path.exists(os.path.join(ROOT, ".git")):
                self.assertRegex(first, r"\(git [0-9a-f]{12}(\+modified)?\)$")


class UnreachableNodeTests(SynchronousTestCase):
    def test_the_node_the_router_names_is_not_there(self) -> None:
        """Seen 1, the other half: the router answers, its node does not."""
        port = free_port()
        daemon = started_daemon(self, extra=f"[im]\nadvertise = 127.0.0.1:{port}\n")
        ran = client(daemon, "alice", "--connect-timeout", "3", "online")
        self.assertEqual(ran.returncode, 3, ran)
        [line] = ran.stderr.splitlines()
        self.assertTrue(
            line.startswith(f"cim-client: cannot reach the node e2e at 127.0.0.1:{port}: "), line
        )


class ListenTests(SynchronousTestCase):
    """Seen 2 and 3: --timeout, --count, and a lost connection."""

    def setUp(self) -> None:
        self.daemon = started_daemon(self)

    def send(self, *texts: str) -> None:
        for text in texts:
            sent = client(self.daemon, "alice", "send", "bob", text)
            self.assertEqual(sent.returncode, 0, sent.stderr)

    def test_timeout_without_count_is_a_normal_end(self) -> None:
        self.send("one")
        listened = client(self.daemon, "bob", "listen", "--timeout", "3")
        self.assertEqual((listened.returncode, listened.stderr), (0, ""))
        self.assertEqual([json.loads(x)["text"] for x in listened.stdout.splitlines()], ["one"])

    def test_timeout_with_count_says_how_many_came(self) -> None:
        self.send("one", "two")
        listened = client(self.daemon, "bob", "listen", "--count", "5", "--timeout", "8")
        self.assertEqual(listened.returncode, 1)
        self.assertEqual(listened.stderr, "cim-client: timed out after 8 s, got 2 of 5\n")
        self.assertEqual(len(listened.stdout.splitlines()), 2)

    def test_count_prints_exactly_n_and_leaves_the_rest_stored(self) -> None:
        self.send("one", "two", "three")
        # Commands that print no messages take none.
        for command in (["online"], ["send", "alice", "hi"], ["group", "list"]):
            ran = client(self.daemon, "bob", *command)
            self.assertEqual(ran.returncode, 0, ran.stderr)
        first = client(self.daemon, "bob", "listen", "--count", "1", "--timeout", "30")
        self.assertEqual((first.returncode, first.stderr), (0, ""))
        self.assertEqual([json.loads(x)["text"] for x in first.stdout.splitlines()], ["one"])
        rest = client(self.daemon, "bob", "listen", "--count", "2", "--timeout", "30")
        self.assertEqual((rest.returncode, rest.stderr), (0, ""))
        texts = [json.loads(x)["text"] for x in rest.stdout.splitlines()]
        self.assertEqual(texts, ["two", "three"])

    def test_commands_that_show_no_messages_move_no_cursor(self) -> None:
        """#14's acceptance 4 (needs the node's timelines): x stored for bob stays unread
        through bob's send, group list, history and sync; listen then prints it."""
        self.send("x")
        for command in (["send", "alice", "y"], ["group", "list"], ["history", "alice"]):
            ran = client(self.daemon, "bob", *command)
            self.assertEqual(ran.returncode, 0, ran.stderr)
        history = client(self.daemon, "bob", "history", "alice")
        self.assertEqual([json.loads(x)["text"] for x in history.stdout.splitlines()], ["y", "x"])
        synced = client(self.daemon, "bob", "sync")
        self.assertEqual((synced.returncode, synced.stderr), (0, ""))
        summary = json.loads(synced.stdout)
        [conversation] = summary["items"]
        self.assertEqual((conversation["peer"], conversation["cursor"]), ("alice", 0))
        self.assertEqual(conversation["last_seq"], 2)
        self.assertIn(conversation["newest"]["text"], ("y", "x"))
        self.assertEqual(summary["total"], conversation["count"])
        listened = client(self.daemon, "bob", "listen", "--count", "1", "--timeout", "30")
        self.assertEqual((listened.returncode, listened.stderr), (0, ""))
        [shown] = [json.loads(x) for x in listened.stdout.splitlines()]
        self.assertEqual((shown["text"], shown["seq"], shown["from"]), ("x", 1, "alice"))
        after = json.loads(client(self.daemon, "bob", "sync").stdout)
        self.assertEqual([item["cursor"] for item in after["items"]], [1] if after["items"] else [])

    def test_a_lost_connection_is_one_line_and_listen_reconnects(self) -> None:
        listener = client(self.daemon, "bob", "listen", "--count", "1", background=True)
        self.addCleanup(stop_listener, listener)
        errors = Lines(listener.stderr)
        self.daemon.wait_connections(1)
        self.daemon.stop()
        self.assertEqual(
            errors.next(), "cim-client: lost the connection to the node e2e; reconnecting\n"
        )
        self.assertIsNone(listener.poll())
        self.daemon.start()
        self.daemon.wait_connections(1, timeout=60)
        self.send("back again")
        out, _ = listener.communicate(timeout=60)
        self.assertEqual(listener.returncode, 0)
        self.assertEqual(json.loads(out)["text"], "back again")
        self.assertEqual(errors.rest(), [])

    def test_no_reconnect_exits_with_status_5(self) -> None:
        listener = client(self.daemon, "bob", "listen", "--no-reconnect", background=True)
        self.addCleanup(stop_listener, listener)
        self.daemon.wait_connections(1)
        self.daemon.stop()
        _, err = listener.communicate(timeout=60)
        self.assertEqual(listener.returncode, 5)
        self.assertEqual(err, "cim-client: lost the connection to the node e2e\n")


class OutputTests(SynchronousTestCase):
    """Seen 4: download over an existing file. Seen 8: a closed pipe."""

    def setUp(self) -> None:
        self.files_port = free_port()
        self.workdir = os.path.abspath(self.mktemp())
        self.daemon = started_daemon(
            self,
            extra=(
                f"[files]\nenabled = true\nlisten = tcp:{self.files_port}:interface=127.0.0.1\n"
                f"storage_dir = {self.workdir}-storage\n"
            ),
        )

    def test_history_into_a_closed_pipe_ends_quietly(self) -> None:
        for n in range(3):
            self.assertEqual(client(self.daemon, "alice", "send", "bob", f"m{n}").returncode, 0)
        deadline = time.monotonic() + 30
        while not client(self.daemon, "bob", "history", "alice").stdout.strip():
            self.assertLess(time.monotonic(), deadline, "the archive stayed empty")
            time.sleep(0.2)
        reader = client(self.daemon, "bob", "history", "alice", background=True)
        assert reader.stdout is not None
        reader.stdout.close()  # like `| head` having read what it wanted
        _, err = reader.communicate(timeout=60)
        self.assertEqual((reader.returncode, err), (0, ""))

    def test_download_keeps_an_existing_file_unless_forced(self) -> None:
        files = f"http://127.0.0.1:{self.files_port}"
        path = os.path.join(self.workdir, "notes.txt")
        os.makedirs(self.workdir, exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(b"twenty-six bytes of notes\n" * 100)
        sent = client(self.daemon, "alice", "--files", files, "send-file", "bob", path)
        self.assertEqual(sent.returncode, 0, sent.stderr)
        url = json.loads(sent.stdout)["url"]
        here = os.path.join(self.workdir, "downloads")
        os.makedirs(here)
        existing = os.path.join(here, "notes.txt")
        with open(existing, "wb") as handle:
            handle.write(b"mine")
        # The receiver downloads it, logged in: files are read by the people they were sent to.
        bob = ("--router", self.daemon.router_url, "--user", "bob", "--files", files)
        for target in (here, existing):
            kept = cim_client(*bob, "download", url, "-o", target)
            self.assertEqual(kept.returncode, 1, kept)
            self.assertEqual(
                kept.stderr, f"cim-client: {existing} already exists (--force replaces it)\n"
            )
            with open(existing, "rb") as handle:
                self.assertEqual(handle.read(), b"mine")
        forced = cim_client(*bob, "download", url, "-o", here, "--force")
        self.assertEqual(forced.returncode, 0, forced.stderr)
        self.assertEqual(json.loads(forced.stdout), {"path": existing, "size": 2600})
        streamed = subprocess.run(
            [os.path.join(BIN, "cim-client"), *bob, "download", url, "-o", "-"],
            env=dict(os.environ, CIM_PASSWORD=PASSWORD),
            capture_output=True,
            timeout=60,
            cwd=ROOT,
        )
        self.assertEqual((streamed.returncode, streamed.stderr), (0, b""))
        with open(path, "rb") as handle:
            self.assertEqual(streamed.stdout, handle.read())


class DaemonReportTests(SynchronousTestCase):
    """Seen 6 (the version in /health and /metrics), Seen 8 (five log lines per
    command) and Seen 10 (process and HTTP metrics), on a real daemon."""

    def setUp(self) -> None:
        self.logic_port = free_port()
        self.daemon = started_daemon(
            self,
            extra=(
                f"[logic]\nenabled = true\nlisten = tcp:{self.logic_port}:interface=127.0.0.1\n"
            ),
        )

    def test_one_info_line_per_command(self) -> None:
        daemon = self.daemon
        before = len(daemon.log().splitlines())
        commands = (["send", "bob", "hello"], ["online"], ["group", "list"])
        for command in commands:
            ran = client(daemon, "alice", *command)
            self.assertEqual(ran.returncode, 0, ran.stderr)
        # A failed login marks the end: every line the commands caused comes before it.
        self.assertEqual(daemon.login("nobody", "wrong")[0], 401)
        deadline = time.monotonic() + 30
        while "login invalid_credentials for 'nobody'" not in daemon.log():
            self.assertLess(time.monotonic(), deadline, daemon.log())
            time.sleep(0.1)
        lines = daemon.log().splitlines()[before:]
        self.assertEqual(len(lines), len(commands) + 1, "\n".join(lines))
        for line in lines[:-1]:
            self.assertIn("login ok for 'alice' from 127.0.0.1", line)

    def test_the_version_and_the_metrics(self) -> None:
        from cim import __version__

        daemon = self.daemon
        health = daemon.health()
        self.assertEqual(health["version"], __version__)
        if os.path.exists(os.path.join(ROOT, ".git")):
            self.assertRegex(health["commit"], r"^[0-9a-f]{12}(\+modified)?$")
        self.assertEqual(client(daemon, "alice", "online").returncode, 0)
        registered = cim_client(
            "--logic", f"http://127.0.0.1:{self.logic_port}", "--user", "carol", "register"
        )
        self.assertEqual(registered.returncode, 0, registered.stderr)
        metrics = daemon.metrics()
        commit = health.get("commit", "unknown")
        self.assertIn(f'cim_build_info{{commit="{commit}",version="{__version__}"}} 1.0', metrics)
        for name in (
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "python_gc_collections_total",
        ):
            self.assertRegex(metrics, rf"(?m)^{name}(\{{[^}}]*\}})? [0-9.e+]+$")
        for service, method, route, status in (
            ("router", "POST", "/api/v1/login", "200"),
            ("router", "POST", "/api/v1/logout", "200"),
            ("logic", "POST", "/api/v1/register", "201"),
            ("admin", "GET", "/health", "200"),
        ):
            labels = f'method="{method}",route="{route}",service="{service}",status="{status}"'
            self.assertRegex(metrics, rf"(?m)^cim_http_requests_total\{{{labels}\}} [1-9]")
            self.assertRegex(
                metrics, rf"(?m)^cim_http_request_duration_seconds_count\{{{labels}\}} [1-9]"
            )
