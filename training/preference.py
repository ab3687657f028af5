"""Preferences between generated samples: the ranking metrics, the few-step sampler that makes a
pair's samples differ in content, and the statistics that say whether a preference carries
information (docs/training.md, "Preferences").

Used by the Distillation-DPO student (``distill.*``) and by the teacher's Diffusion-DPO stage
(``teacher_dpo.*``); both read the same keys from their own config section:

* ``metric``: a name of :data:`METRICS` or the dotted path of any ``(pred, target) -> float`` on
  numpy arrays (``metric_lower_is_better`` gives its direction; a named metric knows its own):

  ``cd``         Chamfer distance (:func:`lidar_completion.metrics.chamfer_distance`), lower is better;
  ``iou``        voxel IoU at ``iou_voxel`` metres, higher is better;
  ``jsd_bev``    JSD-BEV, lower is better;
  ``cd_unseen``  Chamfer distance restricted to what the scan does not see: target and sample
                 points farther than ``unseen_radius`` from every scan point (the whole clouds when
                 either part is empty), lower is better;
  ``composite``  sum over ``composite`` (name -> weight) of weight x metric, each metric signed so
                 that lower is better (IoU enters as -IoU).

* ``pairs_per_scan`` K: K candidate pairs per scan, the pair with the widest margin is kept.
* ``pair_regions`` r: r > 0 ranks the pair region by region instead of scan by scan
  (:func:`region_winners`): the winner is the mosaic of each region's better sample, the loser the
  mosaic of the worse ones (the teacher's DPO stage also takes its loss region by region).

A *margin* is |metric(loser) - metric(winner)|; the *spread* is the mean |metric(a) - metric(b)|
over pairs of independent one-step samples of the same scan. A margin well below the spread says
that the pair differs less than any two samples do; a winner that is always the same side of the
pair (``metric/switch`` near 0 or 1) says that the pair's construction, not the scene, decides.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy.spatial import cKDTree

from lidar_completion import metrics as M
from lidar_completion.errors import ConfigError

from . import distributed as D

from .config import resolve_callable


def _cd(pred, target, scan, spec):
    return M.chamfer_distance(pred, target)


def _iou(pred, target, scan, spec):
    return M.iou(pred, target, float(spec.get("iou_voxel", 0.5)))


def _jsd(pred, target, scan, spec):
    return M.jsd_bev(pred, target)


def unseen_mask(points: np.ndarray, scan: np.ndarray, radius: float) -> np.ndarray:
    """Rows of ``points`` farther than ``radius`` from every point of ``scan``."""
    d, _ = cKDTree(scan).query(points, k=1, distance_upper_bound=radius)
    return ~np.isfinite(d)


def cd_unseen(pred, target, scan, radius: float = 1.0) -> float:
    """Chamfer distance between the parts of ``pred`` and ``target`` the scan does not see (farther
    than ``radius`` from every scan point); the whole clouds' when either part is empty."""
    p = pred[unseen_mask(pred, scan, radius)]
    t = target[unseen_mask(target, scan, radius)]
    if len(p) == 0 or len(t) == 0:
        return M.chamfer_distance(pred, target)
    return M.chamfer_distance(p, t)


def _cd_unseen(pred, target, scan, spec):
    return cd_unseen(pred, target, scan, float(spec.get("unseen_radius", 1.0)))


#: name -> (function(pred, target, scan, spec) -> float, lower is better)
METRICS: dict[str, tuple[Callable, bool]] = {
    "cd": (_cd, True), "iou": (_iou, False), "jsd_bev": (_jsd, True), "cd_unseen": (_cd_unseen, True),
}


def _composite(pred, target, scan, spec):
    total = 0.0
    for name, weight in (spec.get("composite") or {}).items():
        fn, lower = METRICS[name]
        v = float(fn(pred, target, scan, spec))
        total += float(weight) * (v if lower else -v)
    return total


METRICS["composite"] = (_composite, True)


def _trial(fn: Callable, name: str, section: str) -> None:
    """Call a dotted-path metric once on two small clouds, so that one that cannot rank point
    clouds fails at start, naming the key, rather than at the first preference of the run."""
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(64, 3)).astype(np.float32), rng.normal(size=(80, 3)).astype(np.float32)
    try:
        value = float(fn(pred, target))
    except Exception as exc:  # noqa: BLE001 - any failure of the user's function is reported
        raise ConfigError(f"{section}.metric {name!r} failed on two small point clouds ((64, 3) and (80, 3) "
                          f"float32 arrays): {type(exc).__name__}: {exc}; it must be (pred, target) -> float") from None
    if not np.isfinite(value):
        raise ConfigError(f"{section}.metric {name!r} returned {value} for two small point clouds; "
                          "it must return a finite number")


