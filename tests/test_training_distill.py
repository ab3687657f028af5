"""Distillation steps against explicit reference formulas (docs/method.md, "Distillation"), on the tiny networks.

One ``dpo`` and one ``vsd`` optimisation step are run with plain SGD (no momentum, no clipping), so
each parameter update must equal ``-lr * grad`` of the stated loss. The reference recomputes every
quantity from the recorded random draws with fresh copies of the networks taken before the step and
``torch.autograd`` on the written-out formula:

    G   = x_T - sigma_999 * eps_student(x_T, 999),  x_T = x_init + z  (and x_init + 1.1 z)
    aux_side: LiDiff loss of aux_side(sg(G_side) + sigma_t' eps') against eps'
    dpo: L = mean(sg(eps_T(x_w) - eps_aux_w(x_w)) * G_w) - mean(sg(eps_T(x_l) - eps_aux_l(x_l)) * G_l)
    vsd: L = mean(sg(eps_T(x) - eps_aux(x)) * G)
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from lidar_completion.diffusion import NoiseSchedule, diffusion_loss
from lidar_completion.metrics import chamfer_distance
from lidar_completion.models import Condition
from test_training_utils import assert_sgd_update, recorded_step, scenes_source, tiny_config
from training.distill import DistillTrainer

LR_STUDENT = 0.5
LR_AUX = 0.05
SCHED = NoiseSchedule()
SIGMA = torch.sqrt(1.0 - SCHED.alphas_cumprod).float()


def _trainer(tmp_path, mode: str, *extra):
    """The test trainer of ``mode`` (SGD, two scans a batch) and copies of its networks."""
    torch.manual_seed(0)
    cfg = tiny_config("distill", "train.batch_size=2", f"train.optimizer={{name: sgd, lr: {LR_STUDENT}}}",
                      f"distill.aux_optimizer={{name: sgd, lr: {LR_AUX}}}", "train.grad_clip=null",
                      "distill.t_min=100", "distill.t_max=900", "train.batchnorm=train",
                      "distill.aux_updates_per_step=1", "distill.aux_warmup_steps=0",
                      *(["distill.vsd_weight=0"] if mode == "dpo" else []), *extra, mode=mode)
    tr = DistillTrainer(cfg, tmp_path, source=scenes_source(2))
    before = {"student": copy.deepcopy(tr.student)}
    before.update({n: copy.deepcopy(a) for n, a in tr.aux.items()})
    return tr, before


def _run_one_step(tmp_path, mode: str, *extra):
    return recorded_step(*_trainer(tmp_path, mode, *extra))


@pytest.fixture(scope="module")
def dpo_step(tmp_path_factory):
    return _run_one_step(tmp_path_factory.mktemp("dpo"), "dpo")


@pytest.fixture(scope="module")
def vsd_step(tmp_path_factory):
    return _run_one_step(tmp_path_factory.mktemp("vsd"), "vsd")


def _reference_samples(step, sides: int):
    """Explicit one-step samples from a copy of the student taken before the step (graph kept)."""
    tr, batch, rec = step["tr"], step["batch"], step["rec"]
    student = copy.deepcopy(step["before"]["student"]).train()
    scan, scan_b = batch["scan"], batch["scan_batch"]
    x_init, xb = batch["x_init"], batch["x_init_batch"]
    B = batch["batch_size"]
    with torch.no_grad():
        cond = tr.encoder(scan, scan_b)
    z = rec["z"]
    if sides == 2:
        X0, Z = torch.cat([x_init, x_init]), torch.cat([z, 1.1 * z])
        Xb, condk = torch.cat([xb, xb + B]), Condition.concat([cond, cond])
    else:
        X0, Z, Xb, condk = x_init, z, xb, cond
    x_T = X0 + Z
    eps = student(x_T, Xb, torch.full((sides * B,), 999, dtype=torch.long), condk)
    G = x_T - SIGMA[999] * eps
    return student, G, cond


def _winners(step, G):
    batch = step["batch"]
    N = batch["x_init"].shape[0]
    xb, tb = batch["x_init_batch"].numpy(), batch["target_batch"].numpy()
    G1, G2 = G[:N], G[N:]
    g1, g2, tgt = G1.detach().numpy(), G2.detach().numpy(), batch["target"].numpy()
    cd = np.array([[chamfer_distance(g[xb == b], tgt[tb == b]) for b in range(batch["batch_size"])]
                   for g in (g1, g2)])
    first = cd[0] <= cd[1]
    rows = torch.as_tensor(first)[batch["x_init_batch"]].view(-1, 1)
    return torch.where(rows, G1, G2), torch.where(rows, G2, G1), first, cd


def _check_dpo_student_update(step, alpha: float = 0.0):
    tr, batch, rec = step["tr"], step["batch"], step["rec"]
    student, G, cond = _reference_samples(step, sides=2)
    torch.testing.assert_close(G.detach(), rec["G"], rtol=1e-5, atol=1e-5)
    G_w, G_l, first, cd = _winners(step, G)
    assert (first == rec["first"]).all()
    xb = batch["x_init_batch"]
    t, eps = rec["t"], rec["eps"]
    sig = SIGMA[t][xb].view(-1, 1)
    x_w, x_l = G_w.detach() + sig * eps, G_l.detach() + sig * eps
    aux_w, aux_l = tr.aux["aux_w"].eval(), tr.aux["aux_l"].eval()   # after their update of this step
    with torch.no_grad():
        d_w = tr.teacher(x_w, xb, t, cond) - aux_w(x_w, xb, t, cond)
        d_l = tr.teacher(x_l, xb, t, cond) - aux_l(x_l, xb, t, cond)
    assert float(d_w.abs().max()) > 0 and float(d_l.abs().max()) > 0
    loss_w, loss_l = (d_w.detach() * G_w).mean(), (d_l.detach() * G_l).mean()
    loss = loss_w - loss_l + alpha * 0.5 * (loss_w + loss_l)
    grads = torch.autograd.grad(loss, list(student.parameters()), allow_unused=True)
    assert abs(float(loss.detach()) - step["logs"]["loss/student"]) < 1e-4 * max(1.0, abs(float(loss.detach())))
    changed = assert_sgd_update(step["before"]["student"], tr.student, grads, LR_STUDENT)
    # trainable weights moved (convolution kernels and linear layers), not only batch-norm buffers
    assert changed > 20, changed


def test_dpo_step_updates_student_by_the_stop_gradient_loss(dpo_step):
    _check_dpo_student_update(dpo_step)


def test_dpo_with_vsd_weight_adds_the_symmetric_distillation_term(tmp_path):
    _check_dpo_student_update(_run_one_step(tmp_path, "dpo", "distill.vsd_weight=1.0"), alpha=1.0)


def test_published_distillation_term_has_zero_gradient(dpo_step):
    """The released code's mean((eps_T - eps_aux) * (x_t - G)): no gradient reaches the student."""
    tr, batch, rec = dpo_step["tr"], dpo_step["batch"], dpo_step["rec"]
    student, G, cond = _reference_samples(dpo_step, sides=2)
    G_w, G_l, _, _ = _winners(dpo_step, G)
    xb, t, eps = batch["x_init_batch"], rec["t"], rec["eps"]
    sig = SIGMA[t][xb].view(-1, 1)
    x_w, x_l = G_w + sig * eps, G_l + sig * eps            # built from G *with* its graph
    with torch.no_grad():
        d_w = tr.teacher(x_w, xb, t, cond) - tr.aux["aux_w"].eval()(x_w, xb, t, cond)
        d_l = tr.teacher(x_l, xb, t, cond) - tr.aux["aux_l"].eval()(x_l, xb, t, cond)
    published = (d_w * (x_w - G_w)).mean() - (d_l * (x_l - G_l)).mean()
    grads = torch.autograd.grad(published, list(student.parameters()), allow_unused=True)
    assert all(g is None or float(g.abs().max()) == 0.0 for g in grads)


