"""Schemathesis against a real daemon's logic service: no input may produce a 500.

The spec the daemon serves at /api/v1/openapi.json drives the generator: valid and
deliberately invalid bodies, parameters and query strings for every operation, sent
with a person's token and with a device's token (so the code behind the kind checks
is reached too), on SQLite and on PostgreSQL (which, unlike SQLite, enforces column
lengths and rejects NUL characters). The only check is ``not_a_server_error``;
whether each answer is the right 4xx is for the feature tests. Bounded: a fixed
number of examples per operation and a time budget per run.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from typing import Any

from twisted.trial.unittest import TestCase

from tests.integration.support.daemons import BIN, PASSWORD, DaemonProcess, free_port
from tests.integration.test_storage import scratch_postgresql_url

MAX_EXAMPLES = int(os.environ.get("CIM_SCHEMATHESIS_EXAMPLES", "12"))
MAX_SECONDS = 300
"""A deadline for one run (the subprocess is killed past it); runs take well under it."""


def call(port: int, token: str, method: str, path: str, body: Any = None) -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise AssertionError(f"{method} {path}: {error.code} {error.read()!r}") from None


class NoServerErrorTests(TestCase):
    timeout = 900

    def start_daemon(self, database_url: str | None = None) -> tuple[DaemonProcess, int]:
        port = free_port()
        extra = f"[logic]\nenabled = true\nlisten = tcp:{port}:interface=127.0.0.1\n"
        if database_url is not None:
            extra += f"[database]\nurl = {database_url}\n"
        daemon = DaemonProcess(os.path.abspath(self.mktemp()), "fuzz", extra)
        if database_url is not None:
            upgraded = daemon.cimctl("db", "upgrade")
            self.assertEqual(upgraded.returncode, 0, upgraded.stderr)
        daemon.start()
        self.addCleanup(daemon.stop)
        for name, kind in (("fuzzer", "person"), ("fuzzwatch", "device")):
            added = daemon.cimctl("user", "add", name, "--kind", kind, stdin=PASSWORD + "\n")
            self.assertEqual(added.returncode, 0, added.stderr)
        self.seed(daemon, port)
        return daemon, port

    def seed(self, daemon: DaemonProcess, port: int) -> None:
        """Rows with id 1 of every kind, bound to the fuzzing users: the generator tries
        the smallest id, so the authorised code paths are reached, not only the 404s."""
        person = self.token(daemon, "fuzzer")
        device = self.token(daemon, "fuzzwatch")
        code = call(port, device, "POST", "/devices/me/binding-code")["code"]
        call(port, person, "POST", "/bindings", {"device": "fuzzwatch", "code": code})
        call(port, device, "POST", "/sos", {"lat": 52.5, "lon": 13.4})
        call(port, device, "POST", "/locations", {"positions": [{"lat": 52.5, "lon": 13.4}]})
        fence = {"name": "home", "circle": {"lat": 52.5, "lon": 13.4, "radius_m": 200}}
        call(port, person, "POST", "/devices/fuzzwatch/fences", fence)
        call(port, person, "POST", "/posts", {"text": "hello", "like_goal": 2})

    def token(self, daemon: DaemonProcess, user: str) -> str:
        status, body = daemon.login(user)
        self.assertEqual(status, 200, body)
        return str(body["token"])

    def fuzz(self, daemon: DaemonProcess, port: int, user: str) -> None:
        status, body = daemon.login(user)
        self.assertEqual(status, 200, body)
        report = os.path.abspath(self.mktemp())
        os.makedirs(report)
        command = [
            os.path.join(BIN, "st"),
            "run",
            f"http://127.0.0.1:{port}/api/v1/openapi.json",
            "--checks",
            "not_a_server_error",
            "--header",
            f"Authorization: Bearer {body['token']}",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--phases",
            "examples,coverage,fuzzing",
            "--seed",
            "20261126",
            "--workers",
            "1",
            "--request-timeout",
            "20",
            "--generation-database",
            "none",
            "--no-color",
            "--report-dir",
            report,
        ]
        outcome = subprocess.run(
            command, capture_output=True, text=True, timeout=MAX_SECONDS, cwd=report
        )
        tail = (outcome.stdout + outcome.stderr)[-6000:]
        self.assertEqual(outcome.returncode, 0, f"schemathesis found problems as {user}:\n{tail}")
        # It really exercised the API (a spec it could not load would also exit non-zero,
        # but make sure the run was not empty).
        self.assertIn("/api/v1/", outcome.stdout)
        self.assertNotIn("Internal Server Error", daemon.log()[-20000:])

    def test_sqlite(self) -> None:
        daemon, port = self.start_daemon()
        self.fuzz(daemon, port, "fuzzer")
        self.fuzz(daemon, port, "fuzzwatch")

    def test_postgresql(self) -> None:
        daemon, port = self.start_daemon(scratch_postgresql_url(self))
        self.fuzz(daemon, port, "fuzzer")
        self.fuzz(daemon, port, "fuzzwatch")
