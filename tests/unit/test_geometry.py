"""Fence geometry and hysteresis, without any service around them."""

from __future__ import annotations

import math

from twisted.trial.unittest import SynchronousTestCase

from cim.logic.geometry import (
    INSIDE,
    OUTSIDE,
    UNKNOWN,
    FenceTrack,
    InvalidFence,
    LocalPlane,
    circle_fence,
    polygon_fence,
    side_of,
    step,
    usable_accuracy,
)

LAT, LON = 48.8566, 2.3522
METRE_LAT = 1 / 111_250.0
"""About a metre of latitude near Paris, in degrees (the test tolerances absorb the rest)."""


def haversine(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """A reference distance on the mean sphere (0.5% of the ellipsoid, enough to compare)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * 6_371_008.8 * math.asin(math.sqrt(a))


def close(test: SynchronousTestCase, actual: float, expected: float, delta: float) -> None:
    """trial's assertAlmostEqual has no ``delta``."""
    test.assertTrue(abs(actual - expected) <= delta, f"{actual} != {expected} +/- {delta}")


class ProjectionTests(SynchronousTestCase):
    def test_known_ellipsoid_distances(self) -> None:
        # One degree of latitude at the equator is 110,574 m on WGS84; of longitude 111,320 m.
        plane = LocalPlane(0.0, 0.0)
        close(self, plane.project_point(0.001, 0.0)[1], 110.574, delta=0.01)
        close(self, plane.project_point(0.0, 0.001)[0], 111.320, delta=0.01)
        # At 45°: 111,132 m per degree of latitude.
        close(self, LocalPlane(45.0, 0.0).project_point(45.001, 0.0)[1], 111.132, delta=0.01)

    def test_distances_agree_with_a_great_circle_within_half_a_percent(self) -> None:
        plane = LocalPlane(LAT, LON)
        for dlat, dlon in ((0.002, 0.0), (0.0, 0.003), (-0.0015, 0.002), (0.05, -0.08)):
            x, y = plane.project_point(LAT + dlat, LON + dlon)
            reference = haversine(LAT, LON, LAT + dlat, LON + dlon)
            close(self, math.hypot(x, y) / reference, 1.0, delta=0.005)

    def test_antimeridian_and_pole(self) -> None:
        x, y = LocalPlane(0.0, 179.9995).project_point(0.0, -179.9995)
        close(self, x, 111.32, delta=0.05)
        close(self, y, 0.0, delta=1e-6)
        x, y = LocalPlane(90.0, 0.0).project_point(89.999, 120.0)
        close(self, math.hypot(x, y), 111.69, delta=0.1)
        self.assertLess(circle_fence(10.0, 20.0, 500).signed_distance(-10.0, -160.0), -1e7)


class ShapeTests(SynchronousTestCase):
    def test_circle_signed_distance(self) -> None:
        fence = circle_fence(LAT, LON, 200)
        close(self, fence.signed_distance(LAT, LON), 200, delta=1e-6)
        close(self, fence.signed_distance(LAT + 150 * METRE_LAT, LON), 50, delta=1)
        close(self, fence.signed_distance(LAT - 260 * METRE_LAT, LON), -60, delta=1)

    def test_polygon_containment_and_distance_to_the_boundary(self) -> None:
        # A square of about 400 m around the centre.
        d = 200 * METRE_LAT
        e = d / math.cos(math.radians(LAT))
        square = [[LAT - d, LON - e], [LAT - d, LON + e], [LAT + d, LON + e], [LAT + d, LON - e]]
        fence = polygon_fence(square, 10)
        close(self, fence.signed_distance(LAT, LON), 200, delta=2)
        close(self, fence.signed_distance(LAT + d + 30 * METRE_LAT, LON), -30, delta=1)
        close(self, fence.signed_distance(LAT + d - 30 * METRE_LAT, LON), 30, delta=1)
        closed = polygon_fence([*square, square[0]], 4)
        close(self, closed.signed_distance(LAT, LON), 200, delta=2)

    def test_invalid_shapes_are_refused_with_a_reason(self) -> None:
        bow_tie = [[0.0, 0.0], [0.001, 0.001], [0.0, 0.001], [0.001, 0.0]]
        with self.assertRaises(InvalidFence) as raised:
            polygon_fence(bow_tie, 10)
        self.assertIn("Self-intersection", str(raised.exception))
        with self.assertRaises(InvalidFence):
            polygon_fence([[0.0, 0.0], [0.001, 0.001], [0.002, 0.002]], 10)
        with self.assertRaises(InvalidFence):
            polygon_fence([[0.0, 0.0], [0.001, 0.001]], 10)
        with self.assertRaises(InvalidFence):
            polygon_fence([[0.0, 0.0], [0.0, 0.001], [0.001, 0.001], [0.001, 0.0]], 3)
        with self.assertRaises(InvalidFence):
            polygon_fence([[0.0, 0.0], [0.0, 2.0], [2.0, 2.0]], 10)
        with self.assertRaises(InvalidFence):
            circle_fence(0.0, 0.0, 0.5)
        with self.assertRaises(InvalidFence):
            circle_fence(0.0, 0.0, 100_001)

    def test_usable_accuracy(self) -> None:
        fence = circle_fence(LAT, LON, 200)
        self.assertTrue(usable_accuracy(None, fence))
        self.assertTrue(usable_accuracy(200, fence))
        self.assertFalse(usable_accuracy(201, fence))
        self.assertFalse(usable_accuracy(501, circle_fence(LAT, LON, 5000)))


class HysteresisTests(SynchronousTestCase):
    def test_margin_band(self) -> None:
        self.assertEqual(side_of(15, 15), INSIDE)
        self.assertEqual(side_of(-15, 15), OUTSIDE)
        self.assertIsNone(side_of(14.9, 15))
        self.assertIsNone(side_of(-14.9, 15))
        self.assertEqual(side_of(0, 0), INSIDE)

    def run_sides(self, sides: list[str | None], confirmations: int = 2) -> tuple[str, list[str]]:
        track = FenceTrack()
        events = []
        for side in sides:
            moved = step(track, side, confirmations)
            track = moved.track
            if moved.event:
                events.append(moved.event)
        return track.state, events

    def test_first_confirmation_is_silent(self) -> None:
        self.assertEqual(self.run_sides([INSIDE]), (UNKNOWN, []))
        self.assertEqual(self.run_sides([INSIDE, INSIDE]), (INSIDE, []))
        self.assertEqual(self.run_sides([OUTSIDE, OUTSIDE]), (OUTSIDE, []))

    def test_consecutive_reports_confirm_a_crossing(self) -> None:
        base = [INSIDE, INSIDE]
        self.assertEqual(self.run_sides([*base, OUTSIDE]), (INSIDE, []))
        self.assertEqual(self.run_sides([*base, OUTSIDE, OUTSIDE]), (OUTSIDE, ["left"]))
        # A counted report back on the confirmed side cancels the candidate.
        self.assertEqual(self.run_sides([*base, OUTSIDE, INSIDE, OUTSIDE]), (INSIDE, []))
        # A report in the band neither confirms nor resets.
        self.assertEqual(self.run_sides([*base, OUTSIDE, None, OUTSIDE]), (OUTSIDE, ["left"]))
        self.assertEqual(
            self.run_sides([*base, OUTSIDE, OUTSIDE, None, INSIDE, INSIDE]),
            (INSIDE, ["left", "entered"]),
        )

    def test_one_confirmation_is_immediate(self) -> None:
        self.assertEqual(
            self.run_sides([OUTSIDE, INSIDE, OUTSIDE], 1), (OUTSIDE, ["entered", "left"])
        )
