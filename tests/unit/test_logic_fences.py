"""Geofences and positions over the logic service's HTTP API."""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import quote

from sqlalchemy import delete, func, insert, select
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from cim.json_convention import epoch_seconds, iso_time
from cim.logic import fences as fence_feature
from cim.storage.schema import bindings, fences, locations
from tests.fakes.logic import LogicHarness, fired

LAT, LON = 48.8566, 2.3522
METRE_LAT = 1 / 111_250.0
"""About a metre of latitude near Paris, in degrees."""


def north(metres: float) -> float:
    """The latitude ``metres`` north of the fences' centre."""
    return LAT + metres * METRE_LAT


def bind(h: LogicHarness, device: str, guardian: str) -> None:
    def txn(connection: Connection) -> None:
        connection.execute(
            insert(bindings).values(
                device=device, guardian=guardian, status="active", created_at=h.ctx.now()
            )
        )

    fired(h.db.run(txn))


def unbind(h: LogicHarness, device: str, guardian: str) -> None:
    def txn(connection: Connection) -> None:
        connection.execute(
            delete(bindings).where(bindings.c.device == device, bindings.c.guardian == guardian)
        )

    fired(h.db.run(txn))


def count_positions(h: LogicHarness) -> int:
    def txn(connection: Connection) -> int:
        return int(connection.execute(select(func.count()).select_from(locations)).scalar_one())

    return int(fired(h.db.run(txn)))


def family(config: str = "") -> Any:
    """A harness with a watch and two guardians, ann and ben, both bound and connected."""

    def make(test: SynchronousTestCase) -> LogicHarness:
        h = LogicHarness(test, config)
        h.add_user("watch", kind="device")
        for guardian in ("ann", "ben"):
            h.add_user(guardian)
            bind(h, "watch", guardian)
            h.connect(guardian)
        return h

    return make


CIRCLE = {"name": "school", "circle": {"lat": LAT, "lon": LON, "radius_m": 200}}


def report(h: LogicHarness, *distances: float, start: float | None = None) -> list[Any]:
    """The watch reports positions at these distances north of the centre, a second apart."""
    at = h.ctx.now() if start is None else start
    positions = [
        {"lat": north(d), "lon": LON, "at": iso_time(at + i)} for i, d in enumerate(distances)
    ]
    h.clock.advance(len(distances))
    status, body = h.call("POST", "/locations", "watch", {"positions": positions})
    assert status == 200, body
    assert body["accepted"] == len(distances)
    return [(t["event"], t["name"]) for t in body["transitions"]]


