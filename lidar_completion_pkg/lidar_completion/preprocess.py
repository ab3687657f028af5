"""Pre- and post-processing of one scan around the diffusion (docs/method.md, "Data and ground
truth" and "Post-processing").

* :func:`filter_scan`: keep xyz with ``min_range < range < max_range`` and ``z > min_z``
  (3.5 m, 50 m, -4 m published);
* :func:`farthest_point_sample`: exact farthest-point sampling (the ``fpsample`` package, QuickFPS
  bucket variant: the selection of the textbook O(N k) loop, in a fraction of the time, from a
  start point of its own choosing - it does not honour ``start_idx=0``);
* :func:`sector_split`: the approximate variant's partition: azimuth sectors of the scan, each with
  a share of the samples by how much space it covers (:func:`farthest_point_sample` with
  ``parts`` > 1, and the device kernel's, :attr:`lidar_completion.completer.Completer.fps_parts`);
* :func:`make_x_init`: FPS to ``n_fps`` points (18,000) and tile ``tile`` times (10 -> 180,000);
* :func:`postprocess`: keep ``range < max_range`` and
  ``mean_z(x_init) - 2 std_z(x_init) < z < max_z(x_init)``.

Arrays are float32 numpy (N, 3) unless stated; :func:`postprocess` also takes torch tensors.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .errors import CloudFormatError
from .constants import DEFAULTS

__all__ = ["DEFAULTS", "as_cloud", "filter_scan", "farthest_point_sample", "sector_split", "sector_members",
           "make_x_init", "postprocess_mask", "postprocess"]


def as_cloud(points, name: str = "points") -> np.ndarray:
    """Validate an (N, >=3) real array and return its finite xyz rows as float32 (M, 3).

    Rows with NaN or inf in x, y or z are dropped. Also taken: a structured array with fields ``x``,
    ``y``, ``z`` (what :func:`lidar_completion.pointcloud2.read_points` returns); a numpy masked
    array, whose masked rows are dropped; a torch tensor of any real dtype. Raises
    :class:`CloudFormatError` for anything else, naming what it got: a 3-D array says how to pass an
    organised cloud (it cannot be told from a batch of scans, which is completed one by one), a
    cloud that looks transposed, (3, N), says so.
    """
    if hasattr(points, "detach") and hasattr(points, "cpu"):  # torch tensor
        points = points.detach().cpu()
        if points.is_floating_point() and points.dtype not in (torch.float16, torch.float32, torch.float64):
            points = points.float()           # bfloat16 and the like: numpy has no such dtype
        points = points.numpy()
    if isinstance(points, np.ma.MaskedArray):  # masked entries are no returns: dropped
        if points.dtype.names is not None:     # a row is masked when its x, y or z is
            mask = np.ma.getmaskarray(points)
            rows = np.zeros(mask.shape, bool)
            for f in ("x", "y", "z"):
                if f in mask.dtype.names:
                    rows |= mask[f]
            points = np.ma.getdata(points)[~rows]
        elif points.dtype.kind in "fiu":       # NaN where masked: dropped below
            points = np.ma.filled(points.astype(np.float64), np.nan)
        else:
            points = np.ma.getdata(points)
    try:
        arr = np.asarray(points)
    except Exception as exc:  # ragged lists and the like
        raise CloudFormatError(f"{name}: expected an (N, 3+) float array, got an object that numpy "
                               f"cannot convert ({exc})") from None
    if arr.dtype.names is not None:           # structured: x, y, z fields (PointCloud2's layout)
        missing = [f for f in "xyz" if f not in arr.dtype.names]
        if missing:
            raise CloudFormatError(f"{name}: a structured array needs fields x, y and z; it has "
                                   f"{', '.join(arr.dtype.names)}")
        arr = np.stack([arr[f].astype(np.float64, copy=False) for f in "xyz"], axis=-1).reshape(-1, 3)
    if arr.dtype.kind not in "fiu":
        raise CloudFormatError(f"{name}: expected a real-valued (N, 3+) array, got dtype {arr.dtype}")
    if arr.ndim == 3:
        raise CloudFormatError(f"{name}: expected shape (N, 3+), got {arr.shape}: an organised cloud "
                               f"(rows, columns, channels) is points.reshape(-1, {arr.shape[2]}); a batch "
                               "of scans is completed one scan at a time")
    if arr.ndim != 2 or arr.shape[1] < 3:
        raise CloudFormatError(f"{name}: expected shape (N, 3+) (x, y, z first), got {arr.shape}")
    if arr.shape[0] in (3, 4) and arr.shape[1] > 8:
        raise CloudFormatError(f"{name}: got shape {arr.shape}, which reads as {arr.shape[0]} points of "
                               f"{arr.shape[1]} values; a cloud is one row per point (N, 3+): "
                               "pass the transpose (points.T)")
    with np.errstate(over="ignore", invalid="ignore"):   # beyond float32: inf, dropped just below
        xyz = np.asarray(arr[:, :3], dtype=np.float32)
    f = np.isfinite(xyz)
    finite = f[:, 0] & f[:, 1] & f[:, 2]     # = .all(axis=1), 8x faster over 3 columns
    if not finite.all():
        xyz = np.compress(finite, xyz, axis=0)
    return np.ascontiguousarray(xyz)


def filter_scan(points: np.ndarray, min_range: float | None = 3.5, max_range: float | None = 50.0,
                min_z: float | None = -4.0) -> np.ndarray:
    """xyz rows with ``min_range < |p| < max_range`` and ``z > min_z`` (``None`` disables a limit)."""
    pts = np.asarray(points, dtype=np.float32)[:, :3]
    keep = np.ones(len(pts), dtype=bool)
    if min_range is not None or max_range is not None:
        # np.linalg.norm(pts, axis=1) to the bit (float32 squares summed in the same order), 5x
        # faster; with compress below the filter of a 120k-point scan takes 1.5 ms instead of 5
        with np.errstate(over="ignore"):   # a coordinate past 1.8e19 m: range inf, out of range
            sq = pts * pts
            r = np.sqrt(sq[:, 0] + sq[:, 1] + sq[:, 2])
        if min_range is not None:
            keep &= r > min_range
        if max_range is not None:
            keep &= r < max_range
    if min_z is not None:
        keep &= pts[:, 2] > min_z
    return np.ascontiguousarray(np.compress(keep, pts, axis=0))


def _bucket_height(n: int) -> int:
    # kd-tree height for QuickFPS: larger clouds want larger buckets (fpsample's guidance)
    if n < 20_000:
        return 3
    if n < 60_000:
        return 5
    return 7


def farthest_point_sample(points: np.ndarray, n_samples: int, parts: int = 1) -> np.ndarray:
    """Indices (int64) of ``n_samples`` points chosen by farthest-point sampling.

    Deterministic: the same cloud gives the same indices. When the cloud has ``n_samples`` points or
    fewer, every index is returned (in order). ``parts`` > 1 samples the approximate variant: the
    cloud split by :func:`sector_split` into that many azimuth sectors, each sampled exactly on its
    own with its share of ``n_samples`` (the indices sector after sector).
    """
    pts = np.ascontiguousarray(np.asarray(points, dtype=np.float32)[:, :3])
    n = len(pts)
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if int(parts) < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if n <= n_samples:
        return np.arange(n, dtype=np.int64)
    if int(parts) > 1:
        members, quotas = sector_members(torch.from_numpy(pts), int(n_samples), int(parts))
        return np.concatenate([m[_fps_exact(pts[m], q)] for m, q in
                               zip((m.numpy() for m in members), quotas)]).astype(np.int64)
    return _fps_exact(pts, int(n_samples))


def _fps_exact(pts: np.ndarray, n_samples: int) -> np.ndarray:
    n = len(pts)
    if n <= n_samples:
        return np.arange(n, dtype=np.int64)
    import fpsample  # listed in install_requires
    h = _bucket_height(n)
    if n < 2 ** h:   # the k-d tree variant needs 2^h points or more: the plain loop for tiny clouds
        idx = fpsample.fps_sampling(pts, int(n_samples), start_idx=0)
    else:
        idx = fpsample.bucket_fps_kdline_sampling(pts, int(n_samples), h, start_idx=0)
    return np.asarray(idx, dtype=np.int64)


def sector_split(points: torch.Tensor, n_samples: int, parts: int) -> tuple[torch.Tensor, list, list]:
    """The partition of approximate farthest-point sampling: ``(order, sizes, quotas)``.

    The cloud (N, 3), on any device, is cut into ``parts`` equal azimuth sectors about the sensor
    (the origin); ``order`` (N,) lists the point indices sector after sector, ``sizes[s]`` how many
    points sector s has and ``quotas[s]`` (summing to ``min(n_samples, N)``) how many of them it
    samples. The quotas follow the space each sector covers, not its point count: farthest-point
    sampling spreads its samples evenly over the surface, so a sector full of points close to the
    sensor deserves no more samples than its area. The measure is the number of voxels a sector
    occupies at the voxel size at which the whole cloud occupies about ``n_samples`` voxels (the
    size found in a few steps from the horizontal extent; each step is one ``unique``). Shares are
    rounded by largest remainder and capped at the sector's points (the rest goes to sectors with
    room).

    Why sectors: exact sampling is ``n_samples`` strictly sequential steps (18,000 for the published
    budget: 55 ms on an H200, see docs/benchmarks.md); P sectors sampled side by side take
    ``n_samples / P`` steps. What it costs: each sector starts from its own point, so samples
    near a seam may lie closer together than exact sampling would place them.
    """
    pts = points[:, :3].float()
    n = int(pts.shape[0])
    k = min(int(n_samples), n)
    sector = ((torch.atan2(pts[:, 1], pts[:, 0]) + math.pi) * (parts / (2 * math.pi))).long().clamp_(0, parts - 1)
    order = torch.argsort(sector, stable=True)
    sizes = torch.bincount(sector, minlength=parts).cpu().numpy()
    lo, hi = pts.min(0).values, pts.max(0).values
    ext = (hi - lo).double().cpu().numpy()
    voxel = max(math.sqrt(max(float(ext[0] * ext[1]), 1e-6) / max(k, 1)), 1e-4)
    for _ in range(6):
        q = ((pts - lo) / voxel).long()
        span = q.max(0).values + 1
        key = ((q[:, 0] * span[1] + q[:, 1]) * span[2] + q[:, 2]) * parts + sector
        occupied = torch.bincount(torch.unique(key) % parts, minlength=parts).cpu().numpy()
        total = int(occupied.sum())
        if abs(total - k) <= 0.05 * k:
            break
        voxel *= math.sqrt(total / k) if total else 0.5   # occupied voxels of a surface go as 1 / size^2
    return order, [int(v) for v in sizes], _quotas(occupied.astype(np.float64), sizes, k)


def sector_members(points: torch.Tensor, n_samples: int, parts: int) -> tuple[list, list]:
    """:func:`sector_split` as the samplers use it: the point indices of every sector that samples
    anything, and how many it samples (the CPU and the device path share it)."""
    order, sizes, quotas = sector_split(points, n_samples, parts)
    kept = [(m, q) for m, q in zip(torch.split(order, sizes), quotas) if q]
    return [m for m, _ in kept], [q for _, q in kept]


def _quotas(weight: np.ndarray, sizes: np.ndarray, k: int) -> list:
    """``k`` samples shared out in proportion to ``weight`` by largest remainder, none above its
    sector's ``sizes``; what a full sector cannot take goes to the others the same way."""
    quota = np.zeros(len(sizes), dtype=np.int64)
    room = sizes.astype(np.int64).copy()
    left = int(k)
    while left > 0:
        w = np.where(room > 0, weight, 0.0)
        if w.sum() <= 0:
            w = (room > 0).astype(np.float64)
        share = left * w / w.sum()
        give = np.minimum(np.floor(share).astype(np.int64), room)
        rest = left - int(give.sum())
        if rest > 0:   # largest remainders first, among sectors that still have room
            frac = np.where(room - give > 0, share - np.floor(share), -1.0)
            for s in np.argsort(-frac, kind="stable")[:rest]:
                if frac[s] >= 0 and give[s] < room[s]:
                    give[s] += 1
        quota += give
        room -= give
        given = int(give.sum())
        if given == 0:   # all remainders were on full sectors: one each to those with room
            for s in np.flatnonzero(room > 0)[:left]:
                quota[s] += 1
                room[s] -= 1
                given += 1
        left -= given
    return [int(v) for v in quota]


