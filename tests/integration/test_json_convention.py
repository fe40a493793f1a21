"""Every cim-client and cimctl subcommand that prints JSON, run against a real daemon,
checked against the one convention of docs/protocol.md ("JSON conventions") by one
checker function (issue #21, Seen 5)."""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.support.daemons import PASSWORD, DaemonProcess, client, free_port

ISO_UTC_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
NUMBER_KEYS = frozenset(
    (
        "size",
        "total",
        "likes",
        "member_count",
        "bits",
        "lat",
        "lon",
        "accuracy_m",
        "radius_m",
        "battery",
        "duration_ms",
        "width",
        "height",
        "chunks_sent",
        "chunk_count",
        "accepted",
        "deleted",
        "offset",
        "limit",
        "like_goal",
        "post",
    )
)
"""Keys whose values are always numbers (a container under the same name is fine)."""
DIGIT_STRING_KEYS = frozenset(("msg_id", "code", "text", "name", "id", "fingerprint"))
"""Keys whose string values may be all digits: ids too big for JSON numbers, codes."""


def convention_problems(document: Any, listing: bool = False) -> list[str]:
    """What in one printed JSON document breaks the convention (empty: nothing).

    One object at the top (never a bare array); a listing's list under "items"; every
    timestamp ("at", "*_at") an ISO 8601 UTC string with milliseconds and nothing else
    looking like an epoch time; numbers as numbers; no "" or null placeholders.
    """
    problems: list[str] = []
    if not isinstance(document, dict):
        return [f"the document is a {type(document).__name__}, not an object"]
    if listing:
        if not isinstance(document.get("items"), list):
            problems.append('a listing without an "items" list')
        for key, value in document.items():
            if key != "items" and isinstance(value, list):
                problems.append(f'a listing with a second list "{key}"')

    def walk(value: Any, key: str, path: str) -> None:
        if value is None:
            problems.append(f"{path}: null")
        elif isinstance(value, str) and not value:
            problems.append(f'{path}: ""')
        elif isinstance(value, dict):
            for name, item in value.items():
                walk(item, name, f"{path}.{name}")
            return
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, key, f"{path}[{index}]")
            return
        if key == "at" or key.endswith("_at"):
            if not (isinstance(value, str) and ISO_UTC_MS.match(value)):
                problems.append(f"{path}: timestamp {value!r} is not ISO 8601 UTC with ms")
            return
        if isinstance(value, float) and 1e9 <= value < 1e11:
            problems.append(f"{path}: {value!r} looks like an epoch timestamp")
        if key in NUMBER_KEYS and (isinstance(value, bool) or not isinstance(value, int | float)):
            problems.append(f"{path}: {value!r} should be a number")
        if (
            isinstance(value, str)
            and re.fullmatch(r"-?\d+(\.\d+)?", value)
            and key not in DIGIT_STRING_KEYS
        ):
            problems.append(f"{path}: number {value!r} written as a string")
        if isinstance(value, str) and ISO_UTC_MS.match(value) is None and _looks_like_time(value):
            problems.append(f"{path}: {value!r} is a time in another format")

    walk(document, "", "$")
    return problems


def _looks_like_time(text: str) -> bool:
    return re.match(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}", text) is not None


class CheckerTests(SynchronousTestCase):
    """The checker itself catches each thing issue #21 saw."""

    def test_catches_what_the_issue_saw(self) -> None:
        seen = [
            ({"created_at": 1796548067.03}, False),
            ({"media": {"size": "1795"}}, False),
            ([{"id": "g1"}], True),
            ({"bindings": []}, True),
            ({"msg_id": "1", "to": "", "group": "g"}, False),
            ({"previous": None}, False),
            ({"sent_at": "2026-12-06 09:07:37"}, False),
        ]
        for document, listing in seen:
            self.assertNotEqual(convention_problems(document, listing), [], document)

    def test_accepts_the_convention(self) -> None:
        good = {
            "items": [{"msg_id": "387923101993668608", "sent_at": "2026-12-06T09:07:37.290Z"}],
            "total": 1,
            "media": {"size": 1795, "name": "2026"},
        }
        self.assertEqual(convention_problems(good, listing=True), [])


class EveryCommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.workdir = os.path.abspath(self.mktemp())
        self.logic_port = free_port()
        self.files_port = free_port()
        self.daemon = DaemonProcess(
            self.workdir,
            extra=(
                f"[logic]\nenabled = true\nlisten = tcp:{self.logic_port}:interface=127.0.0.1\n"
                f"[files]\nenabled = true\nlisten = tcp:{self.files_port}:interface=127.0.0.1\n"
                f"storage_dir = {self.workdir}/storage\n"
            ),
        )
        for user in ("alice", "bob"):
            added = self.daemon.cimctl("user", "add", user, stdin=PASSWORD + "\n")
            self.assertEqual(added.returncode, 0, added.stderr)
        self.daemon.start()
        self.addCleanup(self.daemon.stop)
        self.checked: list[str] = []

    def cim(self, user: str, *args: str, listing: bool = False, lines: bool = False) -> Any:
        """Run cim-client, check its output, return the (first) document."""
        ran = client(
            self.daemon,
            user,
            "--logic",
            f"http://127.0.0.1:{self.logic_port}",
            "--files",
            f"http://127.0.0.1:{self.files_port}",
            *args,
        )
        self.assertEqual(ran.returncode, 0, (args, ran.stderr))
        return self.check(args, ran.stdout, listing, lines)

    def cimctl(self, *args: str, listing: bool = False) -> Any:
        ran = self.daemon.cimctl(*args)
        self.assertEqual(ran.returncode, 0, (args, ran.stderr))
        return self.check(("cimctl", *args), ran.stdout, listing, False)

    def check(self, argv: tuple[str, ...], stdout: str, listing: bool, lines: bool) -> Any:
        what = " ".join(argv)
        texts = stdout.splitlines() if lines else [stdout]
        self.assertTrue(texts and texts[0].strip(), f"{what} printed nothing")
        documents = [json.loads(text) for text in texts]
        for document in documents:
            self.assertEqual(convention_problems(document, listing), [], f"{what}: {document}")
        self.checked.append(argv)
        return documents[0]

    def assertEverySubcommandChecked(self) -> None:
        """No subcommand that prints JSON was left out of the run above."""
        import argparse

        from cim.scripts import cimctl
        from cim.scripts.client import build_parser

        def leaves(parser: Any, prefix: tuple[str, ...]) -> set[tuple[str, ...]]:
            found: set[tuple[str, ...]] = set()
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    for name, sub in action.choices.items():
                        found |= leaves(sub, (*prefix, name)) or {(*prefix, name)}
            return found

        not_json = {("cimctl", "check-config"), ("cimctl", "db", "upgrade")}
        not_json |= {("cimctl", "user", verb) for verb in ("add", "passwd", "del")}
        every = leaves(build_parser(), ()) | leaves(cimctl.build_parser(), ("cimctl",))
        for leaf in sorted(every - not_json):
            self.assertTrue(
                any(argv[: len(leaf)] == leaf for argv in self.checked),
                f"{' '.join(leaf)} is not checked",
            )

    def test_every_json_output_follows_the_convention(self) -> None:
        cim, cimctl = self.cim, self.cimctl
        # --- chat and groups ---------------------------------------------------------
        cim("alice", "send", "bob", "while you were out")
        cim("bob", "listen", "--count", "1", "--timeout", "30", lines=True)
        # --- contacts: alice and bob become contacts, so alice adds bob to groups -----
        cim("alice", "contacts", "request", "bob")
        cim("bob", "contacts", "list", listing=True)
        cim("bob", "contacts", "accept", "alice")
        cim("bob", "contacts", "policy")
        cim("bob", "contacts", "policy", "everyone", "--group-adds", "contacts")
        cim("bob", "online", listing=True)
        group = cim("alice", "group", "create", "team", "bob")
        self.assertNotIn("invited", group)
        cim("alice", "group", "add", group["id"], "alice")
        cim("alice", "group", "members", group["id"], listing=True)
        cim("bob", "group", "list", listing=True)
        sent = cim("alice", "group", "send", "team", "hello team")
        self.assertNotIn("to", sent)
        path = os.path.join(self.workdir, "notes.txt")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("some notes\n")
        shared = cim("alice", "send-file", "bob", path)
        self.assertIsInstance(shared["size"], int)
        cim("bob", "listen", "--count", "1", "--timeout", "30", lines=True)  # the file
        cim("bob", "download", shared["url"], "-o", os.path.join(self.workdir, "got.txt"))
        deadline = time.monotonic() + 30
        while True:  # the archive writes in batches
            history = client(self.daemon, "bob", "history", "alice")
            if history.stdout.strip():
                break
            self.assertLess(time.monotonic(), deadline, "nothing archived")
            time.sleep(0.2)
        self.check(("history", "alice"), history.stdout, False, True)
        cim("bob", "history", "team", "--group", lines=True)
        kept = cim("alice", "group", "create", "club", "bob")
        cim("alice", "group", "remove", "team", "bob")
        cim("alice", "group", "leave", "team")
        # --- invitations and the rest of contacts ------------------------------------
        cim("mum", "register")
        invited = cim("mum", "group", "create", "family", "alice")
        self.assertEqual(invited["invited"], ["alice"])
        cim("alice", "group", "invitations", listing=True)
        cim("alice", "group", "accept", "family")
        cim("mum", "group", "invite", "family", "bob")
        cim("bob", "group", "decline", "family")
        cim("alice", "contacts", "block", "mum")
        cim("alice", "contacts", "unblock", "mum")
        cim("mum", "contacts", "request", "alice")
        cim("alice", "contacts", "decline", "mum")
        cim("alice", "contacts", "remove", "bob")
        # --- the logic service ----------------------------------------------------------
        cim("dad", "register")
        cim("watch1", "register", "--kind", "device")
        code = cim("watch1", "bind", "code")
        self.assertIsInstance(code["code"], str)
        cim("mum", "bind", "add", "watch1", code["code"])
        cim("dad", "bind", "add", "watch1", cim("watch1", "bind", "code")["code"])
        cim("mum", "bind", "approve", "watch1", "dad")
        cim("mum", "bind", "list", listing=True)
        alarm = cim("watch1", "sos", "raise", "52.52", "13.405", "--battery", "40")
        cim("mum", "sos", "list", "--device", "watch1", listing=True)
        cim("mum", "sos", "show", str(alarm["id"]))
        cim("mum", "sos", "ack", str(alarm["id"]))
        fence = cim("mum", "fence", "add", "watch1", "school", "--circle", "52.52,13.405,300")
        cim("mum", "fence", "list", "watch1", listing=True)
        cim("watch1", "locate", "report", "52.52", "13.405", "--accuracy", "10")
        cim("mum", "locate", "list", "watch1", listing=True)
        post = cim("mum", "post", "add", "first steps", "--goal", "1")
        cim("mum", "post", "list", listing=True)
        cim("mum", "post", "show", str(post["id"]))
        cim("dad", "like", str(post["id"]))
        cim("mum", "likers", str(post["id"]), listing=True)
        cim("dad", "unlike", str(post["id"]))
        cim("mum", "post", "del", str(post["id"]))
        cim("mum", "fence", "del", "watch1", str(fence["id"]))
        cim("dad", "bind", "del", "watch1", "dad")
        # --- cimctl ----------------------------------------------------------------------
        cimctl("user", "list", "--json", listing=True)
        cimctl("online", "--json", listing=True)
        cimctl("group", "list", "--json", listing=True)
        cimctl("group", "show", kept["id"], "--json")
        listener = client(self.daemon, "bob", "listen", "--timeout", "60", background=True)
        try:
            self.daemon.wait_connections(1)
            cimctl("kick", "bob", "--json")
        finally:
            listener.kill()
            listener.communicate()
        cimctl("keygen", "--json")
        cimctl("keygen", "--json")  # with a previous key
        self.assertEverySubcommandChecked()