def test_dpo_aux_nets_learn_from_their_own_side(dpo_step):
    """aux_w takes a denoising step on noised winners, aux_l on noised losers (not the other way)."""
    tr, batch, rec = dpo_step["tr"], dpo_step["batch"], dpo_step["rec"]
    _, G, cond = _reference_samples(dpo_step, sides=2)
    G_w, G_l, first, cd = _winners(dpo_step, G)
    winner_cd = np.where(first, cd[0], cd[1])
    loser_cd = np.where(first, cd[1], cd[0])
    assert (winner_cd <= loser_cd).all()
    assert dpo_step["logs"]["metric/winner"] == pytest.approx(winner_cd.mean(), rel=1e-6)
    assert dpo_step["logs"]["metric/loser"] == pytest.approx(loser_cd.mean(), rel=1e-6)
    xb = batch["x_init_batch"]
    samples = {"aux_w": G_w.detach(), "aux_l": G_l.detach()}
    for name, other in (("aux_w", "aux_l"), ("aux_l", "aux_w")):
        t_a, eps_a = rec["aux"][0][name]

        def update(points):
            net = copy.deepcopy(dpo_step["before"][name]).train()
            x = points + SIGMA[t_a][xb].view(-1, 1) * eps_a
            loss = diffusion_loss(net(x, xb, t_a, cond), eps_a)   # the core's LiDiff loss
            return torch.autograd.grad(loss, list(net.parameters()))

        grads = update(samples[name])
        assert_sgd_update(dpo_step["before"][name], tr.aux[name], grads, LR_AUX)
        wrong = update(samples[other])
        actual = torch.cat([(p1 - p0).detach().flatten() for p0, p1 in
                            zip(dpo_step["before"][name].parameters(), tr.aux[name].parameters())])
        wrong_delta = torch.cat([(-LR_AUX * g).flatten() for g in wrong])
        # the other side's samples would give a clearly different update
        assert float((actual - wrong_delta).abs().max()) > 0.05 * float(actual.abs().max())


