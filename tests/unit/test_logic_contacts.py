"""Contacts, blocks and privacy settings over the logic service's HTTP API.

The same ContactBook as CONTACTS_R (tests/unit/test_contacts*.py), behind the
declared endpoints of cim.logic.http.contacts, on a LogicHarness: real SQLite, a
real IM node whose clients receive the notices.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from cim.im.contacts import book_proto
from cim.json_convention import iso_time
from cim.logic.http.contacts import contact_list_json
from cim.logic.openapi import document
from cim.scripts import contact_commands
from cim.storage.contacts import ContactList, ContactRecord, PendingRecord, Settings
from tests.fakes.logic import PASSWORD, LogicHarness, fired
from tests.unit.test_contacts import bind_txn


class ContactApiTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = LogicHarness(self)
        for name in ("alice", "bob", "carol", "mum", "stranger"):
            self.h.add_user(name)
        self.h.add_user("watch", kind="device")
        fired(self.h.db.run(bind_txn, "watch", "mum"))

    def test_request_accept_and_list(self) -> None:
        h = self.h
        h.connect("bob")
        self.assertEqual(
            h.call("POST", "/contacts/bob", "alice"), (200, {"user": "bob", "status": "requested"})
        )
        [notice] = h.notices("bob", "contact.requested")
        self.assertEqual((notice["from"], notice["to"]), ("alice", "bob"))
        status, listed = h.call("GET", "/contacts", "bob")
        self.assertEqual(status, 200)
        asked_at = iso_time(h.clock.seconds())
        self.assertEqual(
            listed,
            {
                "items": [{"user": "alice", "state": "incoming", "requested_at": asked_at}],
                "messages": "everyone",
                "group_adds": "contacts",
                "read_receipts": "on",
            },
        )
        self.assertEqual(
            h.call("POST", "/contacts/alice/accept", "bob"),
            (200, {"user": "alice", "status": "accepted"}),
        )
        status, listed = h.call("GET", "/contacts", "alice")
        added_at = iso_time(h.clock.seconds())
        self.assertEqual(
            listed["items"], [{"user": "bob", "state": "contact", "added_at": added_at}]
        )
        self.assertEqual(
            h.call("DELETE", "/contacts/bob", "alice"), (200, {"user": "bob", "status": "removed"})
        )
        status, body = h.call("DELETE", "/contacts/bob", "alice")
        self.assertEqual((status, body["error"]), (404, "not_found"))

    def test_a_guardian_answers_for_the_watch(self) -> None:
        h = self.h
        h.connect("mum")
        h.call("POST", "/contacts/watch", "alice")
        self.assertEqual(len(h.notices("mum", "contact.requested")), 1)
        status, listed = h.call("GET", "/contacts", "mum")
        self.assertEqual(
            [(p["user"], p["state"], p["device"]) for p in listed["items"]],
            [("alice", "incoming", "watch")],
        )
        status, body = h.call("POST", "/contacts/alice/accept", "watch")
        self.assertEqual((status, body["error"]), (403, "forbidden"))
        status, body = h.call("POST", "/contacts/alice/accept?device=watch", "carol")
        self.assertEqual((status, body["error"]), (403, "forbidden"))
        self.assertEqual(
            h.call("POST", "/contacts/alice/accept?device=watch", "mum"),
            (200, {"user": "alice", "status": "accepted"}),
        )
        status, listed = h.call("GET", "/contacts?device=watch", "mum")
        self.assertEqual(
            [(c["user"], c["state"], c["approved_by"]) for c in listed["items"]],
            [("alice", "contact", "mum")],
        )
        self.assertEqual((listed["messages"], listed["group_adds"]), ("contacts", "guardians"))
        self.assertTrue(fired(h.contacts.may_message("alice", "watch")))

    def test_refusals_do_not_tell_a_block_from_a_missing_account(self) -> None:
        h = self.h
        self.assertEqual(
            h.call("PUT", "/blocks/stranger", "bob"),
            (200, {"user": "stranger", "status": "blocked"}),
        )
        blocked = h.call("POST", "/contacts/bob", "stranger")
        missing = h.call("POST", "/contacts/ghost", "stranger")
        self.assertEqual((blocked[0], blocked[1]["error"]), (403, "not_accepted"))
        self.assertEqual(
            (blocked[0], blocked[1]["message"].replace("bob", "X")),
            (missing[0], missing[1]["message"].replace("ghost", "X")),
        )
        _status, listed = h.call("GET", "/contacts", "bob")
        self.assertEqual(listed["items"], [{"user": "stranger", "state": "blocked"}])
        self.assertEqual(
            h.call("DELETE", "/blocks/stranger", "bob"),
            (200, {"user": "stranger", "status": "unblocked"}),
        )
        self.assertEqual(h.call("POST", "/contacts/bob", "stranger")[0], 200)

    def test_privacy_settings(self) -> None:
        h = self.h
        self.assertEqual(
            h.call("GET", "/me/privacy", "bob"),
            (200, {"messages": "everyone", "group_adds": "contacts", "read_receipts": "on"}),
        )
        self.assertEqual(
            h.call("PATCH", "/me/privacy", "bob", {"messages": "contacts"}),
            (200, {"messages": "contacts", "group_adds": "contacts", "read_receipts": "on"}),
        )
        self.assertEqual(
            h.call("PATCH", "/me/privacy", "bob", {"read_receipts": "off"}),
            (200, {"messages": "contacts", "group_adds": "contacts", "read_receipts": "off"}),
        )
        status, answer = h.call("PATCH", "/me/privacy", "watch", {"read_receipts": "off"})
        self.assertEqual((status, answer["read_receipts"]), (200, "off"))  # a device's own
        self.assertFalse(fired(h.contacts.may_message("alice", "bob")))
        wrong = ({}, {"messages": "friends"}, {"group_adds": "all"}, {"read_receipts": "no"})
        for body in (*wrong, {"other": 1}):
            status, answer = h.call("PATCH", "/me/privacy", "bob", body)
            self.assertEqual((status, answer["error"]), (400, "bad_request"), body)
        status, answer = h.call("PATCH", "/me/privacy", "watch", {"messages": "everyone"})
        self.assertEqual((status, answer["error"]), (403, "forbidden"))

    def test_authentication_and_bad_names(self) -> None:
        h = self.h
        status, body = h.call("GET", "/contacts")
        self.assertEqual((status, body["error"]), (401, "invalid_token"))
        status, body = h.call("POST", "/contacts/-bad-", "alice")
        self.assertEqual(status, 404)
        status, body = h.call("GET", "/contacts?device=%00", "alice")
        self.assertEqual((status, body["error"]), (400, "bad_request"))

    def test_deleting_an_account_forgets_what_was_decided_about_it(self) -> None:
        h = self.h
        h.call("POST", "/contacts/bob", "alice")
        h.call("POST", "/contacts/alice/accept", "bob")
        self.assertTrue(fired(h.contacts.may_message("alice", "bob")))
        self.assertIs(h.contacts.known("alice", "bob"), True)
        status, _ = h.call("DELETE", "/me", "bob", {"password": PASSWORD})
        self.assertEqual(status, 200)
        self.assertIsNone(h.contacts.known("alice", "bob"))
        self.assertFalse(fired(h.contacts.may_message("alice", "bob")))
        status, listed = h.call("GET", "/contacts", "alice")
        self.assertEqual(listed["items"], [])

    def test_a_new_account_is_reachable_at_once(self) -> None:
        h = self.h
        self.assertFalse(fired(h.contacts.may_message("alice", "newbie")))
        self.assertIs(h.contacts.known("alice", "newbie"), False)
        status, _ = h.call("POST", "/register", body={"name": "newbie", "password": PASSWORD})
        self.assertEqual(status, 201)
        self.assertTrue(fired(h.contacts.may_message("alice", "newbie")))

    def test_the_openapi_document_describes_them(self) -> None:
        paths = document()["paths"]
        for path in ("/api/v1/contacts", "/api/v1/contacts/{user}", "/api/v1/blocks/{user}"):
            self.assertIn(path, paths)
        self.assertEqual(sorted(paths["/api/v1/me/privacy"]), ["get", "patch"])


class ContactListShapeTests(SynchronousTestCase):
    """GET /contacts and ``cim-client contacts list`` print one shape (the JSON
    convention's list), from the storage records and from the IM frame's."""

    def test_the_api_and_the_cli_agree(self) -> None:
        found = ContactList(
            contacts=[
                ContactRecord("bob", 1_700_000_000.25, None),
                ContactRecord("alice", 1_700_000_001.5, "mum"),
            ],
            incoming=[
                PendingRecord("carol", 1_700_000_002.125, "carol"),
                PendingRecord("dave", 1_700_000_003.0, "dave", device="watch"),
            ],
            outgoing=[PendingRecord("erin", 1_700_000_004.75, "mum")],
            blocked=["mallory"],
            settings=Settings("contacts", "nobody"),
        )
        expected = {
            "items": [
                {"user": "bob", "state": "contact", "added_at": "2023-11-14T22:13:20.250Z"},
                {
                    "user": "alice",
                    "state": "contact",
                    "added_at": "2023-11-14T22:13:21.500Z",
                    "approved_by": "mum",
                },
                {"user": "carol", "state": "incoming", "requested_at": "2023-11-14T22:13:22.125Z"},
                {
                    "user": "dave",
                    "state": "incoming",
                    "device": "watch",
                    "requested_at": "2023-11-14T22:13:23.000Z",
                },
                {
                    "user": "erin",
                    "state": "outgoing",
                    "requested_at": "2023-11-14T22:13:24.750Z",
                    "requested_by": "mum",
                },
                {"user": "mallory", "state": "blocked"},
            ],
            "messages": "contacts",
            "group_adds": "nobody",
            "read_receipts": "on",
        }
        self.assertEqual(contact_list_json(found), expected)
        self.assertEqual(contact_commands.contact_list_json(book_proto(found)), expected)