def make_x_init(points: np.ndarray, n_fps: int = 18000, tile: int = 10,
                fps_parts: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(scan_fps, x_init)``: the FPS-sampled scan (n, 3) and ``x_init`` = it tiled ``tile`` times
    (``fps_parts`` > 1: the approximate sampling of :func:`farthest_point_sample`).

    Tiling repeats the whole block (``[p0..pn, p0..pn, ...]``), as the published pipeline does.
    """
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    pts = np.asarray(points, dtype=np.float32)[:, :3]
    scan_fps = np.ascontiguousarray(pts[farthest_point_sample(pts, n_fps, fps_parts)])
    return scan_fps, np.tile(scan_fps, (int(tile), 1))


def postprocess_mask(points, x_init, max_range: float | None = 50.0):
    """Boolean mask of the rows of ``points`` inside the range and z band of docs/method.md,
    "Post-processing".

    The z band comes from ``x_init``: ``mean_z - 2 std_z < z < max_z`` (unbiased std, as published).
    Works on numpy arrays and on torch tensors (same type in, same type out).
    """
    if hasattr(points, "detach"):  # torch
        import torch
        z0 = x_init[:, 2].float()
        # one point has no spread: an empty band (NaN), without torch's degrees-of-freedom warning
        lo = z0.mean() - 2.0 * z0.std() if z0.numel() > 1 else z0.new_tensor(float("nan"))
        hi = z0.max()
        keep = (points[:, 2] > lo) & (points[:, 2] < hi)
        if max_range is not None:
            keep &= torch.linalg.vector_norm(points[:, :3], dim=1) < max_range
        return keep
    z0 = np.asarray(x_init, dtype=np.float64)[:, 2]
    lo = z0.mean() - 2.0 * z0.std(ddof=1) if len(z0) > 1 else float("nan")
    hi = z0.max()
    pts = np.asarray(points)
    keep = (pts[:, 2] > lo) & (pts[:, 2] < hi)
    if max_range is not None:
        keep &= np.linalg.norm(pts[:, :3], axis=1) < max_range
    return keep


def postprocess(points, x_init, max_range: float | None = 50.0):
    """The rows of ``points`` that :func:`postprocess_mask` keeps."""
    return points[postprocess_mask(points, x_init, max_range)]
