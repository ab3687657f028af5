"""Torch datasets over SemanticKITTI-layout sequences and their ground-truth cache.

One item (docs/method.md, "Data and ground truth"):

* ``x_init``   (n_fps * tile, 3) float32 - the input scan farthest-point-sampled to ``n_fps`` points
  and tiled ``tile`` times (18,000 x 10 = 180,000 by default);
* ``scan``     (n_fps, 3) float32 - the farthest-point-sampled scan (the condition);
* ``raw_scan`` (N, 3) float32 - the whole filtered input scan (3.5 m < range < 50 m, z > -4 m; in
  training also the map's label filter);
* ``target``   (target_points, 3) float32 - the cached target shuffled and tiled/truncated
  (training), or (K, 3) the whole target (evaluation, z band -4..4.4 m, unless ``target_points``);
* ``meta``     dict: sequence, frame, pose (4x4 list), augmentation (3x3 list).

With ``fps=False`` the item has no ``x_init`` and ``scan``: the sampling is left to the caller (the
trainers sample a batch on the GPU), and in training ``raw_scan`` comes shuffled, so that sampling
from its first point starts at a random one.

Training applies the same random transform to scan and target: yaw U(0, 2 pi), per-axis rotation
jitter N(0, 0.06) clipped to +-0.18 rad, scale U(0.95, 1.05), flip of y with p = 0.5. All randomness
comes from a generator seeded by (seed, epoch, index) - or the one passed to :meth:`sample`, the
interface of ``training.data.KeyedDataset``.

The cache holds each frame's target masked by the cells of the range- and z-filtered scan; in
training, where the input scan is also label-filtered, the target is masked again by the cells of
that label-filtered scan.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, DatasetError, EmptyFrameError
from . import gt as gt_mod
from . import kitti
from .geometry import rotate

PathLike = Union[str, os.PathLike]


def augmentation_matrix(rng: np.random.Generator, jitter_std: float = 0.06,
                        jitter_clip: float = 0.18, scale_range=(0.95, 1.05),
                        flip_p: float = 0.5) -> np.ndarray:
    """A 3x3 linear map: flip_y @ scale @ R_jitter(x, y, z) @ R_yaw (points: ``p @ M.T``)."""
    yaw = rng.uniform(0.0, 2 * np.pi)
    jx, jy, jz = np.clip(rng.normal(0.0, jitter_std, 3), -jitter_clip, jitter_clip)
    scale = rng.uniform(*scale_range)
    flip = rng.random() < flip_p

    def rz(a):
        c, s = math.cos(a), math.sin(a)
        return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])

    def ry(a):
        c, s = math.cos(a), math.sin(a)
        return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])

    def rx(a):
        c, s = math.cos(a), math.sin(a)
        return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])

    m = scale * (rz(jz) @ ry(jy) @ rx(jx) @ rz(yaw))
    if flip:
        m = np.diag([1.0, -1.0, 1.0]) @ m
    return m


def tile_to(points: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Shuffle ``points`` and tile/truncate them to exactly ``n`` rows."""
    if len(points) == 0:
        raise DatasetError("cannot tile an empty cloud to a fixed size")
    perm = rng.permutation(len(points))
    reps = -(-n // len(points))
    return np.ascontiguousarray(np.tile(points[perm], (reps, 1))[:n])


def fps_indices(points: np.ndarray, n: int, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """``n`` indices of ``points`` by farthest-point sampling (``lidar_completion.preprocess``).

    With ``rng`` the cloud is shuffled first (so the start point varies) and, when it has fewer than
    ``n`` points, the missing indices are drawn with replacement; without ``rng`` it is
    deterministic and a short cloud is padded by repeating it in order."""
    from ..preprocess import farthest_point_sample
    m = len(points)
    if m == 0:
        raise DatasetError("cannot farthest-point-sample an empty scan")
    if rng is not None:
        perm = rng.permutation(m)
        idx = perm[np.asarray(farthest_point_sample(points[perm], n), dtype=np.int64)]
    else:
        idx = np.asarray(farthest_point_sample(points, n), dtype=np.int64)
    if len(idx) < n:
        extra = (rng.integers(0, m, n - len(idx)) if rng is not None
                 else np.resize(np.arange(m), n - len(idx)))
        idx = np.concatenate([idx, extra])
    return idx[:n]


class CompletionDataset(Dataset):
    """Frames of one or more sequences with their cached ground truth.

    ``split``: "train" (augmentation, label-filtered input, target tiled to ``target_points``) or
    "eval" (no augmentation, unfiltered labels, target z band -4..4.4 m, whole target unless
    ``target_points``). ``cache_root`` defaults to ``DATASET_ROOT/gt_cache``; ``build=True`` builds
    missing caches first (otherwise a missing cache is a :class:`DatasetError`).
    """

    def __init__(self, dataset_root: PathLike, sequences: Sequence[Union[str, int]],
                 cache_root: Optional[PathLike] = None, split: str = "train", n_fps: int = 18000,
                 tile: int = 10, target_points: Optional[int] = -1, augment: Optional[bool] = None,
                 seed: int = 0, config: Optional[gt_mod.GTConfig] = None,
                 label_filter: Optional[bool] = None, build: bool = False, verify: bool = False,
                 fps: bool = True):
        if split not in ("train", "eval"):
            raise ConfigError(f"split must be 'train' or 'eval', found {split!r}")
        if n_fps < 1 or tile < 1:
            raise ConfigError(f"n_fps and tile must be >= 1, found {n_fps} and {tile}")
        self.split = split
        self.root = kitti.dataset_root(dataset_root)
        self.cache_root = Path(cache_root) if cache_root is not None else \
            gt_mod.default_cache_root(self.root)
        self.n_fps = int(n_fps)
        self.tile = int(tile)
        if target_points == -1:
            target_points = self.n_fps * self.tile if split == "train" else None
        self.target_points = None if target_points is None else int(target_points)
        self.augment = (split == "train") if augment is None else bool(augment)
        self.label_filter = (split == "train") if label_filter is None else bool(label_filter)
        self.seed = int(seed)
        self.epoch = 0
        self.verify = bool(verify)
        self.fps = bool(fps)
        ids = [kitti.sequence_id(s) for s in sequences]
        if not ids:
            raise ConfigError("no sequences given")
        self.sequences: List[kitti.SemanticKittiSequence] = []
        self.caches: List[gt_mod.GTCache] = []
        for sid in ids:
            seq = kitti.SemanticKittiSequence(self.root, sid, require_labels=self.label_filter)
            if build:
                cache = gt_mod.build_sequence(seq, self.cache_root, config, verify="size")
            else:
                try:
                    cache = gt_mod.GTCache(self.cache_root, sid)
                except DatasetError:
                    if not seq.has_labels:     # nothing to build it from: say that, not "build it"
                        raise DatasetError(
                            f"sequence {sid} has no ground truth: it has no semantic labels "
                            f"({seq.path / 'labels'} missing), which the ground-truth map is built "
                            "from (SemanticKITTI labels sequences 00-10 only)") from None
                    raise
            if len(cache) != len(seq):
                raise DatasetError(f"the cache of sequence {sid} ({cache.dir}) has {len(cache)} "
                                   f"frames but the sequence has {len(seq)} scans; rebuild it with "
                                   "`lidar-completion build-gt`")
            if not cache.complete:
                raise DatasetError(f"the cache of sequence {sid} ({cache.dir}) is incomplete; "
                                   "finish it with `lidar-completion build-gt` (it resumes)")
            if not build:     # (a cache just built or verified is of these files)
                cache.check_source(seq)
            self.sequences.append(seq)
            self.caches.append(cache)
        self.config = config or self.caches[0].config
        self.index = [(si, f) for si, seq in enumerate(self.sequences) for f in range(len(seq))]

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation draws of every item (seeded by (seed, epoch, index))."""
        self.epoch = int(epoch)

    def __getitem__(self, i: int) -> Dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} out of range for a dataset of {len(self)} frames")
        i %= len(self)
        return self.sample(i, np.random.default_rng([self.seed, self.epoch, i]))

    def sample(self, i: int, rng: np.random.Generator) -> Dict:
        """Item ``i`` drawing its randomness from ``rng``."""
        si, frame = self.index[i]
        seq, cache, cfg = self.sequences[si], self.caches[si], self.config
        scan = seq.scan(frame)
        labels = seq.labels(frame) if self.label_filter else None
        raw = scan[gt_mod.input_mask(scan, cfg, labels), :3].astype(np.float32)
        target = cache.load_target(frame, verify=self.verify)
        if self.split == "eval":
            target = gt_mod.evaluation_target(target, cfg)
        if self.label_filter:
            # on the cache's grid (the published rule's starts where the raw scan does)
            origin = gt_mod.published_grid_origin(scan, cfg) if cfg.view_mask == "published" else None
            target = target[gt_mod.viewpoint_mask(target, raw, cfg.view_voxel, origin)]
        where = f"sequence {seq.sequence} frame {frame}"
        if not len(raw):
            raise EmptyFrameError(f"{where} ({seq.scan_path(frame)}, {len(scan)} points): no scan point "
                               f"passes the input filter ({cfg.min_range:g} m < range < "
                               f"{cfg.input_max_range:g} m, z > {cfg.z_min:g} m"
                               f"{', a static class label' if labels is not None else ''})")
        if not len(target):
            raise EmptyFrameError(f"{where}: the ground-truth target is empty "
                               f"({cache.target_path(frame)})")
        if self.fps:
            fps = raw[fps_indices(raw, self.n_fps, rng if self.augment else None)]
        else:   # sampled later (on the device, from point 0): a shuffled cloud starts anywhere
            fps = None
            if self.augment:
                raw = np.ascontiguousarray(raw[rng.permutation(len(raw))])
        if self.augment:
            m = augmentation_matrix(rng)
            fps = None if fps is None else rotate(fps, m).astype(np.float32)
            raw = rotate(raw, m).astype(np.float32)
            target = rotate(target, m).astype(np.float32)
        else:
            m = np.eye(3)
        if self.target_points is not None:
            target = tile_to(target, self.target_points, rng)
        out = {
            "raw_scan": np.ascontiguousarray(raw, dtype=np.float32),
            "target": np.ascontiguousarray(target, dtype=np.float32),
            "meta": {"sequence": seq.sequence, "frame": int(frame),
                     "pose": seq.pose(frame).tolist(), "augmentation": m.tolist()},
        }
        if fps is not None:
            out["x_init"] = np.ascontiguousarray(np.tile(fps, (self.tile, 1)), dtype=np.float32)
            out["scan"] = np.ascontiguousarray(fps, dtype=np.float32)
        return out


class TrainingDataset(CompletionDataset):
    """:class:`CompletionDataset` with ``split="train"``."""

    def __init__(self, dataset_root, sequences, cache_root=None, **kw):
        super().__init__(dataset_root, sequences, cache_root, split="train", **kw)


class EvaluationDataset(CompletionDataset):
    """:class:`CompletionDataset` with ``split="eval"`` (no augmentation, z band -4..4.4 m)."""

    def __init__(self, dataset_root, sequences, cache_root=None, **kw):
        super().__init__(dataset_root, sequences, cache_root, split="eval", **kw)


def collate_completion(samples: List[Dict]) -> Dict:
    """Batch items: every array field becomes a flat (sum N, 3) tensor plus ``<name>_batch`` (row ->
    element) and ``<name>_counts``; rows are grouped by element as the networks expect. ``meta``
    stays a list."""
    if not samples:
        raise DatasetError("cannot collate an empty batch")
    out: Dict = {"batch_size": len(samples), "meta": [s.get("meta", {}) for s in samples]}
    for name, value in samples[0].items():
        if not isinstance(value, np.ndarray):
            continue
        arrs = [np.asarray(s[name], dtype=np.float32) for s in samples]
        out[name] = torch.from_numpy(np.concatenate(arrs, axis=0))
        out[name + "_batch"] = torch.cat([torch.full((len(a),), b, dtype=torch.long)
                                          for b, a in enumerate(arrs)])
        out[name + "_counts"] = torch.tensor([len(a) for a in arrs], dtype=torch.long)
    return out
