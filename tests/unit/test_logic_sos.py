"""SOS alarms over the logic service's HTTP API, as the guardians' IM clients see them."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from cim.json_convention import iso_time
from tests.fakes.logic import LogicHarness, fired
from tests.fakes.node import NodeHarness
from tests.unit.test_logic_bindings import bind, bind_pair, family

HERE = {"lat": 31.2304, "lon": 121.4737, "accuracy_m": 12.5, "battery": 41}


def raise_sos(h: LogicHarness, device: str = "watch", **body: Any) -> dict[str, Any]:
    status, answer = h.call("POST", "/sos", device, body or HERE)
    assert status == 201, answer
    return dict(answer)


def notice_ids(h: LogicHarness, user: str) -> list[str]:
    return [message.id for message in h.inbox.get(user, [])]


class DurableNoticeTests(SynchronousTestCase):
    def test_an_sos_written_before_a_restart_reaches_the_guardian_after_it(self) -> None:
        """System messages go into the receiver's timeline (its conversation with
        @system) before anyone is told: a node that restarts loses none."""
        h = LogicHarness(self)
        family(h, "watch", "g1")
        bind(h, "g1")
        sos = raise_sos(h)
        self.assertEqual(sos["notified"], ["g1"])
        # The node restarts on the same database: a new node, nothing in memory.
        restarted = NodeHarness(database=h.db, state=h.node.state)
        h.node = restarted
        h.connect("g1")
        raised = h.notices("g1", "sos.raised")
        self.assertEqual(len(raised), 1)
        self.assertEqual(raised[0]["sos"], sos["id"])

    def test_system_messages_for_two_receivers_are_two_timelines(self) -> None:
        h = LogicHarness(self)
        for name in ("g1", "g2"):
            h.add_user(name)
        send = h.ctx.notices.send
        self.assertEqual(fired(Deferred.fromCoroutine(send(["g1"], "first"))), ["g1"])
        self.assertEqual(fired(Deferred.fromCoroutine(send(["g1", "g2"], "second"))), ["g1", "g2"])
        g1 = fired(h.timelines.summary("g1", "phone"))
        g2 = fired(h.timelines.summary("g2", "phone"))
        self.assertEqual([(s.conversation, s.unread) for s in g1], [("d:@system:g1", 2)])
        self.assertEqual([(s.conversation, s.unread) for s in g2], [("d:@system:g2", 1)])


class AcceptanceTests(SynchronousTestCase):
    def test_device_two_guardians_sos_reaches_both_and_one_handles_it(self) -> None:
        """A device and two guardians: binding with a code, the second guardian approved
        by the first; an SOS reaches both guardians as a system message (one of them
        offline until later); one acknowledges and the other and the device are told."""
        h = LogicHarness(self)
        family(h, "watch", "g1", "g2")
        status, body = bind(h, "g1")
        self.assertEqual((status, body["status"]), (201, "active"))
        status, body = bind(h, "g2")
        self.assertEqual((status, body["status"]), (201, "pending"))
        status, body = h.call("POST", "/bindings/watch/g2/approve", "g1")
        self.assertEqual((status, body["status"]), (200, "active"))

        h.connect("g1")
        sos = raise_sos(h)
        self.assertEqual(sos["notified"], ["g1", "g2"])
        raised = h.notices("g1", "sos.raised")
        self.assertEqual(len(raised), 1)
        self.assertEqual(raised[0]["priority"], "high")
        self.assertEqual(
            {
                key: raised[0][key]
                for key in ("sos", "device", "lat", "lon", "accuracy_m", "battery", "raised_at")
            },
            {
                "sos": sos["id"],
                "device": "watch",
                "lat": HERE["lat"],
                "lon": HERE["lon"],
                "accuracy_m": HERE["accuracy_m"],
                "battery": HERE["battery"],
                "raised_at": sos["raised_at"],
            },
        )
        self.assertEqual(h.notices("g2", "sos.raised"), [])

        h.connect("g2")  # g2 logs in later: the alarm was stored for it
        raised = h.notices("g2", "sos.raised")
        self.assertEqual(len(raised), 1)
        self.assertEqual((raised[0]["sos"], raised[0]["priority"]), (sos["id"], "high"))

        h.connect("watch")
        status, event = h.call("POST", f"/sos/{sos['id']}/ack", "g1")
        self.assertEqual((status, event["handled_by"]), (200, "g1"))
        self.assertEqual(event["handled_at"], iso_time(h.clock.seconds()))
        for user in ("g2", "watch"):
            handled = h.notices(user, "sos.handled")
            self.assertEqual(len(handled), 1, user)
            self.assertEqual(
                (handled[0]["sos"], handled[0]["device"], handled[0]["handled_by"]),
                (sos["id"], "watch", "g1"),
            )
        self.assertEqual(h.notices("g1", "sos.handled"), [])

        before = {user: len(h.inbox[user]) for user in ("g1", "g2", "watch")}
        status, again = h.call("POST", f"/sos/{sos['id']}/ack", "g2")
        self.assertEqual((status, again), (200, event))
        h.flush()
        self.assertEqual({user: len(h.inbox[user]) for user in before}, before)
        for user in ("g1", "g2", "watch"):
            ids = notice_ids(h, user)
            self.assertEqual(len(ids), len(set(ids)), f"{user} got a notice twice")
        self.assertEqual(len(h.notices("g1", "sos.raised")), 1)
        self.assertEqual(len(h.notices("g2", "sos.raised")), 1)


class RaiseTests(SynchronousTestCase):
    def test_only_devices_raise_and_input_is_bounded(self) -> None:
        h = LogicHarness(self)
        family(h, "watch", "ann")
        status, body = h.call("POST", "/sos", "ann", HERE)
        self.assertEqual((status, body["error"]), (403, "devices_only"))
        for bad in (
            {"lat": 91, "lon": 0},
            {"lat": 0, "lon": -180.5},
            {"lat": 0, "lon": 0, "battery": 101},
            {"lat": 0, "lon": 0, "battery": 5.5},
            {"lat": 0, "lon": 0, "accuracy_m": -1},
            {"lon": 0},
            {"lat": "0", "lon": 0},
            {"lat": 0, "lon": 0, "extra": True},
        ):
            status, body = h.call("POST", "/sos", "watch", bad)
            self.assertEqual((status, body["error"]), (400, "bad_request"), bad)

    def test_position_only_and_no_guardians(self) -> None:
        h = LogicHarness(self)
        family(h, "watch")
        sos = raise_sos(h, lat=-33.9, lon=18.4)
        self.assertEqual(sos["notified"], [])
        # Absent values are left out, not null (the JSON convention).
        self.assertFalse({"accuracy_m", "battery", "handled_by", "handled_at"} & set(sos), sos)
        status, body = h.call("GET", f"/sos/{sos['id']}", "watch")
        self.assertEqual((status, body["lat"], body["lon"]), (200, -33.9, 18.4))

    def test_pending_and_unbound_guardians_are_not_told(self) -> None:
        h = LogicHarness(self)
        family(h, "watch", "ann", "ben", "cat")
        bind_pair(h, "watch", "ann", "cat")
        bind(h, "ben")  # pending
        h.call("DELETE", "/bindings/watch/cat", "cat")
        for user in ("ann", "ben", "cat"):
            h.connect(user)
        sos = raise_sos(h)
        self.assertEqual(sos["notified"], ["ann"])
        self.assertEqual(len(h.notices("ann", "sos.raised")), 1)
        self.assertEqual(h.notices("ben", "sos.raised"), [])
        self.assertEqual(h.notices("cat", "sos.raised"), [])


class AuthorizationTests(SynchronousTestCase):
    def setUp(self) -> None:
        h = self.h = LogicHarness(self)
        family(h, "watch", "ann", "ben", "eve")
        h.add_user("band", kind="device")
        bind(h, "ann")
        bind(h, "ben")  # stays pending
        self.sos = raise_sos(h)

    def test_a_stranger_cannot_see_or_handle_the_alarm(self) -> None:
        h, sos = self.h, self.sos
        for user in ("eve", "band"):
            status, body = h.call("GET", f"/sos/{sos['id']}", user)
            self.assertEqual((status, body["error"]), (403, "not_guardian"), user)
            status, body = h.call("POST", f"/sos/{sos['id']}/ack", user)
            self.assertEqual((status, body["error"]), (403, "not_guardian"), user)
            status, body = h.call("GET", "/sos?device=watch", user)
            self.assertEqual((status, body["error"]), (403, "not_guardian"), user)
            # Their own lists hold nothing of it.
            status, body = h.call("GET", "/sos", user)
            self.assertEqual((status, body["items"]), (200, []), user)
        self.assertNotIn("handled_by", h.call("GET", f"/sos/{sos['id']}", "ann")[1])

    def test_a_pending_guardian_cannot_see_or_handle_it(self) -> None:
        h, sos = self.h, self.sos
        status, body = h.call("POST", f"/sos/{sos['id']}/ack", "ben")
        self.assertEqual((status, body["error"]), (403, "not_guardian"))
        status, body = h.call("GET", f"/sos/{sos['id']}", "ben")
        self.assertEqual((status, body["error"]), (403, "not_guardian"))

    def test_the_device_sees_but_cannot_handle_its_alarm(self) -> None:
        h, sos = self.h, self.sos
        status, body = h.call("GET", f"/sos/{sos['id']}", "watch")
        self.assertEqual((status, body["id"]), (200, sos["id"]))
        status, body = h.call("POST", f"/sos/{sos['id']}/ack", "watch")
        self.assertEqual((status, body["error"]), (403, "not_guardian"))

    def test_an_unbound_guardian_loses_everything_at_once(self) -> None:
        h, sos = self.h, self.sos
        self.assertEqual(h.call("GET", f"/sos/{sos['id']}", "ann")[0], 200)
        self.assertEqual(h.call("DELETE", "/bindings/watch/ann", "watch")[0], 200)
        status, body = h.call("GET", f"/sos/{sos['id']}", "ann")
        self.assertEqual((status, body["error"]), (403, "not_guardian"))
        status, body = h.call("POST", f"/sos/{sos['id']}/ack", "ann")
        self.assertEqual((status, body["error"]), (403, "not_guardian"))
        self.assertEqual(h.call("GET", "/sos", "ann")[1]["items"], [])
        h.connect("ann")
        raise_sos(h)
        self.assertEqual(len(h.notices("ann", "sos.raised")), 1)  # the old one only

    def test_unknown_ids_are_404(self) -> None:
        h = self.h
        for path in ("/sos/999999", "/sos/0", "/sos/99999999999999999999", "/sos/x"):
            status, body = h.call("GET", path, "ann")
            self.assertEqual((status, body["error"]), (404, "not_found"), path)
        status, body = h.call("POST", "/sos/999999/ack", "ann")
        self.assertEqual((status, body["error"]), (404, "not_found"))


class ListTests(SynchronousTestCase):
    def test_lists_are_newest_first_and_limited(self) -> None:
        h = LogicHarness(self)
        family(h, "watch", "ann")
        h.add_user("band", kind="device")
        bind(h, "ann")
        bind(h, "ann", "band")
        ids = []
        for device in ("watch", "band", "watch"):
            ids.append(raise_sos(h, device)["id"])
            h.clock.advance(1)
        status, body = h.call("GET", "/sos", "ann")
        self.assertEqual((status, [e["id"] for e in body["items"]]), (200, ids[::-1]))
        body = h.call("GET", "/sos?device=watch&limit=1", "ann")[1]
        self.assertEqual([e["id"] for e in body["items"]], [ids[2]])
        body = h.call("GET", "/sos", "band")[1]
        self.assertEqual([e["id"] for e in body["items"]], [ids[1]])
        for query in ("limit=0", "limit=101", "limit=x", "device=bad%20name"):
            status, body = h.call("GET", f"/sos?{query}", "ann")
            self.assertEqual((status, body["error"]), (400, "bad_request"), query)


class AcknowledgeTests(SynchronousTestCase):
    def test_only_the_first_acknowledgement_counts(self) -> None:
        h = LogicHarness(self)
        family(h, "watch", "ann", "ben")
        bind_pair(h, "watch", "ann", "ben")
        sos = raise_sos(h)
        h.clock.advance(3)
        first = h.call("POST", f"/sos/{sos['id']}/ack", "ben")
        h.clock.advance(3)
        second = h.call("POST", f"/sos/{sos['id']}/ack", "ann")
        self.assertEqual(first, second)
        self.assertEqual(first[1]["handled_by"], "ben")
        h.connect("ann")
        handled = h.notices("ann", "sos.handled")
        self.assertEqual([n["handled_by"] for n in handled], ["ben"])
