"""Scene-completion metrics on point clouds: plain functions on (N, 3) numpy arrays returning floats.

Definitions follow docs/method.md, "Metrics" (the LiDiff / ScoreLiDAR / Distillation-DPO evaluation),
with the published quirks named and offered separately where the published numbers depend on them:

========================  ===========================================================================
function                  what it computes
========================  ===========================================================================
chamfer_distance          ``0.5 * (mean_g min_p |g-p| + mean_p min_g |p-g|)``, Euclidean, metres.
jsd_bev                   "JSD-BEV (Jensen-Shannon distance, as published)": 0.5 m occupancy over
                          [-50, 50]^3 clipped to 1, summed over z into 200 x 200, normalised,
                          ``scipy.spatial.distance.jensenshannon`` (natural log). The papers call it a
                          divergence; it is the *distance* (square root of the divergence), in [0, sqrt(ln 2)].
jsd_3d                    Jensen-Shannon distance of the raw-count 200^3 histograms (0.5 m, [-50, 50]^3).
emd                       A true optimal-transport distance: Wasserstein-1, Euclidean ground cost in
                          metres, between the normalised point masses of occupied 0.5 m voxels placed
                          at the voxel centres. Exact (POT network simplex) when small enough; see
                          :func:`emd` for the large-scene path and the method it reports.
emd_published             The Distillation-DPO "EMD": Sinkhorn with eps = 0.001 m and a 1e-9 kernel
                          floor, frames with more than 130,000 voxels (both clouds together) dropped
                          (NaN here). NOT an optimal-transport distance: the kernel underflows and the
                          value tracks the scene's size (mean pairwise distance), not the transport cost.
iou / iou_counts          |P n G| / |P u G| over occupied voxels, voxel index ``round(p / voxel_size)``;
                          extent "full" (voxel centres within |x|,|y|,|z| <= 50 m) or "legacy"
                          (indices within +-50, i.e. +-25 / +-10 / +-5 m at 0.5 / 0.2 / 0.1 m: the
                          variant of the published tables, LiDiff's 2024 code, ScoreLiDAR, DDPO)
                          or "lidiff2025" (LiDiff's code since June 2025: raw coordinates in
                          int(100 / v) histogram bins over [-50, 50] m, a floor grid).
precision_recall_fscore   share of predicted points with a ground-truth point closer than the
                          threshold, the converse, and their harmonic mean (fractions, not percent).
prf_area                  the published P/R/F: the normalised Simpson area of P/R/F over 100
                          thresholds from 0.05 to 0.10 m.
frame_metrics             every metric above for one frame, as the JSON record the evaluation keeps.
========================  ===========================================================================

Empty clouds: distance-based metrics return NaN (the metric is undefined), IoU counts work as usual.
Nearest-neighbour queries use ``scipy.spatial.cKDTree`` with ``workers=1`` by default (pass
``workers=-1`` to use every core).
"""
from __future__ import annotations

import logging
import math
import time
import numpy as np
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist, jensenshannon

from .errors import CloudFormatError, ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "chamfer_distance", "jsd_bev", "jsd_3d", "emd", "emd_published", "iou", "iou_counts",
    "precision_recall_fscore", "nn_distances", "prf_from_distances", "prf_area", "voxel_masses",
    "frame_metrics", "chamfer_from_distances",
    "HIST_RANGE", "HIST_VOXEL", "EMD_VOXEL", "EMD_MAX_EXACT_ENTRIES", "EMD_SINKHORN_EPS",
    "EMD_PUBLISHED_MAX_VOXELS", "IOU_VOXEL_SIZES", "IOU_EXTENTS", "PRF_THRESHOLDS", "PRF_AREA_THRESHOLDS", "EMD_MODES",
]