def check_spec(spec: dict, section: str) -> None:
    """Refuse a preference configuration that cannot work (a ConfigError naming the key)."""
    name = spec.get("metric")
    if name not in METRICS:
        if isinstance(name, str) and "." not in name:
            raise ConfigError(f"{section}.metric must be one of {', '.join(METRICS)} or a dotted path to a "
                              f"function (pred, target) -> float, got {name!r}")
        _trial(resolve_callable(name), name, section)
    if name == "composite":
        weights = spec.get("composite") or {}
        bad = [k for k in weights if k not in METRICS or k == "composite"]
        if not weights or bad:
            raise ConfigError(f"{section}.composite must map metric names ({', '.join(sorted(set(METRICS) - {'composite'}))}) "
                              f"to weights, got {weights!r}")
    if int(spec.get("pairs_per_scan", 1)) < 1:
        raise ConfigError(f"{section}.pairs_per_scan must be >= 1, got {spec.get('pairs_per_scan')}")
    if not float(spec.get("pair_regions", 0.0)) >= 0:
        raise ConfigError(f"{section}.pair_regions must be >= 0 (metres; 0: rank whole scans), "
                          f"got {spec.get('pair_regions')}")
    if not float(spec.get("unseen_radius", 1.0)) > 0 or not float(spec.get("iou_voxel", 0.5)) > 0:
        raise ConfigError(f"{section}.unseen_radius and {section}.iou_voxel must be positive")


@dataclass
class PreferenceMetric:
    """The configured ranking metric: ``score(pred, target, scan)`` and its direction."""
    fn: Callable
    lower_is_better: bool
    spec: dict

    @classmethod
    def from_spec(cls, spec: dict) -> "PreferenceMetric":
        name = spec["metric"]
        if name in METRICS:
            fn, lower = METRICS[name]
            return cls(fn, lower, dict(spec))
        path_fn = resolve_callable(name)
        return cls(lambda pred, target, scan, s: path_fn(pred, target),
                   bool(spec.get("metric_lower_is_better", True)), dict(spec))

    def score(self, pred: np.ndarray, target: np.ndarray, scan: np.ndarray) -> float:
        return float(self.fn(pred, target, scan, self.spec))

    def per_scan(self, samples: torch.Tensor, rows: torch.Tensor, batch: dict, B: int) -> np.ndarray:
        """The metric of every scan's sample: ``samples`` (N, 3) with scan index ``rows`` (N,)."""
        g = samples.detach().float().cpu().numpy()
        r = rows.cpu().numpy()
        tb, tg = batch["target_batch"].numpy(), batch["target"].numpy()
        sb, sc = batch["scan_batch"].numpy(), batch["scan"].numpy()
        return np.array([self.score(g[r == b], tg[tb == b], sc[sb == b]) for b in range(B)])

    def first_wins(self, m1: np.ndarray, m2: np.ndarray) -> np.ndarray:
        """True where the first sample is preferred (ties: the first)."""
        return (m1 <= m2) if self.lower_is_better else (m1 >= m2)


def widest_pair(m1: np.ndarray, m2: np.ndarray) -> np.ndarray:
    """Index along axis 0 of the candidate pair with the widest margin, per scan: ``m1``, ``m2``
    (K, B) -> (B,) (ties: the first candidate)."""
    return np.argmax(np.abs(np.asarray(m1) - np.asarray(m2)), axis=0)


_ID_GAP = 1.0e6   # metres between ids in the fourth coordinate: beyond any scene's extent


