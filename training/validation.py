"""Validation during training: every ``validation.every_steps`` steps the trainer completes a fixed
set of held-out frames and the best weights so far are exported beside the last ones.

The frames: ``validation.frames`` frames (0, ``every``, 2 ``every``, ...) of sequence
``validation.sequence`` of ``validation.root`` (default ``data.root``), a SemanticKITTI-layout
dataset whose ground-truth cache is built when missing. With ``data.kind: synthetic`` and no root,
a held-out drive (``validation.synthetic``: sequence id, scans, generator seed) is generated once
into ``<out>/validation``. Frame i is completed with seed ``validation.seed + i``, so every
validation of a run sees the same inputs and the same noise: the curve moves only with the weights.

What is completed (each trainer's :meth:`~training.engine.Trainer.validation_predictor`): the
teacher (and ``teacher-dpo``) and the distilled student sample ``validation.steps`` steps of the
local solver at ``validation.guidance`` (None: the weight their export records), refined with
``validation.refiner`` (teacher) or ``distill.refiner`` (student) when ``validation.refine``; the
refiner refines ``x_init`` (the farthest-point-sampled scan tiled), the results table's "x_init,
no denoiser" row.

Logged (TensorBoard and ``metrics.jsonl``, at the step): ``val/cd`` and ``val/jsd_bev`` (means over
the frames), ``val/best`` (the best ``validation.select`` value so far) and ``val/seconds``. When the
selected metric improves, the inference checkpoint is exported to ``<out>/best/<kind>.pt`` and
``<out>/best/validation.json`` records the step and the metrics; a resumed run reads it back, so
"best" spans the whole run - unless it was chosen by another ``validation.select`` (then the best is
chosen afresh) or recorded after the resumed checkpoint's step (then ``best/`` is moved to
``earlier/``, :func:`discard_later_best`). A validation whose networks output non-finite points is
logged as inf and training goes on. Rank 0 validates; the other ranks wait.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np

from lidar_completion.errors import ConfigError, DatasetError, EmptyFrameError, LidarCompletionError
from lidar_completion.fileutil import atomic_write_json
from lidar_completion.metrics import chamfer_distance, jsd_bev

log = logging.getLogger(__name__)

BEST_DIR = "best"
BEST_FILE = "validation.json"
#: the sampler guidance each kind's export records (the validation default)
EXPORT_GUIDANCE = {"teacher": 6.0, "teacher-dpo": 6.0, "distill": 3.5}

Predictor = Callable[[np.ndarray, int], np.ndarray]


def validation_root(cfg: dict, out) -> tuple[Path, str]:
    """(dataset root, sequence) of the held-out frames; generates the synthetic drive if needed."""
    v, d = cfg["validation"], cfg["data"]
    root = v.get("root")
    if root:
        return Path(root), str(v["sequence"])
    if d["kind"] == "synthetic" and not d.get("root"):
        spec = v["synthetic"]
        root = Path(out) / "validation"
        seq = f"{int(spec['sequence']):02d}"
        marker = root / ".complete"
        if not marker.exists():
            from lidar_completion.data.synthetic import generate_dataset
            generate_dataset(str(root), sequences=[int(seq)], scans=int(spec["scans"]), seed=int(spec["seed"]))
            marker.write_text("ok\n")
        return root, seq
    if d.get("root") and d["kind"] in ("semantickitti", "synthetic"):
        return Path(d["root"]), str(v["sequence"])
    raise ConfigError("validation.every_steps > 0 needs held-out frames: set validation.root (a "
                      "SemanticKITTI-layout dataset) and validation.sequence")


class Validator:
    """The held-out frames, the metrics of one validation and the best-so-far bookkeeping."""

    def __init__(self, cfg: dict, kind: str, out):
        self.cfg = cfg["validation"]
        self.kind = kind
        self.out = Path(out)
        self.every = int(self.cfg["every_steps"])
        self.select = self.cfg["select"]
        self.best_dir = self.out / BEST_DIR
        self._frames: list | None = None
        self._full_cfg = cfg
        self.best = self._read_best()

    @property
    def guidance(self) -> float:
        g = self.cfg.get("guidance")
        return float(g) if g is not None else EXPORT_GUIDANCE.get(self.kind, 1.0)

    def due(self, step: int, total_steps: int) -> bool:
        return self.every > 0 and step > 0 and (step % self.every == 0 or step == total_steps)

    def _read_best(self) -> dict | None:
        path = self.best_dir / BEST_FILE
        if not path.is_file():
            return None
        try:
            best = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            log.warning("%s is unreadable; the best checkpoint is chosen afresh", path)
            return None
        if best.get("select", self.select) != self.select:
            # values of another metric cannot be compared with this one's; its weights move aside,
            # so that best/ never holds a best by a metric the run no longer selects by
            from .logs import aside_folder
            aside = aside_folder(self.out) / BEST_DIR
            self.best_dir.rename(aside)
            log.warning("%s held the best by %s, but validation.select is %s now: moved to %s; the "
                        "best is chosen afresh by %s", self.best_dir, best["select"], self.select, aside,
                        self.select)
            return None
        return best

    def frames(self) -> list:
        """[(frame index, filtered input scan, evaluation target)], loaded once."""
        if self._frames is None:
            from lidar_completion.evaluation import SequenceSource
            root, seq = validation_root(self._full_cfg, self.out)
            try:
                src = SequenceSource(root, seq, build=True, every=int(self.cfg["every"]),
                                     limit=int(self.cfg["frames"]))
            except LidarCompletionError as exc:
                raise type(exc)(f"validation (validation.root {root}, validation.sequence "
                                f"{seq!r}): {exc}") from exc
            frames = []
            for k, i in zip(src.keys, src.indices):
                try:
                    frames.append((i, *src.load(k)))
                except EmptyFrameError as exc:     # an empty scan: validate on the others
                    log.warning("validation: frame %s left out: %s", k, exc)
            if not frames:
                raise DatasetError(f"validation (validation.root {root}, validation.sequence {seq!r}): "
                                   f"none of its {len(src.keys)} frames can be used (see the warnings)")
            self._frames = frames
        return self._frames

    def evaluate(self, predict: Predictor) -> dict:
        """Mean CD and JSD-BEV of ``predict(scan, seed)`` over the frames (seed = validation.seed + frame)."""
        t0 = time.perf_counter()
        cds, jsds = [], []
        seed = int(self.cfg["seed"])
        for index, scan, gt in self.frames():
            pred = predict(scan, seed + int(index))
            cds.append(chamfer_distance(pred, gt))
            jsds.append(jsd_bev(pred, gt))
        return {"cd": float(np.nanmean(cds)), "jsd_bev": float(np.nanmean(jsds)),
                "seconds": time.perf_counter() - t0, "frames": len(cds)}

    def improved(self, metrics: dict) -> bool:
        value = metrics[self.select]
        return math.isfinite(value) and (self.best is None or value < float(self.best["value"]))

    def record_best(self, step: int, metrics: dict) -> None:
        self.best = {"step": int(step), "select": self.select, "value": float(metrics[self.select]),
                     "metrics": metrics}
        atomic_write_json(self.best_dir / BEST_FILE, self.best, indent=1)

    def logs(self, metrics: dict) -> dict:
        return {"val/cd": metrics["cd"], "val/jsd_bev": metrics["jsd_bev"],
                "val/best": float(self.best["value"]) if self.best else float("nan"),
                "val/seconds": metrics["seconds"]}


def discard_later_best(out, step: int) -> Path | None:
    """A run resumed from its checkpoint of ``step``: a best recorded after that step was made by
    the continuation the resume abandons (a run killed between checkpoints), so its weights are
    not of this run's history. ``best/`` is moved to ``earlier/<time>/best`` (returned), with a
    warning; the best is then chosen afresh by the resumed run."""
    from .logs import aside_folder
    folder = Path(out) / BEST_DIR
    path = folder / BEST_FILE
    if not folder.is_dir():
        return None
    try:
        best_step = int(json.loads(path.read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        best_step = None     # unreadable: which step it is of cannot be told, so it cannot be kept
    if best_step is not None and best_step <= int(step):
        return None
    aside = aside_folder(out) / BEST_DIR
    folder.rename(aside)
    log.warning("%s held the best weights of step %s, after the resumed checkpoint's step %d (a "
                "continuation this resume abandons): moved to %s; the best is chosen afresh",
                folder, "?" if best_step is None else best_step, int(step), aside)
    return aside


def completer_predictor(encoder, denoiser, refiner, cfg: dict, guidance: float, device) -> Predictor:
    """``predict(scan, seed)``: the trainer's networks as a Completer (local solver, the training
    point budgets), refined when ``validation.refine`` and a refiner is given."""
    from lidar_completion.completer import Completer
    v, d = cfg["validation"], cfg["data"]
    comp = Completer(encoder, denoiser, refiner, steps=int(v["steps"]), guidance=guidance,
                     refine=bool(v["refine"]) and refiner is not None, device=device, process="local",
                     n_fps=int(d["scan_points"]), tile=int(d["tile"]))
    return lambda scan, seed: comp.complete_detailed(scan, seed=seed).points


def refiner_predictor(refiner, cfg: dict, device) -> Predictor:
    """``predict(scan, seed)``: the refiner on ``x_init`` (no denoiser; the seed is not used)."""
    import torch

    from lidar_completion.completer import Completer
    d = cfg["data"]
    comp = Completer(torch.nn.Identity(), torch.nn.Identity(), refiner, device=device, steps=1, guidance=1.0,
                     process="local", n_fps=int(d["scan_points"]), tile=int(d["tile"]))

    def predict(scan, seed):
        _, _, x_init, _ = comp.prepare(scan)
        with torch.inference_mode():
            return comp.refine_points(torch.as_tensor(x_init, device=comp.device)).cpu().numpy()
    return predict
