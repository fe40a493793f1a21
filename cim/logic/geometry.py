"""Geofence geometry and hysteresis: pure functions, no I/O, tested on their own.

Fences are small (a school, a home, a park), so each one is drawn on its own flat
plane, an azimuthal equidistant projection centred on the fence, in metres; shapely
then does polygon validity, containment and distance to the boundary, which are easy
to get subtly wrong by hand.

Why this projection is good enough: distances from the centre are exact on a sphere
whose local radii are the WGS84 ellipsoid's at the centre (the meridian radius north
to south, the prime vertical radius east to west), and any other distance is off by
a fraction of about (d/R)²/6 plus the ellipsoid's change of curvature across the
fence. For a fence of 1 km that is well under a centimetre; at the 100 km limit a
few metres, still inside the default hysteresis margin. It needs no PROJ database,
copes with the antimeridian and works at the poles, where a plain equirectangular
plane (x = R·Δlon·cos lat0) falls apart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import shapely
from shapely.geometry import Polygon

__all__ = [
    "INSIDE",
    "MAX_FENCE_EXTENT_M",
    "MAX_USABLE_ACCURACY_M",
    "OUTSIDE",
    "UNKNOWN",
    "FenceShape",
    "FenceTrack",
    "InvalidFence",
    "LocalPlane",
    "Step",
    "circle_fence",
    "polygon_fence",
    "side_of",
    "step",
    "usable_accuracy",
]

UNKNOWN = "unknown"
INSIDE = "inside"
OUTSIDE = "outside"

# WGS84
_A = 6_378_137.0
_E2 = 6.694379990141317e-3

MAX_FENCE_EXTENT_M = 100_000.0
"""A fence must lie within this distance of its centre (the projection's comfort zone)."""
MAX_USABLE_ACCURACY_M = 500.0
"""A fix less precise than this (or than the fence's own size) says nothing about a fence."""


class InvalidFence(ValueError):
    """The shape cannot be a fence; the message says why, for people."""


@dataclass(frozen=True)
class LocalPlane:
    """An azimuthal equidistant plane around (lat0, lon0): x east, y north, in metres."""

    lat0: float
    lon0: float

    @property
    def _radii(self) -> tuple[float, float]:
        """The ellipsoid's meridian and prime-vertical radii of curvature at lat0."""
        sin_lat = math.sin(math.radians(self.lat0))
        w = math.sqrt(1.0 - _E2 * sin_lat * sin_lat)
        meridian = _A * (1.0 - _E2) / (w * w * w)
        prime_vertical = _A / w
        return meridian, prime_vertical

    def project(
        self, lats: Sequence[float] | np.ndarray, lons: Sequence[float] | np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        phi0 = math.radians(self.lat0)
        phi = np.radians(np.asarray(lats, dtype=float))
        dlam = np.radians(np.asarray(lons, dtype=float) - self.lon0)
        # The unit direction towards the point in the tangent plane (east, north),
        # scaled by sin c; c is the angular distance from the centre.
        east = np.cos(phi) * np.sin(dlam)
        north = math.cos(phi0) * np.sin(phi) - math.sin(phi0) * np.cos(phi) * np.cos(dlam)
        cos_c = math.sin(phi0) * np.sin(phi) + math.cos(phi0) * np.cos(phi) * np.cos(dlam)
        sin_c = np.hypot(east, north)
        c = np.arctan2(sin_c, cos_c)
        scale = np.divide(c, sin_c, out=np.ones_like(c), where=sin_c > 0)
        meridian, prime_vertical = self._radii
        x = prime_vertical * scale * east
        # The antipode has no direction; put it half a world away rather than at the centre.
        x = np.where((sin_c == 0) & (cos_c < 0), math.pi * prime_vertical, x)
        return x, meridian * scale * north

    def project_point(self, lat: float, lon: float) -> tuple[float, float]:
        x, y = self.project([lat], [lon])
        return float(x[0]), float(y[0])


@dataclass(frozen=True)
class FenceShape:
    """A fence on its own plane: a circle (centre and radius) or a polygon."""

    plane: LocalPlane
    radius_m: float | None
    polygon: Polygon | None

    @property
    def size_m(self) -> float:
        """The radius, or a polygon's equal-area radius: how big the fence is."""
        if self.radius_m is not None:
            return self.radius_m
        assert self.polygon is not None
        return math.sqrt(self.polygon.area / math.pi)

    def signed_distances(
        self, lats: Sequence[float] | np.ndarray, lons: Sequence[float] | np.ndarray
    ) -> list[float]:
        """Metres from the boundary for each point: positive inside, negative outside."""
        x, y = self.plane.project(lats, lons)
        if self.radius_m is not None:
            return [float(d) for d in self.radius_m - np.hypot(x, y)]
        assert self.polygon is not None
        points = shapely.points(x, y)
        to_boundary = shapely.distance(self.polygon.exterior, points)
        inside = shapely.covers(self.polygon, points)
        return [float(d) if i else -float(d) for d, i in zip(to_boundary, inside, strict=True)]

    def signed_distance(self, lat: float, lon: float) -> float:
        return self.signed_distances([lat], [lon])[0]


def circle_fence(lat: float, lon: float, radius_m: float) -> FenceShape:
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise InvalidFence("the centre must be a latitude and longitude")
    if not 1 <= radius_m <= MAX_FENCE_EXTENT_M:
        raise InvalidFence(f"the radius must be between 1 and {MAX_FENCE_EXTENT_M:.0f} metres")
    return FenceShape(LocalPlane(lat, lon), radius_m, None)


def _centre(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """The vertices' mean, longitudes unwrapped around the first so the antimeridian is no edge."""
    first_lon = points[0][1]
    lons = [first_lon + ((lon - first_lon + 180.0) % 360.0 - 180.0) for _, lon in points]
    lat = sum(lat for lat, _ in points) / len(points)
    lon = (sum(lons) / len(lons) + 180.0) % 360.0 - 180.0
    return lat, lon


def polygon_fence(points: Sequence[Sequence[float]], max_points: int) -> FenceShape:
    """A polygon from [lat, lon] vertices; a repeated first vertex at the end is allowed."""
    vertices = [(float(p[0]), float(p[1])) for p in points]
    if len(vertices) > 1 and vertices[0] == vertices[-1]:
        vertices.pop()
    if not 3 <= len(vertices) <= max_points:
        raise InvalidFence(f"a polygon needs between 3 and {max_points} distinct vertices")
    if any(not (-90 <= lat <= 90 and -180 <= lon <= 180) for lat, lon in vertices):
        raise InvalidFence("every vertex must be a latitude and longitude")
    plane = LocalPlane(*_centre(vertices))
    x, y = plane.project([v[0] for v in vertices], [v[1] for v in vertices])
    if float(np.max(np.hypot(x, y))) > MAX_FENCE_EXTENT_M:
        raise InvalidFence(
            f"a polygon must lie within {MAX_FENCE_EXTENT_M / 1000:.0f} km of its centre"
        )
    polygon = Polygon(zip(x.tolist(), y.tolist(), strict=True))
    if not polygon.is_valid:
        reason = shapely.is_valid_reason(polygon)
        raise InvalidFence(f"the polygon is not valid (self-intersecting or flat): {reason}")
    if polygon.area < 1.0:
        raise InvalidFence("the polygon encloses no area")
    shapely.prepare(polygon)
    return FenceShape(plane, None, polygon)


def usable_accuracy(accuracy_m: float | None, shape: FenceShape) -> bool:
    """Whether a fix is precise enough to place against this fence (unknown: yes)."""
    if accuracy_m is None:
        return True
    return accuracy_m <= min(MAX_USABLE_ACCURACY_M, shape.size_m)


# --- hysteresis -----------------------------------------------------------------------


def side_of(signed_distance: float, margin: float) -> str | None:
    """The side a position counts for, or None inside the margin band (it says nothing)."""
    if signed_distance >= margin:
        return INSIDE
    if signed_distance <= -margin:
        return OUTSIDE
    return None


@dataclass(frozen=True)
class FenceTrack:
    """A fence's hysteresis state, as stored in its row."""

    state: str = UNKNOWN
    candidate: str | None = None
    candidate_count: int = 0


@dataclass(frozen=True)
class Step:
    track: FenceTrack
    confirmed: bool
    """The state changed with this report (including the first, silent, confirmation)."""
    event: str | None
    """"entered" or "left" when the change is to be announced; None otherwise."""


def step(track: FenceTrack, side: str | None, confirmations: int) -> Step:
    """Fold one position's side into the fence's state.

    A report in the margin band (side None) neither confirms nor resets a candidate.
    A counted report on the confirmed side cancels a pending candidate: only
    consecutive counted reports on the other side make a transition. The first
    confirmation of an unknown fence sets the state silently: a watch switched on
    at home has not "entered" home.
    """
    if side is None:
        return Step(track, False, None)
    if side == track.state:
        return Step(FenceTrack(track.state), False, None)
    count = track.candidate_count + 1 if track.candidate == side else 1
    if count < confirmations:
        return Step(FenceTrack(track.state, side, count), False, None)
    event = None
    if track.state != UNKNOWN:
        event = "entered" if side == INSIDE else "left"
    return Step(FenceTrack(side), True, event)
