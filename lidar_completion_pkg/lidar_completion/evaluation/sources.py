"""Where evaluated frames come from, and the two evaluations built on them.

* :class:`SequenceSource`: the frames of a SemanticKITTI-layout sequence with the ground-truth
  cache's evaluation targets; :func:`evaluate_sequence` completes them with a Completer (or scores
  the input scan itself, ``baseline="input"``).
* :class:`FileSource`: prediction and ground-truth files paired by stem; :func:`evaluate_files`
  scores completions made elsewhere.
"""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..errors import ConfigError, DatasetError
from ..fileutil import sha256_file
from ..settings import CompletionSettings
from .runner import EvalOptions, run_evaluation

__all__ = ["SequenceSource", "FileSource", "evaluate_sequence", "evaluate_files", "pair_files",
           "CLOUD_EXTS"]

log = logging.getLogger(__name__)

CLOUD_EXTS = (".bin", ".npy", ".ply", ".pcd")


class SequenceSource:
    """Frames ``0, every, 2 every, ...`` (at most ``limit``) of one sequence: ``load(key)`` gives
    (filtered input scan, evaluation target: z band -4..4.4 m, viewpoint mask) from the cache
    (``cache_root``, default DATASET_ROOT/gt_cache; ``build=True`` builds a missing cache first)."""

    def __init__(self, dataset_root, sequence="08", cache_root=None, build: bool = False,
                 every: int = 1, limit: Optional[int] = None):
        from ..data import EvaluationDataset

        # n_fps=1: the dataset's farthest-point sampling is not needed here (the Completer does its own)
        self.dataset = EvaluationDataset(dataset_root, [sequence], cache_root=cache_root, n_fps=1,
                                         tile=1, build=build)
        self.dataset_root = Path(dataset_root)
        self.sequence = self.dataset.sequences[0].sequence
        self.indices = list(range(0, len(self.dataset), every))[:limit]
        if not self.indices:
            raise DatasetError(f"sequence {self.sequence} has no frames to evaluate")
        self.keys = [f"{f:06d}" for f in self.indices]
        self._last: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}

    def load(self, key: str) -> Tuple[np.ndarray, np.ndarray]:
        if key not in self._last:
            item = self.dataset.sample(int(key), np.random.default_rng(0))   # eval: no randomness drawn
            self._last = {key: (item["raw_scan"], item["target"])}
        return self._last[key]

    def run_info(self, seed: int, every: int, limit: Optional[int]) -> Dict:
        """The run record's description of the data (identity keys: dataset, sequence, seed)."""
        return {"dataset": str(self.dataset_root.resolve()), "sequence": self.sequence,
                "seed": int(seed), "every": every, "limit": limit}


def evaluate_sequence(dataset_root, sequence="08", out="evaluation",
                      settings: Optional[CompletionSettings] = None,
                      options: EvalOptions = EvalOptions(), *, completer=None,
                      baseline: Optional[str] = None, cache_root=None, build_gt: bool = False) -> Dict:
    """Evaluate one SemanticKITTI-layout sequence and return the summary dict.

    The prediction comes from ``completer`` (a :class:`~lidar_completion.completer.Completer`), else
    from ``Completer.from_settings(settings)`` (defaults: the shipped student), or, with
    ``baseline="input"``, is the filtered input scan itself (no model). ``settings.checkpoint`` is
    recorded in the run either way. Frame ``i`` is completed with seed ``options.seed + i``; the
    ground truth is :class:`SequenceSource`'s.
    """
    if baseline not in (None, "input"):
        raise ConfigError(f"baseline: expected 'input' or none, got {baseline!r}")
    settings = settings if settings is not None else CompletionSettings()
    src = SequenceSource(dataset_root, sequence, cache_root=cache_root, build=build_gt,
                         every=options.every, limit=options.limit)
    run: Dict = src.run_info(options.seed, options.every, options.limit)
    identity = ["dataset", "sequence", "seed", "source"]
    if baseline == "input":
        run.update(source="input scan (no model)", label=options.label or "input scan alone", steps=None)
        predict_fn = None
    else:
        if completer is None:
            from ..completer import Completer
            completer = Completer.from_settings(settings)
        checkpoint = settings.checkpoint
        ckpt = None
        if checkpoint is not None:
            ckpt = {"path": str(Path(checkpoint).resolve()), "sha256": sha256_file(checkpoint)}
        run.update(source="completer", checkpoint=ckpt, steps=completer.steps,
                   guidance=completer.guidance, refine=completer.refine, process=completer.process,
                   device=str(completer.device), completer=repr(completer),
                   label=options.label or (Path(checkpoint).stem if checkpoint else "model"))
        identity += ["checkpoint", "steps", "guidance", "refine", "process"]
        predict_fn = completer.complete_detailed
    run["identity_keys"] = identity
    run["title"] = f"sequence {src.sequence}, {run['label']}"
    run["description"] = ("Ground truth: the cached per-frame targets (z band -4..4.4 m, viewpoint "
                          "mask). Prediction: " + ("the filtered input scan itself."
                                                   if baseline == "input" else
                                                   f"{run['steps']} steps ({run['process']} solver), "
                                                   f"w={run['guidance']:g}, "
                                                   f"refine={run['refine']}, per-frame seed = "
                                                   f"{options.seed} + frame."))

    def predict(key: str, index: int, inp):
        if predict_fn is None:
            return inp, {}
        res = predict_fn(inp, seed=options.seed + int(index))
        return res.points, dict(res.timings, seed=res.seed)

    return run_evaluation(src.keys, src.load, predict, out, run, options, indices=src.indices)


