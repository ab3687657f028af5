"""DDP on CPU (gloo, 2 processes launched by torchrun) equals one process on the union batch.

Batch norm: the comparison is made with its statistics frozen (``train.batchnorm: frozen``): torch's
SyncBatchNorm has no CPU kernel, and unsynchronised per-rank statistics would legitimately differ
from the union batch's. Everything else is exact by construction: every random draw is keyed by the
sample's position in the global order (not by rank), and the losses are computed from sums
all-reduced with a differentiable all-reduce, so LiDiff's batch-global mean/std regulariser and the
distillation means are those of the union batch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_training_utils import assert_same_update, write_npz
from training.checkpoint import CheckpointManager, load_state

ROOT = Path(__file__).resolve().parents[1]


def _common(npz: Path, kind: str) -> list:
    cfg = {"teacher": "tiny_teacher.yaml", "distill": "tiny_distill_dpo.yaml"}[kind]
    args = ["--config", cfg, "--max-steps", "1", "--set", "device=cpu", "--set", "backend=torch", "--set", "threads=1",
            "--set", "data.kind=npz", "--set", f"data.root={npz}", "--set", "data.scan_points=160",
            "--set", "data.target_points=1600", "--set", "data.num_workers=0",
            "--set", "train.batchnorm=frozen", "--set", "checkpoint.export=false",
            "--set", "log.progress=false", "--set", "log.tensorboard=false", "--set", "train.grad_clip=null"]
    if kind == "distill":
        args += ["--set", "distill.teacher=random", "--set", "distill.refiner=null",
                 "--set", "distill.aux_warmup_steps=0", "--set", "distill.aux_updates_per_step=1",
                 "--set", "distill.metric=lidar_completion.metrics.chamfer_distance",
                 "--set", "train.optimizer={name: sgd, lr: 0.5}",
                 "--set", "distill.aux_optimizer={name: sgd, lr: 0.05}"]
    else:
        args += ["--set", "train.optimizer={name: sgd, lr: 0.1}"]
    return args


def _run(cmd: list, cwd: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(cmd[:6])} ... failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"


def _train(kind: str, common: list, batch: int, out: Path, *extra: str, ranks: int = 1) -> None:
    """One run of ``python -m training`` in fresh processes (``ranks`` > 1: under torchrun), so that
    nothing an earlier test left in the pytest process (thread settings, RNG and allocator state)
    reaches the comparison."""
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] if ranks > 1 else []
    _run([sys.executable, *launch, "-m", "training", kind, *common, *extra, "--set", f"train.batch_size={batch}",
          "--out", str(out)], ROOT)


@pytest.mark.parametrize("kind", ["distill", "teacher"])
def test_ddp_two_ranks_equal_single_process_on_union_batch(tmp_path, kind):
    npz = write_npz(tmp_path / "two.npz", n=2, n_target=1600, n_scan=160)
    common = _common(npz, kind)
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    _train(kind, common, 1, ddp_out, ranks=2)
    _train(kind, common, 2, single_out)

    summary = json.loads((ddp_out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 1
    digests = summary["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1], "ranks hold different weights"

    a = load_state(CheckpointManager(ddp_out / "checkpoints").latest_path())["models"]
    b = load_state(CheckpointManager(single_out / "checkpoints").latest_path())["models"]
    # the initial weights (seeded): the same run stopped after 0 steps
    _train(kind, common, 2, tmp_path / "init", "--max-steps", "0")
    init = load_state(CheckpointManager(tmp_path / "init" / "checkpoints").latest_path())["models"]
    names = ("student", "aux_w", "aux_l") if kind == "distill" else ("teacher",)
    for name in names:
        # non-finite weights first: a NaN would also read as "did not change" below (NaN > 0 is
        # False), which is what the one captured failure message of this test said
        for run, state in (("ddp", a), ("single", b)):
            bad = [k for k, v in state[name].items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
            assert not bad, f"{run} run: {name} has non-finite values in {bad[:5]}"
        moved = max(float((b[name][k] - v).abs().max()) for k, v in init[name].items() if v.is_floating_point())
        assert moved > 0, f"{name} did not change"
        assert_same_update(init[name], a[name], b[name], what=f"{name}.")


def test_ddp_a_wrong_validation_root_stops_every_rank_at_start(tmp_path):
    """Rank 0 alone loads the validation frames; when it cannot, every rank stops before training
    (the other ranks used to wait at the first validation for a rank 0 that had died)."""
    npz = write_npz(tmp_path / "two.npz", n=2, n_target=1600, n_scan=160)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training", "teacher", *_common(npz, "teacher"), "--set", "train.batch_size=1",
           "--set", "validation.every_steps=1", "--set", f"validation.root={tmp_path / 'nowhere'}",
           "--out", str(tmp_path / "run")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "validation" in out and "nowhere" in out
    assert "rank 0 could not load the validation frames" in out      # what the other rank says
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
