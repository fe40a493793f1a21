"""The file service over a real twisted.web Site driven by hand, on a fake clock.

Both thread pools get a synchronous runner, so every request is answered before
``exchange`` returns; the storage directory is a real one under the test's temp dir.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import json
import os
import re
import struct
import zlib
from typing import Any, BinaryIO, cast

from PIL import Image
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from cim.backends.state import token_hash
from cim.backends.state.memory import MemoryState
from cim.config import ConfigError, FilesConfig, parse_config
from cim.files import records
from cim.files.blobs import BlobStore
from cim.files.http import bodies
from cim.files.http.downloads import ByteRange, parse_range
from cim.files.http.site import files_site
from cim.files.names import clean_name, content_disposition
from cim.files.proof import proof_of
from cim.files.signing import UrlKeyError, UrlSigner, load_or_create_key
from cim.files.store import FileStore
from cim.files.thumbnails import set_pixel_limit
from cim.http.telemetry import SiteTelemetry
from cim.metrics import HttpRequests
from cim.storage.accounts import insert_user_txn
from cim.storage.database import Database, ThreadPoolRunner
from tests.fakes.timelines import run_now
from tests.unit.test_router import HttpConnection, HttpResponse, exchange, request_bytes

CHUNK = 4096
TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789", "eve": "eve-token-0"}
KEY = b"k" * 32


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def content_md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def png_bytes(size: tuple[int, int], mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, (200, 30, 30, 128) if mode == "RGBA" else (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


def jpeg_with_orientation(size: tuple[int, int], orientation: int) -> bytes:
    image = Image.new("RGB", size, (10, 120, 200))
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif.tobytes())
    return out.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of zeros: a few KiB that decode to width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", b"".join(parts))
        + chunk(b"IEND", b"")
    )


class FullDisk(BlobStore):
    """A storage directory whose disk fills up while ``full`` is set."""

    full = False

    def _write(self, handle: BinaryIO, data: bytes) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        super()._write(handle, data)


class FileServiceTestCase(SynchronousTestCase):
    config = FilesConfig(
        enabled=True,
        chunk_size=CHUNK,
        max_file_size=1 << 20,
        user_quota=4 << 20,
        upload_expiry=3600,
        url_ttl=600,
        purge_grace=3600,
        thumbnail_size=64,
        max_image_pixels=1_000_000,
        public_url="http://files.test",
    )
    memory_limit = 1024

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.state = MemoryState(self.clock)
        for user, token in TOKENS.items():
            self.successResultOf(
                self.state.sessions.create_session(
                    token_hash(token), user, "d", "n1", 86400, "kick_old"
                )
            )
        self.database = Database("sqlite://", None, runner=run_now)
        self.successResultOf(self.database.start())
        self.addCleanup(self.database.stop)
        for user in TOKENS:
            self.successResultOf(
                self.database.run(insert_user_txn, user, "scrypt$x", "person", 1.0)
            )
        self.root = os.path.abspath(self.mktemp())
        self.blobs = FullDisk(self.root)
        self.blobs.prepare()
        self.work = ThreadPoolRunner("cim-files", 1, None, runner=run_now)
        set_pixel_limit(self.config.max_image_pixels)
        self.addCleanup(set_pixel_limit, 89_478_485)
        self.ids = iter(f"{n:022d}" for n in range(1, 1000))
        self.store = FileStore(
            self.config,
            self.database,
            self.blobs,
            self.work,
            UrlSigner(KEY),
            self.clock,
            new_id=lambda: next(self.ids),
        )
        self.requests = HttpRequests()
        self.site = files_site(
            self.store,
            self.state.sessions,
            self.clock,
            self.config.chunk_size,
            self.memory_limit,
            telemetry=SiteTelemetry("files", self.requests, access_log=True),
        )
        self.site.doStart()
        self.addCleanup(self.site.doStop)

    # --- helpers ------------------------------------------------------------------------

    def call(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: list[tuple[str, str]] | None = None,
        user: str | None = "alice",
        site: Site | None = None,
    ) -> HttpResponse:
        all_headers = list(headers or [])
        if user is not None:
            all_headers.append(("Authorization", f"Bearer {TOKENS[user]}"))
        return exchange(site or self.site, method, path, body, all_headers)

    def post_json(self, path: str, payload: dict[str, Any], user: str = "alice") -> HttpResponse:
        return self.call(
            "POST",
            path,
            json.dumps(payload).encode(),
            [("Content-Type", "application/json")],
            user=user,
        )

    def create(
        self,
        data: bytes,
        name: str = "photo.bin",
        mime: str = "application/octet-stream",
        md5: str | None = None,
        user: str = "alice",
    ) -> dict[str, Any]:
        response = self.post_json(
            "/api/v1/uploads",
            {"name": name, "size": len(data), "md5": md5 or md5_hex(data), "mime": mime},
            user,
        )
        self.assertEqual(response.status, 201, response.body)
        return cast(dict[str, Any], response.json())

    def put_chunk(
        self,
        upload_id: str,
        index: int,
        data: bytes,
        md5: str | None = None,
        user: str = "alice",
    ) -> HttpResponse:
        return self.call(
            "PUT",
            f"/api/v1/uploads/{upload_id}/chunks/{index}",
            data,
            [("Content-MD5", md5 or content_md5(data))],
            user=user,
        )

    def chunks_of(self, data: bytes) -> list[bytes]:
        return [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]

    def upload(
        self,
        data: bytes,
        name: str = "photo.bin",
        mime: str = "application/octet-stream",
        user: str = "alice",
    ) -> HttpResponse:
        upload = self.create(data, name, mime, user=user)
        for index, part in enumerate(self.chunks_of(data)):
            response = self.put_chunk(upload["upload_id"], index, part, user=user)
            self.assertEqual(response.status, 200, response.body)
        return self.call("POST", f"/api/v1/uploads/{upload['upload_id']}/complete", user=user)

    def stored(self, data: bytes, **kwargs: Any) -> dict[str, Any]:
        response = self.upload(data, **kwargs)
        self.assertEqual(response.status, 200, response.body)
        return cast(dict[str, Any], response.json())

    def get_url(
        self,
        url: str,
        headers: list[tuple[str, str]] | None = None,
        method: str = "GET",
        user: str | None = "alice",
    ) -> HttpResponse:
        """A download, by default with the uploader's token (every download has one)."""
        path = url.removeprefix("http://files.test")
        return self.call(method, path, headers=headers, user=user)

    def check(self, data: bytes, user: str = "alice", md5: str | None = None) -> HttpResponse:
        """Instant upload as a client does it: ask, answer the challenge with the bytes."""
        content = {"md5": md5 or md5_hex(data), "size": len(data)}
        first = self.post_json("/api/v1/files/check", content, user)
        self.assertEqual(first.status, 200, first.body)
        challenge = first.json().get("challenge")
        if challenge is None:
            return first
        self.assertNotIn("file_id", first.json())
        part = data[challenge["offset"] : challenge["offset"] + challenge["length"]]
        proof = proof_of(challenge["nonce"], part)
        return self.post_json(
            "/api/v1/files/check",
            {**content, "challenge": challenge["token"], "proof": proof},
            user,
        )

    def bearer(self, user: str = "alice") -> tuple[str, str]:
        return ("Authorization", f"Bearer {TOKENS[user]}")

    def assertError(self, response: HttpResponse, status: int, code: str) -> dict[str, Any]:
        self.assertEqual(response.status, status, response.body)
        self.assertEqual(response.headers["content-type"], "application/json")
        body = cast(dict[str, Any], response.json())
        self.assertEqual(body["error"], code)
        self.assertTrue(body["message"])
        return body

    def files_on_disk(self, under: str = "") -> list[str]:
        found = []
        for directory, _, names in os.walk(os.path.join(self.root, under)):
            for name in names:
                found.append(os.path.relpath(os.path.join(directory, name), self.root))
        return sorted(found)