#: Histogram metrics (JSD): half-width of the cube in metres and its voxel size (200 bins per axis).
HIST_RANGE = 50.0
HIST_VOXEL = 0.5
#: Voxel size (m) of the EMD point masses.
EMD_VOXEL = 0.5
#: Largest n_src * n_tgt cost matrix solved exactly (2e7 float64 entries = 160 MB; about 2-6 s with
#: POT's network simplex on 2 cores for ~4,500 x 4,500 voxels of a street scene).
EMD_MAX_EXACT_ENTRIES = 20_000_000
#: Entropic regularisation (m) of the optional log-domain Sinkhorn path.
EMD_SINKHORN_EPS = 0.05
#: Distillation-DPO drops a frame when both clouds together occupy more voxels than this.
EMD_PUBLISHED_MAX_VOXELS = 130_000
#: Voxel sizes (m) of the IoU columns of a frame record.
IOU_VOXEL_SIZES = (0.5, 0.2, 0.1)
# the IoU variants every frame's record holds (iou_counts: the grid and the range of each)
IOU_EXTENTS = ("full", "legacy", "lidiff2025")
#: Thresholds (m) of the single-threshold P/R/F columns of a frame record.
PRF_THRESHOLDS = (0.05, 0.10)
#: Published P/R/F: normalised Simpson area over 100 thresholds from 0.05 to 0.10 m.
PRF_AREA_THRESHOLDS = np.linspace(0.05, 0.10, 100)
#: Which EMDs a frame record holds: our optimal-transport one, the published variant, both, none.
EMD_MODES = ("both", "ot", "published", "none")


# ----------------------------------------------------------------------------------------- helpers
def _points(x, name: str) -> np.ndarray:
    """(N, >=3) array-like -> float64 (N, 3); raises CloudFormatError on a wrong shape or non-finite."""
    a = np.asarray(x)
    if a.ndim != 2 or a.shape[1] < 3:
        raise CloudFormatError(f"{name}: expected an (N, 3) array of points, got shape {a.shape}")
    a = np.asarray(a[:, :3], dtype=np.float64)
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).any(axis=1).sum())
        raise CloudFormatError(f"{name}: expected finite coordinates, found {bad} rows with NaN/inf")
    return a


def nn_distances(src, dst, workers: int = 1) -> np.ndarray:
    """For every point of ``src`` the Euclidean distance to its nearest point of ``dst`` (float64)."""
    src = _points(src, "src")
    dst = _points(dst, "dst")
    if len(src) == 0:
        return np.zeros(0)
    if len(dst) == 0:
        return np.full(len(src), np.inf)
    d, _ = cKDTree(dst).query(src, k=1, workers=workers)
    return np.asarray(d, dtype=np.float64)


# ----------------------------------------------------------------------------------- Chamfer, P/R/F
def chamfer_distance(pred, gt, workers: int = 1) -> float:
    """Chamfer distance in metres: ``0.5 * (mean_g min_p |g-p| + mean_p min_g |p-g|)``.

    Euclidean (not squared) distances, as LiDiff / Distillation-DPO report it. NaN if a cloud is empty.
    """
    pred = _points(pred, "pred")
    gt = _points(gt, "gt")
    return chamfer_from_distances(nn_distances(pred, gt, workers), nn_distances(gt, pred, workers))


def chamfer_from_distances(d_pred_to_gt: np.ndarray, d_gt_to_pred: np.ndarray) -> float:
    """The Chamfer distance from precomputed nearest-neighbour distances (NaN if either is empty)."""
    if len(d_pred_to_gt) == 0 or len(d_gt_to_pred) == 0:
        return float("nan")
    return float(0.5 * (np.mean(d_gt_to_pred) + np.mean(d_pred_to_gt)))


def prf_from_distances(d_pred_to_gt: np.ndarray, d_gt_to_pred: np.ndarray, threshold: float):
    """(precision, recall, fscore) from precomputed nearest-neighbour distances (see below)."""
    if len(d_pred_to_gt) == 0 or len(d_gt_to_pred) == 0:
        return float("nan"), float("nan"), float("nan")
    p = float(np.mean(d_pred_to_gt < threshold))
    r = float(np.mean(d_gt_to_pred < threshold))
    f = 0.0 if p + r == 0 else 2.0 * p * r / (p + r)
    return p, r, float(f)


def precision_recall_fscore(pred, gt, threshold: float, workers: int = 1):
    """Precision, recall and F-score at a distance ``threshold`` (metres), as fractions in [0, 1].

    precision = share of predicted points whose nearest ground-truth point is closer than
    ``threshold`` (strictly, as the published code counts), recall = share of ground-truth points
    whose nearest predicted point is closer than ``threshold``, F = harmonic mean (0 when both are 0).
    The papers print percentages and average over thresholds 0.05..0.10 m; the evaluation does both.
    Returns a tuple of three floats; NaNs if a cloud is empty.
    """
    if not threshold > 0:
        raise ConfigError(f"threshold: expected a positive distance in metres, got {threshold!r}")
    pred = _points(pred, "pred")
    gt = _points(gt, "gt")
    return prf_from_distances(nn_distances(pred, gt, workers), nn_distances(gt, pred, workers), threshold)


