"""Accounts over the logic service's HTTP API."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import SynchronousTestCase

from cim.backends.state import REASON_PASSWORD_CHANGED
from cim.interfaces import SessionRecord, StateUnavailable
from cim.storage.accounts import password_hash_txn
from cim.storage.schema import bindings, timeline
from tests.fakes.logic import PASSWORD, LogicHarness, fired


class RegistrationTests(SynchronousTestCase):
    def test_register_then_read_and_update_the_profile(self) -> None:
        h = LogicHarness(self)
        status, body = h.call(
            "POST", "/register", body={"name": "ann", "password": PASSWORD, "display_name": "Ann"}
        )
        self.assertEqual((status, body["name"], body["kind"]), (201, "ann", "person"))
        self.assertEqual(body["display_name"], "Ann")
        status, body = h.call("PATCH", "/me", "ann", {"about": "hello"})
        self.assertEqual((status, body["about"], body["display_name"]), (200, "hello", "Ann"))
        h.add_user("ben")
        status, body = h.call("GET", "/users/ann", "ben")
        self.assertEqual((status, body["about"]), (200, "hello"))

    def test_taken_name_bad_name_and_weak_password_are_refused(self) -> None:
        h = LogicHarness(self)
        h.add_user("ann")
        status, body = h.call("POST", "/register", body={"name": "ann", "password": PASSWORD})
        self.assertEqual((status, body["error"]), (409, "name_taken"))
        status, body = h.call("POST", "/register", body={"name": "A!", "password": PASSWORD})
        self.assertEqual((status, body["error"]), (400, "invalid_name"))
        status, body = h.call("POST", "/register", body={"name": "cat", "password": "aaaaaaaaaa"})
        self.assertEqual((status, body["error"]), (400, "weak_password"))
        self.assertNotIn("aaaaaaaaaa", body["message"])

    def test_closed_registration(self) -> None:
        h = LogicHarness(self, "open_registration = false\n")
        status, body = h.call("POST", "/register", body={"name": "ann", "password": PASSWORD})
        self.assertEqual((status, body["error"]), (403, "registration_closed"))

    def test_schema_errors_never_echo_a_password(self) -> None:
        h = LogicHarness(self)
        status, body = h.call("POST", "/register", body={"name": "ann", "password": "x" * 2000})
        self.assertEqual(status, 400)
        self.assertNotIn("xxxx", body["message"])
        status, body = h.call("POST", "/register", body={"name": "ann", "pasword": PASSWORD})
        self.assertEqual(status, 400)
        self.assertNotIn(PASSWORD, body["message"])

    def test_avatar_must_be_https_or_this_nodes_file_url(self) -> None:
        h = LogicHarness(self, "[files]\npublic_url = http://127.0.0.1:8082\n")
        h.add_user("ann")
        for bad in (
            "http://[",
            "http://x.example/a\n",
            "ftp://x.example/a",
            "http:///a",
            "http://x.example/a.png",
            "javascript:alert(1)",
            "https://bank.example@evil.example/a.png",
        ):
            status, body = h.call("PATCH", "/me", "ann", {"avatar_url": bad})
            self.assertEqual(status, 400, bad)
        for good in ("https://files.example.com/files/abc", "http://127.0.0.1:8082/files/f1"):
            status, body = h.call("PATCH", "/me", "ann", {"avatar_url": good})
            self.assertEqual((status, body["avatar_url"]), (200, good))
        self.assertEqual(h.call("PATCH", "/me", "ann", {"avatar_url": ""})[0], 200)

    def test_reserved_names_cannot_be_registered(self) -> None:
        """Issue 17, acceptance 5: registering system, admin, @x is refused."""
        h = LogicHarness(self, "name_pattern = [A-Za-z0-9@][a-z0-9_.-]{0,31}\n")
        for name in ("system", "admin", "root", "Admin", "@x", "@system"):
            status, body = h.call("POST", "/register", body={"name": name, "password": PASSWORD})
            self.assertEqual((status, body["error"]), (400, "reserved_name"), name)
            self.assertEqual(body["message"], "that name is reserved")
        self.assertEqual(fired(h.accounts.list_users()), [])
        status, _ = h.call("POST", "/register", body={"name": "adminton", "password": PASSWORD})
        self.assertEqual(status, 201)

    def test_control_characters_are_refused_in_every_string(self) -> None:
        """Issue 17, acceptance 5 (logic API): text with ESC is a 400, newline and tab
        are kept as sent."""
        h = LogicHarness(self)
        h.add_user("ann")
        for body in (
            {"about": "\x1b[2Jhello"},
            {"display_name": "Ann\rAdmin"},
            {"about": "C1 \x9b31m"},
        ):
            status, answer = h.call("PATCH", "/me", "ann", body)
            self.assertEqual((status, answer["error"]), (400, "bad_request"), body)
            self.assertIn("control characters", answer["message"])
        status, body = h.call(
            "POST", "/register", body={"name": "ben", "password": "pa\x1bss word"}
        )
        self.assertEqual((status, body["error"]), (400, "bad_request"))
        self.assertNotIn("ss word", body["message"])  # the field, never the value
        status, body = h.call("PATCH", "/me", "ann", {"about": "two\nlines\tand a tab"})
        self.assertEqual((status, body["about"]), (200, "two\nlines\tand a tab"))

    def test_nul_and_lone_surrogates_are_refused(self) -> None:
        h = LogicHarness(self)
        h.add_user("ann")
        for raw in (b'{"about": "a\\u0000b"}', b'{"about": "\\ud800"}', b'{"about": 1e999}'):
            status, body = h.call("PATCH", "/me", "ann", raw=raw)
            self.assertEqual((status, body["error"]), (400, "bad_request"), raw)


class AuthenticationTests(SynchronousTestCase):
    def test_no_token_or_unknown_token_is_401(self) -> None:
        h = LogicHarness(self)
        self.assertEqual(h.call("GET", "/me")[0], 401)
        self.assertEqual(h.call("GET", "/me", token="nope")[0], 401)

    def test_openapi_document_lists_every_endpoint(self) -> None:
        h = LogicHarness(self)
        status, spec = h.call("GET", "/openapi.json")
        self.assertEqual((status, spec["openapi"]), (200, "3.1.0"))
        operations = {
            (method.upper(), path) for path, item in spec["paths"].items() for method in item
        }
        declared = {(e.method, "/api/v1" + e.path) for e in h.resource.endpoints}
        self.assertEqual(operations, declared)


class PasswordAndDeletionTests(SynchronousTestCase):
    def test_change_password_needs_the_current_one(self) -> None:
        h = LogicHarness(self)
        h.add_user("ann")
        body = {"current_password": "Wrong-pass-1", "new_password": "New-pass-12"}
        status, answer = h.call("POST", "/me/password", "ann", body)
        self.assertEqual((status, answer["error"]), (403, "wrong_password"))
        body["current_password"] = PASSWORD
        self.assertEqual(h.call("POST", "/me/password", "ann", body)[0], 200)
        self.assertTrue(fired_check(h, "ann", "New-pass-12"))

    def test_change_password_logs_out_the_other_devices(self) -> None:
        """A token or connection from before (a lost phone) stops working; the device
        that changed the password stays logged in."""
        h = LogicHarness(self)
        h.add_user("ann")
        phone = h.connect("ann")  # device "phone", online
        states: list[tuple[str, str]] = []
        phone.on_state = lambda state, detail: states.append((state, detail))
        tablet_token, _ = h.node.login("ann", device="tablet")
        web_token, _ = h.node.login("ann", device="web")
        body = {"current_password": PASSWORD, "new_password": "New-pass-12"}
        status, answer = h.call("POST", "/me/password", token=web_token, body=body)
        self.assertEqual(
            (status, answer),
            (
                200,
                {
                    "ok": True,
                    "other_sessions_ended": True,
                    "logged_out_devices": ["phone", "tablet"],
                },
            ),
        )
        h.flush()
        self.assertEqual(h.call("GET", "/me", token=tablet_token)[0], 401)
        self.assertEqual(h.call("GET", "/me", token=web_token)[0], 200)
        self.assertEqual(phone.state, "stopped")
        self.assertIn(("stopped", f"kicked: {REASON_PASSWORD_CHANGED}"), states)

    def test_change_password_with_the_session_store_down(self) -> None:
        """The password is changed; the answer says the other sessions were not ended."""
        h = LogicHarness(self)
        h.add_user("ann")
        tablet_token, _ = h.node.login("ann", device="tablet")
        sessions = h.node.state.sessions

        def down(*args: object, **kwargs: object) -> Deferred[list[SessionRecord]]:
            return fail(StateUnavailable("the state store is down"))

        self.patch(sessions, "end_user_sessions", down)
        body = {"current_password": PASSWORD, "new_password": "New-pass-12"}
        status, answer = h.call("POST", "/me/password", "ann", body)
        self.assertEqual(
            (status, answer),
            (200, {"ok": True, "other_sessions_ended": False, "logged_out_devices": []}),
        )
        self.assertTrue(fired_check(h, "ann", "New-pass-12"))
        self.assertEqual(h.call("GET", "/me", token=tablet_token)[0], 200)

    def test_wrong_passwords_sent_at_once_cannot_exceed_the_budget(self) -> None:
        """Each attempt counts before the KDF answers, not after."""
        h = LogicHarness(self)
        h.add_user("ann")
        waiting = h.hold(password_hash_txn)
        body = {"current_password": "Wrong-pass-1", "new_password": "New-pass-12"}
        calls = [h.start("POST", "/me/password", "ann", body) for _ in range(8)]
        self.assertEqual(len(waiting), 5)
        for release in waiting:
            release()
        h.flush()
        statuses = sorted(fired(d)[0] for d in calls)
        self.assertEqual(statuses, [403] * 5 + [429] * 3)

    def test_delete_ends_the_session_and_tells_bound_accounts(self) -> None:
        h = LogicHarness(self)
        h.add_user("ann")
        h.add_user("watch", kind="device")

        def bind(connection: object) -> None:
            connection.execute(  # type: ignore[attr-defined]
                bindings.insert().values(
                    device="watch", guardian="ann", status="active", created_at=1.0
                )
            )

        h.db.run(bind)
        h.connect("watch")
        ann_token = h.token("ann")
        status, body = h.call("DELETE", "/me", "ann", {"password": PASSWORD})
        self.assertEqual((status, body), (200, {"deleted": "ann"}))
        self.assertEqual(h.call("GET", "/me", token=ann_token)[0], 401)
        [notice] = h.notices("watch", "binding.removed")
        self.assertEqual((notice["account"], notice["reason"]), ("ann", "account_deleted"))
        self.assertFalse(fired_check(h, "ann", PASSWORD))

    def test_deleting_removes_the_accounts_one_to_one_history(self) -> None:
        from cim.protocols import cim_pb2

        h = LogicHarness(self)
        for name in ("ann", "bob", "cat"):
            h.add_user(name)

        def message(msg_id: int, sender: str, to: str = "", group: str = "") -> cim_pb2.Message:
            m = cim_pb2.Message(id=msg_id, to=to, group=group, text="hi", sent_at_ms=1)
            setattr(m, "from", sender)
            return m

        group = "g" * 26
        for m in (
            message(1, "ann", "bob"),
            message(2, "bob", "ann"),
            message(3, "bob", "cat"),
            message(4, "ann", group=group),
        ):
            fired(h.timelines.append(m, "phone"))
        self.assertEqual(h.call("DELETE", "/me", "ann", {"password": PASSWORD})[0], 200)

        def left(connection: Connection) -> list[int]:
            rows = connection.execute(select(timeline.c.msg_id).order_by(timeline.c.msg_id))
            return [int(msg_id) for msg_id in rows.scalars()]

        # bob and cat's chat stays, and so does ann's message in the group.
        self.assertEqual(fired(h.db.run(left)), [3, 4])
        # bob has nothing left unread there, and a new "ann" would start after seq 2.
        [_bob_cat, ann_bob] = sorted(
            fired(h.timelines.summary("bob", "phone")), key=lambda s: s.conversation, reverse=True
        )
        self.assertEqual(
            (ann_bob.conversation, ann_bob.unread, ann_bob.last_seq), ("d:ann:bob", 0, 2)
        )
        self.assertEqual(fired(h.timelines.summary("ann", "phone")), [])

    def test_deleting_takes_the_account_out_of_cached_group_member_lists(self) -> None:
        h = LogicHarness(self)
        for name in ("ann", "bob"):
            h.add_user(name)
        group = fired(h.groups.create("bob", "family", ["ann"]))
        self.assertEqual(group.invited, ("ann",))  # not a contact of bob's: invited
        fired(h.groups.accept("ann", group.id))
        self.assertEqual(fired(h.groups.member_names(group.id)), ["ann", "bob"])
        status, _ = h.call("DELETE", "/me", "ann", {"password": PASSWORD})
        self.assertEqual(status, 200)
        self.assertEqual(fired(h.groups.member_names(group.id)), ["bob"])
        self.assertFalse(fired(h.groups.is_member(group.id, "ann")))

    def test_a_deleted_persons_pending_request_is_withdrawn_for_all_who_saw_it(self) -> None:
        h = LogicHarness(self)
        h.add_user("watch", kind="device")
        for name in ("mum", "ann"):
            h.add_user(name)

        def bind(connection: Connection) -> None:
            for guardian, status in (("mum", "active"), ("ann", "pending")):
                connection.execute(
                    bindings.insert().values(
                        device="watch", guardian=guardian, status=status, created_at=1.0
                    )
                )

        fired(h.db.run(bind))
        h.connect("watch")
        h.connect("mum")
        self.assertEqual(h.call("DELETE", "/me", "ann", {"password": PASSWORD})[0], 200)
        for told in ("watch", "mum"):
            [notice] = h.notices(told, "binding.removed")
            self.assertEqual((notice["account"], notice["reason"]), ("ann", "account_deleted"))


def fired_check(h: LogicHarness, user: str, password: str) -> bool:
    from tests.fakes.logic import fired

    return bool(fired(h.accounts.check_password(user, password)))