class FenceCrossingTests(SynchronousTestCase):
    def test_a_track_crossing_a_200_m_fence_twice_with_jitter_gives_two_notices_each(
        self,
    ) -> None:
        """The issue's acceptance test."""
        h = family()(self)
        status, fence = h.call("POST", "/devices/watch/fences", "ann", CIRCLE)
        self.assertEqual((status, fence["state"], fence["shape"]), (201, "unknown", "circle"))
        self.assertEqual(fence["circle"], CIRCLE["circle"])
        transitions: list[Any] = []
        # Switched on well inside: the state is set, nothing is announced.
        transitions += report(h, 0, 20, 40, 60)
        # Out through the boundary, jittering a few metres either side of it, with one
        # GPS spike well outside that the next report contradicts.
        transitions += report(h, 150, 190, 203, 232, 170, 197, 205, 196, 204, 199, 202)
        # Well outside, then back, with jitter again on the way in.
        transitions += report(h, 260, 320, 400, 320)
        transitions += report(h, 230, 206, 180, 240, 198, 203, 195, 201, 197)
        transitions += report(h, 150, 120, 100, 50)
        self.assertEqual(transitions, [("left", "school"), ("entered", "school")])
        for guardian in ("ann", "ben"):
            notices = [
                n for n in h.notices(guardian) if n["event"] in ("fence.left", "fence.entered")
            ]
            self.assertEqual([n["event"] for n in notices], ["fence.left", "fence.entered"])
            for notice in notices:
                self.assertEqual((notice["fence"], notice["name"]), (fence["id"], "school"))
                self.assertEqual((notice["device"], notice["lon"]), ("watch", LON))
                self.assertEqual(notice["priority"], "normal")
            # Announced at the confirming fixes: the second one 15 m past the boundary.
            self.assertAlmostEqual(notices[0]["lat"], north(320))
            self.assertAlmostEqual(notices[1]["lat"], north(120))
        status, listed = h.call("GET", "/devices/watch/fences", "ben")
        self.assertEqual((status, listed["items"][0]["state"]), (200, "inside"))

    def test_jitter_within_the_margin_band_never_announces(self) -> None:
        h = family("fence_margin = 15\nfence_confirmations = 1\n")(self)
        h.call("POST", "/devices/watch/fences", "ann", CIRCLE)
        self.assertEqual(report(h, 0), [])
        # Inside the band (186..214 m) nothing counts, however long it lasts.
        self.assertEqual(report(h, 190, 210, 186, 214, 200, 213, 187), [])
        self.assertEqual(report(h, 216), [("left", "school")])
        self.assertEqual(report(h, 190, 210, 186), [])
        self.assertEqual(report(h, 184), [("entered", "school")])
        self.assertEqual(len(h.notices("ann", "fence.left")), 1)
        self.assertEqual(len(h.notices("ben", "fence.entered")), 1)

    def test_polygon_fence(self) -> None:
        h = family("fence_margin = 10\nfence_confirmations = 2\n")(self)
        d = 100 * METRE_LAT
        e = d / math.cos(math.radians(LAT))
        square = [[LAT - d, LON - e], [LAT - d, LON + e], [LAT + d, LON + e], [LAT + d, LON - e]]
        status, fence = h.call(
            "POST", "/devices/watch/fences", "ben", {"name": "park", "polygon": square}
        )
        self.assertEqual((status, fence["shape"], fence["created_by"]), (201, "polygon", "ben"))
        self.assertEqual(len(fence["polygon"]), 4)
        self.assertEqual(report(h, 0, 50), [])
        self.assertEqual(report(h, 95, 105, 115, 130), [("left", "park")])
        self.assertEqual(report(h, 85, 60), [("entered", "park")])
        self.assertEqual([n["name"] for n in h.notices("ann", "fence.left")], ["park"])

    def test_imprecise_and_stale_positions_are_stored_but_move_nothing(self) -> None:
        h = family("fence_confirmations = 1\n")(self)
        h.call("POST", "/devices/watch/fences", "ann", CIRCLE)
        self.assertEqual(report(h, 0), [])
        far = {"lat": north(1000), "lon": LON, "accuracy_m": 600}
        status, body = h.call("POST", "/locations", "watch", {"positions": [far]})
        self.assertEqual((status, body["accepted"], body["transitions"]), (200, 1, []))
        # Newer fixes first, then one from before them: history, not a crossing.
        h.clock.advance(100)
        now = h.ctx.now()
        self.assertEqual(report(h, 10, start=now), [])
        self.assertEqual(report(h, 1000, start=now - 50), [])
        self.assertEqual(count_positions(h), 4)
        self.assertEqual(h.notices("ann", "fence.left"), [])

    def test_a_retried_report_does_not_count_its_fixes_twice(self) -> None:
        h = family("fence_confirmations = 2\n")(self)
        h.call("POST", "/devices/watch/fences", "ann", CIRCLE)
        self.assertEqual(report(h, 0, 20), [])
        start = h.ctx.now()
        self.assertEqual(report(h, 500, start=start), [])
        # The same report again (its answer was lost): one confirmation, not two.
        self.assertEqual(report(h, 500, start=start), [])
        # Another fix at that same moment but elsewhere still counts.
        self.assertEqual(report(h, 510, start=start), [("left", "school")])
        self.assertEqual(len(h.notices("ann", "fence.left")), 1)

    def test_a_batch_is_taken_in_time_order(self) -> None:
        h = family("fence_confirmations = 2\n")(self)
        h.call("POST", "/devices/watch/fences", "ann", CIRCLE)
        now = h.ctx.now()
        positions = [
            {"lat": north(d), "lon": LON, "at": iso_time(now - 10 + t)}
            for t, d in ((5, 500), (0, 0), (6, 500), (1, 0))
        ]
        status, body = h.call("POST", "/locations", "watch", {"positions": positions})
        self.assertEqual(status, 200)
        self.assertEqual([t["event"] for t in body["transitions"]], ["left"])
        self.assertEqual(body["transitions"][0]["at"], iso_time(now - 4))

    def test_a_guardian_offline_gets_the_notice_at_login(self) -> None:
        h = LogicHarness(self, "fence_confirmations = 1\n")
        h.add_user("watch", kind="device")
        h.add_user("cat")
        bind(h, "watch", "cat")
        h.call("POST", "/devices/watch/fences", "cat", CIRCLE)
        report(h, 0, 500)
        h.connect("cat")
        self.assertEqual(len(h.notices("cat", "fence.left")), 1)


