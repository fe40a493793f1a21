"""The Python side of the JS SDK's integration test (clients/js/test/integration.test.ts).

The Node test runner starts this module; it starts a real daemon with the WebSocket
gateway (``[ws] enabled = true``) and the file service, adds the users, prints one JSON
line with the URLs, then acts as bob with ``cim-client`` (the Python library a user
runs) on the commands the Node test writes, one JSON object per line:

- ``{"cmd": "send", "to": U, "text": T}``: bob sends; answers cim-client's outcome.
  With ``"as": "alice"`` alice sends instead, from cim-client (another device of hers).
- ``{"cmd": "listen", "from": U, "count": N}``: bob's next N messages from U (catch-up,
  then live; his own, which a catch-up may bring back, are left out).
- ``{"cmd": "download", "url": U}``: bob downloads; answers the SHA-256 of the bytes.
- ``{"cmd": "read", "with": U}``: bob marks his 1:1 with U read up to its newest message
  (``cim-client read``); answers the mark in effect (``conversation``, ``seq``, ``moved``).
- ``{"cmd": "stop"}``: stops the daemon and exits.

Every answer is one JSON line; a command that fails answers ``{"error": ...}``. The
daemon is stopped on stop, on end of input and on any error, so a failed Node test
leaves no process behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any

from tests.integration.support.daemons import PASSWORD, DaemonProcess, client, free_port

USERS = ("alice", "bob")


def _answer(body: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(body) + "\n")
    sys.stdout.flush()


def _run(
    daemon: DaemonProcess, files_url: str, command: dict[str, Any], workdir: str
) -> dict[str, Any]:
    name = command.get("cmd")
    if name == "send":
        sender = str(command.get("as", "bob"))
        if sender not in USERS:
            return {"error": f"unknown user {sender!r}"}
        done = client(daemon, sender, "send", str(command["to"]), str(command["text"]))
        if done.returncode != 0:
            return {"error": done.stderr.strip()}
        return {"outcome": json.loads(done.stdout)}
    if name == "listen":
        return {"messages": _listen(daemon, str(command["from"]), int(command["count"]))}
    if name == "download":
        target = os.path.join(workdir, "bob-download")
        done = client(
            daemon, "bob", "--files", files_url, "download", str(command["url"]), "-o", target
        )
        if done.returncode != 0:
            return {"error": done.stderr.strip()}
        with open(target, "rb") as handle:
            return {"sha256": hashlib.sha256(handle.read()).hexdigest()}
    if name == "read":
        done = client(daemon, "bob", "read", str(command["with"]))
        if done.returncode != 0:
            return {"error": done.stderr.strip()}
        return {"mark": json.loads(done.stdout)}
    return {"error": f"unknown command {name!r}"}


def _listen(daemon: DaemonProcess, sender: str, count: int) -> list[dict[str, Any]]:
    """Bob's listen until ``count`` messages from ``sender`` came (bounded by its
    --timeout: cim-client exits by itself after 60 s at most)."""
    listening = client(daemon, "bob", "listen", "--timeout", "60", background=True)
    found: list[dict[str, Any]] = []
    try:
        for line in listening.stdout:
            if not line.strip():
                continue
            message = json.loads(line)
            if message.get("from") == sender:
                found.append(message)
                if len(found) >= count:
                    break
    finally:
        listening.terminate()
        listening.communicate(timeout=30)
    if len(found) < count:
        raise RuntimeError(f"bob heard {len(found)} of {count} messages from {sender}")
    return found


def main(workdir: str) -> int:
    ws_port = free_port()
    files_port = free_port()
    files_url = f"http://127.0.0.1:{files_port}"
    daemon = DaemonProcess(
        workdir,
        extra=(
            "[ws]\nenabled = true\n"
            f"listen = tcp:{ws_port}:interface=127.0.0.1\n"
            f"advertise = ws://127.0.0.1:{ws_port}/\n"
            "[files]\nenabled = true\n"
            f"listen = tcp:{files_port}:interface=127.0.0.1\n"
            f"public_url = {files_url}\n"
            f"storage_dir = {workdir}/storage\nchunk_size = 64KiB\n"
        ),
    )
    try:
        for user in USERS:
            added = daemon.cimctl("user", "add", user, stdin=PASSWORD + "\n")
            if added.returncode != 0:
                _answer({"error": f"cimctl user add {user}: {added.stderr.strip()}"})
                return 1
        daemon.start()
        _answer(
            {"ready": True, "router": daemon.router_url, "files": files_url, "password": PASSWORD}
        )
        for line in sys.stdin:
            if not line.strip():
                continue
            command = json.loads(line)
            if command.get("cmd") == "stop":
                break
            try:
                _answer(_run(daemon, files_url, command, workdir))
            except Exception as exc:  # the Node side must hear about it, not hang
                _answer({"error": f"{type(exc).__name__}: {exc}"})
    except Exception as exc:
        _answer({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    finally:
        daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(os.path.abspath(sys.argv[1])))
