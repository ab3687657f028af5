"""Overfitting one synthetic scan with the tiny configuration, on CPU, with fixed seeds.

1. The teacher's denoising loss falls clearly within 100 steps.
2. A few ``dpo`` steps (the tiny configuration's settings) lower the Chamfer distance of the
   student's one-step sample to the target below that of its initial one-step sample (the teacher's),
   for fixed noises. Batch norm runs with frozen statistics during distillation, so the improvement
   can only come from the gradient of the distillation loss - the published code's only effect,
   moving batch-norm statistics, is excluded.
"""
from __future__ import annotations

import json

import numpy as np
import torch

from lidar_completion.checkpoints import save_checkpoint
from lidar_completion.data import TrainingDataset, build_gt, generate_dataset
from lidar_completion.metrics import chamfer_distance
from lidar_completion.preprocess import farthest_point_sample
from test_training_utils import tiny_config
from training.data import ArraySource
from training.distill import DistillTrainer, one_step_sample
from training.teacher import TeacherTrainer


def _one_scan(root, half_extent: float = 10.0, n_scan: int = 100):
    """Frame 2 of a 5-scan synthetic sequence (its target accumulates all 5 scans), cropped."""
    generate_dataset(root, sequences=["00"], scans=5, seed=0)
    build_gt(root, ["00"], verify="size")
    ds = TrainingDataset(root, ["00"], n_fps=10 ** 6, tile=1, target_points=None, augment=False)
    s = ds.sample(2, np.random.default_rng(0))
    crop = lambda p: p[(np.abs(p[:, 0]) < half_extent) & (np.abs(p[:, 1]) < half_extent)]
    raw, target = crop(s["raw_scan"]), crop(s["target"])
    return raw[farthest_point_sample(raw, n_scan)], target


def _student_cd(trainer: DistillTrainer, scan: np.ndarray, target: np.ndarray, draws: int = 4) -> float:
    x_init = torch.from_numpy(np.tile(scan, (10, 1)))
    zb = torch.zeros(len(x_init), dtype=torch.long)
    trainer.student.eval()
    with torch.no_grad():
        cond = trainer.encoder(torch.from_numpy(scan), torch.zeros(len(scan), dtype=torch.long))
        cds = []
        for k in range(draws):
            z = torch.randn(x_init.shape, generator=torch.Generator().manual_seed(100 + k))
            G = one_step_sample(trainer.student, x_init, z, zb, cond, 999, trainer.sigma_T, trainer.alpha_T,
                                "local", 1)
            cds.append(chamfer_distance(G.numpy(), target))
    return float(np.mean(cds))


def test_overfit_one_scan_teacher_then_dpo(tmp_path):
    torch.manual_seed(0)
    scan, target = _one_scan(tmp_path / "synthetic")
    source = ArraySource([scan], [target], target_points=1000)

    cfg = tiny_config("teacher", "train.max_steps=100", "train.batch_size=1", "log.every_steps=1",
                      "train.optimizer={name: adam, lr: 0.003}", "checkpoint.export=false")
    teacher = TeacherTrainer(cfg, tmp_path / "teacher", source=source)
    teacher.run()
    logs = [json.loads(line) for line in (tmp_path / "teacher" / "metrics.jsonl").read_text().splitlines()]
    loss = np.array([r["loss"] for r in logs])
    mse = np.array([r["loss/mse"] for r in logs])
    assert len(loss) == 100
    assert loss[-20:].mean() < 0.6 * loss[:20].mean(), (loss[:20].mean(), loss[-20:].mean())
    assert mse[-20:].mean() < 0.95, mse[-20:].mean()

    ckpt = tmp_path / "teacher.pt"
    save_checkpoint(ckpt, {"encoder": teacher.net.encoder, "denoiser": teacher.net.denoiser},
                    teacher.model_config, kind="teacher")
    dcfg = tiny_config("distill", f"distill.teacher={ckpt}", "train.max_steps=6", "train.batch_size=1",
                       "distill.aux_warmup_steps=2", "train.batchnorm=frozen", "checkpoint.export=false",
                       "train.optimizer={name: adam, lr: 1.0e-4, betas: [0.0, 0.999]}",
                       "distill.aux_optimizer={name: adam, lr: 1.0e-3, betas: [0.0, 0.999]}",
                       mode="dpo")
    assert dcfg["distill"]["mode"] == "dpo" and dcfg["distill"]["vsd_weight"] == 1.0
    student = DistillTrainer(dcfg, tmp_path / "distill", source=source)
    before = _student_cd(student, scan, target)
    student.run()
    after = _student_cd(student, scan, target)
    print(f"student one-step CD: {before:.4f} -> {after:.4f}")
    assert after < 0.95 * before, (before, after)
    dlogs = [json.loads(line) for line in (tmp_path / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["metric/winner"] <= r["metric/loser"] for r in dlogs)
