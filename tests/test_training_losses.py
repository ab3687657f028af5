"""Loss functions of the trainers against the core's definitions and brute-force references, and a
short refiner run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lidar_completion.diffusion import diffusion_loss_terms
from lidar_completion.metrics import chamfer_distance
from test_training_utils import scenes_source, tiny_config
from training.losses import chamfer_loss, denoising_loss_terms, dpo_loss, logsigmoid_weights, vsd_loss
from training.refiner import RefinerTrainer
from training.sources import RefinerView


def test_denoising_loss_equals_the_core_lidiff_loss_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(500, 3, generator=g)
    pred = (0.3 + 0.8 * torch.randn(500, 3, generator=g)).requires_grad_(True)
    ours = denoising_loss_terms(pred, eps, 5.0)
    ref = diffusion_loss_terms(pred, eps, 5.0)
    for k in ("loss", "mse", "mean", "std"):
        assert float(ours[k].detach()) == pytest.approx(float(ref[k].detach()), rel=1e-5)
    g1, = torch.autograd.grad(ours["loss"], pred)
    g2, = torch.autograd.grad(ref["loss"], pred)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-8)


def test_chamfer_loss_matches_brute_force_and_its_gradient():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(300, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    b = torch.randn(200, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    d = torch.cdist(a, b)
    ref_sq = (d.min(1).values ** 2).mean() + (d.min(0).values ** 2).mean()
    ref_l1 = 0.5 * (d.min(1).values.mean() + d.min(0).values.mean())
    for kind, ref in (("chamfer_l2sq", ref_sq), ("chamfer_l1", ref_l1)):
        ours = chamfer_loss(a, b, kind)
        assert float(ours) == pytest.approx(float(ref), rel=1e-9)
        ga, gb = torch.autograd.grad(ours, (a, b))
        ra, rb = torch.autograd.grad(ref, (a, b), retain_graph=True)
        torch.testing.assert_close(ga, ra)
        torch.testing.assert_close(gb, rb)
    assert float(ref_l1) == pytest.approx(chamfer_distance(a.detach().numpy(), b.detach().numpy()), rel=1e-9)


def test_distillation_losses_pass_the_score_difference_to_the_samples():
    g = torch.Generator().manual_seed(2)
    G_w = torch.randn(40, 3, generator=g, requires_grad=True)
    G_l = torch.randn(40, 3, generator=g, requires_grad=True)
    d_w, d_l = torch.randn(40, 3, generator=g), torch.randn(40, 3, generator=g)
    gw, gl = torch.autograd.grad(dpo_loss(d_w, G_w, d_l, G_l), (G_w, G_l))
    torch.testing.assert_close(gw, d_w / G_w.numel())
    torch.testing.assert_close(gl, -d_l / G_l.numel())
    gv, = torch.autograd.grad(vsd_loss(d_w, G_w), G_w)
    torch.testing.assert_close(gv, d_w / G_w.numel())
    # per-scan weights of the logsigmoid option: 1 at zero margin, -> 0 when the winner is already
    # much closer to the teacher than the loser, -> 2 in the opposite case
    w = logsigmoid_weights(torch.tensor([0.5, 0.1, 3.0]), torch.tensor([0.5, 3.0, 0.1]), beta=10.0)
    assert w[0] == pytest.approx(1.0) and w[1] < 1e-6 and w[2] > 2 - 1e-6


def test_refiner_view_jitters_within_the_clip():
    src = RefinerView(scenes_source(1, n_target=800, n_scan=80), input_points=500, target_points=900,
                      sigma=0.2, clip=0.3)
    s = src.sample(0, np.random.default_rng(0))
    assert s["input"].shape == (500, 3) and s["target"].shape == (900, 3)
    from scipy.spatial import cKDTree
    d, _ = cKDTree(s["target"]).query(s["input"])
    assert d.max() <= 0.3 * np.sqrt(3) + 1e-6 and d.mean() > 0.05


def test_refiner_training_lowers_its_chamfer_loss(tmp_path):
    cfg = tiny_config("refiner", "train.max_steps=30", "train.batch_size=1", "log.every_steps=1",
                      "train.optimizer={name: adam, lr: 0.003}", "checkpoint.export=false",
                      "refiner.input_points=300", "refiner.target_points=600")
    src = RefinerView(scenes_source(1, n_target=600, n_scan=60), 300, 600, 0.2, 0.3)
    tr = RefinerTrainer(cfg, tmp_path, source=src)
    tr.run()
    loss = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(loss) == 30 and np.mean(loss[-5:]) < 0.9 * np.mean(loss[:5]), loss
