"""Real cim daemons in their own processes, for integration tests.

Each gets its own directory, free loopback ports and a config written from the
sections a test passes; the helpers wait with deadlines, never without bound.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

BIN = os.path.dirname(sys.executable)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
PASSWORD = "correct horse battery"


def free_port() -> int:
    from tests.integration.support.services import free_port as below_ephemeral

    return below_ephemeral()


class DaemonProcess:
    """One cim node: `twistd -n cim` with its own data directory and ports."""

    def __init__(self, workdir: str, node_id: str = "e2e", extra: str = "") -> None:
        os.makedirs(workdir, exist_ok=True)
        self.workdir = workdir
        self.node_id = node_id
        self.router_port = free_port()
        self.im_port = free_port()
        self.admin_port = free_port()
        self.config = os.path.join(workdir, "cim.ini")
        sections = (
            f"[node]\nid = {node_id}\ndata_dir = {workdir}/data\n"
            f"[router]\nlisten = tcp:{self.router_port}:interface=127.0.0.1\n"
            f"[im]\nlisten = tcp:{self.im_port}:interface=127.0.0.1\n"
            f"[admin]\nlisten = tcp:{self.admin_port}:interface=127.0.0.1\n"
            "[accounts]\nscrypt_n = 4096\n"
        )
        with open(self.config, "w", encoding="utf-8") as handle:
            handle.write(_merge(sections, extra))
        self.admin_token = write_admin_token(self.config)
        self.process: subprocess.Popen[str] | None = None
        self.log_path = os.path.join(workdir, "twistd.log")

    @property
    def router_url(self) -> str:
        return f"http://127.0.0.1:{self.router_port}"

    def cimctl(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [os.path.join(BIN, "cimctl"), "--config", self.config, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )

    def command(self) -> list[str]:
        return [
            os.path.join(BIN, "twistd"),
            "--nodaemon",
            "--pidfile=",
            f"--logfile={self.log_path}",
            "cim",
            "--config",
            self.config,
        ]

    def spawn(self) -> None:
        """Start the process without waiting for it."""
        self.process = subprocess.Popen(
            self.command(),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def start(self, timeout: float = 60) -> None:
        self.spawn()
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 60) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                stderr = self.process.stderr.read() if self.process.stderr else ""
                tail = "\n".join(self.log().splitlines()[-15:])
                raise AssertionError(f"daemon {self.node_id} exited: {stderr}\n{tail}")
            try:
                if self.health()["status"] == "ok":
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"daemon {self.node_id} did not become healthy in {timeout} s")

    def run_to_exit(self, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run the daemon expecting it to refuse to start."""
        return subprocess.run(
            self.command(), capture_output=True, text=True, timeout=timeout, cwd=ROOT
        )

    def operator_headers(self) -> dict[str, str]:
        """What an operator sends to the admin API: the test operator's token."""
        return {"Authorization": f"Bearer {self.admin_token}"}

    def _get(self, path: str) -> bytes:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.admin_port}{path}", headers=self.operator_headers()
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return bytes(response.read())

    def health(self) -> dict[str, Any]:
        health: dict[str, Any] = json.loads(self._get("/health"))
        return health

    def metrics(self) -> str:
        return self._get("/metrics").decode()

    def online(self) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.router_url}/api/v1/online?limit=1000", headers=self.operator_headers()
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            online: dict[str, Any] = json.loads(response.read())
            return online

    def login(self, user: str, password: str = PASSWORD) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(
            f"{self.router_url}/api/v1/login",
            data=json.dumps({"user": user, "password": password}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def wait_connections(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.health().get("online_here", 0) >= count:
                return
            time.sleep(0.05)
        raise AssertionError(f"{count} clients did not come online on {self.node_id}")

    def stop(self) -> int:
        process = self.process
        if process is None:
            return 0
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()
        return process.returncode

    def kill(self) -> None:
        """kill -9: no goodbye to ZooKeeper, Redis or the clients."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8") as handle:
                return handle.read()
        except FileNotFoundError:
            return ""


OPERATOR = "tester"
"""The operator whose admin token every DaemonProcess writes (cimctl sends it too)."""


def write_admin_token(config_path: str) -> str:
    """The test operator's token in the config's [admin] token_file (what cimctl keygen
    --admin writes), so cimctl online/kick and the helpers below are let in."""
    from cim.config import load_config
    from cim.http.operators import new_token, with_token

    path = load_config(config_path).admin_token_path
    if not os.path.isabs(path):
        path = os.path.join(ROOT, path)  # the daemon and cimctl run in ROOT
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    token = new_token()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(with_token("", OPERATOR, token))
    return token


def _merge(base: str, extra: str) -> str:
    """Config text with `extra`'s keys overriding or extending `base`'s sections (a
    section may come twice in `extra`, as a cluster's own [im] and a test's: the later
    key wins)."""
    import configparser

    merged = configparser.ConfigParser(interpolation=None, strict=False)
    merged.optionxform = str  # type: ignore[assignment,method-assign]
    merged.read_string(base)
    if extra:
        merged.read_string(extra)
    lines = []
    for section in merged.sections():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {value}" for key, value in merged[section].items())
    return "\n".join(lines) + "\n"


def client(
    daemon: DaemonProcess,
    user: str,
    *args: str,
    cipher: str | None = None,
    background: bool = False,
    password: str = PASSWORD,
) -> Any:
    """Run cim-client as a user would."""
    command = [os.path.join(BIN, "cim-client"), "--router", daemon.router_url, "--user", user]
    if cipher:
        command += ["--cipher", cipher]
    command += list(args)
    env = dict(os.environ, CIM_PASSWORD=password)
    if background:
        return subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
        )
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