def prf_area(d_pred_to_gt: np.ndarray, d_gt_to_pred: np.ndarray,
             thresholds: np.ndarray = PRF_AREA_THRESHOLDS) -> list:
    """The published P/R/F (fractions): precision, recall and F-score at each of ``thresholds``
    (evenly spaced; strictly closer, as :func:`precision_recall_fscore` counts), integrated with
    Simpson's rule and divided by the area of 1 over the same range. NaNs if a cloud is empty."""
    if len(d_pred_to_gt) == 0 or len(d_gt_to_pred) == 0:
        return [math.nan] * 3
    from scipy.integrate import simpson
    sp, sg = np.sort(d_pred_to_gt), np.sort(d_gt_to_pred)
    p = np.searchsorted(sp, thresholds, side="left") / len(sp)
    r = np.searchsorted(sg, thresholds, side="left") / len(sg)
    f = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0.0)
    dx = thresholds[1] - thresholds[0]
    norm = simpson(np.ones_like(thresholds), dx=dx)
    return [float(simpson(v, dx=dx) / norm) for v in (p, r, f)]


# -------------------------------------------------------------------------------------- JSD metrics
def _hist_voxels(p: np.ndarray, voxel: float = HIST_VOXEL, half: float = HIST_RANGE):
    """Linear indices of the cells of ``np.histogramdd(p, bins, range=[-half, half]^3)`` hit by the
    points (one per point inside the range), binned exactly like numpy does (right edge inclusive)."""
    bins = int(round(2 * half / voxel))
    edges = np.linspace(-half, half, bins + 1)
    idx = np.empty(p.shape, dtype=np.int64)
    for j in range(3):
        k = np.searchsorted(edges, p[:, j], side="right") - 1
        k[p[:, j] == edges[-1]] = bins - 1
        idx[:, j] = k
    inside = ((idx >= 0) & (idx < bins)).all(axis=1)
    idx = idx[inside]
    return (idx[:, 0] * bins + idx[:, 1]) * bins + idx[:, 2], bins


def _js_distance_sparse(keys_a, counts_a, keys_b, counts_b) -> float:
    """Jensen-Shannon distance (natural log) of two histograms given as sparse (keys, counts)."""
    sa, sb = counts_a.sum(), counts_b.sum()
    if sa == 0 or sb == 0:
        return float("nan")
    union = np.union1d(keys_a, keys_b)
    pa = np.zeros(len(union))
    pb = np.zeros(len(union))
    pa[np.searchsorted(union, keys_a)] = counts_a
    pb[np.searchsorted(union, keys_b)] = counts_b
    # cells empty in both contribute exactly 0 to the divergence, so the union support suffices
    return float(jensenshannon(pa / sa, pb / sb))


