"""Push registrations: storage, /api/v1/devices/me/push, PUSH_R, the operation log."""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from cim.oplog import OperationLog
from cim.protocols import cim_pb2
from cim.push.frames import PushRequests
from cim.push.registrations import Registrations, registration_problem
from cim.storage.push import (
    registrations_of_txn,
    remove_dead_token_txn,
    set_registration_txn,
)
from tests.fakes.logic import LogicHarness, fired
from tests.fakes.node import NodeHarness
from tests.unit.test_client_session import make_client, settle

APNS_TOKEN = "ab" * 32
FCM_TOKEN = "fcm-token:" + "x" * 40


def push_harness(
    test: SynchronousTestCase, enabled: bool = True, providers: tuple[str, ...] = ("apns", "fcm")
) -> tuple[LogicHarness, Registrations, str]:
    h = LogicHarness(test)
    log_path = os.path.abspath(test.mktemp())
    oplog = OperationLog(log_path, "node1", h.clock.seconds)
    oplog.open()
    test.addCleanup(oplog.close)
    registrations = Registrations(h.db, h.clock, enabled, providers, oplog)
    h.serve_push(registrations)
    return h, registrations, log_path


def oplog_lines(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


class StorageTests(SynchronousTestCase):
    def test_register_replace_and_dead_token(self) -> None:
        h, _, _ = push_harness(self)
        h.add_user("alice")
        run = h.db.run
        first = fired(run(set_registration_txn, "alice", "phone", "apns", "aa", None, "en", 1.0))
        self.assertEqual((first.provider, first.token, first.created_at), ("apns", "aa", 1.0))
        again = fired(run(set_registration_txn, "alice", "phone", "fcm", "bb", "app", None, 2.0))
        self.assertEqual((again.provider, again.token, again.created_at), ("fcm", "bb", 1.0))
        self.assertEqual(again.updated_at, 2.0)
        # A dead answer for the old token leaves the new one alone.
        self.assertFalse(fired(run(remove_dead_token_txn, "alice", "phone", "aa")))
        self.assertTrue(fired(run(remove_dead_token_txn, "alice", "phone", "bb")))
        self.assertEqual(fired(run(registrations_of_txn, "alice")), [])

    def test_no_such_user(self) -> None:
        h, _, _ = push_harness(self)
        self.assertIsNone(
            fired(h.db.run(set_registration_txn, "ghost", "phone", "apns", "aa", None, None, 1.0))
        )

    def test_account_deletion_ends_its_registrations(self) -> None:
        h, registrations, _ = push_harness(self)
        h.add_user("alice", password="Correct-horse-1")
        fired(Deferred.fromCoroutine(registrations.register("alice", "phone", "apns", APNS_TOKEN)))
        fired(h.accounts.delete_user("alice"))
        self.assertEqual(fired(registrations.of_user("alice")), [])

    def test_a_logout_of_the_device_ends_its_registration_only(self) -> None:
        h, registrations, log_path = push_harness(self)
        h.add_user("alice")
        for device in ("phone", "tablet"):
            fired(
                Deferred.fromCoroutine(registrations.register("alice", device, "apns", APNS_TOKEN))
            )
        fired(Deferred.fromCoroutine(registrations.signed_out("alice", "phone", "10.0.0.1")))
        fired(Deferred.fromCoroutine(registrations.signed_out("alice", "watch", "10.0.0.1")))
        left = fired(registrations.of_user("alice"))
        self.assertEqual([r.device for r in left], ["tablet"])
        removed = [line for line in oplog_lines(log_path) if line["event"] == "push.removed"]
        self.assertEqual(len(removed), 1)
        detail = removed[0]["detail"]
        self.assertEqual((detail["device"], detail["reason"]), ("phone", "logout"))


class ValidationTests(SynchronousTestCase):
    def test_problems(self) -> None:
        self.assertIsNone(registration_problem("apns", APNS_TOKEN, "com.example.watch", "zh-CN"))
        self.assertIsNone(registration_problem("fcm", FCM_TOKEN, None, None))
        self.assertIsNone(registration_problem("webhook", "opaque-1", None, None))
        self.assertIn("provider", registration_problem("gcm", "x", None, None) or "")
        self.assertIn("token", registration_problem("apns", "not hex", None, None) or "")
        self.assertIn("token", registration_problem("webhook", "has space", None, None) or "")
        self.assertIn("locale", registration_problem("apns", APNS_TOKEN, None, "!!") or "")
        self.assertIn("app", registration_problem("apns", APNS_TOKEN, "a b", None) or "")


class HttpTests(SynchronousTestCase):
    def test_put_show_delete(self) -> None:
        h, registrations, log_path = push_harness(self)
        h.add_user("alice")
        status, body = h.call(
            "PUT",
            "/devices/me/push",
            "alice",
            {"provider": "apns", "token": APNS_TOKEN, "app": "com.example.watch", "locale": "zh"},
        )
        self.assertEqual(status, 200, body)
        self.assertEqual(
            (body["device"], body["provider"], body["token"], body["locale"]),
            ("phone", "apns", APNS_TOKEN, "zh"),
        )
        status, shown = h.call("GET", "/devices/me/push", "alice")
        self.assertEqual((status, shown["token"]), (200, APNS_TOKEN))
        stored = fired(registrations.of_user("alice"))
        self.assertEqual([(r.device, r.provider) for r in stored], [("phone", "apns")])
        status, removed = h.call("DELETE", "/devices/me/push", "alice")
        self.assertEqual((status, removed), (200, {"device": "phone", "removed": True}))
        status, body = h.call("DELETE", "/devices/me/push", "alice")
        self.assertEqual((status, body["error"]), (404, "not_registered"))
        status, body = h.call("GET", "/devices/me/push", "alice")
        self.assertEqual(status, 404)
        events = oplog_lines(log_path)
        self.assertEqual([e["event"] for e in events], ["push.registered", "push.removed"])
        self.assertEqual(events[0]["user"], "alice")
        self.assertEqual(events[0]["detail"]["device"], "phone")
        with open(log_path, encoding="utf-8") as handle:
            self.assertNotIn(APNS_TOKEN, handle.read())

    def test_refusals(self) -> None:
        h, _, _ = push_harness(self)
        h.add_user("alice")
        cases: list[tuple[dict[str, Any], int, str]] = [
            ({"provider": "gcm", "token": "x"}, 400, ""),
            ({"provider": "apns"}, 400, ""),
            ({"provider": "apns", "token": APNS_TOKEN, "device": "other"}, 400, ""),
            ({"provider": "apns", "token": "zz"}, 400, "bad_registration"),
            ({"provider": "webhook", "token": "abc"}, 400, "provider_unavailable"),
        ]
        for body, status, error in cases:
            got, answer = h.call("PUT", "/devices/me/push", "alice", body)
            self.assertEqual(got, status, (body, answer))
            if error:
                self.assertEqual(answer["error"], error)
        status, _ = h.call("PUT", "/devices/me/push", None, {"provider": "apns", "token": "a"})
        self.assertEqual(status, 401)

    def test_disabled(self) -> None:
        h, _, _ = push_harness(self, enabled=False)
        h.add_user("alice")
        status, body = h.call(
            "PUT", "/devices/me/push", "alice", {"provider": "apns", "token": APNS_TOKEN}
        )
        self.assertEqual((status, body["error"]), (403, "push_disabled"))


class FrameTests(SynchronousTestCase):
    def ask(self, room: PushRequests, **op: Any) -> cim_pb2.PushAnswer:
        request = cim_pb2.PushRequest(request_id=7, **op)
        answer: cim_pb2.PushAnswer = fired(
            Deferred.fromCoroutine(room.answer("alice", "tablet", request))
        )
        self.assertEqual(answer.request_id, 7)
        return answer

    def test_register_show_remove(self) -> None:
        h, registrations, _ = push_harness(self)
        h.add_user("alice")
        room = PushRequests(registrations)
        self.assertIn(cim_pb2.PUSH_R, room.frame_table())
        wanted = cim_pb2.PushRegistration(provider="fcm", token=FCM_TOKEN, locale="en")
        answer = self.ask(room, register=wanted)
        self.assertTrue(answer.ok and answer.registered, answer)
        self.assertEqual(answer.registration.token, FCM_TOKEN)
        shown = self.ask(room, show=cim_pb2.PushShow())
        self.assertEqual((shown.registered, shown.registration.provider), (True, "fcm"))
        stored = fired(registrations.of_user("alice"))
        self.assertEqual([r.device for r in stored], ["tablet"])
        self.assertTrue(self.ask(room, remove=cim_pb2.PushRemove()).registered)
        self.assertFalse(self.ask(room, remove=cim_pb2.PushRemove()).registered)
        self.assertFalse(self.ask(room, show=cim_pb2.PushShow()).registered)

    def test_refusals_are_answers(self) -> None:
        h, registrations, _ = push_harness(self)
        h.add_user("alice")
        room = PushRequests(registrations)
        bad = self.ask(room, register=cim_pb2.PushRegistration(provider="apns", token="zz"))
        self.assertEqual((bad.ok, bad.error), (False, "bad_registration"))
        empty = self.ask(room)
        self.assertEqual((empty.ok, empty.error), (False, "bad_request"))


class CacheTests(SynchronousTestCase):
    def test_of_users_remembers_answers_for_a_while(self) -> None:
        h, registrations, _ = push_harness(self)
        for name in ("alice", "bob"):
            h.add_user(name)
        self.assertFalse(registrations.known_unregistered("alice"))  # not asked yet
        self.assertEqual(fired(registrations.of_users(["alice", "bob"])), [])
        self.assertEqual(fired(registrations.of_users(["alice", "bob"])), [])
        self.assertEqual(registrations.reads, 1)
        self.assertTrue(registrations.known_unregistered("bob"))
        # A change through this node is seen at once.
        fired(Deferred.fromCoroutine(registrations.register("bob", "phone", "apns", APNS_TOKEN)))
        self.assertFalse(registrations.known_unregistered("bob"))
        self.assertEqual([r.user for r in fired(registrations.of_users(["alice", "bob"]))], ["bob"])
        self.assertEqual(registrations.reads, 2)
        # One made elsewhere (straight into the database) after the TTL.
        fired(h.db.run(set_registration_txn, "alice", "phone", "fcm", FCM_TOKEN, None, None, 1.0))
        self.assertEqual([r.user for r in fired(registrations.of_users(["alice"]))], [])
        self.assertTrue(registrations.known_unregistered("alice"))
        h.clock.advance(11)
        self.assertFalse(registrations.known_unregistered("alice"))  # too old to say
        self.assertEqual([r.user for r in fired(registrations.of_users(["alice"]))], ["alice"])


class ClientLibraryTests(SynchronousTestCase):
    def test_push_request_over_the_connection(self) -> None:
        h, registrations, _ = push_harness(self)
        h.add_user("alice")
        node = NodeHarness(
            database=h.db, users=("alice",), more_rooms=[PushRequests(registrations)]
        )
        client, _, _ = make_client(node, "alice")
        client.start()
        settle(node)
        wanted = cim_pb2.PushRegistration(provider="apns", token=APNS_TOKEN)
        d = client.push_request(cim_pb2.PushRequest(register=wanted))
        settle(node)
        answer = self.successResultOf(d)
        self.assertTrue(answer.ok, answer)
        self.assertEqual(answer.registration.token, APNS_TOKEN)
        stored = fired(registrations.of_user("alice"))
        self.assertEqual([(r.device, r.provider) for r in stored], [("phone", "apns")])
