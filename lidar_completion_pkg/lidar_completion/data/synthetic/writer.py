"""A synthetic sequence written exactly like SemanticKITTI, and the dataset-level API.

``sequences/SS/velodyne/NNNNNN.bin`` (float32 x, y, z, intensity), ``labels/NNNNNN.label`` (uint32,
semantic | instance << 16), ``poses.txt`` (camera-0 frame, first pose identity), ``calib.txt``
(P0..P3 and ``Tr`` velodyne -> camera, KITTI-like) and ``times.txt`` (10 Hz).
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ...errors import ConfigError
from .. import kitti
from .config import SyntheticConfig
from .layout import Town, rot_xyz
from .lidar import Hdl64

__all__ = ["SyntheticScene", "generate_sequence", "generate_dataset", "synthetic_pairs", "config_dict"]


class SyntheticScene:
    """One procedural sequence: a :class:`~.layout.Town` (the static scene, moving agents, the ego
    trajectory) seen by an :class:`~.lidar.Hdl64`.

    ``scan(k)`` ray-casts sweep ``k`` and returns ``(points (N, 4) float32, labels (N,) uint32)``
    in the LiDAR frame; ``lidar_poses`` are the (F, 4, 4) LiDAR poses relative to the first one
    (what ``poses.txt`` + ``calib.txt`` give back); ``tr`` is the velodyne -> camera transform;
    :meth:`write` writes the sequence in SemanticKITTI layout. The same (seed, sequence, n_scans,
    config) always gives the same scene and sweeps.
    """

    def __init__(self, seed: int, sequence: Union[int, str], n_scans: int,
                 config: Optional[SyntheticConfig] = None):
        if n_scans < 1:
            raise ConfigError(f"a sequence needs at least one scan, found {n_scans}")
        self.config = (config or SyntheticConfig()).validate()
        self.seed = int(seed)
        self.sequence = int(sequence)
        self.n_scans = int(n_scans)
        rng = np.random.default_rng([self.seed, self.sequence, 0x5CE4E])
        self.town = Town(rng, self.config, self.n_scans)
        self._tr = kitti_like_tr(rng)
        self.lidar = Hdl64(self.config)
        self.times = self.town.times
        self.world_poses = self.town.world_poses
        self.lidar_poses = self.town.lidar_poses

    @property
    def tr(self) -> np.ndarray:
        return self._tr.copy()

    def scan(self, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Ray-cast sweep ``k``: (points (N, 4) float32 in the LiDAR frame, labels (N,) uint32)."""
        if not 0 <= k < self.n_scans:
            raise IndexError(f"scan {k} out of range for a sequence of {self.n_scans} scans")
        return self.lidar.sweep(self.town, k, np.random.default_rng([self.seed, self.sequence, 1 + k]))

    def write(self, seq_dir: Union[str, os.PathLike], progress=None) -> None:
        """Write this sequence in SemanticKITTI layout into ``seq_dir``."""
        seq_dir = Path(seq_dir)
        (seq_dir / "velodyne").mkdir(parents=True, exist_ok=True)
        (seq_dir / "labels").mkdir(parents=True, exist_ok=True)
        kitti.write_calib(seq_dir / "calib.txt", kitti_calib(self._tr))
        kitti.write_times(seq_dir / "times.txt", self.times)
        for k in range(self.n_scans):
            pts, lab = self.scan(k)
            kitti.write_scan(seq_dir / "velodyne" / f"{k:06d}.bin", pts)
            kitti.write_labels(seq_dir / "labels" / f"{k:06d}.label", lab)
            if progress is not None:
                progress.update(1)
        # poses last: a sequence folder with poses.txt is complete
        kitti.write_poses(seq_dir / "poses.txt",
                          kitti.velo_to_cam_poses(self.lidar_poses, self._tr))


def kitti_like_tr(rng) -> np.ndarray:
    """A velodyne -> camera-0 transform like KITTI's: axes permuted (cam z = velo x, cam x = -velo y,
    cam y = -velo z), a small mounting rotation, camera about 0.27 m behind the LiDAR origin."""
    base = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
    small = rot_xyz(*np.deg2rad(rng.normal(0.0, 0.4, 3)))
    tr = np.eye(4)
    tr[:3, :3] = base @ small
    tr[:3, 3] = (rng.normal(-0.004, 0.005), rng.normal(-0.076, 0.01), rng.normal(-0.272, 0.01))
    return tr


