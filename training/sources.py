"""Where training samples come from (``data.kind`` in the config).

* ``semantickitti``: a SemanticKITTI-layout dataset at ``data.root`` with its per-frame ground-truth
  cache (``lidar_completion.data``), augmented as in docs/method.md, "Data and ground truth";
* ``synthetic``: the same, on scenes made by ``lidar_completion.data.synthetic`` (generated once into
  ``<out>/synthetic`` unless ``data.root`` points at an existing synthetic dataset);
* ``npz``: one ``.npz`` file with arrays ``scan_0, target_0, scan_1, ...`` (tests, overfitting a
  single scan); scans are farthest-point sampled to ``data.scan_points``, targets shuffled and tiled to
  ``data.target_points``.

For the refiner every source is wrapped in :class:`RefinerView`: the input is the dense target
subsampled to ``refiner.input_points`` and jittered with N(0, sigma^2) clipped at +-clip (published:
0.2 m, 0.3 m), the target the dense cloud tiled to ``refiner.target_points``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lidar_completion.data.dataset import tile_to
from lidar_completion.errors import ConfigError, DatasetError


class NpzSource:
    def __init__(self, path, scan_points: int, target_points: int, fps: bool = True):
        path = Path(path)
        if not path.is_file():
            raise DatasetError(f"data.root {path} does not exist (expected an .npz with scan_0, target_0, ...)")
        try:
            archive = np.load(path)
        except (OSError, ValueError, EOFError) as exc:   # not an .npz (e.g. a text or pickle file)
            raise DatasetError(f"data.root {path} is not a readable .npz archive of arrays scan_0, "
                               f"target_0, ... ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        if not hasattr(archive, "files"):                # a single .npy array
            raise DatasetError(f"data.root {path} holds one array, not an .npz archive of arrays scan_0, "
                               "target_0, ...")
        with archive as z:
            n = 0
            while f"scan_{n}" in z.files:
                n += 1
            if n == 0:
                raise DatasetError(f"{path} holds no arrays named scan_0, scan_1, ...; found {z.files[:6]}")
            self.scans, self.targets = [], []
            for i in range(n):
                if f"target_{i}" not in z.files:
                    raise DatasetError(f"{path} has scan_{i} but no target_{i}")
                self.scans.append(np.asarray(z[f"scan_{i}"], dtype=np.float32)[:, :3])
                self.targets.append(np.asarray(z[f"target_{i}"], dtype=np.float32)[:, :3])
        self.scan_points = int(scan_points)
        self.target_points = int(target_points)
        self.fps = bool(fps)
        self._fps_cache: dict = {}

    def __len__(self) -> int:
        return len(self.scans)

    def _scan(self, i: int) -> np.ndarray:
        if i not in self._fps_cache:
            s = self.scans[i]
            if len(s) > self.scan_points:
                from lidar_completion.preprocess import farthest_point_sample
                s = s[farthest_point_sample(s, self.scan_points)]
            self._fps_cache[i] = np.ascontiguousarray(s)
        return self._fps_cache[i]

    def sample(self, index: int, rng: np.random.Generator) -> dict:
        target = tile_to(self.targets[index], self.target_points, rng)
        if not self.fps:        # sampled on the device (training.data.sample_scans_on_device)
            return {"scan_full": self.scans[index], "target": target}
        return {"scan": self._scan(index), "target": target}


class RefinerView:
    """Turn a (scan, dense target) source into (jittered dense input, dense target) pairs."""

    def __init__(self, base, input_points: int, target_points: int, sigma: float, clip: float):
        self.base = base
        self.input_points = int(input_points)
        self.target_points = int(target_points)
        self.sigma = float(sigma)
        self.clip = float(clip)

    def __len__(self) -> int:
        return len(self.base)

    def sample(self, index: int, rng: np.random.Generator) -> dict:
        s = self.base.sample(index, rng) if hasattr(self.base, "sample") else self.base[index]
        dense = np.asarray(s["target"], dtype=np.float32)[:, :3]
        inp = tile_to(dense, self.input_points, rng)
        jit = np.clip(rng.normal(0.0, self.sigma, size=inp.shape), -self.clip, self.clip).astype(np.float32)
        return {"input": inp + jit, "target": tile_to(dense, self.target_points, rng)}


def _kitti_source(cfg: dict, root, whole_target: bool, fps: bool = True):
    from .kitti_adapter import KittiSource
    return KittiSource(cfg, root, whole_target=whole_target, fps=fps)


def build_source(cfg: dict, out_dir, kind: str, fps: bool = True):
    """The trainer's sample source; ``fps=False`` leaves the scans unsampled (``scan_full``) for
    :func:`training.data.sample_scans_on_device`."""
    d = cfg["data"]
    k = d["kind"]
    if kind == "refiner":
        fps = False     # the refiner never reads the scan (RefinerView keeps only the target): no sampling
    if k == "npz":
        if not d.get("root"):
            raise ConfigError("data.kind npz needs data.root: the .npz file")
        base = NpzSource(d["root"], d["scan_points"], d["target_points"], fps=fps)
    elif k in ("semantickitti", "synthetic"):
        root = d.get("root")
        if k == "synthetic" and not root:
            root = Path(out_dir) / "synthetic"
            _ensure_synthetic(root, d["synthetic"])
        if not root:
            raise ConfigError("data.kind semantickitti needs data.root (the folder holding sequences/)")
        base = _kitti_source(cfg, root, whole_target=(kind == "refiner"), fps=fps)
    else:
        raise ConfigError(f"unknown data.kind {k!r}; expected semantickitti, synthetic or npz")
    if d.get("limit"):
        base = _Limited(base, int(d["limit"]))
    if kind == "refiner":
        r = cfg["refiner"]
        base = RefinerView(base, r["input_points"], r["target_points"], r["jitter_sigma"], r["jitter_clip"])
    return base


class _Limited:
    def __init__(self, base, n: int):
        self.base, self.n = base, min(n, len(base))
        if hasattr(base, "limit_to"):     # a source that replaces unusable items keeps to these
            base.limit_to(self.n)

    def __len__(self) -> int:
        return self.n

    def sample(self, index: int, rng):
        return self.base.sample(index, rng) if hasattr(self.base, "sample") else self.base[index]


def _ensure_synthetic(root: Path, spec: dict) -> None:
    """Generate the synthetic dataset once (a marker file records completion); rank 0 only would
    race with the others, so every rank checks the marker and rank 0 writes while others wait."""
    from . import distributed as D
    marker = Path(root) / ".complete"
    if D.env_world()[0] == 0 and not marker.exists():
        from lidar_completion.data.synthetic import generate_dataset
        seqs = [str(s) for s in spec.get("sequences", ["00"])]
        generate_dataset(str(root), sequences=seqs, scans=int(spec.get("scans", 4)),
                         seed=int(spec.get("seed", 0)), progress=True)
        marker.write_text("ok\n")
    D.barrier()