class FenceManagementTests(SynchronousTestCase):
    def test_create_list_delete(self) -> None:
        h = family()(self)
        _, first = h.call("POST", "/devices/watch/fences", "ann", CIRCLE)
        _, second = h.call("POST", "/devices/watch/fences", "ben", {**CIRCLE, "name": "home"})
        status, listed = h.call("GET", "/devices/watch/fences", "ann")
        self.assertEqual(status, 200)
        self.assertEqual([f["name"] for f in listed["items"]], ["school", "home"])
        status, body = h.call("DELETE", f"/devices/watch/fences/{first['id']}", "ben")
        self.assertEqual((status, body), (200, {"deleted": first["id"]}))
        status, body = h.call("DELETE", f"/devices/watch/fences/{first['id']}", "ben")
        self.assertEqual((status, body["error"]), (404, "not_found"))
        _, listed = h.call("GET", "/devices/watch/fences", "ann")
        self.assertEqual([f["id"] for f in listed["items"]], [second["id"]])

    def test_bad_shapes_are_400(self) -> None:
        h = family("max_fence_points = 5\n")(self)
        bow_tie = [[0.0, 0.0], [0.001, 0.001], [0.0, 0.001], [0.001, 0.0]]
        cases: list[Any] = [
            {"name": "x", "polygon": bow_tie},
            {"name": "x", "polygon": [[0.0, 0.0], [0.001, 0.001], [0.002, 0.002]]},
            {"name": "x", "polygon": [[0.0, 0.0], [0.0, 0.001]]},
            {"name": "x", "polygon": [[0.0, 0.0], [0.0, 0.001]] * 4},
            {"name": "x", "circle": {"lat": 0, "lon": 0, "radius_m": 0.5}},
            {"name": "x", "circle": {"lat": 0, "lon": 0, "radius_m": 100_001}},
            {"name": "x", "circle": {"lat": 91, "lon": 0, "radius_m": 100}},
            {"name": "x", "circle": CIRCLE["circle"], "polygon": bow_tie},
            {"name": "x"},
            {"name": "", "circle": CIRCLE["circle"]},
            {"name": "x", "circle": CIRCLE["circle"], "colour": "red"},
        ]
        for body in cases:
            status, answer = h.call("POST", "/devices/watch/fences", "ann", body)
            self.assertEqual(status, 400, body)
            self.assertIn(answer["error"], ("bad_request", "invalid_fence"))
        status, answer = h.call("POST", "/devices/watch/fences", "ann", cases[0])
        self.assertIn("self-intersecting", answer["message"])

    def test_too_many_fences_is_409(self) -> None:
        h = family("max_fences_per_device = 2\n")(self)
        for _ in range(2):
            self.assertEqual(h.call("POST", "/devices/watch/fences", "ann", CIRCLE)[0], 201)
        status, body = h.call("POST", "/devices/watch/fences", "ben", CIRCLE)
        self.assertEqual((status, body["error"]), (409, "too_many_fences"))

    def test_too_many_positions_in_one_report_is_400(self) -> None:
        h = family("max_positions_per_report = 3\n")(self)
        positions = [{"lat": LAT, "lon": LON}] * 4
        status, body = h.call("POST", "/locations", "watch", {"positions": positions})
        self.assertEqual((status, body["error"]), (400, "bad_request"))
        future = [{"lat": LAT, "lon": LON, "at": iso_time(h.ctx.now() + 3600)}]
        status, body = h.call("POST", "/locations", "watch", {"positions": future})
        self.assertEqual(status, 400)
        self.assertIn("future", body["message"])
        self.assertEqual(count_positions(h), 0)

    def test_a_new_fence_is_not_mistaken_for_a_deleted_one(self) -> None:
        # SQLite may hand the deleted fence's id to the next one; its shape must not stick.
        h = family("fence_confirmations = 1\n")(self)
        far = {"name": "far", "circle": {"lat": -LAT, "lon": LON, "radius_m": 200}}
        _, old = h.call("POST", "/devices/watch/fences", "ann", far)
        report(h, 0)
        h.call("DELETE", f"/devices/watch/fences/{old['id']}", "ann")
        h.call("POST", "/devices/watch/fences", "ann", CIRCLE)
        self.assertEqual(report(h, 0, 500), [("left", "school")])