def _bev_hist(p: np.ndarray):
    lin, bins = _hist_voxels(p)
    occupied = np.unique(lin)                        # counts clipped to 1
    cols, counts = np.unique(occupied // bins, return_counts=True)   # sum over z
    return cols, counts.astype(np.float64)


def jsd_bev(pred, gt) -> float:
    """JSD-BEV (Jensen-Shannon distance, as published).

    0.5 m occupancy grid over [-50, 50]^3 m (numpy ``histogramdd`` binning, 200 bins per axis),
    counts clipped to 1, summed over z into a 200 x 200 bird's-eye map, each map normalised to sum 1,
    then ``scipy.spatial.distance.jensenshannon`` with the natural log. That is the Jensen-Shannon
    **distance** (square root of the divergence, between 0 and sqrt(ln 2) = 0.8326) although the
    papers call it "JSD". NaN if a cloud has no point inside the cube.
    """
    pred = _points(pred, "pred")
    gt = _points(gt, "gt")
    ka, ca = _bev_hist(pred)
    kb, cb = _bev_hist(gt)
    return _js_distance_sparse(ka, ca, kb, cb)


def jsd_3d(pred, gt) -> float:
    """Jensen-Shannon distance (natural log) of the raw point-count 200^3 histograms (0.5 m voxels
    over [-50, 50]^3), computed sparsely. NaN if a cloud has no point inside the cube."""
    pred = _points(pred, "pred")
    gt = _points(gt, "gt")
    ka, ca = np.unique(_hist_voxels(pred)[0], return_counts=True)
    kb, cb = np.unique(_hist_voxels(gt)[0], return_counts=True)
    return _js_distance_sparse(ka, ca.astype(np.float64), kb, cb.astype(np.float64))


# ---------------------------------------------------------------------------------------------- IoU
def iou_counts(pred, gt, voxel_size: float, extent: str = "full"):
    """(TP, FP, FN) over occupied voxels, a point's voxel being ``round(p / voxel_size)`` (LiDiff's
    grid, numpy round-half-to-even).

    extent "full": voxels whose centre lies within |x|, |y|, |z| <= 50 m, i.e. indices
    |i| <= round(50 / voxel_size). extent "legacy": the variant of the published tables (LiDiff's
    code as released in 2024, copied by ScoreLiDAR and Distillation-DPO), which bins the *indices*
    into a +-50 histogram and therefore only counts indices |i| <= 50: +-25 m at 0.5 m, +-10 m at
    0.2 m, +-5 m at 0.1 m. extent "lidiff2025": LiDiff's code since June 2025, another grid - the
    raw coordinates in histogram bins over [-50, 50] m (:func:`_lidiff2025_cells`).
    """
    if not voxel_size > 0:
        raise ConfigError(f"voxel_size: expected a positive size in metres, got {voxel_size!r}")
    if extent not in IOU_EXTENTS:
        raise ConfigError(f"extent: expected one of {', '.join(IOU_EXTENTS)}, got {extent!r}")
    cells = _lidiff2025_cells if extent == "lidiff2025" else _round_cells
    sets = [cells(_points(cloud, name), voxel_size, extent) for name, cloud in (("pred", pred), ("gt", gt))]
    tp = int(np.intersect1d(sets[0], sets[1], assume_unique=True).size)
    return tp, int(sets[0].size - tp), int(sets[1].size - tp)


def _round_cells(a: np.ndarray, voxel_size: float, extent: str) -> np.ndarray:
    """Sorted unique keys of the occupied voxels ``round(p / voxel_size)`` inside the extent."""
    limit = int(round(HIST_RANGE / voxel_size)) if extent == "full" else int(HIST_RANGE)
    idx = np.round(a / voxel_size)
    # outside the extent before the integer cast: a far point's index (beyond int64) would wrap to
    # a negative one inside it
    idx = idx[(np.abs(idx) <= limit).all(axis=1)].astype(np.int64) + limit
    span = 2 * limit + 1
    return np.unique((idx[:, 0] * span + idx[:, 1]) * span + idx[:, 2])


def _lidiff2025_cells(a: np.ndarray, voxel_size: float, extent: str = "lidiff2025") -> np.ndarray:
    """Sorted unique keys of the occupied bins of LiDiff's evaluation code since June 2025: the raw
    coordinates in int(100 / voxel_size) equal bins per axis over [-50, 50] m (numpy histogramdd's
    rule: a bin holds [e_k, e_k+1), the last one also 50 m itself; points outside are not counted).
    Only the occupied bins: that code's dense histogram needs 10^9 cells at 0.1 m."""
    bins = int(2 * HIST_RANGE / voxel_size)
    if bins < 1:
        raise ConfigError(f"voxel_size: {voxel_size!r} m leaves no bin in the +-{HIST_RANGE:g} m range")
    edges = np.linspace(-HIST_RANGE, HIST_RANGE, bins + 1)
    idx = np.stack([np.searchsorted(edges, a[:, k], side="right") for k in range(3)], axis=1)
    idx[a == edges[-1]] -= 1                   # 50 m itself: in the last bin, as histogramdd
    idx = idx[((idx >= 1) & (idx <= bins)).all(axis=1)] - 1
    return np.unique((idx[:, 0] * bins + idx[:, 1]) * bins + idx[:, 2])


def iou(pred, gt, voxel_size: float, extent: str = "full") -> float:
    """Voxel IoU |P n G| / |P u G| (see :func:`iou_counts` for the grid and the two extents).
    NaN when neither cloud occupies a voxel inside the extent. The evaluation accumulates TP/FP/FN
    over all frames (as the papers do) rather than averaging these per-frame values."""
    tp, fp, fn = iou_counts(pred, gt, voxel_size, extent)
    union = tp + fp + fn
    return float(tp / union) if union else float("nan")


# ---------------------------------------------------------------------------------------------- EMD
def voxel_masses(points, voxel_size: float = EMD_VOXEL):
    """Occupied voxels (``floor(p / voxel_size)``) -> (centres (K, 3) float64, masses (K,) summing to 1)."""
    p = _points(points, "points")
    cells = np.floor(p / voxel_size)
    if cells.size and np.abs(cells).max() > 2.0 ** 53:
        # beyond 2^53 voxels float64 cannot tell neighbouring voxels apart (and int64 wraps): no
        # completion or ground truth is that far from its sensor
        raise CloudFormatError(f"points: coordinates up to {np.abs(p).max():.3g} m cannot be placed on a "
                               f"{voxel_size:g} m voxel grid (a diverged prediction?)")
    keys, counts = np.unique(cells.astype(np.int64), axis=0, return_counts=True)
    return (keys + 0.5) * voxel_size, counts / counts.sum()


def _aggregate(centres, masses, cell: float):
    """Merge masses into cubes of side ``cell`` placed at their mass centroids.
    Returns (centroids, masses, moved) with moved = sum(mass * |x - centroid|) = W1(before, after)."""
    keys, inv = np.unique(np.floor(centres / cell + 1e-9).astype(np.int64), axis=0, return_inverse=True)
    inv = inv.ravel()
    m = np.bincount(inv, weights=masses)
    cen = np.stack([np.bincount(inv, weights=masses * centres[:, j]) for j in range(3)], axis=1) / m[:, None]
    moved = float(np.sum(masses * np.linalg.norm(centres - cen[inv], axis=1)))
    return cen, m, moved


def _normalised(m):
    m = np.asarray(m, dtype=np.float64)
    return m / m.sum()


def emd(pred, gt, voxel_size: float = EMD_VOXEL, method: str = "auto",
        max_exact_entries: int = EMD_MAX_EXACT_ENTRIES, sinkhorn_eps: float = EMD_SINKHORN_EPS,
        return_info: bool = False):
    """Earth mover's distance (Wasserstein-1, Euclidean ground cost, metres) between the normalised
    point masses of the occupied ``voxel_size`` voxels of two clouds, each mass at its voxel centre.

    Methods (the one used is logged at DEBUG level and returned with ``return_info=True``):

    * ``"exact"``: POT's network simplex (``ot.emd2``) on the full cost matrix. Exact.
    * ``"sinkhorn"``: log-domain entropic OT (``ot.sinkhorn2(method="sinkhorn_log")``) with
      ``sinkhorn_eps`` metres of regularisation (default 0.05 m); returns the transport cost of the
      entropic plan, an upper bound of W1 within a few eps (iterations stop when the marginals are
      met within 1e-5). Dense and slow - hundreds of iterations over the full matrix (about 30 s
      for 740 x 740 voxels on 2 cores) - so only for cross-checks on small problems.
    * ``"coarse"``: exact OT after merging the voxel masses into cubes of side k * voxel_size
      (k = 2, 3, ... the smallest for which n_src * n_tgt <= ``max_exact_entries``), each cube's mass
      placed at its mass centroid. By the triangle inequality the result differs from the exact value
      by at most ``info["error_bound"]`` = W1(src, merged src) + W1(tgt, merged tgt), which is computed
      exactly. On street scenes the actual error is far below that bound: for two 30k-point scenes of
      ~10k voxels (exact 0.278 / 0.500 / 1.066 m for same-distribution / 0.5 m / 1 m shifts) the 1 m
      merge gave 0.342 / 0.535 / 1.092 m (bound 0.68 m), whereas exact OT on a 4,000-voxel random
      subsample gave 0.79 / 0.94 / 1.33 m; hence no subsampling.
    * ``"auto"`` (default): ``"exact"`` if n_src * n_tgt <= ``max_exact_entries`` (2e7 entries,
      160 MB, seconds), else ``"coarse"``. Sinkhorn is never chosen automatically: with a useful
      eps it is slower than exact OT at every size that fits in memory here. Real SemanticKITTI frames occupy ~10-40k voxels of 0.5 m,
      so they take the coarse path (typically 1-1.5 m cubes).

    NaN for an empty cloud. With ``return_info=True`` returns ``(value, info)`` where info holds
    method, n_src, n_tgt, cell (m), error_bound (m), seconds.
    """
    import ot  # POT; imported here so that the other metrics work without it

    if method not in ("auto", "exact", "sinkhorn", "coarse"):
        raise ConfigError(f"method: expected auto, exact, sinkhorn or coarse, got {method!r}")
    pred = _points(pred, "pred")
    gt = _points(gt, "gt")
    t0 = time.perf_counter()
    info = {"method": method, "n_src": 0, "n_tgt": 0, "cell": voxel_size, "error_bound": 0.0}
    if len(pred) == 0 or len(gt) == 0:
        info.update(method="empty", seconds=0.0)
        return (float("nan"), info) if return_info else float("nan")
    xa, wa = voxel_masses(pred, voxel_size)
    xb, wb = voxel_masses(gt, voxel_size)
    info.update(n_src=len(xa), n_tgt=len(xb))
    if method == "auto":
        method = "exact" if len(xa) * len(xb) <= max_exact_entries else "coarse"
    bound = 0.0
    if method == "coarse":
        k = 1
        base = (xa, wa, xb, wb)
        while len(xa) * len(xb) > max_exact_entries:
            k += 1
            cell = k * voxel_size
            xa, wa, ma = _aggregate(base[0], base[1], cell)
            xb, wb, mb = _aggregate(base[2], base[3], cell)
            bound = ma + mb
            info["cell"] = cell
        method_used = "exact" if k == 1 else "coarse"
    else:
        method_used = method
    cost = cdist(xa, xb)
    wa, wb = _normalised(wa), _normalised(wb)
    if method_used == "sinkhorn":
        value = float(ot.sinkhorn2(wa, wb, cost, sinkhorn_eps, method="sinkhorn_log",
                                   numItermax=10_000, stopThr=1e-5))
        info["eps"] = sinkhorn_eps
    else:
        value = float(ot.emd2(wa, wb, cost, numItermax=max(100_000, 50 * cost.size)))
    info.update(method=method_used, error_bound=bound, seconds=time.perf_counter() - t0)
    log.debug("emd: %.4f m via %s (%d x %d, cell %.2f m, bound %.3f m, %.2f s)", value, method_used,
              len(xa), len(xb), info["cell"], bound, info["seconds"])
    return (value, info) if return_info else value


_emd_w1 = emd   # frame_metrics' argument ``emd`` (which EMDs to compute) hides the function's name


def emd_published(pred, gt, voxel_size: float = EMD_VOXEL, epsilon: float = 0.001,
                  max_iter: int = 3000, tol: float = 1e-4,
                  max_voxels: int = EMD_PUBLISHED_MAX_VOXELS) -> float:
    """The "EMD" of the Distillation-DPO evaluation, reproduced for comparison with its tables.

    Both clouds become normalised masses of their occupied ``floor(p / 0.5 m)`` voxels at the voxel
    centres; if the two together have more than 130,000 voxels the published code silently drops the
    frame - here the result is NaN and a warning is logged. Otherwise plain (not log-domain)
    Sinkhorn-Knopp with kernel ``K = exp(-C / 0.001) + 1e-9``, u = a / (K v), v = b / (K^T u), stopped
    when the L1 change of u drops below 1e-4 (at most 3000 iterations), and the value
    ``sum(u_i v_j K_ij C_ij)``.

    This is NOT an optimal-transport distance: with eps = 1 mm the exponential underflows for every
    pair of distinct voxels, so K is 1e-9 everywhere except where both clouds occupy the same voxel;
    the "plan" is then mostly the independent coupling and the value approaches the mean pairwise
    distance of the scene (about 10 m for two identically distributed 40 m scenes) instead of 0.
    Computed without the dense K (same arithmetic: the exponential part is kept only for pairs closer
    than the distance at which it vanishes next to the floor in float64).
    """
    pred = _points(pred, "pred")
    gt = _points(gt, "gt")
    if len(pred) == 0 or len(gt) == 0:
        return float("nan")
    xa, a = voxel_masses(pred, voxel_size)
    xb, b = voxel_masses(gt, voxel_size)
    if len(xa) + len(xb) > max_voxels:
        log.warning("emd_published: %d + %d voxels > %d; the published evaluation drops this frame "
                    "(returning NaN)", len(xa), len(xb), max_voxels)
        return float("nan")
    floor = 1e-9
    # exp(-c / eps) < floor * 2**-54 is absorbed by the floor in float64: keep only closer pairs
    radius = epsilon * (math.log(1.0 / floor) + 54 * math.log(2.0))
    pairs = cKDTree(xa).sparse_distance_matrix(cKDTree(xb), radius, output_type="ndarray")
    rows, cols, dist = pairs["i"], pairs["j"], pairs["v"]      # zero distances included
    kexp = np.exp(-dist / epsilon)

    def k_mul(v):       # K @ v
        return floor * v.sum() + np.bincount(rows, weights=kexp * v[cols], minlength=len(xa))

    def kt_mul(u):      # K.T @ u
        return floor * u.sum() + np.bincount(cols, weights=kexp * u[rows], minlength=len(xb))

    u = np.ones(len(xa))
    v = np.ones(len(xb))
    for _ in range(max_iter):
        u_prev = u
        u = a / k_mul(v)
        v = b / kt_mul(u)
        if np.abs(u - u_prev).sum() < tol:
            break
    # sum_ij u_i v_j (floor + kexp_ij) C_ij, the dense C product done in row blocks
    total = float(np.sum(u[rows] * v[cols] * kexp * dist))
    block = max(1, 4_000_000 // max(1, len(xb)))
    dense = 0.0
    for s in range(0, len(xa), block):
        dense += float(u[s:s + block] @ (cdist(xa[s:s + block], xb) @ v))
    return total + floor * dense


# ------------------------------------------------------------------------------------ one frame
def _key(v: float) -> str:
    return f"{v:g}"


def frame_metrics(pred, gt, emd: str = "both", workers: int = 1) -> dict:
    """Every metric of one frame as a JSON-ready dict (NaN for undefined values).

    Keys: n_pred, n_gt, cd, jsd_bev, jsd_3d, emd (+ emd_method, emd_cell, emd_bound; with ``emd``
    "both" or "ot"), emd_published ("both" or "published"), iou ({"full"|"legacy"|"lidiff2025": {"0.5": [tp, fp,
    fn], ...}} at :data:`IOU_VOXEL_SIZES`), prf ({"0.05": [p, r, f], "0.1": [...], "auc": the
    :func:`prf_area` variant}), metric_seconds.
    """
    if emd not in EMD_MODES:
        raise ConfigError(f"emd: expected one of {', '.join(EMD_MODES)}, got {emd!r}")
    t0 = time.perf_counter()
    pred = _points(pred, "prediction")
    gt = _points(gt, "ground truth")
    rec: dict = {"n_pred": int(len(pred)), "n_gt": int(len(gt))}
    d_pred = nn_distances(pred, gt, workers)
    d_gt = nn_distances(gt, pred, workers)
    rec["cd"] = chamfer_from_distances(d_pred, d_gt)
    rec["jsd_bev"] = jsd_bev(pred, gt)
    rec["jsd_3d"] = jsd_3d(pred, gt)
    if emd in ("both", "ot"):
        value, info = _emd_w1(pred, gt, return_info=True)
        rec.update(emd=value, emd_method=info["method"], emd_cell=info["cell"],
                   emd_bound=info["error_bound"])
    if emd in ("both", "published"):
        rec["emd_published"] = emd_published(pred, gt)
    rec["iou"] = {ext: {_key(v): list(iou_counts(pred, gt, v, ext)) for v in IOU_VOXEL_SIZES}
                  for ext in IOU_EXTENTS}
    rec["prf"] = {_key(t): list(prf_from_distances(d_pred, d_gt, t)) for t in PRF_THRESHOLDS}
    rec["prf"]["auc"] = prf_area(d_pred, d_gt)
    rec["metric_seconds"] = time.perf_counter() - t0
    return rec