def test_dpo_aux_nets_draw_apart_unless_shared(tmp_path, dpo_step):
    """By default each auxiliary net draws its own (t', eps'); with aux_shared_draws both sides are
    noised by the same draw, and each net still takes its step on its own side's samples."""
    _, eps_w = dpo_step["rec"]["aux"][0]["aux_w"]
    _, eps_l = dpo_step["rec"]["aux"][0]["aux_l"]
    assert float((eps_w - eps_l).abs().mean()) > 0.5
    step = _run_one_step(tmp_path, "dpo", "distill.aux_shared_draws=true")
    tr, batch, rec = step["tr"], step["batch"], step["rec"]
    t_w, eps_w = rec["aux"][0]["aux_w"]
    t_l, eps_l = rec["aux"][0]["aux_l"]
    assert torch.equal(t_w, t_l) and torch.equal(eps_w, eps_l)
    _, G, cond = _reference_samples(step, sides=2)
    G_w, G_l, _, _ = _winners(step, G)
    xb = batch["x_init_batch"]
    x_sig = SIGMA[t_w][xb].view(-1, 1) * eps_w
    deltas = {}
    for name, points in (("aux_w", G_w.detach()), ("aux_l", G_l.detach())):
        net = copy.deepcopy(step["before"][name]).train()
        grads = torch.autograd.grad(diffusion_loss(net(points + x_sig, xb, t_w, cond), eps_w),
                                    list(net.parameters()))
        assert_sgd_update(step["before"][name], tr.aux[name], grads, LR_AUX)
        deltas[name] = torch.cat([(-LR_AUX * g).flatten() for g in grads])
    # same start, same draw: aux_l's step is the one aux_w would take on the losers, and it is
    # clearly another step (the nets part because their samples differ)
    gap = float((deltas["aux_w"] - deltas["aux_l"]).abs().max())
    assert gap > 0.05 * float(deltas["aux_w"].abs().max())
    from lidar_completion.errors import ConfigError

    with pytest.raises(ConfigError, match="aux_shared_draws"):
        tiny_config("distill", "distill.aux_shared_draws=sometimes", mode="dpo")


