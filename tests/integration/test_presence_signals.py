"""Typing notices and heartbeats by app state through a real daemon (issue #15).

One node (twistd, SQLite) with short heartbeats so the test is quick:
``heartbeat_interval = 1s`` (a silent foreground connection is closed after 3 s) and
``background_heartbeat_interval = 4s`` (after 12 s in the background).

- alice's ``cim-client typing bob`` reaches bob's ``cim-client listen`` as a JSON line
  with ``"event": "typing"``; nothing of it is stored (bob's next sync is empty).
- A raw connection that says APP_BACKGROUND stays open through 5 s of silence, past
  the foreground's 3 s, and is closed once its background timeout passes; one that
  says nothing is closed after the foreground's.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from cim.protocols import cim_pb2
from tests.integration.support.daemons import PASSWORD, DaemonProcess, client
from tests.integration.support.raw_client import RawClient

INTERVALS = "[im]\nheartbeat_interval = 1s\nbackground_heartbeat_interval = 4s\n"


def closed_within(raw: RawClient, seconds: float) -> float:
    """Read (answering nothing) until the node closes the connection; how long it took.
    Fails if it is still open after ``seconds``."""
    start = time.monotonic()
    raw.sock.settimeout(seconds)
    try:
        while time.monotonic() - start < seconds:
            raw.read()
    except (ConnectionError, OSError) as exc:
        if isinstance(exc, socket.timeout):
            raise AssertionError(f"still open after {seconds:g} s") from exc
        return time.monotonic() - start
    raise AssertionError(f"still open after {seconds:g} s")


class PresenceSignalsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.daemon = DaemonProcess(os.path.abspath(self.mktemp()), extra=INTERVALS)
        for user in ("alice", "bob", "carol"):
            added = self.daemon.cimctl("user", "add", user, stdin=PASSWORD + "\n")
            self.assertEqual(added.returncode, 0, added.stderr)
        self.daemon.start()
        self.addCleanup(self.daemon.stop)

    def test_typing_from_alice_reaches_bobs_listen_and_is_not_stored(self) -> None:
        listen = client(self.daemon, "bob", "listen", "--timeout", "30", background=True)
        self.addCleanup(_end, listen)
        self.daemon.wait_connections(1)
        typed = client(self.daemon, "alice", "typing", "bob")
        self.assertEqual(typed.returncode, 0, typed.stderr)
        self.assertEqual(
            json.loads(typed.stdout), {"to": "bob", "state": "typing", "status": "sent"}
        )
        assert listen.stdout is not None
        # The first line bob's listen prints (bounded by its own --timeout).
        line = listen.stdout.readline()
        self.assertTrue(line, "listen printed nothing")
        record = json.loads(line)
        self.assertEqual(
            {key: record.get(key) for key in ("event", "state", "from", "to")},
            {"event": "typing", "state": "typing", "from": "alice", "to": "bob"},
        )
        _end(listen)
        synced = client(self.daemon, "bob", "sync")
        self.assertEqual(synced.returncode, 0, synced.stderr)
        self.assertEqual(json.loads(synced.stdout)["total"], 0)

    def test_background_keeps_a_silent_connection_past_the_foreground_timeout(self) -> None:
        background = RawClient(self.daemon.router_url, "bob")
        self.addCleanup(background.close)
        background.send(
            cim_pb2.APP_STATE_R,
            cim_pb2.AppStateR(state=cim_pb2.APP_BACKGROUND, request_id=1),
        )
        answer = _next_of(background, cim_pb2.APP_STATE_A, cim_pb2.AppStateA)
        self.assertEqual((answer.heartbeat_interval_ms, answer.heartbeat_timeout_ms), (4000, 12000))
        foreground = RawClient(self.daemon.router_url, "carol")
        self.addCleanup(foreground.close)
        # carol says nothing: closed after the foreground's 3 s (and the sweep's second).
        self.assertGreater(closed_within(foreground, 10), 2)
        # bob was as silent for as long, and longer: 5 s without a byte either way.
        time.sleep(5)
        background.heartbeat()
        background.sock.settimeout(5)
        self.assertIsNone(background.read(), "the node's echo of the heartbeat")
        # Then silence past the background's 12 s: the node closes it.
        waited = closed_within(background, 20)
        self.assertGreater(waited, 3)


def _next_of(raw: RawClient, frame_type: int, message_class: Any) -> Any:
    raw.sock.settimeout(10)
    for _ in range(20):
        frame = raw.read()
        if frame is not None and frame[0] == frame_type:
            return message_class.FromString(frame[1])
    raise AssertionError(f"no frame {frame_type} among the first 20")


def _end(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.terminate()
    try:
        process.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate(timeout=10)
