"""Synthetic SemanticKITTI-format scenes: procedural streets ray-cast with an HDL-64E pattern.

A sequence is one procedural town: a route of straight streets joined by rounded corners (with side
streets at some crossings), a gently sloped ground plane, roads with raised sidewalks (the curbs are
their side faces), building façades, fences, hedges, street lamps, traffic signs, trees (trunk +
blob crown), bushes, parked cars, and moving cars and pedestrians. An ego vehicle drives the route at
about 5-9 m/s; every 0.1 s a Velodyne HDL-64E sweep (64 beams from +2 deg to -24.9 deg, ``azimuth_steps``
columns, 120 m max range) is ray-cast against the scene, with range noise, random and grazing-angle
dropouts, porous vegetation and fences, a few outliers (label 1) and unlabeled points (label 0).

Everything is an analytic primitive with a closed-form ray intersection - oriented boxes, vertical
cylinders and ellipsoids - expressed in a *sheared* frame in which the sloped ground plane is z' = 0
(an affine map keeps rays straight and ray parameters unchanged). Each sweep tests only the
(ray, primitive) pairs inside the primitive's angular footprint, all pairs of one primitive type at
once in numpy, so a full sweep takes a fraction of a second on one core.

Written exactly like SemanticKITTI: ``sequences/SS/velodyne/NNNNNN.bin`` (float32 x, y, z,
intensity), ``labels/NNNNNN.label`` (uint32, semantic | instance << 16), ``poses.txt`` (camera-0
frame, first pose identity), ``calib.txt`` (P0..P3 and ``Tr`` velodyne -> camera), ``times.txt``
(10 Hz). Moving things carry the moving ids (252 moving-car, 254 moving-person, 259
moving-other-vehicle) and move between scans; everything else is static.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import ConfigError
from . import kitti
from .gt import rotate

# SemanticKITTI ids used by the generator
UNLABELED, OUTLIER = 0, 1
CAR, TRUCK, OTHER_VEHICLE, PERSON = 10, 18, 20, 30
ROAD, PARKING, SIDEWALK = 40, 44, 48
BUILDING, FENCE = 50, 51
VEGETATION, TRUNK, TERRAIN = 70, 71, 72
POLE, TRAFFIC_SIGN, OTHER_OBJECT = 80, 81, 99
MOVING_CAR, MOVING_PERSON, MOVING_OTHER_VEHICLE = 252, 254, 259

LABEL_NAMES = {
    0: "unlabeled", 1: "outlier", 10: "car", 18: "truck", 20: "other-vehicle", 30: "person",
    40: "road", 44: "parking", 48: "sidewalk", 50: "building", 51: "fence", 70: "vegetation",
    71: "trunk", 72: "terrain", 80: "pole", 81: "traffic-sign", 99: "other-object",
    252: "moving-car", 254: "moving-person", 259: "moving-other-vehicle",
}
VALID_LABELS = frozenset(LABEL_NAMES)
MOVING_LABELS = frozenset(k for k in LABEL_NAMES if k >= 252)

BOX, CYLINDER, ELLIPSOID = 0, 1, 2


def hdl64_elevations_deg() -> np.ndarray:
    """Vertical angles (degrees, beam 0 at the top) of the HDL-64E model used here: an upper block of
    32 beams from +2.0 to -8.33 deg and a lower block of 32 from -8.83 to -24.9 deg."""
    return np.concatenate([np.linspace(2.0, -8.33, 32), np.linspace(-8.83, -24.9, 32)])


@dataclass
class SyntheticConfig:
    """Sensor and scene parameters (defaults resemble a KITTI HDL-64E drive)."""
    azimuth_steps: int = 2048
    max_range: float = 120.0
    min_range: float = 0.9
    range_noise: float = 0.015          # metres (std, along the ray)
    dropout: float = 0.02               # random loss of returns
    grazing_dropout: float = 0.5        # extra loss at grazing incidence
    outlier_fraction: float = 3e-4      # spurious returns (label 1)
    unlabeled_fraction: float = 0.004   # points whose label is 0
    sensor_height: float = 1.73
    rate_hz: float = 10.0
    speed_range: Tuple[float, float] = (5.0, 9.0)
    max_slope: float = 0.04             # ground grade (rise over run)
    margin: float = 140.0               # scene built this far behind the start and past the end

    def validate(self) -> "SyntheticConfig":
        if self.azimuth_steps < 64:
            raise ConfigError(f"azimuth_steps must be >= 64, found {self.azimuth_steps}")
        if not 0 < self.max_range <= 1000:
            raise ConfigError(f"max_range must be in (0, 1000] m, found {self.max_range}")
        if self.rate_hz <= 0:
            raise ConfigError(f"rate_hz must be positive, found {self.rate_hz}")
        return self


# ----------------------------------------------------------------------------------------------
# primitives (struct of arrays); every primitive: center (cx, cy, cz), yaw, half extents (ex, ey, ez)
#   box: oriented box; cylinder: vertical, radius ex, half height ez; ellipsoid: radii ex, ey, ez
# ----------------------------------------------------------------------------------------------
_GEOM = 7  # cx, cy, cz, yaw, ex, ey, ez


class _PrimList:
    """Growable list of primitives (Python side, used while building a scene)."""

    def __init__(self):
        self.geom: List[Tuple[float, ...]] = []
        self.kind: List[int] = []
        self.label: List[int] = []
        self.inst: List[int] = []
        self.porosity: List[float] = []
        self.pen: List[float] = []
        self.refl: List[float] = []

    def add(self, kind, cx, cy, cz, yaw, ex, ey, ez, label, inst=0, porosity=0.0, pen=0.0,
            refl=0.3):
        self.geom.append((cx, cy, cz, yaw, ex, ey, ez))
        self.kind.append(kind)
        self.label.append(label)
        self.inst.append(inst)
        self.porosity.append(porosity)
        self.pen.append(pen)
        self.refl.append(refl)

    def box(self, cx, cy, z0, z1, yaw, hx, hy, label, **kw):
        self.add(BOX, cx, cy, 0.5 * (z0 + z1), yaw, hx, hy, 0.5 * (z1 - z0), label, **kw)

    def cylinder(self, cx, cy, z0, z1, r, label, **kw):
        self.add(CYLINDER, cx, cy, 0.5 * (z0 + z1), 0.0, r, r, 0.5 * (z1 - z0), label, **kw)

    def ellipsoid(self, cx, cy, cz, yaw, rx, ry, rz, label, **kw):
        self.add(ELLIPSOID, cx, cy, cz, yaw, rx, ry, rz, label, **kw)

    def __len__(self):
        return len(self.kind)

    def arrays(self) -> "_Prims":
        n = len(self.kind)
        return _Prims(
            geom=np.asarray(self.geom, dtype=np.float64).reshape(n, _GEOM),
            kind=np.asarray(self.kind, dtype=np.int8),
            label=np.asarray(self.label, dtype=np.uint32),
            inst=np.asarray(self.inst, dtype=np.uint32),
            porosity=np.asarray(self.porosity, dtype=np.float64),
            pen=np.asarray(self.pen, dtype=np.float64),
            refl=np.asarray(self.refl, dtype=np.float64),
        )


@dataclass
class _Prims:
    geom: np.ndarray
    kind: np.ndarray
    label: np.ndarray
    inst: np.ndarray
    porosity: np.ndarray
    pen: np.ndarray
    refl: np.ndarray

    def __len__(self):
        return len(self.kind)

    def take(self, idx) -> "_Prims":
        return _Prims(*(getattr(self, f)[idx] for f in _PRIM_FIELDS))

    @staticmethod
    def concat(parts: Sequence["_Prims"]) -> "_Prims":
        return _Prims(*(np.concatenate([getattr(p, f) for p in parts]) for f in _PRIM_FIELDS))

    def placed(self, x: float, y: float, yaw: float, z: float = 0.0) -> "_Prims":
        """A copy moved by a rigid (x, y, yaw) placement and lifted by z."""
        c, s = math.cos(yaw), math.sin(yaw)
        g = self.geom.copy()
        g[:, 0] = x + c * self.geom[:, 0] - s * self.geom[:, 1]
        g[:, 1] = y + s * self.geom[:, 0] + c * self.geom[:, 1]
        g[:, 2] += z
        g[:, 3] += yaw
        return _Prims(g, self.kind, self.label, self.inst, self.porosity, self.pen, self.refl)


_PRIM_FIELDS = ("geom", "kind", "label", "inst", "porosity", "pen", "refl")


def _car_template(rng, label, inst, kind="car") -> Tuple[_Prims, float, float]:
    """Box-ish vehicle in its local frame (x forward, base on z = 0); returns (prims, L, W)."""
    p = _PrimList()
    if kind == "van":
        L, W, H = rng.uniform(5.0, 6.2), rng.uniform(1.95, 2.15), rng.uniform(2.1, 2.6)
        body_top, cab_len, cab_off = H - 0.05, 0.8 * L, -0.05 * L
    else:
        L, W, H = rng.uniform(3.9, 4.8), rng.uniform(1.65, 1.9), rng.uniform(1.4, 1.6)
        body_top, cab_len, cab_off = rng.uniform(0.85, 1.0), rng.uniform(0.45, 0.6) * L, \
            rng.uniform(-0.15, 0.0) * L
    refl = rng.uniform(0.15, 0.6)
    p.box(0.0, 0.0, 0.3, body_top, 0.0, L / 2, W / 2, label, inst=inst, refl=refl)
    if kind != "van":
        p.box(cab_off, 0.0, body_top, H, 0.0, cab_len / 2, W / 2 - 0.1, label, inst=inst,
              porosity=0.2, refl=0.1)
    for sx in (-1, 1):
        for sy in (-1, 1):
            p.box(sx * (L / 2 - 0.8), sy * (W / 2 - 0.12), 0.0, 0.66, 0.0, 0.33, 0.11, label,
                  inst=inst, refl=0.08)
    return p.arrays(), L, W


def _person_template(rng, label, inst) -> _Prims:
    p = _PrimList()
    h = rng.uniform(1.55, 1.9)
    r = rng.uniform(0.17, 0.23)
    p.cylinder(0.0, 0.0, 0.0, h - 0.25, r, label, inst=inst, refl=0.3)
    p.ellipsoid(0.0, 0.0, h - 0.12, 0.0, 0.1, 0.1, 0.12, label, inst=inst, refl=0.25)
    return p.arrays()


# ----------------------------------------------------------------------------------------------
# route: straight segments joined by circular arcs, parameterised by arc length
# ----------------------------------------------------------------------------------------------
class _Route:
    def __init__(self, vertices: np.ndarray, radii: Sequence[float]):
        v = np.asarray(vertices, dtype=np.float64)
        self.vertices = v
        seg = np.diff(v, axis=0)
        self.seg_len = np.hypot(seg[:, 0], seg[:, 1])
        self.seg_heading = np.arctan2(seg[:, 1], seg[:, 0])
        # pieces: type (0 line, 1 arc), s0, length, p0 (x, y), heading0, center (x, y), radius, sign
        pieces = []
        s = 0.0
        start = v[0].copy()
        n_seg = len(seg)
        for i in range(n_seg):
            h = self.seg_heading[i]
            end_trim = 0.0
            if i < n_seg - 1:
                turn = _wrap(self.seg_heading[i + 1] - h)
                end_trim = radii[i] * math.tan(abs(turn) / 2)
            line_end = v[i + 1] - end_trim * np.array([math.cos(h), math.sin(h)])
            length = float(np.hypot(*(line_end - start)))
            pieces.append((0, s, length, start[0], start[1], h, 0.0, 0.0, 0.0, 0.0))
            s += length
            if i < n_seg - 1:
                turn = _wrap(self.seg_heading[i + 1] - h)
                sign = 1.0 if turn > 0 else -1.0
                r = radii[i]
                center = line_end + sign * r * np.array([-math.sin(h), math.cos(h)])
                arc_len = r * abs(turn)
                pieces.append((1, s, arc_len, line_end[0], line_end[1], h, center[0], center[1],
                               r, sign))
                s += arc_len
                h2 = self.seg_heading[i + 1]
                start = v[i + 1] + end_trim * np.array([math.cos(h2), math.sin(h2)])
        self.pieces = np.asarray(pieces, dtype=np.float64)
        self.length = s

    def at(self, s) -> Tuple[np.ndarray, np.ndarray]:
        """Points (n, 2) and headings (n,) at arc lengths ``s`` (extrapolated linearly past the ends)."""
        s = np.atleast_1d(np.asarray(s, dtype=np.float64))
        idx = np.clip(np.searchsorted(self.pieces[:, 1], s, side="right") - 1, 0,
                      len(self.pieces) - 1)
        pc = self.pieces[idx]
        ds = s - pc[:, 1]
        xy = np.empty((len(s), 2))
        heading = np.empty(len(s))
        line = pc[:, 0] == 0
        h0 = pc[:, 5]
        xy[line, 0] = pc[line, 3] + ds[line] * np.cos(h0[line])
        xy[line, 1] = pc[line, 4] + ds[line] * np.sin(h0[line])
        heading[line] = h0[line]
        arc = ~line
        if arc.any():
            a = pc[arc]
            # past the end of an arc piece (only possible for the last piece) keep the circle
            phi0 = np.arctan2(a[:, 4] - a[:, 7], a[:, 3] - a[:, 6])
            phi = phi0 + a[:, 9] * ds[arc] / a[:, 8]
            xy[arc, 0] = a[:, 6] + a[:, 8] * np.cos(phi)
            xy[arc, 1] = a[:, 7] + a[:, 8] * np.sin(phi)
            heading[arc] = a[:, 5] + a[:, 9] * ds[arc] / a[:, 8]
        return xy, heading

    def offset(self, s, d) -> Tuple[np.ndarray, np.ndarray]:
        """Points at lateral offset ``d`` (left positive) of the route at arc lengths ``s``."""
        xy, h = self.at(s)
        xy = xy + np.asarray(d, dtype=np.float64)[..., None] * np.stack([-np.sin(h), np.cos(h)], 1)
        return xy, h


def _wrap(a):
    return (np.asarray(a) + np.pi) % (2 * np.pi) - np.pi


@dataclass
class _Street:
    cx: float
    cy: float
    heading: float
    half_len: float
    road_hw: float        # half width of the asphalt
    sidewalk_w: float
    sidewalk_h: float
    parking: bool
    on_route: bool

    def to_world(self, u, v) -> Tuple[np.ndarray, np.ndarray]:
        c, s = math.cos(self.heading), math.sin(self.heading)
        u = np.asarray(u, dtype=np.float64)
        v = np.asarray(v, dtype=np.float64)
        return self.cx + c * u - s * v, self.cy + s * u + c * v


def _obb_overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Separating-axis test between 2D oriented rectangles a (n, 5) and b (m, 5) given as
    (cx, cy, yaw, hx, hy); returns (n, m) bool."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=bool)
    d = b[None, :, :2] - a[:, None, :2]                                    # (n, m, 2)
    ua = np.stack([np.cos(a[:, 2]), np.sin(a[:, 2])], -1)[:, None, :]      # (n, 1, 2)
    va = np.stack([-np.sin(a[:, 2]), np.cos(a[:, 2])], -1)[:, None, :]
    ub = np.stack([np.cos(b[:, 2]), np.sin(b[:, 2])], -1)[None, :, :]      # (1, m, 2)
    vb = np.stack([-np.sin(b[:, 2]), np.cos(b[:, 2])], -1)[None, :, :]
    ha, wa = a[:, None, 3], a[:, None, 4]
    hb, wb = b[None, :, 3], b[None, :, 4]
    out = np.ones(d.shape[:2], dtype=bool)
    for axis in (ua, va, ub, vb):
        axis = np.broadcast_to(axis, d.shape)
        dist = np.abs((d * axis).sum(-1))
        ra = ha * np.abs((ua * axis).sum(-1)) + wa * np.abs((va * axis).sum(-1))
        rb = hb * np.abs((ub * axis).sum(-1)) + wb * np.abs((vb * axis).sum(-1))
        out &= dist <= ra + rb
    return out


def _points_in_obb(points: np.ndarray, obb: np.ndarray, margin: float) -> np.ndarray:
    """(m,) bool: does any of ``points`` (n, 2) lie inside each rectangle of ``obb`` (m, 5)
    grown by ``margin``."""
    out = np.zeros(len(obb), dtype=bool)
    for start in range(0, len(obb), 256):
        o = obb[start:start + 256]
        d = points[None, :, :] - o[:, None, :2]
        c, s = np.cos(o[:, 2])[:, None], np.sin(o[:, 2])[:, None]
        u = d[..., 0] * c + d[..., 1] * s
        v = -d[..., 0] * s + d[..., 1] * c
        inside = (np.abs(u) <= o[:, None, 3] + margin) & (np.abs(v) <= o[:, None, 4] + margin)
        out[start:start + 256] = inside.any(1)
    return out


# ----------------------------------------------------------------------------------------------
# the scene
# ----------------------------------------------------------------------------------------------
@dataclass
class _Agent:
    template: _Prims
    mode: str              # "route" or "street"
    s0: float
    speed: float
    offset: float          # lateral offset (route) / v coordinate (street)
    direction: int         # +1 along, -1 against
    street: int = -1
    base_z: float = 0.0


class SyntheticScene:
    """One procedural sequence: the static town, moving agents, the ego trajectory and its sweeps.

    ``scan(k)`` ray-casts sweep ``k`` and returns ``(points (N, 4) float32, labels (N,) uint32)``
    in the LiDAR frame; ``lidar_poses`` are the (F, 4, 4) LiDAR poses relative to the first one
    (what ``poses.txt`` + ``calib.txt`` give back); ``tr`` is the velodyne -> camera transform.
    """

    def __init__(self, seed: int, sequence: Union[int, str], n_scans: int,
                 config: Optional[SyntheticConfig] = None):
        if n_scans < 1:
            raise ConfigError(f"a sequence needs at least one scan, found {n_scans}")
        self.config = (config or SyntheticConfig()).validate()
        self.seed = int(seed)
        self.sequence = int(sequence)
        self.n_scans = int(n_scans)
        rng = np.random.default_rng([self.seed, self.sequence, 0x5CE4E])
        cfg = self.config
        self.times = np.arange(n_scans, dtype=np.float64) / cfg.rate_hz

        # ground plane z = a x + b y
        grade = rng.uniform(0.0, cfg.max_slope)
        direction = rng.uniform(0, 2 * np.pi)
        self.slope = (grade * math.cos(direction), grade * math.sin(direction))

        # ego speed profile v(t) = v0 (1 + amp sin(w t + phi)) and its integral
        self._v0 = rng.uniform(*cfg.speed_range)
        self._vamp = rng.uniform(0.0, 0.15)
        self._vw = 2 * np.pi / rng.uniform(8.0, 20.0)
        self._vphi = rng.uniform(0, 2 * np.pi)
        travel = self._travel(self.times[-1])

        self.lane_w = rng.uniform(3.2, 3.7)
        self._build_route(rng, cfg.margin + travel + cfg.margin)
        self.s_start = cfg.margin
        self._static_list = _PrimList()
        self._footprints: List[Tuple[Tuple[float, float, float, float, float], str, int, int]] = []
        self._ground_regions: List[Tuple[float, float, float, float, float, int]] = []
        self._agents: List[_Agent] = []
        self._next_inst = 1
        self._populate(rng)
        self._build_ego(rng)
        self._tr = _kitti_like_tr(rng)

        H = 64
        self.elevations = np.deg2rad(hdl64_elevations_deg())
        W = cfg.azimuth_steps
        az = np.arange(W) * (2 * np.pi / W)
        ce = np.cos(self.elevations)[:, None]
        self._dirs = np.stack([np.broadcast_to(ce * np.cos(az), (H, W)),
                               np.broadcast_to(ce * np.sin(az), (H, W)),
                               np.broadcast_to(np.sin(self.elevations)[:, None], (H, W))],
                              -1).reshape(-1, 3)
        self._elev_asc = self.elevations[::-1].copy()

    # ------------------------------------------------------------------ construction helpers
    def _inst(self) -> int:
        self._next_inst += 1
        return self._next_inst - 1

    def _travel(self, t):
        t = np.asarray(t, dtype=np.float64)
        return self._v0 * (t - self._vamp / self._vw * (np.cos(self._vw * t + self._vphi)
                                                       - math.cos(self._vphi)))

    def _build_route(self, rng, total_length: float) -> None:
        vertices = [np.zeros(2)]
        heading = 0.0
        headings = []
        radii = []
        length = 0.0
        first = True
        while length < total_length + 40:
            seg_len = rng.uniform(70, 150) if not first else rng.uniform(self.config.margin + 20,
                                                                          self.config.margin + 90)
            first = False
            headings.append(heading)
            vertices.append(vertices[-1] + seg_len * np.array([math.cos(heading), math.sin(heading)]))
            length += seg_len
            # next turn: a crossing (about 90 deg) or a gentle bend, heading kept within +-90 deg
            if rng.random() < 0.6:
                turn = math.radians(rng.uniform(80, 95)) * (1 if rng.random() < 0.5 else -1)
                radius = rng.uniform(9.0, 14.0)
            else:
                turn = math.radians(rng.uniform(12, 40)) * (1 if rng.random() < 0.5 else -1)
                radius = rng.uniform(35.0, 70.0)
            if abs(heading + turn) > math.radians(95):
                turn = -turn
            heading += turn
            radii.append(radius)
        radii = radii[:len(vertices) - 2]
        # make sure each fillet fits on its segments
        v = np.asarray(vertices)
        seg_len = np.hypot(*np.diff(v, axis=0).T)
        for i in range(len(radii)):
            turn = abs(headings[i + 1] - headings[i])
            max_t = 0.4 * min(seg_len[i], seg_len[i + 1])
            radii[i] = min(radii[i], max_t / max(math.tan(turn / 2), 1e-6))
        self.route = _Route(v, radii)
        self.turns = [headings[i + 1] - headings[i] for i in range(len(radii))]

    def _add_object(self, footprint, clearance: str, street: int, prims: _PrimList,
                    first: int) -> None:
        """Register the primitives added to ``prims`` since index ``first`` as one object."""
        self._footprints.append((tuple(float(x) for x in footprint), clearance, street, first,
                                 len(prims)))

    def _populate(self, rng) -> None:
        streets: List[_Street] = []
        route = self.route
        lane = self.lane_w
        # one street per route segment (extended to cover the crossings), plus side streets
        for i, (h, L) in enumerate(zip(route.seg_heading, route.seg_len)):
            parking = rng.random() < 0.65
            road_hw = lane + (2.3 if parking else 0.3)
            mid = 0.5 * (route.vertices[i] + route.vertices[i + 1])
            streets.append(_Street(mid[0], mid[1], h, L / 2 + road_hw + 1.0, road_hw,
                                   rng.uniform(1.8, 4.0), rng.uniform(0.1, 0.18), parking, True))
        for i, turn in enumerate(self.turns):
            if abs(turn) < math.radians(60):
                continue
            corner = route.vertices[i + 1]
            for h, p in ((route.seg_heading[i], 0.5), (route.seg_heading[i + 1] + np.pi, 0.5)):
                if rng.random() < p:
                    L = rng.uniform(40, 90)
                    road_hw = lane + rng.choice([0.3, 2.3])
                    c = corner + (L / 2) * np.array([math.cos(h), math.sin(h)])
                    streets.append(_Street(c[0], c[1], h, L / 2, road_hw, rng.uniform(1.8, 3.5),
                                           rng.uniform(0.1, 0.18), False, False))
        self.streets = streets

        for si, st in enumerate(streets):
            self._ground_regions.append((st.cx, st.cy, st.heading, st.half_len, st.road_hw, ROAD))
            style = rng.choice(["urban", "residential", "green", "mixed"], p=[0.35, 0.3, 0.15, 0.2])
            for side in (-1.0, 1.0):
                self._populate_side(rng, si, st, side, str(style))
        self._populate_route_traffic(rng)
        self._reject_conflicts()

    def _populate_side(self, rng, si: int, st: _Street, side: float, style: str) -> None:
        P = self._static_list
        hw, sw, sh = st.road_hw, st.sidewalk_w, st.sidewalk_h
        hl = st.half_len
        # sidewalk slabs (their road-side faces are the curbs), 8 m pieces
        n_pieces = max(1, int(math.ceil(2 * hl / 8.0)))
        piece = 2 * hl / n_pieces
        for k in range(n_pieces):
            u = -hl + (k + 0.5) * piece
            x, y = st.to_world(u, side * (hw + sw / 2))
            first = len(P)
            P.box(float(x), float(y), -0.5, sh, st.heading, piece / 2, sw / 2, SIDEWALK,
                  refl=0.3)
            self._add_object((x, y, st.heading, piece / 2, sw / 2), "sidewalk", si, P, first)
        v0 = hw + sw  # edge of the lots
        # street lamps near the curb
        u = -hl + rng.uniform(3, 20)
        lamp_h = rng.uniform(6.5, 8.5)
        while u < hl:
            x, y = st.to_world(u, side * (hw + 0.45))
            first = len(P)
            P.cylinder(float(x), float(y), 0.0, lamp_h, rng.uniform(0.07, 0.12), POLE, refl=0.45)
            ax, ay = st.to_world(u, side * (hw + 0.45 - 0.8))
            P.box(float(ax), float(ay), lamp_h - 0.15, lamp_h, st.heading + np.pi / 2, 0.8, 0.06,
                  POLE, refl=0.45)
            self._add_object((x, y, 0.0, 0.15, 0.15), "furniture", si, P, first)
            u += rng.uniform(22, 35)
        # traffic signs
        for _ in range(rng.poisson(2 * hl / 60)):
            u = rng.uniform(-hl, hl)
            x, y = st.to_world(u, side * (hw + 0.35))
            first = len(P)
            top = rng.uniform(2.2, 3.0)
            P.cylinder(float(x), float(y), 0.0, top, 0.035, POLE, refl=0.45)
            P.box(float(x), float(y), top - 0.05, top + 0.6, st.heading + np.pi / 2 * rng.choice([0, 1]),
                  0.32, 0.02, TRAFFIC_SIGN, refl=0.9)
            self._add_object((x, y, 0.0, 0.35, 0.35), "furniture", si, P, first)
        # sidewalk trees
        if rng.random() < 0.45:
            u = -hl + rng.uniform(2, 10)
            while u < hl:
                x, y = st.to_world(u, side * (hw + min(1.0, sw / 2)))
                self._tree(rng, float(x), float(y), si, "furniture", small=True)
                u += rng.uniform(7, 13)
        # static pedestrians and clutter on the sidewalk
        for _ in range(rng.poisson(2 * hl / 70)):
            u = rng.uniform(-hl, hl)
            x, y = st.to_world(u, side * (hw + rng.uniform(0.4, sw - 0.3)))
            t = _person_template(rng, PERSON, self._inst()).placed(float(x), float(y),
                                                                   rng.uniform(0, 6.28), z=sh)
            self._add_template(t, (x, y, 0.0, 0.3, 0.3), "furniture", si)
        for _ in range(rng.poisson(2 * hl / 50)):
            u = rng.uniform(-hl, hl)
            x, y = st.to_world(u, side * (hw + rng.uniform(0.4, sw - 0.3)))
            first = len(P)
            hx, hy = rng.uniform(0.25, 0.9), rng.uniform(0.25, 0.45)
            P.box(float(x), float(y), 0.0, sh + rng.uniform(0.5, 1.2), st.heading, hx, hy,
                  OTHER_OBJECT, refl=0.3)
            self._add_object((x, y, st.heading, hx, hy), "furniture", si, P, first)
        # walkers
        for _ in range(rng.poisson(2 * hl / 45)):
            tmpl = _person_template(rng, MOVING_PERSON, self._inst())
            self._agents.append(_Agent(tmpl, "street", rng.uniform(-hl, hl),
                                       rng.uniform(0.9, 1.6), side * (hw + sw * 0.5),
                                       int(rng.choice([-1, 1])), street=si, base_z=sh))
        # parked cars in the parking lane
        if st.parking:
            u = -hl + rng.uniform(0, 8)
            while u < hl:
                if rng.random() < 0.8:
                    kind = "van" if rng.random() < 0.12 else "car"
                    label = OTHER_VEHICLE if kind == "van" else CAR
                    tmpl, L, W = _car_template(rng, label, self._inst(), kind)
                    x, y = st.to_world(u + L / 2, side * (hw - 1.15))
                    yaw = st.heading + (0.0 if rng.random() < 0.5 else np.pi) + rng.normal(0, 0.03)
                    self._add_template(tmpl.placed(float(x), float(y), yaw),
                                       (x, y, yaw, L / 2, W / 2), "parked", si)
                    u += L + rng.uniform(0.8, 2.5)
                else:
                    u += rng.uniform(4, 12)
        # lots, block by block
        u = -hl
        while u < hl:
            blen = min(rng.uniform(18, 50), hl - u)
            if blen < 6:
                break
            kind = style if style != "mixed" else str(rng.choice(
                ["urban", "residential", "green", "parking"], p=[0.35, 0.3, 0.2, 0.15]))
            if kind == "urban" and rng.random() < 0.1:
                kind = "parking"
            getattr(self, f"_block_{kind}")(rng, si, st, side, u, u + blen, v0)
            u += blen + rng.uniform(0, 5)

    def _add_template(self, tmpl: _Prims, footprint, clearance: str, street: int) -> None:
        P = self._static_list
        first = len(P)
        for i in range(len(tmpl)):
            P.add(int(tmpl.kind[i]), *tmpl.geom[i], int(tmpl.label[i]), inst=int(tmpl.inst[i]),
                  porosity=float(tmpl.porosity[i]), pen=float(tmpl.pen[i]),
                  refl=float(tmpl.refl[i]))
        self._add_object(footprint, clearance, street, P, first)

    def _tree(self, rng, x, y, si, clearance, small=False) -> None:
        P = self._static_list
        first = len(P)
        trunk_h = rng.uniform(1.8, 3.0) if small else rng.uniform(2.0, 4.5)
        r = rng.uniform(0.1, 0.18) if small else rng.uniform(0.12, 0.35)
        P.cylinder(x, y, 0.0, trunk_h + 0.6, r, TRUNK, refl=0.3)
        crown = rng.uniform(1.2, 2.2) if small else rng.uniform(1.8, 4.0)
        n = int(rng.integers(1, 4))
        extent = 0.0
        for _ in range(n):
            rx, ry = crown * rng.uniform(0.7, 1.1), crown * rng.uniform(0.7, 1.1)
            rz = crown * rng.uniform(0.7, 1.2)
            ox, oy = rng.normal(0, 0.3 * crown, 2)
            P.ellipsoid(x + ox, y + oy, trunk_h + 0.8 * rz, rng.uniform(0, np.pi), rx, ry, rz,
                        VEGETATION, porosity=0.25, pen=0.35, refl=0.5)
            extent = max(extent, abs(ox) + max(rx, ry))
        # the footprint that matters for clearance is the trunk (crowns may overhang)
        self._add_object((x, y, 0.0, r + 0.2, r + 0.2), clearance, si, P, first)

    def _bush(self, rng, x, y, si) -> None:
        P = self._static_list
        first = len(P)
        rx, ry, rz = rng.uniform(0.5, 1.6), rng.uniform(0.5, 1.6), rng.uniform(0.4, 1.1)
        P.ellipsoid(x, y, 0.6 * rz, rng.uniform(0, np.pi), rx, ry, rz, VEGETATION, porosity=0.1,
                    pen=0.2, refl=0.5)
        self._add_object((x, y, 0.0, max(rx, ry), max(rx, ry)), "lot", si, P, first)

    def _frontage(self, rng, si, st, side, ua, ub, v, kind) -> None:
        """A hedge or fence along the lot edge at lateral position v, split into <= 8 m pieces."""
        P = self._static_list
        n = max(1, int(math.ceil((ub - ua) / 8.0)))
        piece = (ub - ua) / n
        if kind == "hedge":
            height, half_t = rng.uniform(0.8, 1.8), rng.uniform(0.3, 0.5)
        else:
            height, half_t = rng.uniform(1.0, 2.0), 0.03
            porosity = 0.4 if rng.random() < 0.5 else 0.0
        for k in range(n):
            u = ua + (k + 0.5) * piece
            x, y = st.to_world(u, side * (v + half_t))
            first = len(P)
            if kind == "hedge":
                P.box(float(x), float(y), 0.0, height, st.heading, piece / 2, half_t, VEGETATION,
                      porosity=0.05, pen=0.15, refl=0.5)
            else:
                P.box(float(x), float(y), 0.0, height, st.heading, piece / 2, half_t, FENCE,
                      porosity=porosity, refl=0.3)
            self._add_object((x, y, st.heading, piece / 2, half_t), "lot", si, P, first)

    def _building(self, rng, si, st, side, ua, ub, v_front, depth, height, balconies) -> None:
        P = self._static_list
        n = max(1, int(math.ceil((ub - ua) / 10.0)))
        piece = (ub - ua) / n
        for k in range(n):
            u = ua + (k + 0.5) * piece
            x, y = st.to_world(u, side * (v_front + depth / 2))
            first = len(P)
            P.box(float(x), float(y), -0.5, height, st.heading, piece / 2, depth / 2, BUILDING,
                  refl=rng.uniform(0.2, 0.45))
            if balconies and height > 7:
                for z in np.arange(3.2, height - 2.0, 3.0):
                    bx, by = st.to_world(u, side * (v_front - 0.6))
                    P.box(float(bx), float(by), z, z + 1.1, st.heading, min(piece / 2 - 0.5, 1.6),
                          0.6, BUILDING, porosity=0.2, refl=0.3)
            self._add_object((x, y, st.heading, piece / 2, depth / 2), "lot", si, P, first)

    def _block_urban(self, rng, si, st, side, ua, ub, v0) -> None:
        u = ua
        setback = rng.uniform(0.0, 1.5)
        while u < ub - 4:
            blen = min(rng.uniform(10, 32), ub - u)
            self._building(rng, si, st, side, u, u + blen, v0 + setback + rng.uniform(0, 0.6),
                           rng.uniform(10, 20), rng.uniform(7, 22), rng.random() < 0.4)
            u += blen + (rng.uniform(0.5, 6) if rng.random() < 0.4 else 0.0)

    def _block_residential(self, rng, si, st, side, ua, ub, v0) -> None:
        if rng.random() < 0.7:
            self._frontage(rng, si, st, side, ua, ub, v0 + 0.3,
                           "hedge" if rng.random() < 0.5 else "fence")
        u = ua + rng.uniform(1, 4)
        while u < ub - 6:
            blen = min(rng.uniform(8, 14), ub - u)
            setback = rng.uniform(4, 9)
            self._building(rng, si, st, side, u, u + blen, v0 + setback, rng.uniform(8, 12),
                           rng.uniform(5, 9), False)
            # front yard vegetation
            for _ in range(rng.poisson(1.2)):
                x, y = st.to_world(rng.uniform(u, u + blen), side * (v0 + rng.uniform(1.5, setback - 1)))
                if rng.random() < 0.5:
                    self._bush(rng, float(x), float(y), si)
                else:
                    self._tree(rng, float(x), float(y), si, "lot")
            u += blen + rng.uniform(3, 8)

    def _block_green(self, rng, si, st, side, ua, ub, v0) -> None:
        if rng.random() < 0.4:
            self._frontage(rng, si, st, side, ua, ub, v0 + 0.3, "fence")
        for _ in range(rng.poisson((ub - ua) / 6)):
            x, y = st.to_world(rng.uniform(ua, ub), side * (v0 + rng.uniform(2, 30)))
            self._tree(rng, float(x), float(y), si, "lot")
        for _ in range(rng.poisson((ub - ua) / 8)):
            x, y = st.to_world(rng.uniform(ua, ub), side * (v0 + rng.uniform(1, 25)))
            self._bush(rng, float(x), float(y), si)
        if rng.random() < 0.5:  # a building further back
            self._building(rng, si, st, side, ua + 2, ub - 2, v0 + rng.uniform(20, 35),
                           rng.uniform(10, 16), rng.uniform(6, 15), False)

    def _block_parking(self, rng, si, st, side, ua, ub, v0) -> None:
        depth = rng.uniform(14, 22)
        x, y = st.to_world(0.5 * (ua + ub), side * (v0 + depth / 2))
        region = (float(x), float(y), st.heading, (ub - ua) / 2, depth / 2)
        self._ground_regions.append(region + (PARKING,))
        # parked cars in a row, perpendicular to the street
        u = ua + 1.5
        while u < ub - 2.5:
            if rng.random() < 0.7:
                kind = "van" if rng.random() < 0.1 else "car"
                label = OTHER_VEHICLE if kind == "van" else CAR
                tmpl, L, W = _car_template(rng, label, self._inst(), kind)
                cx, cy = st.to_world(u + W / 2, side * (v0 + 1.0 + L / 2))
                yaw = st.heading + side * np.pi / 2 + (np.pi if rng.random() < 0.3 else 0.0) \
                    + rng.normal(0, 0.04)
                self._add_template(tmpl.placed(float(cx), float(cy), yaw),
                                   (cx, cy, yaw, L / 2, W / 2), "lot", si)
            u += rng.uniform(2.5, 2.9)
        P = self._static_list
        lx, ly = st.to_world(0.5 * (ua + ub), side * (v0 + depth - 1))
        first = len(P)
        P.cylinder(float(lx), float(ly), 0.0, rng.uniform(6, 9), 0.1, POLE, refl=0.45)
        self._add_object((lx, ly, 0.0, 0.2, 0.2), "lot", si, P, first)
        if rng.random() < 0.6:
            self._building(rng, si, st, side, ua + 1, ub - 1, v0 + depth + rng.uniform(1, 4),
                           rng.uniform(10, 18), rng.uniform(5, 14), False)

    def _populate_route_traffic(self, rng) -> None:
        """Moving cars in both directions along the route (ego lane: leaders and followers)."""
        route = self.route
        half = self.lane_w / 2
        vmax = self._v0 * (1 + self._vamp)
        vmin = self._v0 * (1 - self._vamp)
        duration = self.times[-1] if len(self.times) else 0.0

        def car(label_kind):
            kind = "van" if rng.random() < 0.12 else "car"
            label = MOVING_OTHER_VEHICLE if kind == "van" else MOVING_CAR
            tmpl, L, W = _car_template(rng, label, self._inst(), kind)
            return tmpl, L

        # oncoming traffic over the whole route (and what will arrive during the sequence)
        s = rng.uniform(5, 30)
        end = route.length + 13.0 * duration
        while s < end:
            tmpl, L = car("car")
            speed = rng.uniform(6.0, 12.0)
            self._agents.append(_Agent(tmpl, "route", s, speed, half, -1))
            s += rng.uniform(25, 80)
        # leaders in the ego lane, faster than the ego at its fastest
        s = self.s_start + rng.uniform(14, 25)
        for _ in range(int(rng.integers(1, 4))):
            tmpl, L = car("car")
            self._agents.append(_Agent(tmpl, "route", s, vmax * rng.uniform(1.2, 1.5) + 0.5,
                                       -half, 1))
            s += rng.uniform(20, 50)
        # followers, slower than the ego at its slowest
        s = self.s_start - rng.uniform(12, 25)
        for _ in range(int(rng.integers(0, 3))):
            tmpl, L = car("car")
            self._agents.append(_Agent(tmpl, "route", s, max(0.5, vmin * rng.uniform(0.5, 0.85)),
                                       -half, 1))
            s -= rng.uniform(20, 50)

    def _reject_conflicts(self) -> None:
        """Drop static objects that overlap a road, a side street or the lanes of moving traffic."""
        P = self._static_list
        fps = np.array([f[0] for f in self._footprints], dtype=np.float64).reshape(-1, 5)
        clearance = np.array([f[1] for f in self._footprints])
        owner = np.array([f[2] for f in self._footprints])
        streets = self.streets
        roads = np.array([[s.cx, s.cy, s.heading, s.half_len, s.road_hw] for s in streets])
        corridors = np.array([[s.cx, s.cy, s.heading, s.half_len, s.road_hw + s.sidewalk_w]
                              for s in streets])
        roads_grown = roads.copy()
        roads_grown[:, 3:] += 1.5
        own = owner[:, None] == np.arange(len(streets))[None, :]
        hit_road = _obb_overlap(fps, roads)
        hit_corr = _obb_overlap(fps, corridors)
        hit_grown = _obb_overlap(fps, roads_grown)
        reject = np.zeros(len(fps), dtype=bool)
        m = clearance == "sidewalk"
        reject[m] = (hit_road[m] & ~own[m]).any(1)
        m = clearance == "furniture"
        reject[m] = hit_road[m].any(1)
        m = clearance == "lot"
        reject[m] = hit_corr[m].any(1)
        m = clearance == "parked"
        reject[m] = (hit_grown[m] & ~own[m]).any(1)
        # keep the lanes of moving traffic (both directions, whole route) clear
        s = np.arange(0.0, self.route.length, 1.0)
        lanes = np.concatenate([self.route.offset(s, np.full(len(s), d))[0]
                                for d in (-self.lane_w / 2, self.lane_w / 2)])
        reject |= _points_in_obb(lanes, fps, margin=1.3)
        keep_prims = np.zeros(len(P), dtype=bool)
        for (fp, _, _, a, b), r in zip(self._footprints, reject):
            if not r:
                keep_prims[a:b] = True
        self.static = P.arrays().take(np.flatnonzero(keep_prims))
        regions = np.array(self._ground_regions, dtype=np.float64).reshape(-1, 6)
        if len(regions):
            park = regions[:, 5] == PARKING
            bad = np.zeros(len(regions), dtype=bool)
            bad[park] = _obb_overlap(regions[park, :5], corridors).any(1)
            regions = regions[~bad]
        self.ground_regions = regions
        self.n_rejected = int(reject.sum())

    def _build_ego(self, rng) -> None:
        cfg = self.config
        s = self.s_start + self._travel(self.times)
        xy, heading = self.route.offset(s, np.full(len(s), -self.lane_w / 2))
        a, b = self.slope
        poses = np.tile(np.eye(4), (len(s), 1, 1))
        # small smooth body motion (pitch / roll / height), as a suspension would give
        t = self.times
        wobble = [rng.uniform(0.001, 0.004) * np.sin(2 * np.pi * rng.uniform(0.3, 1.2) * t
                                                      + rng.uniform(0, 6.28)) for _ in range(3)]
        normal = np.array([-a, -b, 1.0]) / math.sqrt(a * a + b * b + 1)
        for k in range(len(s)):
            fwd = np.array([math.cos(heading[k]), math.sin(heading[k]), 0.0])
            fwd[2] = a * fwd[0] + b * fwd[1]
            fwd /= np.linalg.norm(fwd)
            left = np.cross(normal, fwd)
            R = np.stack([fwd, left, normal], 1)
            R = R @ _rot_xyz(wobble[0][k], wobble[1][k], 0.0)
            ground = a * xy[k, 0] + b * xy[k, 1]
            poses[k, :3, :3] = R
            poses[k, :3, 3] = (xy[k, 0], xy[k, 1], ground + cfg.sensor_height + 5 * wobble[2][k])
        self.world_poses = poses
        self.lidar_poses = np.linalg.inv(poses[0]) @ poses

    # ------------------------------------------------------------------ per scan
    @property
    def tr(self) -> np.ndarray:
        return self._tr.copy()

    def dynamic_prims(self, k: int) -> Tuple[_Prims, List[Tuple[int, np.ndarray]]]:
        """Primitives of the moving agents at sweep ``k`` (and their world positions)."""
        t = self.times[k]
        parts, where = [], []
        route_agents = [a for a in self._agents if a.mode == "route"]
        if route_agents:
            s = np.array([a.s0 + a.direction * a.speed * t for a in route_agents])
            off = np.array([a.offset for a in route_agents])
            xy, h = self.route.offset(s, off)
            for a, p, hh in zip(route_agents, xy, h):
                yaw = hh + (np.pi if a.direction < 0 else 0.0)
                parts.append(a.template.placed(p[0], p[1], yaw, a.base_z))
                where.append((int(a.template.inst[0]), p))
        for a in self._agents:
            if a.mode != "street":
                continue
            st = self.streets[a.street]
            u = a.s0 + a.direction * a.speed * t
            x, y = st.to_world(u, a.offset)
            yaw = st.heading + (np.pi if a.direction < 0 else 0.0)
            parts.append(a.template.placed(float(x), float(y), yaw, a.base_z))
            where.append((int(a.template.inst[0]), np.array([float(x), float(y)])))
        if not parts:
            return _PrimList().arrays(), where
        return _Prims.concat(parts), where

    def scan(self, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Ray-cast sweep ``k``: (points (N, 4) float32 in the LiDAR frame, labels (N,) uint32)."""
        if not 0 <= k < self.n_scans:
            raise IndexError(f"scan {k} out of range for a sequence of {self.n_scans} scans")
        cfg = self.config
        rng = np.random.default_rng([self.seed, self.sequence, 1 + k])
        pose = self.world_poses[k]
        R, o = pose[:3, :3], pose[:3, 3]
        a, b = self.slope
        dyn, _ = self.dynamic_prims(k)
        prims = _Prims.concat([self.static, dyn])
        # cull by distance
        g = prims.geom
        bound = np.sqrt(g[:, 4] ** 2 + g[:, 5] ** 2 + g[:, 6] ** 2)
        center_w = np.stack([g[:, 0], g[:, 1], g[:, 2] + a * g[:, 0] + b * g[:, 1]], 1)
        near = np.linalg.norm(center_w - o, axis=1) - bound < cfg.max_range
        prims = prims.take(np.flatnonzero(near))

        dirs_w = rotate(self._dirs, R)
        # sheared frame: z' = z - (a x + b y)
        dsh = dirs_w.copy()
        dsh[:, 2] -= a * dirs_w[:, 0] + b * dirs_w[:, 1]
        osh = o.copy()
        osh[2] -= a * o[0] + b * o[1]

        n_rays = len(dsh)
        best_t = np.full(n_rays, np.inf)
        # ground plane
        down = dsh[:, 2] < -1e-9
        t_ground = np.full(n_rays, np.inf)
        t_ground[down] = -osh[2] / dsh[down, 2]
        best_t = np.minimum(best_t, t_ground)

        ray, pid, t, normal = self._intersect_all(prims, R, o, osh, dsh, rng)
        if len(t):
            np.minimum.at(best_t, ray, t)
        hit = np.isfinite(best_t) & (best_t <= cfg.max_range) & (best_t >= cfg.min_range)

        # which surface won each ray
        win_prim = np.full(n_rays, -1, dtype=np.int64)
        win_normal = np.zeros((n_rays, 3))
        win_normal[:, 2] = 1.0
        if len(t):
            w = np.flatnonzero(t == best_t[ray])
            # ties: keep one per ray
            _, first = np.unique(ray[w], return_index=True)
            w = w[first]
            win_prim[ray[w]] = pid[w]
            win_normal[ray[w]] = normal[w]

        idx = np.flatnonzero(hit)
        rng_vals = best_t[idx]
        prim_of = win_prim[idx]
        on_ground = prim_of < 0
        labels = np.empty(len(idx), dtype=np.uint32)
        inst = np.zeros(len(idx), dtype=np.uint32)
        refl = np.empty(len(idx))
        pen = np.zeros(len(idx))
        labels[~on_ground] = prims.label[prim_of[~on_ground]]
        inst[~on_ground] = prims.inst[prim_of[~on_ground]]
        refl[~on_ground] = prims.refl[prim_of[~on_ground]]
        pen[~on_ground] = prims.pen[prim_of[~on_ground]]
        # ground hits: road / parking / terrain by region, lane markings brighter
        gi = np.flatnonzero(on_ground)
        if len(gi):
            pw = o + dirs_w[idx[gi]] * rng_vals[gi, None]
            glab, marking = self._ground_labels(pw[:, :2], o)
            labels[gi] = glab
            refl[gi] = np.where(marking, 0.8, np.select(
                [glab == ROAD, glab == PARKING], [0.22, 0.26], 0.38))
        # normals in world frame (ground: plane normal) -> incidence
        nrm = win_normal[idx]
        nrm[on_ground] = np.array([-a, -b, 1.0]) / math.sqrt(a * a + b * b + 1)
        cos_inc = np.abs((nrm * dirs_w[idx]).sum(1)) / np.maximum(np.linalg.norm(nrm, axis=1), 1e-9)
        # vegetation and other porous surfaces: returns from inside
        has_pen = pen > 0
        if has_pen.any():
            rng_vals[has_pen] += np.minimum(rng.exponential(pen[has_pen]), 3 * pen[has_pen])
        rng_vals = rng_vals + rng.normal(0.0, cfg.range_noise, len(rng_vals))
        drop_p = (cfg.dropout + cfg.grazing_dropout * np.clip(1 - cos_inc / 0.12, 0, 1)
                  + 0.15 * (rng_vals / cfg.max_range) ** 2)
        keep = (rng.random(len(rng_vals)) >= drop_p) & (rng_vals <= cfg.max_range)
        idx, rng_vals, labels, inst, refl, cos_inc = (x[keep] for x in
                                                      (idx, rng_vals, labels, inst, refl, cos_inc))
        # outliers (label 1) at random short ranges on random rays
        n_out = rng.binomial(n_rays, cfg.outlier_fraction)
        if n_out:
            oi = rng.choice(n_rays, n_out, replace=False)
            idx = np.concatenate([idx, oi])
            rng_vals = np.concatenate([rng_vals, rng.uniform(1.0, 40.0, n_out)])
            labels = np.concatenate([labels, np.full(n_out, OUTLIER, np.uint32)])
            inst = np.concatenate([inst, np.zeros(n_out, np.uint32)])
            refl = np.concatenate([refl, rng.uniform(0, 0.2, n_out)])
            cos_inc = np.concatenate([cos_inc, np.ones(n_out)])
        unl = rng.random(len(labels)) < cfg.unlabeled_fraction
        labels[unl] = UNLABELED
        inst[unl] = 0
        intensity = refl * (0.35 + 0.65 * np.sqrt(cos_inc)) * (1 - 0.3 * rng_vals / cfg.max_range)
        intensity = np.clip(intensity + rng.normal(0, 0.02, len(intensity)), 0.0, 0.99)
        order = np.argsort(idx, kind="stable")  # ring-major order like a range image
        idx, rng_vals, labels, inst, intensity = (x[order] for x in
                                                  (idx, rng_vals, labels, inst, intensity))
        pts = self._dirs[idx] * rng_vals[:, None]
        out = np.empty((len(idx), 4), dtype=np.float32)
        out[:, :3] = pts
        out[:, 3] = intensity
        return out, (labels | (inst << 16)).astype(np.uint32)

    def _ground_labels(self, xy: np.ndarray, o: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        labels = np.full(len(xy), TERRAIN, dtype=np.uint32)
        marking = np.zeros(len(xy), dtype=bool)
        regions = self.ground_regions
        if not len(regions):
            return labels, marking
        dist = np.hypot(regions[:, 0] - o[0], regions[:, 1] - o[1]) \
            - np.hypot(regions[:, 3], regions[:, 4])
        # parking first, roads last so that roads win
        order = [i for i in np.argsort(-regions[:, 5]) if dist[i] < self.config.max_range]
        for i in order:
            cx, cy, h, hx, hy, lab = regions[i]
            d = xy - (cx, cy)
            c, s = math.cos(h), math.sin(h)
            u = d[:, 0] * c + d[:, 1] * s
            v = -d[:, 0] * s + d[:, 1] * c
            inside = (np.abs(u) <= hx) & (np.abs(v) <= hy)
            labels[inside] = int(lab)
            if lab == ROAD:
                marking[inside] = (np.abs(v[inside]) < 0.075) & ((u[inside] % 6.0) < 3.0)
        return labels, marking

    def _intersect_all(self, prims: _Prims, R, o, osh, dsh, rng):
        """All (ray, primitive) hits inside the primitives' angular footprints.

        Returns ray index, primitive index, ray parameter t and the (sheared-frame) normal."""
        cfg = self.config
        H, W = len(self.elevations), cfg.azimuth_steps
        n = len(prims)
        empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros((0, 3)))
        if n == 0:
            return empty
        g = prims.geom
        a, b = self.slope
        # corners of each primitive's bounding box (sheared frame) -> world -> sensor frame
        sx = np.array([-1, 1, -1, 1, -1, 1, -1, 1], dtype=np.float64)
        sy = np.array([-1, -1, 1, 1, -1, -1, 1, 1], dtype=np.float64)
        sz = np.array([-1, -1, -1, -1, 1, 1, 1, 1], dtype=np.float64)
        c, s = np.cos(g[:, 3])[:, None], np.sin(g[:, 3])[:, None]
        lx, ly = g[:, 4:5] * sx, g[:, 5:6] * sy
        cx = g[:, 0:1] + c * lx - s * ly
        cy = g[:, 1:2] + s * lx + c * ly
        cz = g[:, 2:3] + g[:, 6:7] * sz + a * cx + b * cy
        corners = np.stack([cx, cy, cz], -1) - o                  # (n, 8, 3) world, centred
        corners = rotate(corners.reshape(-1, 3), R.T).reshape(-1, 8, 3)  # sensor frame
        cxy = corners[..., :2].mean(1)
        rxy = np.linalg.norm(corners[..., :2] - cxy[:, None, :], axis=-1).max(1)
        dxy = np.linalg.norm(cxy, axis=1)
        full = dxy <= rxy * 1.001 + 1e-6
        ref = np.arctan2(cxy[:, 1], cxy[:, 0])
        ang = np.arctan2(corners[..., 1], corners[..., 0])
        rel = _wrap(ang - ref[:, None])
        step = 2 * np.pi / W
        lo = np.floor((ref + rel.min(1)) / step).astype(np.int64)
        hi = np.ceil((ref + rel.max(1)) / step).astype(np.int64)
        ncol = np.where(full, W, np.minimum(hi - lo + 1, W))
        lo = np.where(full, 0, lo)
        # elevation bounds: linear z over the box, horizontal distance within [rho_min, rho_max]
        zmax, zmin = corners[..., 2].max(1), corners[..., 2].min(1)
        rho_min = np.maximum(dxy - rxy, 1e-6)
        rho_max = dxy + rxy
        e_hi = np.arctan2(zmax, np.where(zmax > 0, rho_min, rho_max))
        e_lo = np.arctan2(zmin, np.where(zmin < 0, rho_min, rho_max))
        margin = 1e-4
        i0 = np.searchsorted(self._elev_asc, e_lo - margin, side="left")
        i1 = np.searchsorted(self._elev_asc, e_hi + margin, side="right")
        nb = np.maximum(i1 - i0, 0)
        b0 = H - i1
        counts = ncol * nb
        total = int(counts.sum())
        if total == 0:
            return empty
        pid = np.repeat(np.arange(n), counts)
        starts = np.cumsum(counts) - counts
        k = np.arange(total, dtype=np.int64) - starts[pid]
        nbp = nb[pid]
        col = (lo[pid] + k // nbp) % W
        beam = b0[pid] + k % nbp
        ray = beam * W + col
        # porous primitives let some rays through
        por = prims.porosity[pid]
        keep = (por <= 0) | (rng.random(total) >= por)
        pid, ray = pid[keep], ray[keep]

        out_ray, out_pid, out_t, out_n = [], [], [], []
        kinds = prims.kind[pid]
        for kind, fn in ((BOX, _hit_boxes), (CYLINDER, _hit_cylinders),
                         (ELLIPSOID, _hit_ellipsoids)):
            m = kinds == kind
            if not m.any():
                continue
            r_, p_ = ray[m], pid[m]
            t, nrm = fn(g, p_, osh, dsh[r_])
            ok = np.isfinite(t)
            out_ray.append(r_[ok])
            out_pid.append(p_[ok])
            out_t.append(t[ok])
            out_n.append(nrm[ok])
        if not out_ray:
            return empty
        return (np.concatenate(out_ray), np.concatenate(out_pid), np.concatenate(out_t),
                np.concatenate(out_n))

    # ------------------------------------------------------------------ writing
    def write(self, seq_dir: Union[str, os.PathLike], progress=None) -> None:
        """Write this sequence in SemanticKITTI layout into ``seq_dir``."""
        seq_dir = Path(seq_dir)
        (seq_dir / "velodyne").mkdir(parents=True, exist_ok=True)
        (seq_dir / "labels").mkdir(parents=True, exist_ok=True)
        kitti.write_calib(seq_dir / "calib.txt", _kitti_calib(self._tr))
        kitti.write_times(seq_dir / "times.txt", self.times)
        for k in range(self.n_scans):
            pts, lab = self.scan(k)
            kitti.write_scan(seq_dir / "velodyne" / f"{k:06d}.bin", pts)
            kitti.write_labels(seq_dir / "labels" / f"{k:06d}.label", lab)
            if progress is not None:
                progress.update(1)
        # poses last: a sequence folder with poses.txt is complete
        kitti.write_poses(seq_dir / "poses.txt",
                          kitti.velo_to_cam_poses(self.lidar_poses, self._tr))


def _hit_boxes(g, p, o, d):
    cx, cy, cz, yaw = g[p, 0], g[p, 1], g[p, 2], g[p, 3]
    ext = g[p, 4:7]
    c, s = np.cos(yaw), np.sin(yaw)
    ox, oy, oz = o[0] - cx, o[1] - cy, o[2] - cz
    lo = np.stack([c * ox + s * oy, -s * ox + c * oy, oz], 1)
    ld = np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1], d[:, 2]], 1)
    ld = np.where(np.abs(ld) < 1e-12, 1e-12, ld)
    inv = 1.0 / ld
    t1 = (-ext - lo) * inv
    t2 = (ext - lo) * inv
    tmin = np.minimum(t1, t2)
    tmax = np.maximum(t1, t2)
    tnear = tmin.max(1)
    tfar = tmax.min(1)
    ok = (tnear <= tfar) & (tnear > 1e-6)
    t = np.where(ok, tnear, np.inf)
    axis = tmin.argmax(1)
    nl = np.zeros_like(ld)
    rows = np.arange(len(ld))
    nl[rows, axis] = -np.sign(ld[rows, axis])
    normal = np.stack([c * nl[:, 0] - s * nl[:, 1], s * nl[:, 0] + c * nl[:, 1], nl[:, 2]], 1)
    return t, normal


