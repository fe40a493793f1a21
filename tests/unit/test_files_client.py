"""The client library against the real file service resource, in memory (treq's StubTreq).

The upload is interrupted the way a lost network interrupts it (every request fails
after some chunks), then run again with the same state file: the server's own count
shows that only the missing chunks came the second time.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost

from cim.client.files import (
    DestinationExists,
    FileClient,
    FileServiceError,
    ProofChallenge,
    UploadReport,
    UploadState,
)
from cim.client.media import media_message, media_summary
from cim.files.proof import proof_of
from cim.protocols import cim_pb2
from cim.storage.files_access import share_txn
from tests.unit.test_files import CHUNK, TOKENS, FileServiceTestCase, png_bytes, run_now


class CutAfter:
    """A treq stand-in whose network goes away after ``chunks`` chunk requests."""

    def __init__(self, inner: StubTreq, chunks: int) -> None:
        self.inner = inner
        self.left = chunks
        self.requests: list[tuple[str, str]] = []

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        self.requests.append((method, url))
        if method == "PUT":
            if self.left <= 0:
                d: Deferred[Any] = Deferred()
                d.errback(ConnectionLost("the network went away"))
                return d
            self.left -= 1
        return self.inner.request(method, url, **kwargs)  # type: ignore[attr-defined]

    def get(self, url: str, **kwargs: Any) -> Deferred[Any]:
        return self.request("GET", url, **kwargs)


class FileClientTests(FileServiceTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.stub = StubTreq(self.site.resource)
        self.resume = UploadState(os.path.join(os.path.abspath(self.mktemp()), "uploads.json"))
        self.path = os.path.join(os.path.abspath(self.mktemp()))
        os.makedirs(self.path)

    def client(self, http: Any = None, user: str = "alice") -> FileClient:
        return FileClient(
            self.clock,
            "http://files.test",
            TOKENS[user],
            user=user,
            parallel=4,
            http=http or self.stub,  # type: ignore[arg-type]
            blocking=run_now,
        )

    def settle(self, d: Deferred[Any]) -> None:
        """Pump the in-memory connections and the clock until ``d`` has fired."""
        for _ in range(1000):
            if d.called:
                return
            self.stub.flush()
            self.clock.advance(1)
        self.fail("the client never finished")

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.path, name)
        with open(path, "wb") as handle:
            handle.write(data)
        return path

    def send(self, client: FileClient, path: str, **kwargs: Any) -> Deferred[UploadReport]:
        d = Deferred.fromCoroutine(client.upload(path, state=self.resume, **kwargs))
        self.settle(d)
        return d

    def test_interrupted_upload_resumes_with_only_the_missing_chunks(self) -> None:
        data = os.urandom(CHUNK * 10 + 7)  # 11 chunks
        path = self.write("big.bin", data)
        cut = CutAfter(self.stub, chunks=5)
        failure = self.failureResultOf(self.send(self.client(cut), path), FileServiceError)
        self.assertEqual(failure.value.code, "unreachable")
        before = self.store.metrics.chunks_stored
        self.assertEqual(before, 5)
        self.assertEqual(len(self.resume._load()), 1)  # the upload id was kept

        report = self.successResultOf(self.send(self.client(), path))
        self.assertTrue(report.resumed)
        self.assertFalse(report.instant)
        self.assertEqual((report.chunks_sent, report.chunk_count), (6, 11))
        self.assertEqual(self.store.metrics.chunks_stored - before, 6)
        self.assertEqual(report.file.md5, hashlib.md5(data).hexdigest())
        self.assertEqual(report.file.size, len(data))
        self.assertEqual(self.resume._load(), {})
        sha = hashlib.sha256(data).hexdigest()
        with open(self.blobs.blob_path(sha), "rb") as handle:
            self.assertEqual(hashlib.md5(handle.read()).hexdigest(), report.file.md5)

        # Acceptance 2 through the client: the same file again sends nothing.
        again = self.successResultOf(self.send(self.client(), path))
        self.assertTrue(again.instant)
        self.assertEqual(again.chunks_sent, 0)
        self.assertEqual(again.file.file_id, report.file.file_id)
        self.assertEqual(self.store.metrics.chunks_stored - before, 6)
        # Another user with the same bytes: the client answers the challenge, and the
        # upload is instant for them too.
        theirs = self.successResultOf(self.send(self.client(user="bob"), path))
        self.assertTrue(theirs.instant)
        self.assertEqual(theirs.file.file_id, report.file.file_id)
        self.assertEqual(self.store.metrics.instant_uploads, 1)
        self.assertEqual(self.store.metrics.chunks_stored - before, 6)

    def test_a_changed_file_gets_no_instant_upload_from_someone_elses_content(self) -> None:
        """The proof is about the bytes: the same MD5 and size with other bytes fail it."""
        data = os.urandom(CHUNK * 2)
        stored = self.successResultOf(self.send(self.client(), self.write("f.bin", data)))
        pretender = self.client(user="bob")
        # Bob knows the MD5 and the size, not the bytes: he answers with his own.
        d = Deferred.fromCoroutine(pretender.check(stored.file.md5, len(data)))
        self.settle(d)
        challenge = self.successResultOf(d)
        self.assertIsInstance(challenge, ProofChallenge)
        assert isinstance(challenge, ProofChallenge)
        guess = proof_of(challenge.nonce, b"\0" * challenge.length)
        d2 = Deferred.fromCoroutine(pretender.prove(stored.file.md5, len(data), challenge, guess))
        self.settle(d2)
        self.assertIsNone(self.successResultOf(d2))
        self.assertEqual(self.store.metrics.proofs_failed, 1)

    def test_an_expired_upload_in_the_state_file_starts_afresh(self) -> None:
        data = os.urandom(CHUNK * 3)
        path = self.write("a.bin", data)
        self.failureResultOf(self.send(self.client(CutAfter(self.stub, 1)), path))
        self.clock.advance(self.config.upload_expiry + 10)
        report = self.successResultOf(self.send(self.client(), path))
        self.assertFalse(report.resumed)
        self.assertEqual(report.chunks_sent, 3)

    def test_several_chunks_are_in_flight_at_once(self) -> None:
        data = os.urandom(CHUNK * 8)
        path = self.write("b.bin", data)
        held: list[tuple[Deferred[Any], Deferred[Any]]] = []
        stub = self.stub

        class Holding:
            """Answers chunk requests only when the test lets them go."""

            def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
                inner: Deferred[Any] = stub.request(method, url, **kwargs)  # type: ignore[attr-defined]
                if method != "PUT":
                    return inner
                outer: Deferred[Any] = Deferred()
                held.append((inner, outer))
                return outer

        d = Deferred.fromCoroutine(self.client(Holding()).upload(path, state=self.resume))
        waves = []
        for _ in range(100):
            if d.called:
                break
            self.stub.flush()
            if held:
                waves.append(len(held))
                released, held[:] = list(held), []
                for inner, outer in released:
                    inner.chainDeferred(outer)
        self.successResultOf(d)
        self.assertEqual(waves, [4, 4])

    def test_image_message_and_download(self) -> None:
        image = png_bytes((200, 100))
        path = self.write("holiday.png", image)
        report = self.successResultOf(self.send(self.client(), path))
        stored = report.file
        self.assertEqual(stored.mime, "image/png")
        self.assertTrue(stored.thumbnail_url)
        message = media_message("bob", stored, "holiday.png")
        self.assertEqual(message.type, cim_pb2.IMAGE)
        self.assertEqual(message.to, "bob")
        self.assertEqual((message.media.width, message.media.height), (200, 100))
        self.assertEqual(message.media.file_id, stored.file_id)
        self.assertEqual(media_summary(message), "[image] holiday.png (" + self.size(image) + ")")
        group = media_message("team", stored, "holiday.png", group=True)
        self.assertEqual((group.group, group.to), ("team", ""))

        target = os.path.join(self.path, "out")
        os.makedirs(target)
        bob = self.client(user="bob")
        never_sent = Deferred.fromCoroutine(bob.download(stored.url, target))
        self.settle(never_sent)
        refused = self.failureResultOf(never_sent, FileServiceError)
        self.assertEqual((refused.value.status, refused.value.code), (404, "not_found"))
        # The IM node records the share when it takes the message; here by hand.
        shared = self.database.run(
            share_txn, [stored.file_id], "alice", "bob", "", self.clock.seconds()
        )
        self.assertTrue(self.successResultOf(shared))
        # Alice's signed URL is not Bob's: the client asks again without the signature.
        d = Deferred.fromCoroutine(bob.download(stored.signed_url, target))
        self.settle(d)
        saved, size = self.successResultOf(d)
        self.assertEqual(saved, os.path.join(target, "holiday.png"))
        with open(saved, "rb") as handle:
            self.assertEqual(handle.read(), image)
        self.assertEqual(size, len(image))

    def test_download_continues_a_partial_file(self) -> None:
        data = os.urandom(CHUNK * 2)
        report = self.successResultOf(self.send(self.client(), self.write("c.bin", data)))
        target = os.path.join(self.path, "copy.bin")
        with open(target + ".part", "wb") as handle:
            handle.write(data[:1000])
        d = Deferred.fromCoroutine(self.client().download(report.file.url, target))
        self.settle(d)
        self.assertEqual(self.successResultOf(d), (target, len(data)))
        with open(target, "rb") as handle:
            self.assertEqual(handle.read(), data)
        self.assertFalse(os.path.exists(target + ".part"))

    def test_download_does_not_replace_a_file_unless_asked(self) -> None:
        data = os.urandom(3000)
        report = self.successResultOf(self.send(self.client(), self.write("d.bin", data)))
        out = os.path.join(self.path, "out")
        os.makedirs(out)
        for target in (os.path.join(out, "mine.bin"), os.path.join(out, "d.bin")):
            with open(target, "wb") as handle:
                handle.write(b"precious")
            # A named file is checked before asking; a directory once the name is known.
            where = target if target.endswith("mine.bin") else out
            d = Deferred.fromCoroutine(self.client().download(report.file.url, where))
            self.settle(d)
            failure = self.failureResultOf(d, DestinationExists)
            self.assertEqual(str(failure.value), f"{target} already exists")
            with open(target, "rb") as handle:
                self.assertEqual(handle.read(), b"precious")
            self.assertFalse(os.path.exists(target + ".part"))
            d = Deferred.fromCoroutine(
                self.client().download(report.file.url, where, overwrite=True)
            )
            self.settle(d)
            self.assertEqual(self.successResultOf(d), (target, len(data)))
            with open(target, "rb") as handle:
                self.assertEqual(handle.read(), data)

    def test_download_into_a_stream(self) -> None:
        data = os.urandom(CHUNK + 10)
        report = self.successResultOf(self.send(self.client(), self.write("e.bin", data)))
        stream = io.BytesIO()
        d = Deferred.fromCoroutine(self.client().download_to(report.file.url, stream))
        self.settle(d)
        self.assertEqual(self.successResultOf(d), len(data))
        self.assertEqual(stream.getvalue(), data)
        self.assertEqual([n for n in os.listdir(self.path) if n.endswith(".part")], [])

    def test_refusals_are_reported_with_their_code(self) -> None:
        path = self.write("huge.bin", b"x")
        self.config_quota_exhausted()
        failure = self.failureResultOf(self.send(self.client(), path), FileServiceError)
        self.assertEqual((failure.value.status, failure.value.code), (403, "quota_exceeded"))
        self.assertNotIn(TOKENS["alice"], repr(self.client()))

    def config_quota_exhausted(self) -> None:
        for n in range(4):
            response = self.post_json(
                "/api/v1/uploads", {"name": "x", "size": 1 << 20, "md5": f"{n:032x}"}
            )
            self.assertEqual(response.status, 201)

    @staticmethod
    def size(data: bytes) -> str:
        return f"{len(data) / 1024:.1f} KiB" if len(data) >= 1024 else f"{len(data)} B"
