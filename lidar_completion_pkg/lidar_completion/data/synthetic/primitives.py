"""Analytic primitives of a synthetic scene and their closed-form ray intersections.

Primitives are kept as a struct of arrays (:class:`Prims`; built with :class:`PrimList`). Every
primitive has a centre (cx, cy, cz), a yaw and half extents (ex, ey, ez): a box is an oriented box,
a cylinder is vertical with radius ex and half height ez, an ellipsoid has radii ex, ey, ez. The
``hit_*`` functions intersect many (ray, primitive) pairs of one kind at once and return the ray
parameter of the first hit (inf for a miss) and the surface normal.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

__all__ = ["BOX", "CYLINDER", "ELLIPSOID", "PrimList", "Prims", "car_template", "person_template",
           "hit_boxes", "hit_cylinders", "hit_ellipsoids"]

BOX, CYLINDER, ELLIPSOID = 0, 1, 2
_GEOM = 7  # cx, cy, cz, yaw, ex, ey, ez


class PrimList:
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

    def arrays(self) -> "Prims":
        n = len(self.kind)
        return Prims(
            geom=np.asarray(self.geom, dtype=np.float64).reshape(n, _GEOM),
            kind=np.asarray(self.kind, dtype=np.int8),
            label=np.asarray(self.label, dtype=np.uint32),
            inst=np.asarray(self.inst, dtype=np.uint32),
            porosity=np.asarray(self.porosity, dtype=np.float64),
            pen=np.asarray(self.pen, dtype=np.float64),
            refl=np.asarray(self.refl, dtype=np.float64),
        )


@dataclass
class Prims:
    geom: np.ndarray
    kind: np.ndarray
    label: np.ndarray
    inst: np.ndarray
    porosity: np.ndarray
    pen: np.ndarray
    refl: np.ndarray

    def __len__(self):
        return len(self.kind)

    def take(self, idx) -> "Prims":
        return Prims(*(getattr(self, f)[idx] for f in _PRIM_FIELDS))

    @staticmethod
    def concat(parts: Sequence["Prims"]) -> "Prims":
        return Prims(*(np.concatenate([getattr(p, f) for p in parts]) for f in _PRIM_FIELDS))

    def placed(self, x: float, y: float, yaw: float, z: float = 0.0) -> "Prims":
        """A copy moved by a rigid (x, y, yaw) placement and lifted by z."""
        c, s = math.cos(yaw), math.sin(yaw)
        g = self.geom.copy()
        g[:, 0] = x + c * self.geom[:, 0] - s * self.geom[:, 1]
        g[:, 1] = y + s * self.geom[:, 0] + c * self.geom[:, 1]
        g[:, 2] += z
        g[:, 3] += yaw
        return Prims(g, self.kind, self.label, self.inst, self.porosity, self.pen, self.refl)


_PRIM_FIELDS = ("geom", "kind", "label", "inst", "porosity", "pen", "refl")


def car_template(rng, label, inst, kind="car") -> Tuple[Prims, float, float]:
    """Box-ish vehicle in its local frame (x forward, base on z = 0); returns (prims, L, W)."""
    p = PrimList()
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


def person_template(rng, label, inst) -> Prims:
    p = PrimList()
    h = rng.uniform(1.55, 1.9)
    r = rng.uniform(0.17, 0.23)
    p.cylinder(0.0, 0.0, 0.0, h - 0.25, r, label, inst=inst, refl=0.3)
    p.ellipsoid(0.0, 0.0, h - 0.12, 0.0, 0.1, 0.1, 0.12, label, inst=inst, refl=0.25)
    return p.arrays()


# ray intersections (o: ray origin, d: (n, 3) directions, p: primitive index per ray)
def hit_boxes(g, p, o, d):
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


def hit_cylinders(g, p, o, d):
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


def hit_ellipsoids(g, p, o, d):
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