def kitti_calib(tr: np.ndarray) -> Dict[str, np.ndarray]:
    f, cx, cy = 718.856, 607.1928, 185.2157
    p0 = np.array([[f, 0, cx, 0.0], [0, f, cy, 0.0], [0, 0, 1, 0.0]])
    p1 = p0.copy()
    p1[0, 3] = -386.1448
    p2 = p0.copy()
    p2[:, 3] = (45.38225, -0.1130887, 0.003779761)
    p3 = p0.copy()
    p3[:, 3] = (-337.2877, 2.369057, 0.004915215)
    return {"P0": p0, "P1": p1, "P2": p2, "P3": p3, "Tr": tr[:3]}


def _sequence_ids(sequences, first: int = 0) -> List[str]:
    if isinstance(sequences, (int, np.integer)):
        if sequences < 1:
            raise ConfigError(f"number of sequences must be >= 1, found {sequences}")
        return [f"{first + i:02d}" for i in range(int(sequences))]
    ids = [kitti.sequence_id(s) for s in sequences]
    if not ids:
        raise ConfigError("no sequences requested")
    return ids


def generate_sequence(out_root: Union[str, os.PathLike], sequence: Union[int, str], scans: int,
                      seed: int = 0, config: Optional[SyntheticConfig] = None,
                      progress=None) -> Path:
    """Generate one sequence into ``out_root/sequences/SS``; returns the sequence folder."""
    seq = kitti.sequence_id(sequence)
    scene = SyntheticScene(seed, int(seq), scans, config)
    seq_dir = Path(out_root) / "sequences" / seq
    scene.write(seq_dir, progress=progress)
    return seq_dir


def generate_dataset(out_root: Union[str, os.PathLike], sequences: Union[int, Sequence] = 1,
                     scans: int = 100, seed: int = 0, config: Optional[SyntheticConfig] = None,
                     first_sequence: int = 0, progress: bool = False) -> List[str]:
    """Write a synthetic SemanticKITTI-layout dataset to ``out_root/sequences/SS/...``.

    ``sequences``: a count N (ids ``first_sequence`` .. +N-1) or a list of ids. The same
    (seed, sequence id, scans, config) always gives the same files. Returns the sequence ids.
    """
    ids = _sequence_ids(sequences, first_sequence)
    if scans < 1:
        raise ConfigError(f"scans per sequence must be >= 1, found {scans}")
    bar = None
    if progress:
        from ..progress import progress_bar
        bar = progress_bar(total=len(ids) * scans, unit="scan", desc="make-synthetic")
    try:
        for seq in ids:
            if bar is not None:
                bar.set_postfix_str(f"sequence {seq}")
            generate_sequence(out_root, seq, scans, seed, config, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    return ids


def synthetic_pairs(root: Union[str, os.PathLike], sequence: Union[int, str] = 0,
                    scans: int = 20, seed: int = 0, config: Optional[SyntheticConfig] = None,
                    cache_dir: Optional[Union[str, os.PathLike]] = None,
                    gt_config=None) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Yield ``(scan (N, 4) float32, target (M, 3) float32)`` for a synthetic sequence.

    Generates the sequence under ``root`` when it is not there yet (same seed -> same data), builds
    its ground truth through the same builder and cache as real data
    (:func:`lidar_completion.data.gt.build_sequence`),
    then yields every frame's raw scan and cached target (scan frame, z > -4 m, viewpoint-masked).
    """
    from ..gt import build_sequence
    seq = kitti.sequence_id(sequence)
    seq_dir = Path(root) / "sequences" / seq
    if not (seq_dir / "poses.txt").is_file():
        generate_sequence(root, seq, scans, seed, config)
    sequence_obj = kitti.SemanticKittiSequence(root, seq, require_labels=True)
    cache_root = Path(cache_dir) if cache_dir is not None else Path(root) / "gt_cache"
    cache = build_sequence(sequence_obj, cache_root, config=gt_config)
    for i in range(len(sequence_obj)):
        yield sequence_obj.scan(i), cache.load_target(i)


def config_dict(config: Optional[SyntheticConfig] = None) -> Dict:
    return asdict(config or SyntheticConfig())