# ------------------------------------------------------------------------------ evaluate files
def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def pair_files(pred_dir, gt_dir) -> List[Tuple[str, Path, Path]]:
    """(stem, prediction file, ground-truth file) for every stem present in both folders
    (.bin/.npy/.ply/.pcd), in natural order; raises DatasetError when nothing pairs."""
    found = []
    for d, what in ((Path(pred_dir), "prediction"), (Path(gt_dir), "ground-truth")):
        if not d.is_dir():
            raise DatasetError(f"{what} folder {d} does not exist or is not a folder")
        files: Dict[str, Path] = {}
        for p in sorted(d.iterdir()):
            if p.is_file() and p.suffix.lower() in CLOUD_EXTS:
                if p.stem in files:
                    raise DatasetError(f"{d}: two clouds share the stem {p.stem!r} "
                                       f"({files[p.stem].name}, {p.name}); keep one")
                files[p.stem] = p
        found.append(files)
    pred, gt = found
    stems = sorted(set(pred) & set(gt), key=_natural)
    if not stems:
        raise DatasetError(f"no file stem is common to {pred_dir} ({len(pred)} clouds) and {gt_dir} "
                           f"({len(gt)} clouds); files are paired by name without extension")
    for name, only in (("prediction", set(pred) - set(gt)), ("ground truth", set(gt) - set(pred))):
        if only:
            log.warning("%d %s files have no partner and are skipped (e.g. %s)", len(only), name,
                        sorted(only, key=_natural)[0])
    return [(s, pred[s], gt[s]) for s in stems]


class FileSource:
    """PRED_DIR and GT_DIR clouds paired by stem (at most ``limit``); the optional ``input_dir``
    (same stems) only adds the input scan to the renders."""

    def __init__(self, pred_dir, gt_dir, input_dir=None, limit: Optional[int] = None):
        pairs = pair_files(pred_dir, gt_dir)[:limit]
        self.keys = [s for s, _, _ in pairs]
        self._files = {s: (p, g) for s, p, g in pairs}
        self._inputs: Dict[str, Path] = {}
        if input_dir is not None:
            for p in Path(input_dir).iterdir():
                if p.is_file() and p.suffix.lower() in CLOUD_EXTS:
                    self._inputs[p.stem] = p

    def load(self, key: str):
        from ..io import read_cloud
        gt = read_cloud(self._files[key][1])
        inp = read_cloud(self._inputs[key]) if key in self._inputs else None
        return inp, gt

    def predict(self, key: str, index: int, inp):
        from ..io import read_cloud
        t0 = time.perf_counter()
        pred = read_cloud(self._files[key][0])
        return pred, {"read": time.perf_counter() - t0}


def evaluate_files(pred_dir, gt_dir, out, input_dir=None, options: EvalOptions = EvalOptions()) -> Dict:
    """Evaluate completions made elsewhere (see :class:`FileSource`). Returns the summary dict."""
    src = FileSource(pred_dir, gt_dir, input_dir, options.limit)
    run = {"pred_dir": str(Path(pred_dir).resolve()), "gt_dir": str(Path(gt_dir).resolve()),
           "source": "files", "label": options.label or Path(pred_dir).name, "steps": None,
           "identity_keys": ["pred_dir", "gt_dir"]}
    run["title"] = f"{run['label']} (files)"
    run["description"] = f"Predictions from {pred_dir}, ground truth from {gt_dir}, paired by stem."
    return run_evaluation(src.keys, src.load, src.predict, out, run, options)
