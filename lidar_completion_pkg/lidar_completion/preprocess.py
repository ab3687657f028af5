"""Pre- and post-processing of one scan around the diffusion (docs/method.md, "Data and ground
truth" and "Post-processing").

* :func:`filter_scan`: keep xyz with ``min_range < range < max_range`` and ``z > min_z``
  (3.5 m, 50 m, -4 m published);
* :func:`farthest_point_sample`: exact farthest-point sampling (the ``fpsample`` package, QuickFPS
  bucket variant: the selection of the textbook O(N k) loop, in a fraction of the time, from a
  start point of its own choosing - it does not honour ``start_idx=0``);
* :func:`make_x_init`: FPS to ``n_fps`` points (18,000) and tile ``tile`` times (10 -> 180,000);
* :func:`postprocess`: keep ``range < max_range`` and
  ``mean_z(x_init) - 2 std_z(x_init) < z < max_z(x_init)``.

Arrays are float32 numpy (N, 3) unless stated; :func:`postprocess` also takes torch tensors.
"""
from __future__ import annotations

import numpy as np

from .errors import CloudFormatError

__all__ = ["DEFAULTS", "as_cloud", "filter_scan", "farthest_point_sample", "make_x_init",
           "postprocess_mask", "postprocess"]

#: Published pre/post-processing limits.
DEFAULTS = dict(min_range=3.5, max_range=50.0, min_z=-4.0, n_fps=18000, tile=10)


def as_cloud(points, name: str = "points") -> np.ndarray:
    """Validate an (N, >=3) real array and return its finite xyz rows as float32 (M, 3).

    Rows with NaN or inf in x, y or z are dropped. Raises :class:`CloudFormatError` for anything
    that is not a 2-D numeric array with at least 3 columns.
    """
    if hasattr(points, "detach") and hasattr(points, "cpu"):  # torch tensor
        points = points.detach().cpu().numpy()
    try:
        arr = np.asarray(points)
    except Exception as exc:  # ragged lists and the like
        raise CloudFormatError(f"{name}: expected an (N, 3+) float array, got an object that numpy "
                               f"cannot convert ({exc})") from None
    if arr.dtype.kind not in "fiu":
        raise CloudFormatError(f"{name}: expected a real-valued (N, 3+) array, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] < 3:
        raise CloudFormatError(f"{name}: expected shape (N, 3+) (x, y, z first), got {arr.shape}")
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


def farthest_point_sample(points: np.ndarray, n_samples: int) -> np.ndarray:
    """Indices (int64) of ``n_samples`` points chosen by farthest-point sampling.

    Deterministic: the same cloud gives the same indices. When the cloud has ``n_samples`` points or
    fewer, every index is returned (in order).
    """
    pts = np.ascontiguousarray(np.asarray(points, dtype=np.float32)[:, :3])
    n = len(pts)
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if n <= n_samples:
        return np.arange(n, dtype=np.int64)
    import fpsample  # listed in install_requires
    idx = fpsample.bucket_fps_kdline_sampling(pts, int(n_samples), _bucket_height(n), start_idx=0)
    return np.asarray(idx, dtype=np.int64)


def make_x_init(points: np.ndarray, n_fps: int = 18000, tile: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """``(scan_fps, x_init)``: the FPS-sampled scan (n, 3) and ``x_init`` = it tiled ``tile`` times.

    Tiling repeats the whole block (``[p0..pn, p0..pn, ...]``), as the published pipeline does.
    """
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    pts = np.asarray(points, dtype=np.float32)[:, :3]
    scan_fps = np.ascontiguousarray(pts[farthest_point_sample(pts, n_fps)])
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
        lo = z0.mean() - 2.0 * z0.std()
        hi = z0.max()
        keep = (points[:, 2] > lo) & (points[:, 2] < hi)
        if max_range is not None:
            keep &= torch.linalg.vector_norm(points[:, :3], dim=1) < max_range
        return keep
    z0 = np.asarray(x_init, dtype=np.float64)[:, 2]
    lo = z0.mean() - 2.0 * z0.std(ddof=1)
    hi = z0.max()
    pts = np.asarray(points)
    keep = (pts[:, 2] > lo) & (pts[:, 2] < hi)
    if max_range is not None:
        keep &= np.linalg.norm(pts[:, :3], axis=1) < max_range
    return keep


def postprocess(points, x_init, max_range: float | None = 50.0):
    """The rows of ``points`` that :func:`postprocess_mask` keeps."""
    return points[postprocess_mask(points, x_init, max_range)]