def test_vsd_step_updates_student_and_aux(vsd_step):
    tr, batch, rec = vsd_step["tr"], vsd_step["batch"], vsd_step["rec"]
    student, G, cond = _reference_samples(vsd_step, sides=1)
    torch.testing.assert_close(G.detach(), rec["G"], rtol=1e-5, atol=1e-5)
    xb = batch["x_init_batch"]
    # auxiliary net: LiDiff loss on the noised student samples
    t_a, eps_a = rec["aux"][0]["aux"]
    net = copy.deepcopy(vsd_step["before"]["aux"]).train()
    x_a = G.detach() + SIGMA[t_a][xb].view(-1, 1) * eps_a
    aux_grads = torch.autograd.grad(diffusion_loss(net(x_a, xb, t_a, cond), eps_a), list(net.parameters()))
    assert_sgd_update(vsd_step["before"]["aux"], tr.aux["aux"], aux_grads, LR_AUX)
    # student: mean(sg(eps_T - eps_aux) * G)
    t, eps = rec["t"], rec["eps"]
    x = G.detach() + SIGMA[t][xb].view(-1, 1) * eps
    with torch.no_grad():
        d = tr.teacher(x, xb, t, cond) - tr.aux["aux"].eval()(x, xb, t, cond)
    loss = (d.detach() * G).mean()
    grads = torch.autograd.grad(loss, list(student.parameters()), allow_unused=True)
    changed = assert_sgd_update(vsd_step["before"]["student"], tr.student, grads, LR_STUDENT)
    assert changed > 20, changed
    assert "metric/winner" not in vsd_step["logs"]


def test_dpo_logsigmoid_weighting_runs_and_weights_each_scan(tmp_path):
    step = _run_one_step(tmp_path, "dpo", "distill.weighting=logsigmoid", "distill.dpo_beta=50.0")
    w = step["logs"]["dpo/weight"]
    assert 0.0 < w < 2.0
    moved = max(float((p1 - p0).detach().abs().max()) for p0, p1 in
                zip(step["before"]["student"].parameters(), step["tr"].student.parameters()))
    assert moved > 0


def test_dpo_pairs_from_independent_noise(tmp_path):
    """pair_noise: independent - the second sample of each pair starts from x_init + 1.1 z2 with a
    second draw z2 (not 1.1 z): the recorded samples are the student's on exactly those starts."""
    step = _run_one_step(tmp_path, "dpo", "distill.pair_noise=independent")
    tr, batch, rec = step["tr"], step["batch"], step["rec"]
    z, z2 = rec["z"], rec["z2"]
    assert z2.shape == z.shape and float((z2 - z).abs().mean()) > 0.5      # unrelated draws
    student = copy.deepcopy(step["before"]["student"]).train()
    x_init, xb, B = batch["x_init"], batch["x_init_batch"], batch["batch_size"]
    with torch.no_grad():
        cond = tr.encoder(batch["scan"], batch["scan_batch"])
        x_T = torch.cat([x_init + z, x_init + 1.1 * z2])
        eps = student(x_T, torch.cat([xb, xb + B]), torch.full((2 * B,), 999, dtype=torch.long),
                      Condition.concat([cond, cond]))
    torch.testing.assert_close(x_T - SIGMA[999] * eps, rec["G"], rtol=1e-5, atol=1e-5)


def test_pair_noise_setting_is_checked():
    from lidar_completion.errors import ConfigError

    with pytest.raises(ConfigError, match="pair_noise"):
        tiny_config("distill", "distill.pair_noise=sometimes", mode="dpo")