def _hit_cylinders(g, p, o, d):
    cx, cy, cz, r, hz = g[p, 0], g[p, 1], g[p, 2], g[p, 4], g[p, 6]
    ox, oy = o[0] - cx, o[1] - cy
    qa = d[:, 0] ** 2 + d[:, 1] ** 2
    qb = 2 * (ox * d[:, 0] + oy * d[:, 1])
    qc = ox * ox + oy * oy - r * r
    disc = qb * qb - 4 * qa * qc
    ok = (disc > 0) & (qa > 1e-12) & (qc > 0)
    sq = np.sqrt(np.where(ok, disc, 0.0))
    t = (-qb - sq) / np.where(ok, 2 * qa, 1.0)
    z = o[2] + t * d[:, 2] - cz
    ok &= (t > 1e-6) & (np.abs(z) <= hz)
    t = np.where(ok, t, np.inf)
    hx = ox + t * d[:, 0]
    hy = oy + t * d[:, 1]
    hx = np.where(ok, hx, 0.0)
    hy = np.where(ok, hy, 0.0)
    normal = np.stack([hx / r, hy / r, np.zeros_like(hx)], 1)
    return t, normal


def _hit_ellipsoids(g, p, o, d):
    cx, cy, cz, yaw = g[p, 0], g[p, 1], g[p, 2], g[p, 3]
    ext = g[p, 4:7]
    c, s = np.cos(yaw), np.sin(yaw)
    ox, oy, oz = o[0] - cx, o[1] - cy, o[2] - cz
    lo = np.stack([c * ox + s * oy, -s * ox + c * oy, oz], 1) / ext
    ld = np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1], d[:, 2]], 1) / ext
    qa = (ld * ld).sum(1)
    qb = 2 * (lo * ld).sum(1)
    qc = (lo * lo).sum(1) - 1.0
    disc = qb * qb - 4 * qa * qc
    ok = (disc > 0) & (qc > 0)
    sq = np.sqrt(np.where(ok, disc, 0.0))
    t = (-qb - sq) / (2 * qa)
    ok &= t > 1e-6
    t = np.where(ok, t, np.inf)
    hp = lo + np.where(ok, t, 0.0)[:, None] * ld
    nl = hp / ext
    normal = np.stack([c * nl[:, 0] - s * nl[:, 1], s * nl[:, 0] + c * nl[:, 1], nl[:, 2]], 1)
    return t, normal


