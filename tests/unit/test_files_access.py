"""Files belong to someone (issue 17): who reads a file, instant upload with a proof of
possession, deleting, the purge, and what deleting an account takes.

The same in-memory service as ``tests.unit.test_files``; shares are recorded with the
transaction the IM node uses (``share_txn``), groups and accounts with their own.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from cim.backends.state.memory import MemoryState
from cim.config import FilesConfig
from cim.files import records
from cim.files.proof import PROOF_RANGE, proof_of
from cim.files.purge import PurgeReport
from cim.json_convention import iso_time
from cim.services.files import FilesService, purge_interval
from cim.storage.accounts import delete_user_txn, insert_user_txn
from cim.storage.database import Database
from cim.storage.files_access import may_read_txn, share_txn
from cim.storage.groups import create_group_txn, remove_members_txn
from cim.storage.profiles import delete_account_txn
from cim.storage.schema import file_refs, files, uploads
from tests.fakes.contacts import befriend_txn
from tests.unit.test_files import CHUNK, FileServiceTestCase, md5_hex, png_bytes, run_now


def used_txn(connection: Connection, user: str) -> int:
    return records.used_bytes_txn(connection, user)


def holdings_txn(connection: Connection, user: str) -> list[tuple[str, float | None]]:
    rows = connection.execute(
        select(file_refs.c.file_id, file_refs.c.deleted_at).where(file_refs.c.user_name == user)
    ).all()
    return [(row.file_id, row.deleted_at) for row in rows]


class AccessTestCase(FileServiceTestCase):
    def run_txn(self, txn: Any, *args: Any) -> Any:
        return self.successResultOf(self.database.run(txn, *args))

    def share(self, file_id: str, sender: str, to: str = "", group: str = "") -> bool:
        return bool(self.run_txn(share_txn, [file_id], sender, to, group, self.clock.seconds()))

    def purge(self) -> PurgeReport:
        return self.successResultOf(Deferred.fromCoroutine(self.store.purge()))

    def download(self, file_id: str, user: str) -> Any:
        return self.call("GET", f"/files/{file_id}", user=user)

    def blob_exists(self, data: bytes) -> bool:
        return os.path.exists(self.blobs.blob_path(hashlib.sha256(data).hexdigest()))


class ReadingTests(AccessTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.data = os.urandom(CHUNK + 100)
        self.file = self.stored(self.data, name="diary.txt", mime="text/plain")
        self.file_id = self.file["file_id"]

    def test_a_user_never_sent_the_file_cannot_read_it_with_or_without_the_md5(self) -> None:
        """Acceptance 4: another user cannot download a file they were never sent."""
        self.assertEqual(self.download(self.file_id, "alice").body, self.data)
        refused = self.download(self.file_id, "eve")
        self.assertError(refused, 404, "not_found")
        thumb = self.call("GET", f"/files/{self.file_id}/thumbnail", user="eve")
        self.assertError(thumb, 404, "not_found")
        described = self.call("GET", f"/api/v1/files/{self.file_id}", user="eve")
        self.assertError(described, 404, "not_found")
        # Alice's own signed URL, with Eve's token: refused before anything else.
        self.assertError(self.get_url(self.file["signed_url"], user="eve"), 403, "bad_signature")
        # With the MD5 and the size: a challenge, and nothing about the file.
        asked = self.post_json(
            "/api/v1/files/check", {"md5": md5_hex(self.data), "size": len(self.data)}, "eve"
        )
        self.assertEqual(set(asked.json()), {"challenge"})
        self.assertNotIn(self.file_id, asked.body.decode())
        self.assertError(self.download(self.file_id, "eve"), 404, "not_found")
        self.assertEqual(self.run_txn(holdings_txn, "eve"), [])

    def test_the_receiver_of_a_one_to_one_message_reads_it_and_only_they(self) -> None:
        self.assertTrue(self.share(self.file_id, "alice", to="bob"))
        self.assertEqual(self.download(self.file_id, "bob").body, self.data)
        described = self.call("GET", f"/api/v1/files/{self.file_id}", user="bob").json()
        self.assertEqual(self.get_url(described["signed_url"], user="bob").body, self.data)
        self.assertError(self.download(self.file_id, "eve"), 404, "not_found")
        # Bob forwards it to Eve: he may, because he may read it.
        self.assertTrue(self.share(self.file_id, "bob", to="eve"))
        self.assertEqual(self.download(self.file_id, "eve").body, self.data)

    def test_a_sender_cannot_share_a_file_they_cannot_read(self) -> None:
        self.assertFalse(self.share(self.file_id, "eve", to="bob"))
        self.assertError(self.download(self.file_id, "bob"), 404, "not_found")
        # Eve would have read it herself, as a participant: nothing was recorded.
        self.assertError(self.download(self.file_id, "eve"), 404, "not_found")
        self.assertFalse(self.share("0" * 22, "alice", to="bob"))

    def test_group_files_are_read_by_the_current_members(self) -> None:
        group_id = "g" * 26
        # Contacts, so that bob is added at once rather than invited (docs/privacy.md).
        self.run_txn(befriend_txn, "alice", "bob")
        self.run_txn(
            create_group_txn, group_id, "team", "alice", ["bob"], self.clock.seconds(), 100
        )
        self.assertError(self.download(self.file_id, "bob"), 404, "not_found")
        self.assertTrue(self.share(self.file_id, "alice", group=group_id))
        self.assertEqual(self.download(self.file_id, "bob").body, self.data)
        self.assertError(self.download(self.file_id, "eve"), 404, "not_found")
        self.run_txn(remove_members_txn, group_id, "alice", ["bob"])
        self.assertError(self.download(self.file_id, "bob"), 404, "not_found")


class DatabaseDownTests(AccessTestCase):
    def test_a_database_that_does_not_answer_is_503_not_a_traceback(self) -> None:
        file_id = self.stored(os.urandom(100))["file_id"]
        self.successResultOf(self.database.stop())
        for method, path in (("GET", f"/files/{file_id}"), ("DELETE", f"/api/v1/files/{file_id}")):
            response = self.call(method, path)
            self.assertError(response, 503, "database_unavailable")
            self.assertEqual(response.headers["retry-after"], "5")


class InstantUploadTests(AccessTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.data = os.urandom(PROOF_RANGE + 3 * CHUNK)  # larger than one proof range
        self.file = self.stored(self.data)
        self.content = {"md5": md5_hex(self.data), "size": len(self.data)}

    def ask(self, user: str = "bob") -> dict[str, Any]:
        answer = self.post_json("/api/v1/files/check", self.content, user).json()
        challenge: dict[str, Any] = answer["challenge"]
        return challenge

    def prove(self, challenge: dict[str, Any], proof: str, user: str = "bob") -> Any:
        return self.post_json(
            "/api/v1/files/check",
            {**self.content, "challenge": challenge["token"], "proof": proof},
            user,
        )

    def test_instant_upload_without_proof_of_possession_links_nothing(self) -> None:
        """Acceptance 4: instant upload without proof of possession links nothing."""
        challenge = self.ask()
        self.assertEqual(challenge["length"], PROOF_RANGE)
        self.assertLessEqual(challenge["offset"] + challenge["length"], len(self.data))
        # Nothing but the MD5 and size: no proof, a guessed proof, the wrong bytes.
        no_proof = self.post_json(
            "/api/v1/files/check", {**self.content, "challenge": challenge["token"]}, "bob"
        )
        self.assertError(no_proof, 400, "bad_request")
        self.assertEqual(self.prove(challenge, "0" * 64).json(), {"exists": False})
        other_bytes = proof_of(challenge["nonce"], os.urandom(challenge["length"]))
        self.assertEqual(self.prove(challenge, other_bytes).json(), {"exists": False})
        # Alice holds it: she gets it without a challenge.
        alices = self.post_json("/api/v1/files/check", self.content, "alice").json()
        self.assertEqual(alices["file_id"], self.file["file_id"])
        # Someone else's challenge, an altered one, an expired one.
        eves = self.ask("eve")
        right_for_eve = self.proof_for(eves)
        self.assertError(self.prove(eves, right_for_eve), 400, "bad_challenge")
        altered = dict(challenge, token=challenge["token"].replace(".", ".1", 1))
        self.assertError(self.prove(altered, self.proof_for(challenge)), 400, "bad_challenge")
        self.assertEqual(self.run_txn(holdings_txn, "bob"), [])
        self.assertEqual(self.run_txn(used_txn, "bob"), 0)
        self.assertError(self.download(self.file["file_id"], "bob"), 404, "not_found")
        self.assertEqual(self.store.metrics.proofs_failed, 2)
        self.clock.advance(121)
        self.assertError(self.prove(challenge, self.proof_for(challenge)), 400, "challenge_expired")
        # The right bytes: linked, the same file, in Bob's quota, readable by him.
        fresh = self.ask()
        linked = self.prove(fresh, self.proof_for(fresh)).json()
        self.assertTrue(linked["exists"])
        self.assertEqual(linked["file_id"], self.file["file_id"])
        self.assertEqual(self.run_txn(used_txn, "bob"), len(self.data))
        self.assertEqual(self.download(self.file["file_id"], "bob").body, self.data)
        self.assertEqual(self.store.metrics.instant_uploads, 1)

    def proof_for(self, challenge: dict[str, Any]) -> str:
        start = challenge["offset"]
        return proof_of(challenge["nonce"], self.data[start : start + challenge["length"]])

    def test_a_challenge_does_not_tell_whether_the_content_is_stored(self) -> None:
        stored = self.ask()
        unknown = self.post_json(
            "/api/v1/files/check", {"md5": "0" * 32, "size": len(self.data)}, "bob"
        ).json()["challenge"]
        self.assertEqual(set(stored), set(unknown))
        self.assertEqual(stored["length"], unknown["length"])

    def test_the_proof_picks_the_file_whose_bytes_it_proves(self) -> None:
        """Two stored files with the same MD5 and size (a collision someone made)."""
        fake_sha = "f" * 64
        self.run_txn(insert_colliding_file_txn, self.file["file_id"], fake_sha)
        os.makedirs(os.path.dirname(self.blobs.blob_path(fake_sha)), exist_ok=True)
        with open(self.blobs.blob_path(fake_sha), "wb") as handle:
            handle.write(os.urandom(len(self.data)))
        challenge = self.ask()
        linked = self.prove(challenge, self.proof_for(challenge)).json()
        self.assertEqual(linked["file_id"], self.file["file_id"])


def insert_colliding_file_txn(connection: Connection, like: str, sha256: str) -> None:
    row = connection.execute(select(files).where(files.c.id == like)).one()
    values = dict(row._mapping, id="C" * 22, sha256=sha256, created_at=row.created_at - 1)
    connection.execute(insert(files).values(**values))


class DeleteAndPurgeTests(AccessTestCase):
    def test_a_deleted_file_is_purged_after_the_grace_period_and_the_quota_freed(self) -> None:
        """Acceptance 4: a deleted file's blob is purged after the grace period."""
        data = png_bytes((300, 200))
        file = self.stored(data, name="a.png", mime="image/png")
        sha = hashlib.sha256(data).hexdigest()
        thumbnail = self.blobs.thumbnail_path(sha, "jpeg")
        self.assertTrue(os.path.exists(thumbnail))
        self.assertEqual(self.run_txn(used_txn, "alice"), len(data))
        deleted = self.call("DELETE", f"/api/v1/files/{file['file_id']}")
        self.assertEqual(deleted.status, 200, deleted.body)
        grace = self.config.purge_grace
        self.assertEqual(
            deleted.json(),
            {
                "file_id": file["file_id"],
                "readable": False,
                "shared": False,
                "quota_freed_at": iso_time(self.clock.seconds() + grace),
            },
        )
        self.assertError(self.download(file["file_id"], "alice"), 404, "not_found")
        again = self.call("DELETE", f"/api/v1/files/{file['file_id']}")
        self.assertError(again, 404, "not_found")
        # Within the grace period: the quota still counts it and the bytes are there.
        self.clock.advance(grace - 1)
        self.assertEqual(self.purge(), PurgeReport(0, 0, 0))
        self.assertEqual(self.run_txn(used_txn, "alice"), len(data))
        self.assertTrue(self.blob_exists(data))
        self.clock.advance(2)
        self.assertEqual(self.purge(), PurgeReport(1, 1, len(data)))
        self.assertEqual(self.run_txn(used_txn, "alice"), 0)
        self.assertFalse(self.blob_exists(data))
        self.assertFalse(os.path.exists(thumbnail))
        self.assertEqual(self.files_on_disk("tmp"), [])
        self.assertIsNone(self.run_txn(records.file_txn, file["file_id"]))
        self.assertEqual(self.store.metrics.files_purged, 1)

    def test_undeleting_within_the_grace_period_by_uploading_again(self) -> None:
        data = os.urandom(CHUNK)
        file = self.stored(data)
        self.call("DELETE", f"/api/v1/files/{file['file_id']}")
        again = self.stored(data)
        self.assertEqual(again["file_id"], file["file_id"])
        self.clock.advance(self.config.purge_grace + 1)
        self.assertEqual(self.purge().files, 0)
        self.assertEqual(self.download(file["file_id"], "alice").body, data)

    def test_deleting_is_for_the_caller_the_others_keep_their_copies(self) -> None:
        data = os.urandom(CHUNK)
        file_id = self.stored(data)["file_id"]
        self.assertTrue(self.share(file_id, "alice", to="bob"))
        self.assertError(
            self.call("DELETE", f"/api/v1/files/{file_id}", user="eve"), 404, "not_found"
        )
        deleted = self.call("DELETE", f"/api/v1/files/{file_id}").json()
        self.assertEqual((deleted["shared"], deleted["readable"]), (True, False))
        self.assertError(self.download(file_id, "alice"), 404, "not_found")
        self.assertEqual(self.download(file_id, "bob").body, data)
        self.clock.advance(self.config.purge_grace + 1)
        self.assertEqual(self.purge(), PurgeReport(1, 0, 0))  # Alice's quota only
        self.assertEqual(self.download(file_id, "bob").body, data)
        # Bob deletes his copy, which he never held: nothing of his quota.
        bobs = self.call("DELETE", f"/api/v1/files/{file_id}", user="bob").json()
        self.assertNotIn("quota_freed_at", bobs)
        self.assertFalse(bobs["shared"])
        self.assertEqual(self.purge().files, 1)
        self.assertFalse(self.blob_exists(data))

    def test_a_group_copy_stays_with_the_group(self) -> None:
        data = os.urandom(CHUNK)
        file_id = self.stored(data)["file_id"]
        self.run_txn(befriend_txn, "alice", "bob")
        self.run_txn(create_group_txn, "h" * 26, "team", "alice", ["bob"], 1.0, 100)
        self.assertTrue(self.share(file_id, "alice", group="h" * 26))
        refused = self.call("DELETE", f"/api/v1/files/{file_id}", user="bob")
        self.assertIn("group", self.assertError(refused, 404, "not_found")["message"])
        deleted = self.call("DELETE", f"/api/v1/files/{file_id}").json()
        self.assertEqual((deleted["readable"], deleted["shared"]), (True, True))
        self.clock.advance(self.config.purge_grace + 1)
        self.assertEqual(self.purge().files, 0)
        self.assertEqual(self.download(file_id, "bob").body, data)

    def test_content_uploaded_again_while_it_is_purged_is_put_back(self) -> None:
        data = os.urandom(CHUNK)
        file_id = self.stored(data)["file_id"]
        self.call("DELETE", f"/api/v1/files/{file_id}")
        self.clock.advance(self.config.purge_grace + 1)
        original = self.blobs.set_aside

        def meanwhile(sha256: str, thumbnail: str | None) -> list[tuple[str, str]]:
            moved = original(sha256, thumbnail)
            self.create(data, user="bob")  # an upload of the same bytes starts
            return moved

        self.blobs.set_aside = meanwhile  # type: ignore[method-assign]
        self.purge()
        self.assertTrue(self.blob_exists(data))
        self.assertEqual(self.files_on_disk("tmp"), [])

    def test_an_upload_of_the_same_content_keeps_an_unreferenced_file(self) -> None:
        data = os.urandom(CHUNK)
        file_id = self.stored(data)["file_id"]
        self.call("DELETE", f"/api/v1/files/{file_id}")
        upload = self.create(data, user="bob")
        self.clock.advance(self.config.purge_grace / 2)
        self.put_chunk(upload["upload_id"], 0, data, user="bob")
        self.clock.advance(self.config.purge_grace / 2 + 1)
        self.assertEqual(self.purge(), PurgeReport(1, 0, 0))  # only Alice's quota
        done = self.call("POST", f"/api/v1/uploads/{upload['upload_id']}/complete", user="bob")
        self.assertEqual(done.json()["file_id"], file_id)
        self.assertEqual(self.download(file_id, "bob").body, data)


