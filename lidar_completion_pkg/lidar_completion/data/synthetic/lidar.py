"""The LiDAR model of the synthetic generator: a Velodyne HDL-64E ray-cast against a town.

64 beams from +2 deg to -24.9 deg, ``azimuth_steps`` columns, ``max_range`` metres, with range noise,
random and grazing-angle dropouts, porous vegetation and fences, a few outliers (label 1) and
unlabeled points (label 0). Rays are cast in a *sheared* frame in which the sloped ground plane is
z' = 0 (an affine map keeps rays straight and ray parameters unchanged), and each sweep tests only the
(ray, primitive) pairs inside each primitive's angular footprint, all pairs of one primitive type at
once, so a full sweep takes a fraction of a second on one core.
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np

from ..geometry import rotate
from .config import OUTLIER, PARKING, ROAD, UNLABELED, SyntheticConfig
from .layout import Town, wrap_angle
from .primitives import BOX, CYLINDER, ELLIPSOID, Prims, hit_boxes, hit_cylinders, hit_ellipsoids

__all__ = ["Hdl64", "hdl64_elevations_deg"]


def hdl64_elevations_deg() -> np.ndarray:
    """Vertical angles (degrees, beam 0 at the top) of the HDL-64E model used here: an upper block of
    32 beams from +2.0 to -8.33 deg and a lower block of 32 from -8.83 to -24.9 deg."""
    return np.concatenate([np.linspace(2.0, -8.33, 32), np.linspace(-8.83, -24.9, 32)])


class Hdl64:
    """Ray directions of one sweep and the ray casting against a :class:`~.layout.Town`."""

    def __init__(self, config: SyntheticConfig):
        self.config = config
        cfg = config
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

    def sweep(self, town: Town, k: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        """Ray-cast sweep ``k`` of ``town`` (noise and dropouts from ``rng``): (points (N, 4)
        float32 in the LiDAR frame, labels (N,) uint32)."""
        cfg = self.config
        pose = town.world_poses[k]
        R, o = pose[:3, :3], pose[:3, 3]
        a, b = town.slope
        dyn, _ = town.dynamic_prims(k)
        prims = Prims.concat([town.static, dyn])
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

        ray, pid, t, normal = self._intersect_all(prims, town.slope, R, o, osh, dsh, rng)
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
            glab, marking = town.ground_labels(pw[:, :2], o)
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

    def _intersect_all(self, prims: Prims, slope, R, o, osh, dsh, rng):
        """All (ray, primitive) hits inside the primitives' angular footprints.

        Returns ray index, primitive index, ray parameter t and the (sheared-frame) normal."""
        cfg = self.config
        H, W = len(self.elevations), cfg.azimuth_steps
        n = len(prims)
        empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros((0, 3)))
        if n == 0:
            return empty
        g = prims.geom
        a, b = slope
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
        rel = wrap_angle(ang - ref[:, None])
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
        for kind, fn in ((BOX, hit_boxes), (CYLINDER, hit_cylinders),
                         (ELLIPSOID, hit_ellipsoids)):
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