class AuthorizationTests(SynchronousTestCase):
    def test_a_person_not_bound_cannot_touch_fences_or_positions(self) -> None:
        h = family()(self)
        h.add_user("eve")
        _, fence = h.call("POST", "/devices/watch/fences", "ann", CIRCLE)
        report(h, 0)
        calls: list[tuple[str, str, Any]] = [
            ("POST", "/devices/watch/fences", CIRCLE),
            ("GET", "/devices/watch/fences", None),
            ("DELETE", f"/devices/watch/fences/{fence['id']}", None),
            ("GET", "/devices/watch/locations", None),
            ("GET", "/devices/nobody/fences", None),
        ]
        for method, path, body in calls:
            status, answer = h.call(method, path, "eve", body)
            self.assertEqual((status, answer["error"]), (403, "not_a_guardian"), path)
        # The device itself reads its positions but does not manage fences.
        self.assertEqual(h.call("GET", "/devices/watch/locations", "watch")[0], 200)
        self.assertEqual(h.call("GET", "/devices/watch/fences", "watch")[0], 403)

    def test_an_unbound_guardian_loses_access_at_once(self) -> None:
        h = family("fence_confirmations = 1\n")(self)
        h.call("POST", "/devices/watch/fences", "ann", CIRCLE)
        self.assertEqual(h.call("GET", "/devices/watch/locations", "ben")[0], 200)
        unbind(h, "watch", "ben")
        for method, path in (("GET", "/devices/watch/locations"), ("GET", "/devices/watch/fences")):
            self.assertEqual(h.call(method, path, "ben")[0], 403)
        self.assertEqual(h.call("POST", "/devices/watch/fences", "ben", CIRCLE)[0], 403)
        report(h, 0, 500)
        self.assertEqual(len(h.notices("ann", "fence.left")), 1)
        self.assertEqual(h.notices("ben", "fence.left"), [])

    def test_a_person_cannot_report_positions(self) -> None:
        h = family()(self)
        status, body = h.call("POST", "/locations", "ann", {"positions": [{"lat": 0, "lon": 0}]})
        self.assertEqual((status, body["error"]), (403, "devices_only"))
        self.assertEqual(count_positions(h), 0)

    def test_another_devices_fence_under_the_wrong_path_is_404(self) -> None:
        h = family()(self)
        h.add_user("phone", kind="device")
        bind(h, "phone", "ann")
        _, fence = h.call("POST", "/devices/phone/fences", "ann", CIRCLE)
        status, body = h.call("DELETE", f"/devices/watch/fences/{fence['id']}", "ann")
        self.assertEqual((status, body["error"]), (404, "not_found"))
        _, listed = h.call("GET", "/devices/phone/fences", "ann")
        self.assertEqual([f["id"] for f in listed["items"]], [fence["id"]])
        # A fence on the phone is not moved by the watch's positions.
        report(h, 0, 500, 500)

        def states(connection: Connection) -> list[str]:
            return list(connection.execute(select(fences.c.state)).scalars())

        self.assertEqual(fired(h.db.run(states)), ["unknown"])


class HistoryTests(SynchronousTestCase):
    def test_history_newest_first_with_since_until_and_limit(self) -> None:
        h = family()(self)
        start = h.ctx.now()
        report(h, 0, 10, 20, 30, 40, start=start)
        status, body = h.call("GET", "/devices/watch/locations", "ann")
        self.assertEqual(status, 200)
        self.assertEqual(
            [p["at"] for p in body["items"]], [iso_time(start + i) for i in (4, 3, 2, 1, 0)]
        )
        self.assertNotIn("accuracy_m", body["items"][0])  # none sent: left out, not null
        since, until = iso_time(start + 1), "2027-01-15T10:00:03+02:00"  # start + 3, at +02:00
        self.assertEqual(epoch_seconds(until), start + 3)
        query = f"?since={since}&until={quote(until)}&limit=2"
        _, body = h.call("GET", "/devices/watch/locations" + query, "ben")
        self.assertEqual(
            [p["at"] for p in body["items"]], [iso_time(start + 3), iso_time(start + 2)]
        )
        for bad in (
            "?limit=0",
            "?limit=1001",
            "?since=-1",
            "?until=nan",
            "?limit=x",
            f"?since={start}",  # epoch seconds: not the convention
            "?since=2027-01-15T08:00:00",  # no offset: ambiguous
            "?since=2027-13-45T08:00:00Z",
            "?until=1969-12-31T23:59:59Z",
        ):
            status, _ = h.call("GET", "/devices/watch/locations" + bad, "ann")
            self.assertEqual(status, 400, bad)

    def test_retention_purges_old_positions_in_batches(self) -> None:
        h = family("location_retention = 2h\n")(self)
        feature = h.service.features.fences
        start = h.ctx.now()
        report(h, *([0.0] * 30), start=start)
        h.clock.advance(3600)
        h.tokens.clear()  # the router's session has expired meanwhile
        report(h, 0, 0)
        # Batches of 7, at most 3 per round: a round never holds the database for long.
        self.patch(fence_feature, "PURGE_BATCH", 7)
        self.patch(fence_feature, "PURGE_BATCHES_PER_ROUND", 3)
        fired(Deferred.fromCoroutine(feature.housekeeping()))
        self.assertEqual(count_positions(h), 32)
        h.clock.advance(3600 + 30)
        fired(Deferred.fromCoroutine(feature.housekeeping()))
        self.assertEqual(count_positions(h), 32 - 21)
        fired(Deferred.fromCoroutine(feature.housekeeping()))
        self.assertEqual(count_positions(h), 2)
        h.clock.advance(3600)
        fired(Deferred.fromCoroutine(feature.housekeeping()))
        self.assertEqual(count_positions(h), 0)