class AccountDeletionTests(AccessTestCase):
    def test_deleting_an_account_removes_its_unshared_files(self) -> None:
        """Acceptance 4: shared copies stay for the other participants."""
        private, sent = os.urandom(CHUNK), os.urandom(CHUNK + 1)
        private_id = self.stored(private)["file_id"]
        sent_id = self.stored(sent)["file_id"]
        self.assertTrue(self.share(sent_id, "alice", to="bob"))
        pending = self.create(os.urandom(10))
        deleted = self.run_txn(delete_account_txn, "alice", self.clock.seconds())
        self.assertIsNotNone(deleted)
        self.assertEqual(self.purge().files, 1)  # at once: nobody may read it
        self.assertFalse(self.blob_exists(private))
        self.assertIsNone(self.run_txn(records.file_txn, private_id))
        self.assertTrue(self.blob_exists(sent))
        self.assertEqual(self.download(sent_id, "bob").body, sent)
        self.assertEqual(self.run_txn(remaining_uploads_txn, pending["upload_id"]), [])
        # Whoever registers the name next gets nothing of it.
        self.run_txn(insert_user_txn, "alice", "scrypt$y", "person", 2.0)
        self.assertFalse(self.run_txn(may_read_txn, sent_id, "alice"))
        # Bob's account goes too (through cimctl's path): nobody is left to read it.
        self.assertTrue(self.run_txn(delete_user_txn, "bob"))
        self.assertEqual(self.purge().files, 1)
        self.assertFalse(self.blob_exists(sent))


