"""SemanticKITTI-layout data (real or synthetic) for the trainers, through the core's datasets.

Wraps :class:`lidar_completion.data.TrainingDataset` (label-filtered input, farthest-point sampling,
joint augmentation of docs/method.md, "Data and ground truth", cached per-frame targets) and keeps
the arrays the trainers use.
Its randomness comes from the generator :class:`training.data.KeyedDataset` passes in, keyed by the
sample's position in the global order. ``data.build_gt: true`` (default for synthetic data) builds
missing ground-truth caches first, on rank 0 while the other ranks wait.
"""
from __future__ import annotations

from pathlib import Path

from . import distributed as D


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

    def __len__(self) -> int:
        return len(self.ds)

    def sample(self, index: int, rng) -> dict:
        s = self.ds.sample(index, rng)
        if "scan" not in s:     # sampled on the device (training.data.sample_scans_on_device)
            return {"scan_full": s["raw_scan"], "target": s["target"]}
        return {"scan": s["scan"], "x_init": s["x_init"], "target": s["target"]}