def _rot_xyz(rx, ry, rz) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), \
        math.cos(rz), math.sin(rz)
    Rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return Rz @ Ry @ Rx


def _kitti_like_tr(rng) -> np.ndarray:
    """A velodyne -> camera-0 transform like KITTI's: axes permuted (cam z = velo x, cam x = -velo y,
    cam y = -velo z), a small mounting rotation, camera about 0.27 m behind the LiDAR origin."""
    base = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
    small = _rot_xyz(*np.deg2rad(rng.normal(0.0, 0.4, 3)))
    tr = np.eye(4)
    tr[:3, :3] = base @ small
    tr[:3, 3] = (rng.normal(-0.004, 0.005), rng.normal(-0.076, 0.01), rng.normal(-0.272, 0.01))
    return tr


def _kitti_calib(tr: np.ndarray) -> Dict[str, np.ndarray]:
    f, cx, cy = 718.856, 607.1928, 185.2157
    p0 = np.array([[f, 0, cx, 0.0], [0, f, cy, 0.0], [0, 0, 1, 0.0]])
    p1 = p0.copy()
    p1[0, 3] = -386.1448
    p2 = p0.copy()
    p2[:, 3] = (45.38225, -0.1130887, 0.003779761)
    p3 = p0.copy()
    p3[:, 3] = (-337.2877, 2.369057, 0.004915215)
    return {"P0": p0, "P1": p1, "P2": p2, "P3": p3, "Tr": tr[:3]}