def remaining_uploads_txn(connection: Connection, upload_id: str) -> list[str]:
    return list(connection.execute(select(uploads.c.id).where(uploads.c.id == upload_id)).scalars())


class PurgeJobTests(SynchronousTestCase):
    def test_the_purge_runs_on_the_services_clock(self) -> None:
        reactor = MemoryReactorClock()
        reactor.advance(1_700_000_000)
        database = Database("sqlite://", None, runner=run_now)
        self.successResultOf(database.start())
        self.addCleanup(database.stop)
        self.successResultOf(database.run(insert_user_txn, "alice", "scrypt$x", "person", 1.0))
        config = FilesConfig(
            enabled=True, listen="tcp:0", public_url="http://f.test", purge_grace=86400
        )
        self.assertEqual(purge_interval(config), 3600)
        self.assertEqual(purge_interval(FilesConfig(purge_grace=0)), 60)
        files = FilesService(
            config,
            os.path.abspath(self.mktemp()),
            database,
            MemoryState(reactor).sessions,
            reactor,
            runner=run_now,
        )
        files.startService()
        self.successResultOf(files.when_ready())
        self.addCleanup(lambda: self.successResultOf(files.stopService()))
        store = files.store
        upload = self.successResultOf(
            Deferred.fromCoroutine(store.create_upload("alice", "a", 5, md5_hex(b"hello"), None))
        )
        blobs = store.blobs
        path = blobs.chunk_path(upload.id, 0)
        os.makedirs(os.path.dirname(path))
        with open(path, "wb") as handle:
            handle.write(b"hello")
        self.successResultOf(
            database.run(records.record_chunk_txn, upload.id, 0, 5, reactor.seconds(), 2e9)
        )
        record = self.successResultOf(Deferred.fromCoroutine(store.complete("alice", upload.id)))
        self.successResultOf(Deferred.fromCoroutine(store.delete("alice", record.id)))
        blob = blobs.blob_path(record.sha256)
        reactor.advance(86400)
        self.assertTrue(os.path.exists(blob))
        reactor.advance(3600)
        self.assertFalse(os.path.exists(blob))
        self.assertEqual(store.metrics.files_purged, 1)
