"""Device binding over the logic service's HTTP API: codes, approval, unbinding."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import SynchronousTestCase

from cim.json_convention import iso_time
from cim.storage.bindings import bind_with_code_txn
from cim.storage.schema import binding_codes
from tests.fakes.logic import LogicHarness, fired


def family(h: LogicHarness, device: str = "watch", *people: str) -> None:
    """Accounts for a device and people (none bound yet)."""
    h.add_user(device, kind="device")
    for person in people:
        h.add_user(person)


def new_code(h: LogicHarness, device: str = "watch") -> str:
    status, body = h.call("POST", "/devices/me/binding-code", device)
    assert status == 201, body
    return str(body["code"])


def bind(h: LogicHarness, person: str, device: str = "watch") -> tuple[int, Any]:
    return h.call("POST", "/bindings", person, {"device": device, "code": new_code(h, device)})


def bind_pair(h: LogicHarness, device: str, first: str, second: str) -> None:
    """``first`` bound at once, ``second`` requested then approved by ``first``."""
    assert bind(h, first, device)[0] == 201
    assert bind(h, second, device)[1]["status"] == "pending"
    status, body = h.call("POST", f"/bindings/{device}/{second}/approve", first)
    assert (status, body["status"]) == (200, "active"), body


def wrong(code: str) -> str:
    return str((int(code) + 1) % 10 ** len(code)).zfill(len(code))


class CodeTests(SynchronousTestCase):
    def test_code_is_digits_stored_as_a_hash_and_replaced_on_request(self) -> None:
        h = LogicHarness(self, "binding_code_digits = 8\n")
        family(h, "watch")
        status, body = h.call("POST", "/devices/me/binding-code", "watch")
        self.assertEqual(status, 201)
        code = body["code"]
        self.assertRegex(code, r"^[0-9]{8}$")
        expires = h.clock.seconds() + h.config.binding_code_ttl
        self.assertEqual(body["expires_at"], iso_time(expires))
        rows = fired(h.db.run(lambda c: c.execute(binding_codes.select()).all()))
        self.assertEqual(len(rows), 1)
        self.assertNotIn(code, rows[0].code_hash)
        self.assertEqual(len(rows[0].code_hash), 64)
        second = new_code(h)
        rows = fired(h.db.run(lambda c: c.execute(binding_codes.select()).all()))
        self.assertEqual(len(rows), 1)
        h.add_user("ann")
        if second != code:
            status, body = h.call("POST", "/bindings", "ann", {"device": "watch", "code": code})
            self.assertEqual((status, body["error"]), (403, "wrong_code"))
        status, body = h.call("POST", "/bindings", "ann", {"device": "watch", "code": second})
        self.assertEqual(status, 201)

    def test_a_person_cannot_ask_for_a_code(self) -> None:
        h = LogicHarness(self)
        family(h, "watch", "ann")
        status, body = h.call("POST", "/devices/me/binding-code", "ann")
        self.assertEqual((status, body["error"]), (403, "devices_only"))

    def test_expired_code_is_410_and_a_code_is_single_use(self) -> None:
        h = LogicHarness(self)
        family(h, "watch", "ann", "ben")
        code = new_code(h)
        h.clock.advance(h.config.binding_code_ttl + 1)
        status, body = h.call("POST", "/bindings", "ann", {"device": "watch", "code": code})
        self.assertEqual((status, body["error"]), (410, "expired_code"))
        code = new_code(h)
        self.assertEqual(
            h.call("POST", "/bindings", "ann", {"device": "watch", "code": code})[0], 201
        )
        status, body = h.call("POST", "/bindings", "ben", {"device": "watch", "code": code})
        self.assertEqual((status, body["error"]), (403, "wrong_code"))

    def test_housekeeping_forgets_expired_codes(self) -> None:
        h = LogicHarness(self)
        family(h, "watch")
        new_code(h)
        h.clock.advance(h.config.binding_code_ttl + 1)
        fired(ensureDeferred(h.service.features.bindings.housekeeping()))
        rows = fired(h.db.run(lambda c: c.execute(binding_codes.select()).all()))
        self.assertEqual(rows, [])

    def test_the_service_tidies_while_its_port_listens(self) -> None:
        h = LogicHarness(self)
        family(h, "watch")
        new_code(h)
        service = h.service
        self.assertEqual(
            [child.name for child in service.children()],
            ["logic listener", "logic housekeeping"],
        )
        service.startService()
        fired(service.when_ready())
        [(port, _, _, interface)] = h.clock.tcpServers
        self.assertEqual((port, interface), (8081, "127.0.0.1"))
        h.clock.advance(h.config.binding_code_ttl + 1)
        h.clock.advance(h.config.purge_interval)  # the housekeeping's next round
        rows = fired(h.db.run(lambda c: c.execute(binding_codes.select()).all()))
        self.assertEqual(rows, [])
        fired(service.stopService())
        h.tokens.clear()  # the old session expired meanwhile
        new_code(h)  # once stopped, nothing tidies any more
        h.clock.advance(h.config.binding_code_ttl + h.config.purge_interval + 1)
        rows = fired(h.db.run(lambda c: c.execute(binding_codes.select()).all()))
        self.assertEqual(len(rows), 1)


class BindTests(SynchronousTestCase):
    def test_first_binding_is_active_and_both_sides_are_told(self) -> None:
        h = LogicHarness(self)
        family(h, "watch", "ann")
        h.connect("watch")
        h.connect("ann")
        status, body = bind(h, "ann")
        self.assertEqual(status, 201)
        self.assertEqual(
            (body["device"], body["guardian"], body["status"]), ("watch", "ann", "active")
        )
        for user in ("watch", "ann"):
            notices = h.notices(user, "binding.created")
            self.assertEqual(len(notices), 1, user)
            self.assertEqual(
                (notices[0]["device"], notices[0]["guardian"], notices[0]["priority"]),
                ("watch", "ann", "normal"),
            )

    def test_binding_again_is_idempotent(self) -> None:
        h = LogicHarness(self)
        family(h, "watch", "ann")
        h.connect("ann")
        first = bind(h, "ann")
        again = bind(h, "ann")
        self.assertEqual((first[0], again[0]), (201, 200))
        self.assertEqual(first[1], again[1])
        self.assertEqual(len(h.notices("ann", "binding.created")), 1)

    def test_devices_cannot_bind_and_unknown_devices_are_404(self) -> None:
        h = LogicHarness(self)
        family(h, "watch", "ann")
        h.add_user("band", kind="device")
        code = new_code(h)
        status, body = h.call("POST", "/bindings", "band", {"device": "watch", "code": code})
        self.assertEqual((status, body["error"]), (403, "persons_only"))
        for target in ("nobody", "ann"):
            status, body = h.call("POST", "/bindings", "ann", {"device": target, "code": code})
            self.assertEqual((status, body["error"]), (404, "not_found"), target)

    def test_wrong_codes_are_throttled_per_person(self) -> None:
        h = LogicHarness(self, "binding_attempts = 3\nbinding_attempt_window = 60s\n")
        family(h, "watch", "ann")
        code = new_code(h)
        for _ in range(3):
            status, body = h.call(
                "POST", "/bindings", "ann", {"device": "watch", "code": wrong(code)}
            )
            self.assertEqual((status, body["error"]), (403, "wrong_code"))
        # Even the right code is refused while throttled.
        status, body = h.call("POST", "/bindings", "ann", {"device": "watch", "code": code})
        self.assertEqual((status, body["error"]), (429, "too_many_attempts"))
        h.clock.advance(61)
        status, body = h.call("POST", "/bindings", "ann", {"device": "watch", "code": code})
        self.assertEqual(status, 201)

    def test_wrong_codes_sent_at_once_cannot_exceed_the_budget(self) -> None:
        """Each attempt counts before the database answers, not after."""
        h = LogicHarness(self, "binding_attempts = 3\nbinding_attempt_window = 60s\n")
        family(h, "watch", "ann")
        code = new_code(h)
        waiting = h.hold(bind_with_code_txn)
        body = {"device": "watch", "code": wrong(code)}
        calls = [h.start("POST", "/bindings", "ann", body) for _ in range(10)]
        self.assertEqual(len(waiting), 3)
        for release in waiting:
            release()
        h.flush()
        statuses = sorted(fired(d)[0] for d in calls)
        self.assertEqual(statuses, [403] * 3 + [429] * 7)

    def test_a_right_code_takes_back_its_own_count_only(self) -> None:
        h = LogicHarness(self, "binding_attempts = 2\nbinding_attempt_window = 60s\n")
        family(h, "watch", "ann")
        family(h, "clock")
        code = new_code(h)
        status, _ = h.call("POST", "/bindings", "ann", {"device": "watch", "code": wrong(code)})
        self.assertEqual(status, 403)
        self.assertEqual(bind(h, "ann", "clock")[0], 201)
        status, _ = h.call("POST", "/bindings", "ann", {"device": "watch", "code": wrong(code)})
        self.assertEqual(status, 403)
        status, body = h.call("POST", "/bindings", "ann", {"device": "watch", "code": code})
        self.assertEqual((status, body["error"]), (429, "too_many_attempts"))

    def test_many_people_cannot_brute_force_one_device(self) -> None:
        h = LogicHarness(self, "binding_attempts = 2\nbinding_attempt_window = 60s\n")
        family(h, "watch")
        code = new_code(h)
        people = [f"p{i:02d}" for i in range(5)]
        for person in people:
            h.add_user(person)
        refusals = []
        for person in people:
            for _ in range(2):
                refusals.append(
                    h.call("POST", "/bindings", person, {"device": "watch", "code": wrong(code)})
                )
        statuses = [status for status, _ in refusals]
        # 2 per person, 8 (4 x 2) per device: the ninth and tenth guesses are refused.
        self.assertEqual(statuses, [403] * 8 + [429] * 2)
        h.add_user("owner")
        status, body = h.call("POST", "/bindings", "owner", {"device": "watch", "code": code})
        self.assertEqual((status, body["error"]), (429, "too_many_attempts"))
        # The device showing a new code lets its owner in again.
        status, _ = bind(h, "owner")
        self.assertEqual(status, 201)

    def test_schema_refuses_bad_bodies(self) -> None:
        h = LogicHarness(self)
        family(h, "watch", "ann")
        for body in (
            {"device": "watch"},
            {"device": "watch", "code": 123456},
            {"device": "watch", "code": "1" * 40},
            {"device": "watch", "code": "1", "extra": 1},
        ):
            status, answer = h.call("POST", "/bindings", "ann", body)
            self.assertEqual((status, answer["error"]), (400, "bad_request"), body)

    def test_schema_errors_never_echo_a_code(self) -> None:
        h = LogicHarness(self)
        family(h, "watch", "ann")
        for code in ("4711" * 9, 4711):
            status, answer = h.call("POST", "/bindings", "ann", {"device": "watch", "code": code})
            self.assertEqual(status, 400)
            self.assertNotIn("4711", answer["message"])


class ApprovalTests(SynchronousTestCase):
    def test_later_bindings_wait_for_the_first_guardian(self) -> None:
        h = LogicHarness(self)
        family(h, "watch", "ann", "ben", "cat")
        for user in ("watch", "ann", "ben"):
            h.connect(user)
        self.assertEqual(bind(h, "ann")[1]["status"], "active")
        status, body = bind(h, "ben")
        self.assertEqual((status, body["status"]), (201, "pending"))
        requested = h.notices("ann", "binding.requested")
        self.assertEqual([(n["device"], n["guardian"]) for n in requested], [("watch", "ben")])
        self.assertEqual(h.notices("ben", "binding.created"), [])
        # The first guardian sees the request; the pending one sees only its own row.
        listed = h.call("GET", "/bindings", "ann")[1]["items"]
        self.assertEqual(
            {(b["guardian"], b["status"]) for b in listed}, {("ann", "active"), ("ben", "pending")}
        )
        listed = h.call("GET", "/bindings", "ben")[1]["items"]
        self.assertEqual([(b["guardian"], b["status"]) for b in listed], [("ben", "pending")])
        # Nobody but the first guardian approves.
        for who in ("ben", "watch", "cat"):
            status, body = h.call("POST", "/bindings/watch/ben/approve", who)
            self.assertEqual((status, body["error"]), (403, "not_first_guardian"), who)
        status, body = h.call("POST", "/bindings/watch/ben/approve", "ann")
        self.assertEqual((status, body["status"], body["approved_by"]), (200, "active", "ann"))
        for user in ("ben", "watch"):
            approved = h.notices(user, "binding.approved")
            self.assertEqual(len(approved), 1, user)
            self.assertEqual(approved[0]["approved_by"], "ann")
        # Approving again is harmless and silent.
        self.assertEqual(h.call("POST", "/bindings/watch/ben/approve", "ann")[0], 200)
        self.assertEqual(len(h.notices("ben", "binding.approved")), 1)
        status, body = h.call("POST", "/bindings/watch/cat/approve", "ann")
        self.assertEqual((status, body["error"]), (404, "not_found"))
        listed = h.call("GET", "/bindings", "watch")[1]["items"]
        self.assertEqual(
            {(b["guardian"], b["status"]) for b in listed}, {("ann", "active"), ("ben", "active")}
        )

    def test_declining_a_request_tells_the_requester(self) -> None:
        h = LogicHarness(self)
        family(h, "watch", "ann", "ben")
        h.connect("ben")
        bind(h, "ann")
        bind(h, "ben")
        status, body = h.call("DELETE", "/bindings/watch/ben", "ann")
        self.assertEqual(
            (status, body), (200, {"device": "watch", "guardian": "ben", "removed": True})
        )
        removed = h.notices("ben", "binding.removed")
        self.assertEqual([(n["reason"], n["removed_by"]) for n in removed], [("declined", "ann")])
        self.assertEqual(h.call("GET", "/bindings", "ben")[1]["items"], [])

    def test_when_the_first_guardian_leaves_the_next_takes_over(self) -> None:
        h = LogicHarness(self)
        family(h, "watch", "ann", "ben", "cat", "dan")
        bind_pair(h, "watch", "ann", "ben")
        h.clock.advance(5)
        bind(h, "cat")
        h.call("POST", "/bindings/watch/cat/approve", "ann")
        self.assertEqual(h.call("DELETE", "/bindings/watch/ann", "ann")[0], 200)
        h.connect("ben")
        bind(h, "dan")
        self.assertEqual(len(h.notices("ben", "binding.requested")), 1)
        status, body = h.call("POST", "/bindings/watch/dan/approve", "cat")
        self.assertEqual((status, body["error"]), (403, "not_first_guardian"))
        status, body = h.call("POST", "/bindings/watch/dan/approve", "ben")
        self.assertEqual((status, body["status"]), (200, "active"))


class UnbindTests(SynchronousTestCase):
    def test_either_side_unbinds_and_both_are_told(self) -> None:
        h = LogicHarness(self)
        family(h, "watch", "ann")
        h.connect("watch")
        h.connect("ann")
        bind(h, "ann")
        status, _ = h.call("DELETE", "/bindings/watch/ann", "watch")
        self.assertEqual(status, 200)
        for user in ("watch", "ann"):
            removed = h.notices(user, "binding.removed")
            self.assertEqual(
                [(n["device"], n["guardian"], n["reason"], n["removed_by"]) for n in removed],
                [("watch", "ann", "unbound", "watch")],
                user,
            )
        self.assertEqual(h.call("GET", "/bindings", "ann")[1]["items"], [])
        status, body = h.call("DELETE", "/bindings/watch/ann", "ann")
        self.assertEqual((status, body["error"]), (404, "not_found"))

    def test_strangers_and_co_guardians_cannot_unbind_others(self) -> None:
        h = LogicHarness(self)
        family(h, "watch", "ann", "ben", "eve")
        bind_pair(h, "watch", "ann", "ben")
        for who, target in (("eve", "ben"), ("eve", "ann"), ("ben", "ann")):
            status, body = h.call("DELETE", f"/bindings/watch/{target}", who)
            self.assertEqual((status, body["error"]), (403, "not_allowed"), (who, target))
        # The first guardian may remove the others.
        self.assertEqual(h.call("DELETE", "/bindings/watch/ben", "ann")[0], 200)

    def test_an_unbound_guardian_loses_the_device_at_once(self) -> None:
        h = LogicHarness(self)
        family(h, "watch", "ann", "ben")
        bind_pair(h, "watch", "ann", "ben")
        h.call("DELETE", "/bindings/watch/ann", "watch")
        self.assertEqual(h.call("GET", "/bindings", "ann")[1]["items"], [])
        status, body = h.call("DELETE", "/bindings/watch/ben", "ann")
        self.assertEqual((status, body["error"]), (403, "not_allowed"))
        h.add_user("cat")
        bind(h, "cat")
        status, body = h.call("POST", "/bindings/watch/cat/approve", "ann")
        self.assertEqual((status, body["error"]), (403, "not_first_guardian"))

    def test_bad_path_names_are_404(self) -> None:
        h = LogicHarness(self)
        family(h, "watch", "ann")
        status, body = h.call("DELETE", "/bindings/wa%20tch/ann", "ann")
        self.assertEqual((status, body["error"]), (404, "not_found"))