class UploadTests(FileServiceTestCase):
    def test_chunks_in_any_order_then_complete(self) -> None:
        data = os.urandom(CHUNK * 2 + 100)
        upload = self.create(data, "report.pdf", "application/pdf")
        self.assertEqual((upload["chunk_size"], upload["chunk_count"]), (CHUNK, 3))
        parts = self.chunks_of(data)
        for index in (2, 0):
            self.assertEqual(self.put_chunk(upload["upload_id"], index, parts[index]).status, 200)
        status = self.call("GET", f"/api/v1/uploads/{upload['upload_id']}").json()
        self.assertEqual(status["received"], [0, 2])
        self.assertEqual(status["size"], len(data))
        last = self.put_chunk(upload["upload_id"], 1, parts[1]).json()
        self.assertEqual((last["received"], last["chunk_count"]), (3, 3))

        done = self.call("POST", f"/api/v1/uploads/{upload['upload_id']}/complete")
        self.assertEqual(done.status, 200, done.body)
        body = done.json()
        self.assertEqual(
            (body["size"], body["mime"], body["name"]), (len(data), "application/pdf", "report.pdf")
        )
        self.assertEqual(body["md5"], md5_hex(data))
        # No thumbnail and no dimensions for a PDF: the keys are left out, not blank.
        self.assertFalse(
            {"thumbnail_url", "signed_thumbnail_url", "width", "height"} & set(body), body
        )
        self.assertRegex(body["expires_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertEqual(body["url"], f"http://files.test/files/{body['file_id']}")
        self.assertTrue(
            body["signed_url"].startswith(f"http://files.test/files/{body['file_id']}?")
        )

        sha = hashlib.sha256(data).hexdigest()
        self.assertEqual(self.files_on_disk(), [f"blobs/{sha[:2]}/{sha[2:4]}/{sha}"])
        downloaded = self.get_url(body["url"])
        self.assertEqual(downloaded.status, 200)
        self.assertEqual(downloaded.body, data)
        # The upload is gone once it is a file.
        gone = self.call("GET", f"/api/v1/uploads/{upload['upload_id']}")
        self.assertError(gone, 404, "not_found")
        self.assertEqual(self.store.metrics.uploads_completed, 1)
        self.assertEqual(self.store.metrics.chunks_stored, 3)

    def test_large_chunks_are_spooled_to_disk_and_moved_into_place(self) -> None:
        data = os.urandom(CHUNK)  # larger than the 1 KiB memory limit
        upload = self.create(data)
        spooled: list[str] = []
        original = self.blobs.store_chunk

        def spy(
            upload_id: str, chunk: int, path: str | None, body: bytes | None, md5: bytes
        ) -> None:
            spooled.append(path or "")
            self.assertIsNone(body)
            self.assertTrue(os.path.exists(path or ""))
            original(upload_id, chunk, path, body, md5)

        self.blobs.store_chunk = spy  # type: ignore[method-assign,assignment]
        self.assertEqual(self.put_chunk(upload["upload_id"], 0, data).status, 200)
        self.assertEqual(os.path.dirname(spooled[0]), self.blobs.tmp_dir)
        self.assertEqual(self.files_on_disk("tmp"), [])
        with open(self.blobs.chunk_path(upload["upload_id"], 0), "rb") as handle:
            self.assertEqual(handle.read(), data)

    def test_same_content_again_is_instant_and_has_the_same_id(self) -> None:
        """Acceptance 2: nothing is transferred and the file id is the same."""
        data = os.urandom(CHUNK + 10)
        first = self.stored(data, name="a.bin")
        chunks = self.store.metrics.chunks_stored
        check = self.check(data, "bob")
        self.assertEqual(check.status, 200)
        self.assertTrue(check.json()["exists"])
        self.assertEqual(check.json()["file_id"], first["file_id"])
        self.assertEqual(self.store.metrics.chunks_stored, chunks)
        self.assertEqual(self.store.metrics.instant_uploads, 1)
        # Uploading it in full anyway also ends at the same file and one blob.
        again = self.stored(data, name="b.bin", user="bob")
        self.assertEqual(again["file_id"], first["file_id"])
        self.assertEqual(len(self.files_on_disk("blobs")), 1)

    def test_check_for_unknown_content(self) -> None:
        response = self.check(b"never stored")
        self.assertEqual(response.json(), {"exists": False})

    def test_chunk_with_wrong_md5_is_refused(self) -> None:
        """Acceptance 3, first half: the chunk is not stored."""
        data = os.urandom(CHUNK * 2)
        upload = self.create(data)
        wrong = content_md5(b"something else")
        response = self.put_chunk(upload["upload_id"], 0, data[:CHUNK], md5=wrong)
        self.assertError(response, 400, "md5_mismatch")
        status = self.call("GET", f"/api/v1/uploads/{upload['upload_id']}").json()
        self.assertEqual(status["received"], [])
        self.assertEqual(self.files_on_disk(), [])

    def test_complete_with_wrong_whole_file_md5_is_refused(self) -> None:
        """Acceptance 3, second half: nothing half-written becomes a file."""
        data = os.urandom(CHUNK * 2 + 1)
        upload = self.create(data, md5=md5_hex(b"not these bytes"))
        for index, part in enumerate(self.chunks_of(data)):
            self.assertEqual(self.put_chunk(upload["upload_id"], index, part).status, 200)
        response = self.call("POST", f"/api/v1/uploads/{upload['upload_id']}/complete")
        self.assertError(response, 400, "md5_mismatch")
        self.assertEqual(self.files_on_disk(), [])
        self.assertFalse(self.check(data).json()["exists"])
        gone = self.call("GET", f"/api/v1/uploads/{upload['upload_id']}")
        self.assertError(gone, 404, "not_found")

    def test_complete_with_missing_chunks_lists_them(self) -> None:
        data = os.urandom(CHUNK * 3)
        upload = self.create(data)
        self.put_chunk(upload["upload_id"], 1, self.chunks_of(data)[1])
        response = self.call("POST", f"/api/v1/uploads/{upload['upload_id']}/complete")
        body = self.assertError(response, 409, "incomplete")
        self.assertEqual(body["missing"], [0, 2])

    def test_chunk_checks(self) -> None:
        data = os.urandom(CHUNK + 10)
        upload_id = self.create(data)["upload_id"]
        path = f"/api/v1/uploads/{upload_id}/chunks/0"
        self.assertError(self.call("PUT", path, data[:CHUNK]), 400, "bad_request")
        bad = self.call("PUT", path, data[:CHUNK], [("Content-MD5", "not base64!")])
        self.assertError(bad, 400, "bad_request")
        short = data[: CHUNK - 1]
        self.assertError(self.put_chunk(upload_id, 0, short), 400, "bad_chunk_size")
        self.assertError(self.put_chunk(upload_id, 1, data[:CHUNK]), 400, "bad_chunk_size")
        self.assertError(self.put_chunk(upload_id, 2, b"x"), 400, "bad_chunk")
        too_big = os.urandom(CHUNK + 1)
        self.assertError(self.put_chunk(upload_id, 0, too_big), 413, "chunk_too_large")
        huge = os.urandom(20000)  # more than any body the service takes
        self.assertError(self.put_chunk(upload_id, 0, huge), 413, "body_too_large")
        self.assertEqual(self.files_on_disk(), [])

    def test_limits_are_clear_4xx_errors(self) -> None:
        big = {"name": "x", "size": (1 << 20) + 1, "md5": "0" * 32}
        self.assertError(self.post_json("/api/v1/uploads", big), 413, "file_too_large")
        bad_md5 = {"name": "x", "size": 10, "md5": "xyz"}
        self.assertError(self.post_json("/api/v1/uploads", bad_md5), 400, "bad_request")
        bad_mime = {"name": "x", "size": 10, "md5": "0" * 32, "mime": "text html"}
        self.assertError(self.post_json("/api/v1/uploads", bad_mime), 400, "bad_request")
        empty = {"name": "x", "size": 0, "md5": "0" * 32}
        self.assertError(self.post_json("/api/v1/uploads", empty), 400, "bad_request")
        # The quota counts unfinished uploads too: four of 1 MiB fill 4 MiB.
        for n in range(4):
            upload = {"name": "x", "size": 1 << 20, "md5": f"{n:032x}"}
            self.assertEqual(self.post_json("/api/v1/uploads", upload).status, 201)
        over = {"name": "x", "size": 1, "md5": "f" * 32}
        body = self.assertError(self.post_json("/api/v1/uploads", over), 403, "quota_exceeded")
        self.assertEqual(body["quota"], 4 << 20)
        # Bob's quota is his own.
        self.assertEqual(self.post_json("/api/v1/uploads", over, "bob").status, 201)

    def test_abort_frees_the_quota_and_the_chunks(self) -> None:
        data = os.urandom(CHUNK * 2)
        upload_id = self.create(data)["upload_id"]
        self.put_chunk(upload_id, 0, data[:CHUNK])
        self.assertEqual(self.call("DELETE", f"/api/v1/uploads/{upload_id}").status, 200)
        self.assertEqual(self.files_on_disk(), [])
        self.assertError(self.call("GET", f"/api/v1/uploads/{upload_id}"), 404, "not_found")


class AuthenticationTests(FileServiceTestCase):
    def test_every_api_call_needs_a_token(self) -> None:
        for method, path in (
            ("POST", "/api/v1/files/check"),
            ("POST", "/api/v1/uploads"),
            ("GET", "/api/v1/uploads/0000000000000000000001"),
            ("PUT", "/api/v1/uploads/0000000000000000000001/chunks/0"),
            ("POST", "/api/v1/uploads/0000000000000000000001/complete"),
        ):
            body = b"{}" if method == "POST" else b""
            headers = [("Content-Type", "application/json")]
            response = self.call(method, path, body, headers, user=None)
            self.assertError(response, 401, "invalid_token")
            self.assertEqual(response.headers["www-authenticate"], 'Bearer realm="cim"')
            wrong = self.call(
                method, path, body, [*headers, ("Authorization", "Bearer nope")], user=None
            )
            self.assertError(wrong, 401, "invalid_token")

    def test_someone_elses_upload_is_not_found(self) -> None:
        data = os.urandom(10)
        upload_id = self.create(data)["upload_id"]
        self.assertError(
            self.call("GET", f"/api/v1/uploads/{upload_id}", user="eve"), 404, "not_found"
        )
        self.assertError(self.put_chunk(upload_id, 0, data, user="eve"), 404, "not_found")
        done = self.call("POST", f"/api/v1/uploads/{upload_id}/complete", user="eve")
        self.assertError(done, 404, "not_found")

    def test_logged_out_token_stops_working(self) -> None:
        self.successResultOf(
            self.state.sessions.end_session(token_hash(TOKENS["alice"]), "logged out")
        )
        response = self.post_json("/api/v1/files/check", {"md5": "0" * 32, "size": 5})
        self.assertError(response, 401, "invalid_token")

    def test_unknown_paths_and_methods_answer_json(self) -> None:
        self.assertError(self.call("GET", "/nothing/here"), 404, "not_found")
        response = self.call("PATCH", "/api/v1/uploads")
        self.assertError(response, 405, "method_not_allowed")
        self.assertEqual(response.headers["allow"], "POST")


class DownloadTests(FileServiceTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.data = bytes(range(256)) * 40  # 10240 bytes, three chunks
        self.file = self.stored(self.data, name="notes.txt", mime="text/plain")

    def test_ranges(self) -> None:
        """Acceptance 4, first half."""
        url = self.file["url"]
        for header, status, expected, content_range in (
            ("bytes=0-9", 206, self.data[:10], "bytes 0-9/10240"),
            ("bytes=10000-", 206, self.data[10000:], "bytes 10000-10239/10240"),
            ("bytes=-5", 206, self.data[-5:], "bytes 10235-10239/10240"),
            ("bytes=100-99999", 206, self.data[100:], "bytes 100-10239/10240"),
            ("bytes=0-0,5-6", 200, self.data, None),
            ("pages=1", 200, self.data, None),
        ):
            response = self.get_url(url, [("Range", header)])
            self.assertEqual(response.status, status, header)
            self.assertEqual(response.body, expected, header)
            self.assertEqual(response.headers.get("content-range"), content_range, header)
        unsatisfiable = self.get_url(url, [("Range", "bytes=10240-")])
        self.assertError(unsatisfiable, 416, "range_not_satisfiable")
        self.assertEqual(unsatisfiable.headers["content-range"], "bytes */10240")

    def test_headers_and_conditional_requests(self) -> None:
        response = self.get_url(self.file["url"])
        headers = response.headers
        sha = hashlib.sha256(self.data).hexdigest()
        self.assertEqual(headers["etag"], f'"{sha}"')
        self.assertEqual(headers["content-type"], "text/plain")
        self.assertEqual(
            headers["content-disposition"],
            "attachment; filename=\"notes.txt\"; filename*=UTF-8''notes.txt",
        )
        self.assertEqual(headers["accept-ranges"], "bytes")
        self.assertEqual(headers["x-content-type-options"], "nosniff")
        self.assertIn("sandbox", headers["content-security-policy"])
        self.assertEqual(headers["last-modified"], "Tue, 14 Nov 2023 22:13:20 GMT")
        path = self.file["url"].removeprefix("http://files.test")
        for condition in (
            ("If-None-Match", f'"{sha}"'),
            ("If-None-Match", f'"other", "{sha}"'),
            ("If-Modified-Since", headers["last-modified"]),
        ):
            connection = HttpConnection(self.site)
            connection.send(request_bytes("GET", path, headers=[condition, self.bearer()]))
            raw = connection.transport.value()
            connection.close()
            self.assertTrue(raw.startswith(b"HTTP/1.1 304 "), raw)
            self.assertTrue(raw.endswith(b"\r\n\r\n"), raw)
        changed = self.get_url(self.file["url"], [("If-None-Match", '"other"')])
        self.assertEqual(changed.status, 200)
        # If-Range with another validator: the whole file, not the range.
        stale = self.get_url(self.file["url"], [("Range", "bytes=0-1"), ("If-Range", '"old"')])
        self.assertEqual((stale.status, len(stale.body)), (200, len(self.data)))
        connection = HttpConnection(self.site)
        connection.send(request_bytes("HEAD", path, headers=[self.bearer()]))
        head = connection.transport.value()
        connection.close()
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertIn(b"\r\nContent-Length: 10240\r\n", head)
        self.assertTrue(head.endswith(b"\r\n\r\n"), head)

    def test_access_needs_a_token_and_a_signed_url_only_narrows_it(self) -> None:
        """Acceptance 4, second half (and issue 17: no URL anyone can reuse forever)."""
        file_id = self.file["file_id"]
        bare = self.call("GET", f"/files/{file_id}", user=None)
        self.assertError(bare, 401, "invalid_token")
        signed_alone = self.get_url(self.file["signed_url"], user=None)
        self.assertError(signed_alone, 401, "invalid_token")
        with_token = self.call("GET", f"/files/{file_id}")
        self.assertEqual((with_token.status, with_token.body), (200, self.data))
        self.assertEqual(self.get_url(self.file["signed_url"]).body, self.data)
        forged = self.get_url(self.file["signed_url"].replace("sig=", "sig=x"))
        self.assertError(forged, 403, "bad_signature")
        moved = re.sub(
            r"expires=(\d+)", lambda m: f"expires={int(m.group(1)) + 1}", self.file["signed_url"]
        )
        self.assertError(self.get_url(moved), 403, "bad_signature")
        # A signature for the file does not open the thumbnail, nor another file.
        thumb = self.file["signed_url"].replace(
            f"/files/{file_id}?", f"/files/{file_id}/thumbnail?"
        )
        self.assertError(self.get_url(thumb), 403, "bad_signature")
        self.clock.advance(self.config.url_ttl + 1)
        expired = self.get_url(self.file["signed_url"])
        self.assertError(expired, 403, "bad_signature")
        # A fresh description carries a fresh URL.
        fresh = self.call("GET", f"/api/v1/files/{file_id}").json()
        self.assertEqual(self.get_url(fresh["signed_url"]).body, self.data)
        self.assertError(self.call("GET", "/files/0000000000000000000999"), 404, "not_found")

    def test_downloads_are_counted_by_route_template(self) -> None:
        self.get_url(self.file["url"])
        self.call("GET", f"/files/{self.file['file_id']}", user="alice")
        self.call("GET", f"/api/v1/files/{self.file['file_id']}", user="alice")
        # bob was never sent the file: the same route, counted under its own status.
        self.call("GET", f"/files/{self.file['file_id']}", user="bob")
        self.assertEqual(self.requests.count("files", "GET", "/files/{id}", "200"), 2)
        self.assertEqual(self.requests.count("files", "GET", "/files/{id}", "404"), 1)
        self.assertEqual(self.requests.count("files", "GET", "/api/v1/files/{id}", "200"), 1)

    def test_access_log_holds_no_signatures_or_tokens(self) -> None:
        events: list[LogEvent] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.get_url(self.file["signed_url"])
        self.call("GET", f"/files/{self.file['file_id']}")
        text = "\n".join(formatEvent(event) for event in events)
        self.assertIn(f"/files/{self.file['file_id']}", text)
        signature = self.file["signed_url"].split("sig=")[1]
        self.assertNotIn(signature, text)
        self.assertNotIn(TOKENS["alice"], text)
        self.assertNotIn("sig=", text)


class ThumbnailTests(FileServiceTestCase):
    def thumbnail(self, body: dict[str, Any]) -> Image.Image:
        response = self.get_url(body["thumbnail_url"])
        self.assertEqual(response.status, 200, response.body)
        self.assertEqual(response.headers["content-disposition"].split(";")[0], "inline")
        image = Image.open(io.BytesIO(response.body))
        image.load()
        self.assertEqual(response.headers["content-type"], Image.MIME[image.format or ""])
        return image

    def test_jpeg_gets_an_upright_thumbnail_of_the_configured_size(self) -> None:
        """Acceptance 5: EXIF orientation 6 (turned 90 degrees) is applied."""
        data = jpeg_with_orientation((400, 200), orientation=6)
        body = self.stored(data, name="camera.jpg", mime="image/jpeg")
        self.assertEqual((body["width"], body["height"], body["mime"]), (200, 400, "image/jpeg"))
        thumbnail = self.thumbnail(body)
        self.assertEqual(thumbnail.format, "JPEG")
        self.assertEqual(thumbnail.size, (32, 64))
        original = self.get_url(body["url"])
        self.assertEqual(original.headers["content-disposition"].split(";")[0], "inline")
        self.assertEqual(original.headers["content-type"], "image/jpeg")

    def test_png_with_alpha_gets_a_png_thumbnail(self) -> None:
        body = self.stored(png_bytes((300, 150), "RGBA"), name="logo.png", mime="image/png")
        thumbnail = self.thumbnail(body)
        self.assertEqual(
            (thumbnail.format, thumbnail.mode, thumbnail.size), ("PNG", "RGBA", (64, 32))
        )

    def test_small_images_are_not_enlarged(self) -> None:
        body = self.stored(png_bytes((20, 10)), name="dot.png", mime="image/png")
        self.assertEqual(self.thumbnail(body).size, (20, 10))

    def test_decompression_bomb_is_refused(self) -> None:
        """Acceptance 5: 100 megapixels in a few KiB, refused before decoding."""
        bomb = bomb_png(10_000, 10_000)
        self.assertLess(len(bomb), 64 * 1024)
        response = self.upload(bomb, name="bomb.png", mime="image/png")
        body = self.assertError(response, 422, "image_too_large")
        self.assertIn("1000000 pixels", body["message"])
        self.assertEqual(self.files_on_disk(), [])

    def test_image_over_the_pixel_limit_is_refused(self) -> None:
        response = self.upload(png_bytes((1001, 1000)), name="wide.png", mime="image/png")
        self.assertError(response, 422, "image_too_large")

    def test_broken_image_is_refused_but_other_types_are_plain_files(self) -> None:
        response = self.upload(b"\x89PNG not really" * 10, name="x.png", mime="image/png")
        self.assertError(response, 422, "bad_image")
        # A type Pillow does not decode is stored as a file, served as a download.
        body = self.stored(b"<svg onload=alert(1)>", name="x.svg", mime="image/svg+xml")
        self.assertNotIn("thumbnail_url", body)
        served = self.get_url(body["url"])
        self.assertEqual(served.headers["content-disposition"].split(";")[0], "attachment")


class NameTests(FileServiceTestCase):
    def test_hostile_names_are_harmless(self) -> None:
        """Acceptance 6."""
        long_name = "x" * 5000 + ".txt"
        cases = {
            "../../etc/passwd": "passwd",
            "/etc/shadow": "shadow",
            "C:\\Windows\\system32\\evil.dll": "evil.dll",
            "a\x00b\x1f.txt": "ab.txt",
            "..": "file",
            "": "file",
            "report\u202e.txt": "report.txt",
            long_name: "x" * 251 + ".txt",
        }
        for number, (raw, expected) in enumerate(cases.items()):
            data = f"content {number}".encode()
            upload = self.create(data, name=raw)
            self.assertEqual(upload["name"], expected, repr(raw))
            self.put_chunk(upload["upload_id"], 0, data)
            body = self.call("POST", f"/api/v1/uploads/{upload['upload_id']}/complete").json()
            self.assertEqual(body["name"], expected)
            disposition = self.get_url(body["url"]).headers["content-disposition"]
            self.assertNotIn("/", disposition.split("filename*")[0])
            self.assertNotIn("..", disposition)
        allowed = re.compile(r"blobs/[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{64}")
        on_disk = self.files_on_disk()
        self.assertEqual(len(on_disk), len(cases))
        for path in on_disk:
            self.assertRegex(path, allowed)
        self.assertFalse(os.path.exists(os.path.join(self.root, "..", "etc")))

    def test_clean_name_keeps_the_extension_of_long_names(self) -> None:
        self.assertEqual(len(clean_name("a" * 300 + ".jpeg")), 255)
        self.assertTrue(clean_name("a" * 300 + ".jpeg").endswith(".jpeg"))
        self.assertEqual(len(clean_name("b" * 300)), 255)

    def test_content_disposition_is_ascii_with_the_exact_name_encoded(self) -> None:
        header = content_disposition('日本 "q".txt', inline=False)
        self.assertEqual(
            header,
            b'attachment; filename="__ _q_.txt"; '
            b"filename*=UTF-8''%E6%97%A5%E6%9C%AC%20%22q%22.txt",
        )


class ExpiryAndDiskTests(FileServiceTestCase):
    def test_unfinished_uploads_expire_and_their_chunks_are_deleted(self) -> None:
        data = os.urandom(CHUNK * 2)
        upload_id = self.create(data)["upload_id"]
        self.put_chunk(upload_id, 0, data[:CHUNK])
        self.clock.advance(3000)
        # A stored chunk moves the expiry on: still there after the first hour.
        self.put_chunk(upload_id, 1, data[CHUNK:])
        self.clock.advance(1000)
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(self.store.sweep())), 0)
        self.assertEqual(self.call("GET", f"/api/v1/uploads/{upload_id}").status, 200)
        self.clock.advance(3000)
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(self.store.sweep())), 1)
        self.assertEqual(self.files_on_disk(), [])
        self.assertError(self.call("GET", f"/api/v1/uploads/{upload_id}"), 404, "not_found")

    def test_sweep_removes_orphans_and_stale_temporaries(self) -> None:
        orphan = os.path.join(self.root, "uploads", "Z" * 22)
        os.makedirs(orphan)
        with open(os.path.join(orphan, "0"), "wb") as handle:
            handle.write(b"left by a crash")
        with open(os.path.join(self.root, "tmp", ".body-crash"), "wb") as handle:
            handle.write(b"half a body")
        young = self.successResultOf(Deferred.fromCoroutine(self.store.sweep()))
        self.assertEqual(young, 0)
        self.assertEqual(len(self.files_on_disk()), 2)  # the clock is in 2023: not old yet
        self.clock.advance(10 * 365 * 86400)
        self.successResultOf(Deferred.fromCoroutine(self.store.sweep()))
        self.assertEqual(self.files_on_disk(), [])

    def test_disk_full_while_storing_a_chunk_is_507_and_resumable(self) -> None:
        data = os.urandom(100)  # stays in memory, so storing it writes a file
        upload_id = self.create(data)["upload_id"]
        self.blobs.full = True
        self.assertError(self.put_chunk(upload_id, 0, data), 507, "insufficient_storage")
        self.assertEqual(self.call("GET", f"/api/v1/uploads/{upload_id}").json()["received"], [])
        self.blobs.full = False
        self.assertEqual(self.put_chunk(upload_id, 0, data).status, 200)
        done = self.call("POST", f"/api/v1/uploads/{upload_id}/complete")
        self.assertEqual(done.status, 200)

    def test_disk_full_while_assembling_keeps_the_upload(self) -> None:
        data = os.urandom(CHUNK * 2)
        upload_id = self.create(data)["upload_id"]
        for index, part in enumerate(self.chunks_of(data)):
            self.put_chunk(upload_id, index, part)
        self.blobs.full = True
        response = self.call("POST", f"/api/v1/uploads/{upload_id}/complete")
        self.assertError(response, 507, "insufficient_storage")
        self.assertEqual(self.files_on_disk("tmp"), [])
        status = self.call("GET", f"/api/v1/uploads/{upload_id}").json()
        self.assertEqual(status["received"], [0, 1])
        self.blobs.full = False
        done = self.call("POST", f"/api/v1/uploads/{upload_id}/complete")
        self.assertEqual(done.status, 200)
        self.assertEqual(self.get_url(done.json()["url"]).body, data)

    def test_disk_full_while_spooling_the_body_is_507(self) -> None:
        data = os.urandom(CHUNK)
        upload_id = self.create(data)["upload_id"]

        def no_space(*args: Any, **kwargs: Any) -> Any:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(bodies, "_mkstemp", no_space)
        self.assertError(self.put_chunk(upload_id, 0, data), 507, "insufficient_storage")


