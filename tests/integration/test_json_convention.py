"""Every cim-client and cimctl subcommand that prints JSON, and every JSON answer of the
router, logic, files and admin HTTP APIs, run against a real daemon and checked against
the one convention of docs/protocol.md ("JSON conventions") by one checker function
(issue #21, Seen 5)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, cast

from twisted.trial.unittest import SynchronousTestCase

from cim.json_convention import iso_time
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
        "offset",
        "limit",
        "like_goal",
        "post",
    )
)
"""Keys whose values are always numbers (a container under the same name is fine)."""
DIGIT_STRING_KEYS = frozenset(
    ("msg_id", "replaces", "code", "text", "name", "id", "fingerprint", "version", "commit")
)
"""Keys whose string values may be all digits: ids too big for JSON numbers, codes,
a version ("1.0") or a commit made only of decimal digits."""


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


def push_section(workdir: str) -> str:
    """Push on, through a webhook nobody listens at: registrations are all these tests
    need (nobody is pushed to: no registered device is ever away with a message)."""
    os.makedirs(workdir, exist_ok=True)
    secret = os.path.join(workdir, "webhook_secret")
    with open(secret, "w", encoding="utf-8") as handle:
        handle.write("s" * 32 + "\n")
    return (
        "[push]\nenabled = true\n"
        f"webhook_url = http://127.0.0.1:{free_port()}/push\nwebhook_secret_file = {secret}\n"
    )


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
                f"{push_section(self.workdir)}"
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
        unread = cim("bob", "sync", listing=True)
        self.assertEqual(unread["total"], 1)
        cim("bob", "listen", "--count", "1", "--timeout", "30", lines=True)
        self.assertEqual(cim("bob", "read", "alice")["seq"], 1)
        self.assertEqual(cim("bob", "typing", "alice")["state"], "typing")
        # --- recall and edit (#15): the changes, and listen's lines of them ------------
        later = cim("alice", "send", "bob", "one more")
        self.assertEqual(cim("alice", "edit", later["msg_id"], "one more, edited")["event"], "edit")
        self.assertEqual(cim("alice", "recall", later["msg_id"])["event"], "recall")
        cim("bob", "listen", "--count", "3", "--timeout", "30", lines=True)
        # --- contacts: alice and bob become contacts, so alice adds bob to groups -----
        cim("alice", "contacts", "request", "bob")
        cim("bob", "contacts", "list", listing=True)
        cim("bob", "contacts", "accept", "alice")
        cim("bob", "contacts", "policy")
        cim("bob", "contacts", "policy", "everyone", "--group-adds", "contacts")
        cim("bob", "contacts", "policy", "--read-receipts", "on")
        cim("bob", "online", listing=True)
        cim("bob", "devices", listing=True)
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
        cim("bob", "delete-file", "--", shared["file_id"])  # an id may begin with "-"
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
        cimctl("limits", "alice", "--messages-per-second", "100", "--json", listing=True)
        listener = client(self.daemon, "bob", "listen", "--timeout", "60", background=True)
        try:
            self.daemon.wait_connections(1)
            cimctl("kick", "bob", "--json")
        finally:
            listener.kill()
            listener.communicate()
        cimctl("keygen", "--json")
        cimctl("keygen", "--json")  # with a previous key
        # --- push registrations (#19) ------------------------------------------------
        cim("alice", "push", "register", "--provider", "webhook", "--token", "alice-token")
        self.assertEqual(cim("alice", "push", "show")["token"], "alice-token")
        cimctl("push", "show", "alice", "--json", listing=True)
        self.assertTrue(cim("alice", "push", "remove")["removed"])
        self.assertEverySubcommandChecked()


JSON_TYPE = "application/json"


class EveryHttpAnswerTests(SynchronousTestCase):
    """Every JSON answer of the router, logic, files and admin APIs, with the same checker.

    The endpoints are called as a client would, in an order that gives each a real
    answer; ``assertEveryEndpointChecked`` holds the list against what each service
    declares, so an endpoint added later without a check here fails this test.
    """

    def setUp(self) -> None:
        self.workdir = os.path.abspath(self.mktemp())
        ports = {"logic": free_port(), "files": free_port()}
        self.daemon = DaemonProcess(
            self.workdir,
            extra=(
                f"[logic]\nenabled = true\nlisten = tcp:{ports['logic']}:interface=127.0.0.1\n"
                f"[files]\nenabled = true\nlisten = tcp:{ports['files']}:interface=127.0.0.1\n"
                f"storage_dir = {self.workdir}/storage\nchunk_size = 64KiB\n"
                f"{push_section(self.workdir)}"
            ),
        )
        for user in ("alice", "bob"):
            added = self.daemon.cimctl("user", "add", user, stdin=PASSWORD + "\n")
            self.assertEqual(added.returncode, 0, added.stderr)
        self.daemon.start()
        self.addCleanup(self.daemon.stop)
        self.base = {
            "router": self.daemon.router_url,
            "logic": f"http://127.0.0.1:{ports['logic']}/api/v1",
            "files": f"http://127.0.0.1:{ports['files']}",
            "admin": f"http://127.0.0.1:{self.daemon.admin_port}",
        }
        self.checked: set[tuple[str, str, str]] = set()

    def http(
        self,
        service: str,
        method: str,
        template: str,
        status: int,
        body: Any = None,
        token: str | None = None,
        listing: bool = False,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        query: dict[str, str] | None = None,
        **params: Any,
    ) -> Any:
        """Call one endpoint, expect ``status``, check the JSON answer; return it."""
        path = template.format(
            **{k: urllib.parse.quote(str(v), safe="") for k, v in params.items()}
        )
        url = self.base[service] + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        sent = dict(headers or {})
        if body is not None:
            data = json.dumps(body).encode()
            sent["Content-Type"] = JSON_TYPE
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(url, data=data, headers=sent, method=method)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                code, content_type, raw = response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            code, content_type, raw = error.code, error.headers, error.read()
        what = f"{method} {service} {path}"
        self.assertEqual(code, status, f"{what}: {raw[:300]!r}")
        self.assertEqual(content_type.get_content_type(), JSON_TYPE, what)
        document = json.loads(raw)
        self.assertEqual(convention_problems(document, listing), [], f"{what}: {document}")
        self.checked.add((service, method, template))
        return document

    def login(self, user: str) -> str:
        answer = self.http(
            "router", "POST", "/api/v1/login", 200, {"user": user, "password": PASSWORD}
        )
        return str(answer["token"])

    def declared(self) -> set[tuple[str, str, str]]:
        """What every service declares that answers JSON (downloads answer the file)."""
        from cim.files.http.downloads import Downloads
        from cim.files.http.site import FILE_ID
        from cim.files.http.uploads import Uploads
        from cim.logic.openapi import document
        from cim.services import router

        every: set[tuple[str, str, str]] = {("admin", "GET", "/health")}
        for path in (router.LOGIN_PATH, router.LOGOUT_PATH, router.KICK_PATH):
            every.add(("router", "POST", path))
        every.add(("router", "GET", router.ONLINE_PATH))
        for path, operations in document()["paths"].items():
            for method in operations:
                every.add(("logic", method.upper(), path.removeprefix("/api/v1")))
        every.discard(("logic", "GET", "/openapi.json"))  # the schemas, not data
        nothing = cast(Any, None)
        for endpoint in Uploads(nothing, nothing).endpoints(FILE_ID):
            every.add(("files", endpoint.method, endpoint.path))
        downloads = Downloads(nothing, nothing).endpoints(FILE_ID)
        self.assertEqual({e.path for e in downloads}, {"/files/{id}", "/files/{id}/thumbnail"})
        return every

    def test_every_answer_follows_the_convention(self) -> None:
        http = self.http
        # --- the router ---------------------------------------------------------------
        alice = self.login("alice")
        bob = self.login("bob")
        http("router", "POST", "/api/v1/login", 401, {"user": "alice", "password": "wrong"})
        # The operators' endpoints answer an operator's token (issue 17).
        operator = self.daemon.admin_token
        http("router", "GET", "/api/v1/online", 401)
        http("router", "GET", "/api/v1/online", 200, listing=True, token=operator)
        http("router", "POST", "/api/v1/admin/kick", 200, {"user": "bob"}, operator)
        http("router", "POST", "/api/v1/admin/kick", 404, {"user": "bob"}, operator)
        http("router", "POST", "/api/v1/logout", 401, token=bob)  # kicked: gone
        # --- the admin service ---------------------------------------------------------
        http("admin", "GET", "/health", 200)
        health = http("admin", "GET", "/health", 200, token=operator)
        self.assertIn("version", health)
        # --- the file service -----------------------------------------------------------
        data = os.urandom(100_000)  # two chunks
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        size = len(data)
        probe = {"md5": md5, "size": size}

        def check() -> bool:
            """files/check as a client does it (issue 17): a challenge, then the proof."""
            asked = http("files", "POST", "/api/v1/files/check", 200, probe, alice)
            if "exists" in asked:  # the caller holds that content already
                return bool(asked["exists"])
            challenge = asked["challenge"]
            start, length = challenge["offset"], challenge["length"]
            key = base64.urlsafe_b64decode(
                challenge["nonce"] + "=" * (-len(challenge["nonce"]) % 4)
            )
            proof = hmac.new(key, data[start : start + length], hashlib.sha256).hexdigest()
            answer = {**probe, "challenge": challenge["token"], "proof": proof}
            return bool(http("files", "POST", "/api/v1/files/check", 200, answer, alice)["exists"])

        self.assertFalse(check())
        upload = http(
            "files",
            "POST",
            "/api/v1/uploads",
            201,
            {"name": "noise.bin", "size": size, "md5": md5, "mime": "application/octet-stream"},
            alice,
        )
        upload_id, chunk_size = upload["upload_id"], upload["chunk_size"]
        for chunk in range(upload["chunk_count"]):
            piece = data[chunk * chunk_size : (chunk + 1) * chunk_size]
            digest = base64.b64encode(hashlib.md5(piece, usedforsecurity=False).digest()).decode()
            http(
                "files",
                "PUT",
                "/api/v1/uploads/{id}/chunks/{chunk}",
                200,
                token=alice,
                data=piece,
                headers={"Content-MD5": digest, "Content-Type": "application/octet-stream"},
                id=upload_id,
                chunk=chunk,
            )
        http("files", "GET", "/api/v1/uploads/{id}", 200, token=alice, id=upload_id)
        stored = http(
            "files", "POST", "/api/v1/uploads/{id}/complete", 200, token=alice, id=upload_id
        )
        self.assertNotIn("thumbnail_url", stored)  # not an image: left out, not ""
        http("files", "GET", "/api/v1/files/{id}", 200, token=alice, id=stored["file_id"])
        self.assertTrue(check())
        other = os.urandom(10)
        doomed = http(
            "files",
            "POST",
            "/api/v1/uploads",
            201,
            {
                "name": "x.bin",
                "size": len(other),
                "md5": hashlib.md5(other, usedforsecurity=False).hexdigest(),
            },
            alice,
        )
        http("files", "DELETE", "/api/v1/uploads/{id}", 200, token=alice, id=doomed["upload_id"])
        deleted = http(
            "files", "DELETE", "/api/v1/files/{id}", 200, token=alice, id=stored["file_id"]
        )
        self.assertEqual(deleted["file_id"], stored["file_id"])
        # --- the logic service ------------------------------------------------------------
        for name, kind in (("mum", "person"), ("dad", "person"), ("watch1", "device")):
            body = {"name": name, "password": PASSWORD, "kind": kind}
            http("logic", "POST", "/register", 201, body)
        http("logic", "POST", "/register", 201, {"name": "gone", "password": PASSWORD})
        mum, dad, watch = self.login("mum"), self.login("dad"), self.login("watch1")
        me = http("logic", "GET", "/me", 200, token=mum)
        self.assertNotIn("display_name", me)  # not set: left out, not ""
        http("logic", "PATCH", "/me", 200, {"display_name": "Mum"}, mum)
        http("logic", "GET", "/users/{name}", 200, token=dad, name="mum")
        change = {"current_password": PASSWORD, "new_password": PASSWORD + "!"}
        http("logic", "POST", "/me/password", 200, change, dad)
        gone = self.login("gone")
        http("logic", "DELETE", "/me", 200, {"password": PASSWORD}, gone)
        code = http("logic", "POST", "/devices/me/binding-code", 201, token=watch)["code"]
        http("logic", "POST", "/bindings", 201, {"device": "watch1", "code": code}, mum)
        code = http("logic", "POST", "/devices/me/binding-code", 201, token=watch)["code"]
        pending = http("logic", "POST", "/bindings", 201, {"device": "watch1", "code": code}, dad)
        self.assertNotIn("approved_at", pending)  # pending: left out, not null
        http("logic", "GET", "/bindings", 200, token=mum, listing=True)
        http(
            "logic",
            "POST",
            "/bindings/{device}/{guardian}/approve",
            200,
            token=mum,
            device="watch1",
            guardian="dad",
        )
        alarm = http("logic", "POST", "/sos", 201, {"lat": 52.52, "lon": 13.405}, watch)
        self.assertNotIn("battery", alarm)
        http("logic", "GET", "/sos", 200, token=mum, query={"device": "watch1"}, listing=True)
        http("logic", "GET", "/sos/{id}", 200, token=mum, id=alarm["id"])
        http("logic", "POST", "/sos/{id}/ack", 200, token=dad, id=alarm["id"])
        circle = {"name": "school", "circle": {"lat": 52.52, "lon": 13.405, "radius_m": 300}}
        fence = http("logic", "POST", "/devices/{device}/fences", 201, circle, mum, device="watch1")
        http(
            "logic",
            "GET",
            "/devices/{device}/fences",
            200,
            token=dad,
            device="watch1",
            listing=True,
        )
        a_minute_ago = time.time() - 60
        fixes = {
            "positions": [
                {"lat": 52.52, "lon": 13.405, "at": iso_time(a_minute_ago)},
                {"lat": 52.52, "lon": 13.405, "accuracy_m": 10},
            ]
        }
        http("logic", "POST", "/locations", 200, fixes, watch)
        listed = http(
            "logic",
            "GET",
            "/devices/{device}/locations",
            200,
            token=mum,
            query={"since": iso_time(a_minute_ago - 1)},
            device="watch1",
            listing=True,
        )
        self.assertEqual(len(listed["items"]), 2, listed)
        http(
            "logic",
            "DELETE",
            "/devices/{device}/fences/{fence}",
            200,
            token=mum,
            device="watch1",
            fence=fence["id"],
        )
        post = http("logic", "POST", "/posts", 201, {"text": "first steps"}, mum)
        self.assertNotIn("like_goal", post)
        http("logic", "GET", "/posts", 200, token=dad, listing=True)
        http("logic", "GET", "/posts/{post}", 200, token=dad, post=post["id"])
        http("logic", "PUT", "/posts/{post}/like", 200, token=dad, post=post["id"])
        likers = http(
            "logic", "GET", "/posts/{post}/likes", 200, token=mum, post=post["id"], listing=True
        )
        self.assertEqual((likers["items"], likers["likes"]), (["dad"], 1))
        http("logic", "DELETE", "/posts/{post}/like", 200, token=dad, post=post["id"])
        http("logic", "DELETE", "/posts/{post}", 200, token=mum, post=post["id"])
        # Contacts, blocks and privacy: a request declined, another accepted.
        asked = http("logic", "POST", "/contacts/{user}", 200, token=mum, user="dad")
        self.assertEqual(asked["status"], "requested")
        http("logic", "POST", "/contacts/{user}/decline", 200, token=dad, user="mum")
        http("logic", "POST", "/contacts/{user}", 200, token=mum, user="dad")
        http("logic", "POST", "/contacts/{user}", 200, token=mum, user="alice")  # outgoing
        accepted = http("logic", "POST", "/contacts/{user}/accept", 200, token=dad, user="mum")
        self.assertEqual(accepted["status"], "accepted")
        book = http("logic", "GET", "/contacts", 200, token=mum, listing=True)
        states = {entry["user"]: entry["state"] for entry in book["items"]}
        self.assertEqual((states["dad"], states["alice"]), ("contact", "outgoing"), book)
        self.assertIn("messages", book)
        http("logic", "GET", "/contacts", 200, token=alice, listing=True)  # incoming
        http("logic", "DELETE", "/contacts/{user}", 200, token=mum, user="dad")
        http("logic", "PUT", "/blocks/{user}", 200, token=dad, user="mum")
        blocked = http("logic", "GET", "/contacts", 200, token=dad, listing=True)
        self.assertIn({"user": "mum", "state": "blocked"}, blocked["items"])
        http("logic", "DELETE", "/blocks/{user}", 200, token=dad, user="mum")
        http("logic", "GET", "/me/privacy", 200, token=mum)
        settings = http("logic", "PATCH", "/me/privacy", 200, {"messages": "contacts"}, mum)
        self.assertEqual(settings["messages"], "contacts")
        http(
            "logic",
            "DELETE",
            "/bindings/{device}/{guardian}",
            200,
            token=dad,
            device="watch1",
            guardian="dad",
        )
        # Push registration of the calling device (#19).
        body = {"provider": "webhook", "token": "mum-token", "locale": "en"}
        registered = http("logic", "PUT", "/devices/me/push", 200, body, mum)
        self.assertEqual(registered["token"], "mum-token")
        http("logic", "GET", "/devices/me/push", 200, token=mum)
        self.assertTrue(http("logic", "DELETE", "/devices/me/push", 200, token=mum)["removed"])
        # --- and the router's logout, last --------------------------------------------
        http("router", "POST", "/api/v1/logout", 200, token=alice)
        self.assertEqual(sorted(self.declared() - self.checked), [])
