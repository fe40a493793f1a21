"""The file service in a real daemon, with cim-client run as a user runs it.

Acceptance 1 kills a real client process halfway through a 50 MiB upload and counts,
on the server, the chunks the second run sends; acceptance 7 sends an image from one
user's ``send-file`` to another user's ``listen`` and downloads it from the URL the
message carries. Issue 17: the receivers (of a 1:1 message, of a group message)
download it with their own login, and nobody else does, whatever they know of it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

from PIL import Image
from twisted.trial.unittest import SynchronousTestCase

from tests.integration.support.daemons import BIN, PASSWORD, ROOT, DaemonProcess, client, free_port

MIB = 1 << 20


class FilesDaemonTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.workdir = os.path.abspath(self.mktemp())
        self.files_port = free_port()
        self.storage = os.path.join(self.workdir, "storage")
        self.daemon = DaemonProcess(
            self.workdir,
            extra=(
                f"[files]\nenabled = true\n"
                f"listen = tcp:{self.files_port}:interface=127.0.0.1\n"
                f"storage_dir = {self.storage}\nchunk_size = 1MiB\n"
            ),
        )
        for user in ("alice", "bob", "eve"):
            added = self.daemon.cimctl("user", "add", user, stdin=PASSWORD + "\n")
            self.assertEqual(added.returncode, 0, added.stderr)
        self.daemon.start()
        self.addCleanup(self.daemon.stop)
        self.state_file = os.path.join(self.workdir, "client-cache", "uploads.json")

    @property
    def files_url(self) -> str:
        return f"http://127.0.0.1:{self.files_port}"

    def send_file(self, *args: str, background: bool = False, user: str = "alice") -> Any:
        command = [
            os.path.join(BIN, "cim-client"),
            "--router",
            self.daemon.router_url,
            "--files",
            self.files_url,
            "--user",
            user,
            "send-file",
            *args,
        ]
        env = dict(os.environ, CIM_PASSWORD=PASSWORD, CIM_UPLOAD_STATE=self.state_file)
        if background:
            return subprocess.Popen(
                command,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
        return subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT
        )

    def download(self, user: str, url: str, target: str) -> Any:
        """cim-client download, logged in as ``user``: files are private."""
        return client(self.daemon, user, "--files", self.files_url, "download", url, "-o", target)

    def assertNotDownloadable(self, user: str, url: str) -> None:
        target = os.path.join(self.workdir, f"{user}-should-not-have")
        refused = self.download(user, url, target)
        self.assertEqual(refused.returncode, 1, refused)
        self.assertIn("no such file", refused.stderr)
        self.assertNotIn("Traceback", refused.stderr)
        self.assertFalse(os.path.exists(target))

    def files_health(self) -> dict[str, Any]:
        return dict(self.daemon.health()["files"])

    def chunks_on_disk(self) -> set[str]:
        uploads = os.path.join(self.storage, "uploads")
        found = set()
        for upload_id in os.listdir(uploads):
            for name in os.listdir(os.path.join(uploads, upload_id)):
                found.add(f"{upload_id}/{name}")
        return found

    def test_killed_upload_resumes_with_only_the_missing_chunks(self) -> None:
        """Acceptance 1: 50 MiB in 1 MiB chunks, 4 in flight, the client killed halfway."""
        path = os.path.join(self.workdir, "big.bin")
        data = os.urandom(50 * MIB)
        with open(path, "wb") as handle:
            handle.write(data)
        # Paced, so the client is surely still sending when it is killed.
        first = self.send_file(
            "bob", path, "--parallel", "4", "--limit-rate", "25MiB", background=True
        )
        try:
            deadline = time.monotonic() + 60
            while len(self.chunks_on_disk()) < 25:
                if first.poll() is not None:
                    self.fail(f"the client ended early: {first.communicate()}")
                self.assertLess(time.monotonic(), deadline, "the upload did not start")
                time.sleep(0.02)
        finally:
            first.kill()
            first.communicate()
        # Chunks whose bodies had fully arrived are still being stored: let them land.
        stored = self._settled_chunk_count()
        received_first = self.chunks_on_disk()
        self.assertEqual(len(received_first), stored)
        self.assertLess(stored, 50)
        with open(self.state_file, encoding="utf-8") as handle:
            self.assertEqual(len(json.load(handle)), 1)

        second = self.send_file("bob", path, "--parallel", "4")
        self.assertNotIn("Traceback", second.stderr)
        result = json.loads(second.stdout)
        self.assertTrue(result["resumed"])
        self.assertFalse(result["instant"])
        self.assertEqual(result["chunk_count"], 50)
        self.assertEqual(result["chunks_sent"], 50 - stored)
        self.assertEqual(self.files_health()["chunks_stored"], 50)  # stored + the missing ones
        self.assertEqual(self.files_health()["uploads_completed"], 1)
        digest = hashlib.md5(data).hexdigest()
        sha = hashlib.sha256(data).hexdigest()
        blob = os.path.join(self.storage, "blobs", sha[:2], sha[2:4], sha)
        with open(blob, "rb") as handle:
            self.assertEqual(hashlib.md5(handle.read()).hexdigest(), digest)
        self.assertEqual(os.listdir(os.path.join(self.storage, "uploads")), [])

        # Acceptance 2 with real processes: nothing is sent again, same file id.
        third = self.send_file("bob", path)
        again = json.loads(third.stdout)
        self.assertTrue(again["instant"])
        self.assertEqual((again["chunks_sent"], again["file_id"]), (0, result["file_id"]))
        self.assertEqual(self.files_health()["chunks_stored"], 50)
        # Another user with the same bytes answers the server's challenge: instant too.
        theirs = self.send_file("alice", path, user="eve")
        self.assertEqual(theirs.returncode, 0, theirs.stderr)
        instant = json.loads(theirs.stdout)
        self.assertTrue(instant["instant"])
        self.assertEqual((instant["chunks_sent"], instant["file_id"]), (0, result["file_id"]))
        self.assertEqual(self.files_health()["instant_uploads"], 1)
        self.assertEqual(self.files_health()["chunks_stored"], 50)

    def _settled_chunk_count(self) -> int:
        """The server's count once it and the disk agree and have stopped moving."""
        deadline = time.monotonic() + 30
        last = -1
        steady = 0
        while time.monotonic() < deadline:
            count = self.files_health()["chunks_stored"]
            if count == last and count == len(self.chunks_on_disk()):
                steady += 1
                if steady >= 5:
                    return int(count)
            else:
                steady = 0
            last = count
            time.sleep(0.05)
        raise AssertionError("the server kept storing chunks after the client was killed")

    def test_image_reaches_listen_with_a_url_that_downloads_it(self) -> None:
        """Acceptance 7."""
        image = Image.new("RGB", (640, 480), (250, 120, 10))
        out = io.BytesIO()
        image.save(out, "JPEG")
        photo = out.getvalue()
        path = os.path.join(self.workdir, "sunset.jpg")
        with open(path, "wb") as handle:
            handle.write(photo)
        listener = client(
            self.daemon, "bob", "listen", "--count", "1", "--timeout", "60", background=True
        )
        try:
            self.daemon.wait_connections(1)
            sent = self.send_file("bob", path)
            out_text, err = listener.communicate(timeout=90)
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.communicate()
        self.assertEqual(sent.returncode, 0, sent.stderr)
        outcome = json.loads(sent.stdout)
        self.assertEqual(outcome["status"], "delivered")
        self.assertEqual(listener.returncode, 0, err)
        message = json.loads(out_text.strip().splitlines()[0])
        self.assertEqual((message["type"], message["from"]), ("image", "alice"))
        media = message["media"]
        self.assertEqual(media["name"], "sunset.jpg")
        self.assertEqual(media["mime"], "image/jpeg")
        self.assertEqual(int(media["size"]), len(photo))
        self.assertEqual((media["width"], media["height"]), (640, 480))
        self.assertEqual(media["file_id"], outcome["file_id"])
        self.assertEqual(media["url"], f"{self.files_url}/files/{media['file_id']}")
        # Without a token: refused, URL or not.
        for url in (media["url"], media["thumbnail_url"]):
            with self.assertRaises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(url, timeout=10)
            self.assertEqual(refused.exception.code, 401)
        # The receiver downloads it with cim-client, logged in as himself.
        target = os.path.join(self.workdir, "got.jpg")
        fetched = self.download("bob", media["url"], target)
        self.assertEqual(fetched.returncode, 0, fetched.stderr)
        self.assertEqual(json.loads(fetched.stdout), {"path": target, "size": len(photo)})
        with open(target, "rb") as handle:
            self.assertEqual(handle.read(), photo)
        thumb = os.path.join(self.workdir, "thumb.jpg")
        self.assertEqual(self.download("bob", media["thumbnail_url"], thumb).returncode, 0)
        with open(thumb, "rb") as handle:
            self.assertEqual(Image.open(io.BytesIO(handle.read())).size, (256, 192))
        # Eve was never sent it: neither the file nor its thumbnail, logged in or not.
        self.assertNotDownloadable("eve", media["url"])
        self.assertNotDownloadable("eve", media["thumbnail_url"])
        log = self.daemon.log()
        self.assertNotIn("sig=", log)

    def test_a_file_sent_to_a_group_reaches_its_members(self) -> None:
        created = client(self.daemon, "alice", "group", "create", "team", "bob")
        self.assertEqual(created.returncode, 0, created.stderr)
        group_id = json.loads(created.stdout)["id"]
        # bob is not alice's contact: he was invited (a notice he reads), and accepts.
        self.assertEqual(json.loads(created.stdout)["invited"], ["bob"])
        told = client(self.daemon, "bob", "listen", "--count", "1", "--timeout", "30")
        self.assertIn("group.invited", told.stdout, told.stderr)
        accepted = client(self.daemon, "bob", "group", "accept", "team")
        self.assertEqual(accepted.returncode, 0, accepted.stderr)
        path = os.path.join(self.workdir, "note.txt")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("hello group")
        listener = client(
            self.daemon, "bob", "listen", "--count", "1", "--timeout", "60", background=True
        )
        try:
            self.daemon.wait_connections(1)
            sent = self.send_file("team", path, "--group")
            out_text, err = listener.communicate(timeout=90)
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.communicate()
        self.assertEqual(sent.returncode, 0, sent.stderr)
        self.assertEqual(json.loads(sent.stdout)["status"], "accepted")
        self.assertEqual(listener.returncode, 0, err)
        message = json.loads(out_text.strip().splitlines()[0])
        self.assertEqual((message["type"], message["group"]), ("file", group_id))
        self.assertEqual(message["media"]["name"], "note.txt")
        # A member downloads it; someone outside the group does not.
        target = os.path.join(self.workdir, "from-the-group.txt")
        fetched = self.download("bob", message["media"]["url"], target)
        self.assertEqual(fetched.returncode, 0, fetched.stderr)
        with open(target, encoding="utf-8") as handle:
            self.assertEqual(handle.read(), "hello group")
        self.assertNotDownloadable("eve", message["media"]["url"])

    def test_a_deleted_file_is_no_longer_readable_by_its_uploader(self) -> None:
        path = os.path.join(self.workdir, "mine.txt")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("just for me")
        sent = self.send_file("bob", path)
        self.assertEqual(sent.returncode, 0, sent.stderr)
        shared = json.loads(sent.stdout)
        deleted = client(
            self.daemon, "alice", "--files", self.files_url, "delete-file", shared["file_id"]
        )
        self.assertEqual(deleted.returncode, 0, deleted.stderr)
        answer = json.loads(deleted.stdout)
        self.assertEqual((answer["file_id"], answer["shared"]), (shared["file_id"], True))
        self.assertNotDownloadable("alice", shared["url"])
        # Bob was sent it: his copy stays.
        kept = os.path.join(self.workdir, "bobs.txt")
        self.assertEqual(self.download("bob", shared["url"], kept).returncode, 0)


class FilesRefusalTests(SynchronousTestCase):
    def test_a_key_others_can_read_stops_the_daemon_with_one_line(self) -> None:
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(workdir, "data"))
        key = os.path.join(workdir, "url.key")
        with open(key, "w", encoding="utf-8") as handle:
            handle.write("c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0IQ==\n")
        os.chmod(key, 0o644)
        daemon = DaemonProcess(
            workdir,
            extra=f"[files]\nenabled = true\nlisten = tcp:{free_port()}\nurl_key = {key}\n",
        )
        result = daemon.run_to_exit()
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(
            result.stderr.strip(),
            f"cim: could not start node e2e: [files] url_key: the URL signing key {key} is "
            f"accessible by group or others (mode 0644); run: chmod 600 {key}",
        )