class PieceTests(SynchronousTestCase):
    def test_parse_range(self) -> None:
        self.assertEqual(parse_range(b"bytes=0-0", 10), ByteRange(0, 0))
        self.assertEqual(parse_range(b"bytes=-20", 10), ByteRange(0, 9))
        self.assertEqual(parse_range(b"bytes=-0", 10), "unsatisfiable")
        self.assertEqual(parse_range(b"bytes=5-2", 10), None)
        self.assertEqual(parse_range(b"bytes=-", 10), None)
        self.assertEqual(parse_range(None, 10), None)

    def test_signing_key_is_created_private_and_reused(self) -> None:
        path = os.path.join(os.path.abspath(self.mktemp()))
        os.makedirs(path)
        key_path = os.path.join(path, "key")
        key = load_or_create_key(key_path)
        self.assertEqual(len(key), 32)
        self.assertEqual(os.stat(key_path).st_mode & 0o777, 0o600)
        self.assertEqual(load_or_create_key(key_path), key)
        os.chmod(key_path, 0o644)
        with self.assertRaises(UrlKeyError) as caught:
            load_or_create_key(key_path)
        self.assertIn("chmod 600", str(caught.exception))

    def test_signer_hides_its_key_and_checks_expiry_and_user(self) -> None:
        signer = UrlSigner(KEY)
        self.assertNotIn("k" * 8, repr(signer))
        signature = signer.signature("f" * 22, "file", "alice", 100)
        self.assertTrue(signer.check("f" * 22, "file", "alice", 100, signature, now=100))
        self.assertFalse(signer.check("f" * 22, "file", "alice", 100, signature, now=101))
        self.assertFalse(signer.check("f" * 22, "file", "bob", 100, signature, now=0))
        self.assertFalse(signer.check("g" * 22, "file", "alice", 100, signature, now=0))
        self.assertFalse(signer.check("f" * 22, "file", "alice", 100, "\udcff", now=0))

    def test_config(self) -> None:
        config = parse_config(
            "[node]\nid = n1\n[files]\nenabled = true\nchunk_size = 512KiB\n"
            "public_url = https://files.example.com/\nuser_quota = 0\n"
        ).files
        self.assertEqual(config.chunk_size, 512 * 1024)
        self.assertEqual(config.public_url, "https://files.example.com")
        self.assertEqual(config.user_quota, 0)
        defaults = parse_config("[node]\nid = n1\n").files
        self.assertEqual(
            (defaults.chunk_size, defaults.max_file_size, defaults.thumbnail_size),
            (1 << 20, 1 << 30, 256),
        )
        # Signed URLs are short-lived; deleted files are purged after a day.
        self.assertEqual((defaults.url_ttl, defaults.purge_grace), (3600, 86400))
        grace = parse_config("[node]\nid = n1\n[files]\npurge_grace = 0\n").files
        self.assertEqual(grace.purge_grace, 0)
        with self.assertRaises(ConfigError):
            parse_config("[node]\nid = n1\n[files]\npurge_grace = -1s\n")
        with self.assertRaises(ConfigError) as caught:
            parse_config("[node]\nid = n1\n[files]\nchunk_size = 1KiB\n")
        self.assertIn("[files] chunk_size", str(caught.exception))
        with self.assertRaises(ConfigError):
            parse_config("[node]\nid = n1\n[files]\npublic_url = ftp://x\n")
        with self.assertRaises(ConfigError):
            parse_config("[node]\nid = n1\n[files]\nenabled = true\nlisten = unix:/tmp/f.sock\n")