def test_guided_teacher_score_shares_kernel_maps_and_matches_the_formula(tmp_path, monkeypatch):
    """teacher_guidance w != 1: the student descends mean(sg(eps_u + w (eps_c - eps_u) - eps_aux) * G),
    eps_u conditioned on the all-zero cloud, and the teacher's two passes and the auxiliary pass on one
    noisy sample voxelise it once (sparse.shared_maps) for the student update: one coordinate set
    per side instead of three."""
    from lidar_completion.sparse import torch_backend
    built = []

    class Counting(torch_backend.CoordinateManager):
        def __init__(self, *a, **k):
            built.append(1)
            super().__init__(*a, **k)

    # the shipped teacher: at random initialisation the condition does not change the prediction yet
    shipped = Path(__file__).resolve().parents[1] / "lidar_completion_pkg" / "lidar_completion" / "weights" / "teacher.pt"
    step = _run_one_step(tmp_path, "vsd", "distill.teacher_guidance=3.0", f"distill.teacher={shipped}")
    tr, batch, rec = step["tr"], step["batch"], step["rec"]
    student, G, cond = _reference_samples(step, sides=1)
    xb, B = batch["x_init_batch"], batch["batch_size"]
    t, eps = rec["t"], rec["eps"]
    x = G.detach() + SIGMA[t][xb].view(-1, 1) * eps
    n_scan = int(batch["scan_counts"].max())
    with torch.no_grad():
        uncond = tr.encoder(torch.zeros(n_scan * B, 3), torch.arange(B).repeat_interleave(n_scan))
        eps_c, eps_u = tr.teacher(x, xb, t, cond), tr.teacher(x, xb, t, uncond)
        d = eps_u + 3.0 * (eps_c - eps_u) - tr.aux["aux"].eval()(x, xb, t, cond)
    assert float((eps_c - eps_u).abs().max()) > 1e-4   # the guidance term is not empty
    loss = (d * G).mean()
    grads = torch.autograd.grad(loss, list(student.parameters()), allow_unused=True)
    assert_sgd_update(step["before"]["student"], tr.student, grads, LR_STUDENT)

    # the student update of a further step: the teacher (conditional + unconditional) and the
    # auxiliary net build one coordinate manager for the sample, where separate calls build three
    from training.distill import _Step
    _, G, _ = _reference_samples(step, sides=1)   # a fresh graph (the one above was used)
    monkeypatch.setattr(torch_backend, "CoordinateManager", Counting)
    st = _Step(keys=tr.sample_keys(batch), B=B, counts=batch["x_init_counts"], xb=xb,
               n_scan=n_scan, sides=["aux"], cond=cond, samples={"aux": G.detach()}, G_all=G)
    tr.update_student(st)
    assert len(built) == 1, len(built)


@pytest.mark.parametrize("mode", ["vsd", "dpo"])
def test_non_finite_student_samples_stop_the_run_as_divergence(tmp_path, monkeypatch, mode):
    """A diverged student generates NaN points: the run stops with the trainers' divergence error,
    which names the samples, before the ranking metric or a network refuses them, and no
    optimiser step is taken."""
    from training.engine import TrainingDivergedError
    cfg = tiny_config("distill", "train.batch_size=1", "distill.aux_warmup_steps=0", "checkpoint.every_steps=1",
                      "checkpoint.export=false", "train.max_steps=2", mode=mode)
    tr = DistillTrainer(cfg, tmp_path, source=scenes_source(2))
    real = tr.generate

    def poisoned(*args, **kwargs):
        G = real(*args, **kwargs)
        return G * float("nan") if tr.step == 1 else G

    monkeypatch.setattr(tr, "generate", poisoned)
    with pytest.raises(TrainingDivergedError, match=r"the student's samples 'G' became nan in step 2 "):
        tr.run()
    assert tr.step == 1
    for p in tr.student.parameters():
        assert torch.isfinite(p).all()
