"""Living with a running node: JSON logs, metrics after a chat, SIGHUP reopening logs.

Real daemons (twistd) and the real command-line client, as an operator runs them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.support.daemons import PASSWORD, DaemonProcess, client


def _chat(test: SynchronousTestCase, daemon: DaemonProcess, text: str) -> None:
    listener = client(daemon, "bob", "listen", "--count", "1", "--timeout", "30", background=True)
    try:
        daemon.wait_connections(1)
        sent = client(daemon, "alice", "send", "bob", text)
        _out, err = listener.communicate(timeout=60)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.communicate()
    test.assertEqual(sent.returncode, 0, sent.stderr)
    test.assertEqual(json.loads(sent.stdout)["status"], "delivered")
    test.assertEqual(listener.returncode, 0, err)


def _sample(metrics: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", metrics, re.MULTILINE)
    if match is None:
        raise AssertionError(f"{name}{labels} not in /metrics:\n{metrics}")
    return float(match.group(1))


class RunningNodeTests(SynchronousTestCase):
    """One daemon with ``[log] format = json`` writing to its own file."""

    def setUp(self) -> None:
        workdir = os.path.abspath(self.mktemp())
        self.json_log = os.path.join(workdir, "log", "cim.json")
        self.daemon = DaemonProcess(
            workdir, extra=f"[log]\nformat = json\nlevel = debug\nfile = {self.json_log}\n"
        )
        for user in ("alice", "bob"):
            added = self.daemon.cimctl("user", "add", user, stdin=PASSWORD + "\n")
            self.assertEqual(added.returncode, 0, added.stderr)
        self.daemon.start()
        self.addCleanup(self.daemon.stop)

    def _log_lines(self) -> list[dict[str, object]]:
        with open(self.json_log, encoding="utf-8") as handle:
            text = handle.read()
        self.assertTrue(text.endswith("\n"), text[-200:])
        # Acceptance 4: every line is one JSON object.
        return [json.loads(line) for line in text.splitlines()]

    def test_json_log_lines_and_metrics_after_a_chat(self) -> None:
        _chat(self, self.daemon, "hello, metrics")
        metrics = self.daemon.metrics()
        # Acceptance 3: non-zero delivered-message and latency series.
        self.assertGreater(_sample(metrics, "cim_messages_total", '{outcome="delivered"}'), 0)
        self.assertGreater(_sample(metrics, "cim_delivery_latency_seconds_count"), 0)
        self.assertGreater(
            _sample(metrics, "cim_delivery_latency_seconds_bucket", '{le="+Inf"}'), 0
        )
        self.assertGreater(_sample(metrics, "cim_database_pool_wait_seconds_count"), 0)
        self.assertIn('cim_connection_states{state="established"}', metrics)

        lines = self._log_lines()
        self.assertTrue(lines)
        for line in lines:
            self.assertIsInstance(line, dict)
            for key in ("time", "level", "namespace", "text", "node"):
                self.assertIn(key, line)
        connected = [line for line in lines if "connected to" in str(line["text"])]
        self.assertEqual({str(line["user"]) for line in connected}, {"alice", "bob"})
        for line in connected:
            self.assertEqual(line["node"], self.daemon.node_id)
        # The text log twistd would write is not used for JSON.
        self.assertFalse(os.path.exists(self.daemon.log_path) and "{" in self.daemon.log())

    def test_sighup_reopens_the_log_file(self) -> None:
        moved = self.json_log + ".1"
        os.rename(self.json_log, moved)
        assert self.daemon.process is not None
        self.daemon.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.json_log) and time.monotonic() < deadline:
            time.sleep(0.05)
            self.daemon.login("alice")  # something to log
        self.assertTrue(os.path.exists(self.json_log), "SIGHUP did not reopen the log")
        self.daemon.login("alice")
        deadline = time.monotonic() + 20
        while not self._log_lines() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertTrue(self._log_lines())