class RecordedPort:
    """A listening port that writes its closing into a journal."""

    def __init__(self, journal: list[str], host: Any) -> None:
        self.journal = journal
        self.host = host

    def getHost(self) -> Any:
        return self.host

    def stopListening(self) -> None:
        self.journal.append("port closed")


class HeldWork:
    """A pool runner that runs work at once until ``hold``; then keeps it waiting."""

    def __init__(self, journal: list[str]) -> None:
        self.journal = journal
        self.held: list[tuple[Any, Deferred[Any]]] = []
        self.holding = False

    def __call__(self, work: Any) -> Deferred[Any]:
        if not self.holding:
            return maybeDeferred(work)
        d: Deferred[Any] = Deferred()
        self.held.append((work, d))
        return d

    def release(self) -> None:
        for work, d in self.held:
            self.journal.append("held work done")
            maybeDeferred(work).chainDeferred(d)


class ListenerTests(SynchronousTestCase):
    def files_service(self, config: FilesConfig, runner: Any = run_now) -> Any:
        from twisted.internet.testing import MemoryReactorClock

        from cim.services.files import FilesService

        self.reactor = reactor = MemoryReactorClock()
        reactor.advance(1_700_000_000)
        self.data_dir = os.path.abspath(self.mktemp())
        self.database = database = Database("sqlite://", None, runner=run_now)
        self.successResultOf(database.start())
        self.addCleanup(database.stop)
        self.successResultOf(database.run(insert_user_txn, "alice", "scrypt$x", "person", 1.0))
        return FilesService(
            config, self.data_dir, database, MemoryState(reactor).sessions, reactor, runner=runner
        )

    def test_listener_sweeps_on_its_clock_and_stops(self) -> None:
        config = FilesConfig(
            enabled=True, listen="tcp:0", public_url="http://f.test", upload_expiry=120
        )
        files = self.files_service(config)
        reactor, database = self.reactor, self.database
        self.assertFalse(os.path.exists(self.data_dir))  # made at start, not with the tree
        self.assertEqual(
            [child.name for child in files.children()],
            ["files storage", "files listener", "files housekeeping"],
        )
        files.startService()
        self.successResultOf(files.when_ready())
        self.assertEqual(os.stat(files.key_path).st_mode & 0o777, 0o600)
        self.assertEqual(files.storage_dir, os.path.join(self.data_dir, "files"))
        self.assertEqual(len(reactor.tcpServers), 1)
        store = files.store
        self.assertEqual(store.public_url, "http://f.test")
        upload = self.successResultOf(
            Deferred.fromCoroutine(store.create_upload("alice", "a", 10, "0" * 32, None))
        )
        reactor.advance(121)  # past the expiry, and the sweep runs every 30 s
        self.assertIsNone(
            self.successResultOf(database.run(records.upload_txn, upload.id, reactor.seconds()))
        )
        self.assertEqual(store.metrics.uploads_expired, 1)
        self.successResultOf(files.stopService())
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_the_port_opens_after_the_storage_and_closes_before_the_pool_drains(self) -> None:
        from twisted.internet.address import IPv4Address

        journal: list[str] = []
        work = HeldWork(journal)
        files = self.files_service(FilesConfig(enabled=True, listen="tcp:0"), runner=work)
        reactor = self.reactor

        def listen(port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
            journal.append(f"listening, key there: {os.path.exists(files.key_path)}")
            return RecordedPort(journal, IPv4Address("TCP", "127.0.0.7", 8082))

        self.patch(reactor, "listenTCP", listen)
        files.startService()
        self.successResultOf(files.when_ready())
        self.assertEqual(journal, ["listening, key there: True"])
        # No public_url: the service names itself by the address it listens on.
        self.assertEqual(files.store.public_url, "http://127.0.0.7:8082")
        work.holding = True
        running = files.store.work.run(lambda: None)
        stopped = files.stopService()
        self.assertEqual(journal[1:], ["port closed"])
        self.assertNoResult(stopped)  # the pool waits for the work it was given
        work.release()
        self.successResultOf(running)
        self.successResultOf(stopped)
        self.assertEqual(journal[1:], ["port closed", "held work done"])

    def test_a_key_that_cannot_be_read_stops_the_start_before_the_port(self) -> None:
        from cim.services.tree import StartupError

        files = self.files_service(FilesConfig(enabled=True, listen="tcp:0"))
        os.makedirs(self.data_dir)
        with open(files.key_path, "w") as handle:
            handle.write("not a key\n")
        os.chmod(files.key_path, 0o600)
        files.startService()
        failure = self.failureResultOf(files.when_ready(), StartupError)
        self.assertEqual(
            failure.getErrorMessage(),
            f"[files] url_key: the URL signing key {files.key_path} is empty or malformed",
        )
        self.assertEqual(self.reactor.tcpServers, [])
