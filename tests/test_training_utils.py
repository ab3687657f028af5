"""Shared helpers of the training tests (no tests here): tiny scenes, configs and trainers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from training.config import load_config
from training.data import ArraySource

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"


def plane_scene(seed: int, n_target: int = 2400, n_scan: int = 240, extent: float = 8.0):
    """A ground plane and two walls (a few metres), and a sparse 'scan' of part of them."""
    rng = np.random.default_rng(seed)
    k = n_target // 4
    ground = np.c_[rng.uniform(-extent, extent, (2 * k, 2)), rng.normal(-1.7, 0.02, 2 * k)]
    wall1 = np.c_[rng.uniform(-extent, extent, k), np.full(k, 0.6 * extent) + rng.normal(0, 0.02, k),
                  rng.uniform(-1.7, 1.5, k)]
    wall2 = np.c_[np.full(k, -0.7 * extent) + rng.normal(0, 0.02, k), rng.uniform(-extent, extent, k),
                  rng.uniform(-1.7, 1.5, k)]
    target = np.concatenate([ground, wall1, wall2]).astype(np.float32)
    near = target[np.linalg.norm(target[:, :2], axis=1) < 0.7 * extent]
    scan = near[rng.choice(len(near), n_scan, replace=False)]
    return scan.astype(np.float32), target


def scenes_source(n: int = 2, n_target: int = 2400, n_scan: int = 240, seed0: int = 0) -> ArraySource:
    scans, targets = zip(*(plane_scene(seed0 + i, n_target, n_scan) for i in range(n)))
    return ArraySource(list(scans), list(targets), target_points=n_target)


def write_npz(path, n: int = 2, n_target: int = 2400, n_scan: int = 240, seed0: int = 0) -> Path:
    arrays = {}
    for i in range(n):
        s, t = plane_scene(seed0 + i, n_target, n_scan)
        arrays[f"scan_{i}"] = s
        arrays[f"target_{i}"] = t
    np.savez(path, **arrays)
    return Path(path)


def assert_same_update(init: dict, a: dict, b: dict, what: str = "", rtol: float = 1e-3) -> None:
    """State dicts ``a`` and ``b`` reached from ``init`` by (nominally) the same update: per tensor
    the updates agree within ``rtol`` of that tensor's largest update, plus 1e-5 of the module's
    largest update (tensors whose gradient nearly cancels), plus float32 rounding of the weights."""
    floats = [k for k, w in init.items() if w.dtype.is_floating_point]
    scale = max(float((b[k] - init[k]).abs().max()) for k in floats)
    for k, w0 in init.items():
        if k not in floats:
            assert torch.equal(a[k], b[k]), f"{what}{k}"
            continue
        da, db = a[k] - w0, b[k] - w0
        tol = rtol * float(db.abs().max()) + 1e-5 * scale + 4 * torch.finfo(torch.float32).eps * w0.abs()
        err = (da - db).abs()
        assert bool((err <= tol + 1e-30).all()), f"{what}{k}: updates differ by {float(err.max()):.3g}"


def assert_sgd_update(before: torch.nn.Module, after: torch.nn.Module, grads, lr: float) -> int:
    """Every parameter of ``after`` is ``before``'s minus ``lr`` times its gradient in ``grads``
    (one plain SGD step); returns how many weight tensors (kernels, linear weights) moved."""
    changed_weights = 0
    for (name, p0), p1, g in zip(before.named_parameters(), after.parameters(), grads):
        delta = p1.detach() - p0.detach()
        expected = torch.zeros_like(delta) if g is None else -lr * g
        scale = float(expected.abs().max())
        # float32: p1 = fl(p0 - lr g) carries a rounding error of up to half an ulp of p0
        tol = 2e-3 * expected.abs() + 2e-3 * scale + 4 * torch.finfo(torch.float32).eps * p0.detach().abs()
        err = (delta - expected).abs()
        assert bool((err <= tol).all()), f"{name}: update differs from -lr*grad by {float(err.max()):.3g} " \
                                         f"(largest expected update {scale:.3g})"
        if ("kernel" in name or name.endswith("weight")) and float(delta.abs().max()) > 0:
            changed_weights += 1
    return changed_weights


def recorded_step(tr, before) -> dict:
    """One step of trainer ``tr`` on the first batch of epoch 0 with its draws recorded
    (``tr.record``); ``before``: copies of its networks taken before the step."""
    from training.data import make_loader
    tr.record = True
    tr.sampler.set_epoch(0, 0)
    batch = next(iter(make_loader(tr.dataset, tr.sampler, 0)))
    logs = tr.train_step(batch)
    return {"tr": tr, "before": before, "batch": batch, "rec": tr.last_record, "logs": logs}


def lidiff_teacher_file(path, seed: int):
    """A tiny teacher with random weights (``seed``) saved in LiDiff's Lightning layout; its path."""
    from lidar_completion.models import ConditionEncoder, Denoiser, ModelConfig
    torch.manual_seed(seed)
    enc, den = ConditionEncoder(ModelConfig.tiny(), "torch"), Denoiser(ModelConfig.tiny(), "torch")
    sd = {f"DM_encoder.{k}": v for k, v in enc.state_dict().items()}
    sd.update({f"DiffModel.{k}": v for k, v in den.state_dict().items()})
    torch.save({"state_dict": sd}, path)
    return path


def tiny_config(kind: str, *overrides, mode: str = "dpo") -> dict:
    """The shipped tiny config of ``kind`` with test settings: CPU, 1 thread, no workers, no
    TensorBoard / progress bar, SGD (so that an update is -lr * grad)."""
    name = {"teacher": "tiny_teacher", "refiner": "tiny_refiner", "distill": f"tiny_distill_{mode}",
            "teacher-dpo": "tiny_teacher_dpo"}[kind]
    base = ["device=cpu", "backend=torch", "threads=1", "data.num_workers=0", "log.tensorboard=false", "log.progress=false",
            "log.render_every_steps=0", "checkpoint.every_steps=0", "train.max_steps=null", "train.epochs=1"]
    if kind == "distill":
        base += ["distill.teacher=random", "distill.refiner=null", "distill.metric=lidar_completion.metrics.chamfer_distance"]
    if kind == "teacher-dpo":
        base += ["teacher_dpo.reference=random"]
    return load_config(CONFIGS / f"{name}.yaml", kind=kind, overrides=base + list(overrides))