# ----------------------------------------------------------------------------------------------
# dataset-level API
# ----------------------------------------------------------------------------------------------
def _sequence_ids(sequences, first: int = 0) -> List[str]:
    if isinstance(sequences, (int, np.integer)):
        if sequences < 1:
            raise ConfigError(f"number of sequences must be >= 1, found {sequences}")
        return [f"{first + i:02d}" for i in range(int(sequences))]
    ids = [kitti.sequence_id(s) for s in sequences]
    if not ids:
        raise ConfigError("no sequences requested")
    return ids


def generate_sequence(out_root: Union[str, os.PathLike], sequence: Union[int, str], scans: int,
                      seed: int = 0, config: Optional[SyntheticConfig] = None,
                      progress=None) -> Path:
    """Generate one sequence into ``out_root/sequences/SS``; returns the sequence folder."""
    seq = kitti.sequence_id(sequence)
    scene = SyntheticScene(seed, int(seq), scans, config)
    seq_dir = Path(out_root) / "sequences" / seq
    scene.write(seq_dir, progress=progress)
    return seq_dir


def generate_dataset(out_root: Union[str, os.PathLike], sequences: Union[int, Sequence] = 1,
                     scans: int = 100, seed: int = 0, config: Optional[SyntheticConfig] = None,
                     first_sequence: int = 0, progress: bool = False) -> List[str]:
    """Write a synthetic SemanticKITTI-layout dataset to ``out_root/sequences/SS/...``.

    ``sequences``: a count N (ids ``first_sequence`` .. +N-1) or a list of ids. The same
    (seed, sequence id, scans, config) always gives the same files. Returns the sequence ids.
    """
    ids = _sequence_ids(sequences, first_sequence)
    if scans < 1:
        raise ConfigError(f"scans per sequence must be >= 1, found {scans}")
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(ids) * scans, unit="scan", desc="make-synthetic")
    try:
        for seq in ids:
            if bar is not None:
                bar.set_postfix_str(f"sequence {seq}")
            generate_sequence(out_root, seq, scans, seed, config, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    return ids


def synthetic_pairs(root: Union[str, os.PathLike], sequence: Union[int, str] = 0,
                    scans: int = 20, seed: int = 0, config: Optional[SyntheticConfig] = None,
                    cache_dir: Optional[Union[str, os.PathLike]] = None,
                    gt_config=None) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Yield ``(scan (N, 4) float32, target (M, 3) float32)`` for a synthetic sequence.

    Generates the sequence under ``root`` when it is not there yet (same seed -> same data), builds
    its ground truth through the same builder and cache as real data (:func:`..gt.build_sequence`),
    then yields every frame's raw scan and cached target (scan frame, z > -4 m, viewpoint-masked).
    """
    from . import gt as gt_mod
    seq = kitti.sequence_id(sequence)
    seq_dir = Path(root) / "sequences" / seq
    if not (seq_dir / "poses.txt").is_file():
        generate_sequence(root, seq, scans, seed, config)
    sequence_obj = kitti.SemanticKittiSequence(root, seq, require_labels=True)
    cache_root = Path(cache_dir) if cache_dir is not None else Path(root) / "gt_cache"
    cache = gt_mod.build_sequence(sequence_obj, cache_root, config=gt_config)
    for i in range(len(sequence_obj)):
        yield sequence_obj.scan(i), cache.load_target(i)


def config_dict(config: Optional[SyntheticConfig] = None) -> Dict:
    return asdict(config or SyntheticConfig())
