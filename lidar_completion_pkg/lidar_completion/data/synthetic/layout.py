"""The layout of a synthetic town: streets along a route, what stands beside them, the traffic and
the ego vehicle's drive.

A route of straight streets joined by rounded corners (with side streets at some crossings) on a
gently sloped ground plane; roads with raised sidewalks (the curbs are their side faces), building
façades, fences, hedges, street lamps, traffic signs, trees (trunk + blob crown), bushes, parked
cars, and moving cars and pedestrians. Objects that would block a road, a side street or the lanes
of moving traffic are dropped. The ego vehicle drives the route at about 5-9 m/s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

from .config import (CAR, MOVING_CAR, MOVING_OTHER_VEHICLE, MOVING_PERSON, OTHER_OBJECT,
                     OTHER_VEHICLE, PARKING, PERSON, POLE, ROAD, SIDEWALK, TERRAIN, TRAFFIC_SIGN,
                     TRUNK, VEGETATION, BUILDING, FENCE, SyntheticConfig)
from .primitives import PrimList, Prims, car_template, person_template

__all__ = ["Town", "Route", "Street", "Agent", "rot_xyz", "wrap_angle"]


class Route:
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
                turn = wrap_angle(self.seg_heading[i + 1] - h)
                end_trim = radii[i] * math.tan(abs(turn) / 2)
            line_end = v[i + 1] - end_trim * np.array([math.cos(h), math.sin(h)])
            length = float(np.hypot(*(line_end - start)))
            pieces.append((0, s, length, start[0], start[1], h, 0.0, 0.0, 0.0, 0.0))
            s += length
            if i < n_seg - 1:
                turn = wrap_angle(self.seg_heading[i + 1] - h)
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


def wrap_angle(a):
    return (np.asarray(a) + np.pi) % (2 * np.pi) - np.pi


@dataclass
class Street:
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


def obb_overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
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


def points_in_obb(points: np.ndarray, obb: np.ndarray, margin: float) -> np.ndarray:
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


@dataclass
class Agent:
    template: Prims
    mode: str              # "route" or "street"
    s0: float
    speed: float
    offset: float          # lateral offset (route) / v coordinate (street)
    direction: int         # +1 along, -1 against
    street: int = -1
    base_z: float = 0.0


class Town:
    """One procedural town and its drive: the static primitives (``static``), the moving agents
    (``agents``, placed per sweep by :meth:`dynamic_prims`), the streets and ground regions, and the
    ego vehicle's LiDAR poses in the world (``world_poses``) and relative to the first
    (``lidar_poses``) at ``times``. Every random draw comes from ``rng``, in a fixed order.
    """

    def __init__(self, rng: np.random.Generator, config: SyntheticConfig, n_scans: int):
        self.config = config
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
        self._static_list = PrimList()
        self._footprints: List[Tuple[Tuple[float, float, float, float, float], str, int, int]] = []
        self._ground_regions: List[Tuple[float, float, float, float, float, int]] = []
        self.agents: List[Agent] = []
        self._next_inst = 1
        self._populate(rng)
        self._build_ego(rng)

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
        self.route = Route(v, radii)
        self.turns = [headings[i + 1] - headings[i] for i in range(len(radii))]

    def _add_object(self, footprint, clearance: str, street: int, prims: PrimList,
                    first: int) -> None:
        """Register the primitives added to ``prims`` since index ``first`` as one object."""
        self._footprints.append((tuple(float(x) for x in footprint), clearance, street, first,
                                 len(prims)))

    def _populate(self, rng) -> None:
        streets: List[Street] = []
        route = self.route
        lane = self.lane_w
        # one street per route segment (extended to cover the crossings), plus side streets
        for i, (h, L) in enumerate(zip(route.seg_heading, route.seg_len)):
            parking = rng.random() < 0.65
            road_hw = lane + (2.3 if parking else 0.3)
            mid = 0.5 * (route.vertices[i] + route.vertices[i + 1])
            streets.append(Street(mid[0], mid[1], h, L / 2 + road_hw + 1.0, road_hw,
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
                    streets.append(Street(c[0], c[1], h, L / 2, road_hw, rng.uniform(1.8, 3.5),
                                           rng.uniform(0.1, 0.18), False, False))
        self.streets = streets

        for si, st in enumerate(streets):
            self._ground_regions.append((st.cx, st.cy, st.heading, st.half_len, st.road_hw, ROAD))
            style = rng.choice(["urban", "residential", "green", "mixed"], p=[0.35, 0.3, 0.15, 0.2])
            for side in (-1.0, 1.0):
                self._populate_side(rng, si, st, side, str(style))
        self._populate_route_traffic(rng)
        self._reject_conflicts()

    def _populate_side(self, rng, si: int, st: Street, side: float, style: str) -> None:
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
            t = person_template(rng, PERSON, self._inst()).placed(float(x), float(y),
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
            tmpl = person_template(rng, MOVING_PERSON, self._inst())
            self.agents.append(Agent(tmpl, "street", rng.uniform(-hl, hl),
                                       rng.uniform(0.9, 1.6), side * (hw + sw * 0.5),
                                       int(rng.choice([-1, 1])), street=si, base_z=sh))
        # parked cars in the parking lane
        if st.parking:
            u = -hl + rng.uniform(0, 8)
            while u < hl:
                if rng.random() < 0.8:
                    kind = "van" if rng.random() < 0.12 else "car"
                    label = OTHER_VEHICLE if kind == "van" else CAR
                    tmpl, L, W = car_template(rng, label, self._inst(), kind)
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

    def _add_template(self, tmpl: Prims, footprint, clearance: str, street: int) -> None:
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
                tmpl, L, W = car_template(rng, label, self._inst(), kind)
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
            tmpl, L, W = car_template(rng, label, self._inst(), kind)
            return tmpl, L

        # oncoming traffic over the whole route (and what will arrive during the sequence)
        s = rng.uniform(5, 30)
        end = route.length + 13.0 * duration
        while s < end:
            tmpl, L = car("car")
            speed = rng.uniform(6.0, 12.0)
            self.agents.append(Agent(tmpl, "route", s, speed, half, -1))
            s += rng.uniform(25, 80)
        # leaders in the ego lane, faster than the ego at its fastest
        s = self.s_start + rng.uniform(14, 25)
        for _ in range(int(rng.integers(1, 4))):
            tmpl, L = car("car")
            self.agents.append(Agent(tmpl, "route", s, vmax * rng.uniform(1.2, 1.5) + 0.5,
                                       -half, 1))
            s += rng.uniform(20, 50)
        # followers, slower than the ego at its slowest
        s = self.s_start - rng.uniform(12, 25)
        for _ in range(int(rng.integers(0, 3))):
            tmpl, L = car("car")
            self.agents.append(Agent(tmpl, "route", s, max(0.5, vmin * rng.uniform(0.5, 0.85)),
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
        hit_road = obb_overlap(fps, roads)
        hit_corr = obb_overlap(fps, corridors)
        hit_grown = obb_overlap(fps, roads_grown)
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
        reject |= points_in_obb(lanes, fps, margin=1.3)
        keep_prims = np.zeros(len(P), dtype=bool)
        for (fp, _, _, a, b), r in zip(self._footprints, reject):
            if not r:
                keep_prims[a:b] = True
        self.static = P.arrays().take(np.flatnonzero(keep_prims))
        regions = np.array(self._ground_regions, dtype=np.float64).reshape(-1, 6)
        if len(regions):
            park = regions[:, 5] == PARKING
            bad = np.zeros(len(regions), dtype=bool)
            bad[park] = obb_overlap(regions[park, :5], corridors).any(1)
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
            R = R @ rot_xyz(wobble[0][k], wobble[1][k], 0.0)
            ground = a * xy[k, 0] + b * xy[k, 1]
            poses[k, :3, :3] = R
            poses[k, :3, 3] = (xy[k, 0], xy[k, 1], ground + cfg.sensor_height + 5 * wobble[2][k])
        self.world_poses = poses
        self.lidar_poses = np.linalg.inv(poses[0]) @ poses

    def dynamic_prims(self, k: int) -> Tuple[Prims, List[Tuple[int, np.ndarray]]]:
        """Primitives of the moving agents at sweep ``k`` (and their world positions)."""
        t = self.times[k]
        parts, where = [], []
        route_agents = [a for a in self.agents if a.mode == "route"]
        if route_agents:
            s = np.array([a.s0 + a.direction * a.speed * t for a in route_agents])
            off = np.array([a.offset for a in route_agents])
            xy, h = self.route.offset(s, off)
            for a, p, hh in zip(route_agents, xy, h):
                yaw = hh + (np.pi if a.direction < 0 else 0.0)
                parts.append(a.template.placed(p[0], p[1], yaw, a.base_z))
                where.append((int(a.template.inst[0]), p))
        for a in self.agents:
            if a.mode != "street":
                continue
            st = self.streets[a.street]
            u = a.s0 + a.direction * a.speed * t
            x, y = st.to_world(u, a.offset)
            yaw = st.heading + (np.pi if a.direction < 0 else 0.0)
            parts.append(a.template.placed(float(x), float(y), yaw, a.base_z))
            where.append((int(a.template.inst[0]), np.array([float(x), float(y)])))
        if not parts:
            return PrimList().arrays(), where
        return Prims.concat(parts), where

    def ground_labels(self, xy: np.ndarray, o: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Labels (road / parking / terrain) of ground points ``xy`` seen from ``o``, and whether
        each lies on a lane marking."""
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


def rot_xyz(rx, ry, rz) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), \
        math.cos(rz), math.sin(rz)
    Rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return Rz @ Ry @ Rx
