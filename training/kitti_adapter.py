"""SemanticKITTI-layout data (real or synthetic) for the trainers, through the core's datasets.

Wraps :class:`lidar_completion.data.TrainingDataset` (label-filtered input, farthest-point sampling,
joint augmentation of docs/method.md, "Data and ground truth", cached per-frame targets) and keeps
the arrays the trainers use.
Its randomness comes from the generator :class:`training.data.KeyedDataset` passes in, keyed by the
sample's position in the global order. ``data.build_gt: true`` (default for synthetic data) builds
missing ground-truth caches first, on rank 0 while the other ranks wait.
"""
from __future__ import annotations

import logging
from pathlib import Path

from . import distributed as D

log = logging.getLogger(__name__)


class KittiSource:
    def __init__(self, cfg: dict, root, train: bool = True, whole_target: bool = False, fps: bool = True):
        from lidar_completion.data import TrainingDataset, build_gt
        d = cfg["data"]
        build = d.get("build_gt")
        if build is None:
            build = d["kind"] == "synthetic"
        seqs = [str(s) for s in (d["synthetic"]["sequences"] if d["kind"] == "synthetic" and not d.get("root")
                                 else d["sequences"])]
        if build:
            if D.env_world()[0] == 0:
                build_gt(root, seqs, out=d.get("gt_cache"), verify="size", progress=False)
            D.barrier()
        self.ds = TrainingDataset(root, seqs, cache_root=d.get("gt_cache"), n_fps=int(d["scan_points"]),
                                  tile=int(d["tile"]), target_points=None if whole_target else int(d["target_points"]),
                                  augment=bool(d["augment"]), seed=int(cfg["seed"]), fps=fps)
        self.root = Path(root)
        self._skipped: set = set()
        self._within = len(self.ds)      # data.limit: replacements come from the first N frames

    def limit_to(self, n: int) -> None:
        """Use only the first ``n`` frames (``data.limit``), replacements included."""
        self._within = max(1, min(int(n), len(self.ds)))

    def __len__(self) -> int:
        return len(self.ds)

    def sample(self, index: int, rng) -> dict:
        """Item ``index``; a frame whose files cannot make one (a scan with no point left by the
        input filter, an empty target) is replaced by the next usable frame, with a warning once per
        frame: one bad scan among thousands does not end a run, and the replacement is the same on
        every run (the frame's checks draw nothing from ``rng``)."""
        from lidar_completion.errors import DatasetError, EmptyFrameError
        n = self._within
        for k in range(n):
            i = (index + k) % n
            try:
                s = self.ds.sample(i, rng)
                break
            except EmptyFrameError as exc:     # a damaged cache (DatasetError) ends the run
                if i not in self._skipped:
                    self._skipped.add(i)
                    log.warning("training: frame %s left out, another frame takes its place: %s", i, exc)
        else:
            raise DatasetError(f"no frame of the training set ({self.root}) can be used (see the warnings)")
        if "scan" not in s:     # sampled on the device (training.data.sample_scans_on_device)
            return {"scan_full": s["raw_scan"], "target": s["target"]}
        return {"scan": s["scan"], "x_init": s["x_init"], "target": s["target"]}