def _separated(points: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``points`` (n, 3) with a fourth coordinate that puts every id far from every other: a
    nearest neighbour in this space is one of the same id whenever the id has points."""
    return np.concatenate([points.astype(np.float64), ids.astype(np.float64)[:, None] * _ID_GAP], axis=1)


def region_index(anchors: np.ndarray, rows: np.ndarray, cell: float) -> tuple[np.ndarray, np.ndarray]:
    """The region of every row: (``region`` (N,) in 0..R-1, ``keys`` (R, 3): scan, square x, square y).

    A region is a ``cell`` x ``cell`` metre square of the ground plane of one scan, and a row belongs
    to the square of its anchor (its start point). Regions are numbered in the order of their keys,
    so those of scan 0 come first.
    """
    keys = np.concatenate([np.asarray(rows)[:, None].astype(np.int64),
                           np.floor(np.asarray(anchors)[:, :2] / float(cell)).astype(np.int64)], axis=1)
    uniq, region = np.unique(keys, axis=0, return_inverse=True)
    return region.reshape(-1), uniq


def region_winners(g1: np.ndarray, g2: np.ndarray, anchors: np.ndarray, rows: np.ndarray,
                   target: np.ndarray, target_rows: np.ndarray, cell: float,
                   regions: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, dict]:
    """Region-wise preference between two samples of the same scans.

    ``g1``, ``g2`` (N, 3): two samples whose row i comes from the same start point ``anchors[i]``
    (the tiled scan point, x_init); ``rows`` (N,): each row's scan; ``target`` (M, 3) with scan index
    ``target_rows``. A region is a ``cell`` x ``cell`` metre square of the ground plane (x, y) of one
    scan; a row belongs to the region of its anchor, so both samples have the same rows in every
    region. Each sample's score in a region is a local Chamfer distance: the mean distance from its
    rows there to the scan's target, plus the mean distance from the target points in that square
    to its rows there (the second term is left out where the square has no target point). Lower is
    better; ties go to the first sample.

    Returns (``first`` (N,) bool: the row's region is won by ``g1``; statistics: the number of
    regions and the share of them that ``g2`` won). ``regions``: :func:`region_index`'s result for
    these rows, when the caller has it already.

    Why: a whole-scan metric of two samples from independent noises sums many regional differences
    that cancel, and which sample is lower is a coin toss no other metric shares
    (docs/experiments/preference.md). A region's winner is decided by that region alone, and the
    mosaic of winners is better than the mosaic of losers by construction, region by region.
    """
    cell = float(cell)
    region, uniq = regions if regions is not None else region_index(anchors, rows, cell)
    R = len(uniq)
    tkeys = np.concatenate([target_rows[:, None].astype(np.int64),
                            np.floor(target[:, :2] / cell).astype(np.int64)], axis=1)
    # the region of every target point, -1 where no row has its anchor in that square
    lookup = {tuple(k): i for i, k in enumerate(uniq.tolist())}
    t_region = np.array([lookup.get(tuple(k), -1) for k in tkeys.tolist()], dtype=np.int64)
    t_in = t_region >= 0
    t_tree = cKDTree(_separated(target, target_rows))
    n_rows = np.bincount(region, minlength=R).astype(np.float64)
    n_t = np.bincount(t_region[t_in], minlength=R).astype(np.float64)
    scores = []
    for g in (g1, g2):
        precision, _ = t_tree.query(_separated(g, rows), k=1)
        s = np.bincount(region, weights=precision, minlength=R) / n_rows
        if t_in.any():
            coverage, _ = cKDTree(_separated(g, region)).query(_separated(target[t_in], t_region[t_in]), k=1)
            cov = np.bincount(t_region[t_in], weights=coverage, minlength=R)
            s = s + np.where(n_t > 0, cov / np.maximum(n_t, 1.0), 0.0)
        scores.append(s)
    first_region = scores[0] <= scores[1]
    return first_region[region], {"regions": R, "second_won": float((~first_region).mean()),
                                  "region_margin": float(np.abs(scores[0] - scores[1]).mean())}


@dataclass
class RankedPair:
    """A pair ranked by :func:`rank_pair`: the winner and loser (whole samples, or region mosaics)."""
    x_w: torch.Tensor
    x_l: torch.Tensor
    first: np.ndarray | None           # (B,) whole scans: the first sample wins (None: regions, no m1/m2)
    mw: np.ndarray                     # (B,) the metric of each scan's winner / loser as used
    ml: np.ndarray
    logs: dict
    first_rows: np.ndarray | None = None                       # (N,) with regions: the row's region won by s1
    regions: tuple[np.ndarray, np.ndarray] | None = None       # region_index(...) of the rows


def rank_pair(metric: PreferenceMetric, s1: torch.Tensor, s2: torch.Tensor, m1: np.ndarray, m2: np.ndarray,
              rows: torch.Tensor, batch: dict, B: int, cell: float) -> RankedPair:
    """Winner and loser of each scan's pair of samples ``s1``, ``s2`` (N, 3) (scan index ``rows``),
    whose per-scan metrics are ``m1``, ``m2``: whole samples by the metric, or with ``cell`` > 0 the
    mosaics of each region's better and worse sample (:func:`region_winners`). The winner and loser
    keep the samples' graphs. ``logs``: ``metric/winner``, ``/loser``, ``/margin`` and ``/switch``
    (the share of scans, or of regions, the second sample won) summed over the ranks, and with
    regions ``metric/regions`` (regions per scan). Used by the distillation and the teacher's DPO
    stage alike. With regions the whole-sample metrics are not needed: ``m1`` = ``m2`` = None
    skips them (``first`` is then None)."""
    if m1 is None or m2 is None:
        if cell <= 0:
            raise ValueError("rank_pair: whole-scan ranking needs the metrics m1 and m2")
        first = None
    else:
        first = metric.first_wins(m1, m2)
    logs, first_rows, regions = {}, None, None
    if cell > 0:
        xb, anchors = rows.cpu().numpy(), batch["x_init"].numpy()
        regions = region_index(anchors, xb, cell)
        first_rows, rstats = region_winners(
            s1.detach().float().cpu().numpy(), s2.detach().float().cpu().numpy(), anchors, xb,
            batch["target"].numpy(), batch["target_batch"].numpy(), cell, regions=regions)
        pick = torch.as_tensor(first_rows, device=s1.device).view(-1, 1)
        switch = rstats["second_won"] * B
        logs["metric/regions"] = float(rstats["regions"]) / B
    else:
        pick = torch.as_tensor(first, device=s1.device)[rows].view(-1, 1)
        switch = float((~first).sum())
    x_w, x_l = torch.where(pick, s1, s2), torch.where(pick, s2, s1)
    if cell > 0:
        mw, ml = metric.per_scan(x_w, rows, batch, B), metric.per_scan(x_l, rows, batch, B)
    else:
        mw, ml = np.where(first, m1, m2), np.where(first, m2, m1)
    stats = D.all_reduce_sum_nograd(torch.tensor(
        [mw.sum(), ml.sum(), np.abs(ml - mw).sum(), switch, float(B)], dtype=torch.float64,
        device=s1.device)).cpu()
    n = float(stats[4])
    logs.update({"metric/winner": float(stats[0]) / n, "metric/loser": float(stats[1]) / n,
                 "metric/margin": float(stats[2]) / n, "metric/switch": float(stats[3]) / n})
    return RankedPair(x_w, x_l, first, np.asarray(mw), np.asarray(ml), logs, first_rows, regions)


def spread(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean |a - b| over pairs of samples, standard deviation) per scan of ``values`` (S, B)."""
    v = np.asarray(values, dtype=np.float64)
    s = v.shape[0]
    diffs = [np.abs(v[i] - v[j]) for i in range(s) for j in range(i + 1, s)]
    return np.mean(diffs, axis=0), v.std(axis=0)


def sample_timesteps(steps: int, t_top: int) -> list[int]:
    """``steps`` timesteps from ``t_top`` down, evenly spaced (1 -> [t_top]; 2 -> [999, 500])."""
    if int(steps) < 1:
        raise ConfigError(f"sampling steps must be >= 1, got {steps}")
    return [int(round(t)) for t in np.linspace(t_top, 0, int(steps) + 1)[:-1]]


def local_sample(denoise: Callable, x_T: torch.Tensor, timesteps: list[int], sigmas: torch.Tensor,
                 grad_last: bool = False) -> torch.Tensor:
    """Deterministic few-step sample of the local process x_t = x_0 + sigma_t eps (DDIM with
    eta = 0): at each t, x_0 = x - sigma_t eps(x, t) and, unless t is the last, x = x_0 +
    sigma_t' eps(x, t) at the next t'. ``denoise(x, t) -> eps``. Only the last step records a
    graph, and only with ``grad_last`` (earlier steps are evaluated without gradient)."""
    x = x_T
    for i, t in enumerate(timesteps):
        last = i == len(timesteps) - 1
        with torch.set_grad_enabled(grad_last and last):
            eps = denoise(x if last and grad_last else x.detach(), t)
            x0 = x - float(sigmas[t]) * eps
        if last:
            return x0
        x = (x0 + float(sigmas[timesteps[i + 1]]) * eps).detach()
    return x


def guided_eps(net, x: torch.Tensor, xb: torch.Tensor, t: torch.Tensor, cond, uncond, guidance: float,
               num_elements: int) -> torch.Tensor:
    """``net``'s noise prediction for a batch of ``num_elements`` scans, with classifier-free
    guidance ``eps_u + w (eps_c - eps_u)`` when ``guidance`` is not 1 (both halves in one call;
    ``uncond``: the all-zero cloud's condition for every element)."""
    from lidar_completion.diffusion.guidance import cfg_combine
    from lidar_completion.models import Condition
    if float(guidance) == 1.0:
        return net(x, xb, t, cond)
    out = net(torch.cat([x, x]), torch.cat([xb, xb + num_elements]), torch.cat([t, t]),
              Condition.concat([cond, uncond]))
    n = x.shape[0]
    return cfg_combine(out[:n], out[n:], float(guidance))
