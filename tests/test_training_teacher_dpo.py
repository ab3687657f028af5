"""The teacher's Diffusion-DPO stage (training/teacher_dpo.py) against its written-out formula, on the
tiny networks: one SGD step must equal -lr x the autograd gradient of

    L = mean_b -log sigmoid(-beta ((e_model^w - e_ref^w) - (e_model^l - e_ref^l))),
    e^s = mean |eps - eps(x^s + sigma_t eps, t)|^2 over scan b's points and coordinates,

where x^w / x^l are the reference's one-step samples ranked by Chamfer distance to the ground
truth. At the first step model = reference, so L = log 2 and the gradient is
beta / 2 (grad e^w - grad e^l), which must move the weights (the distillation code the method
builds on shipped a loss whose gradient was zero; this stage must not).
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lidar_completion.diffusion import NoiseSchedule
from lidar_completion.metrics import chamfer_distance
from test_training_utils import (assert_sgd_update, lidiff_teacher_file, recorded_step, scenes_source,
                                 tiny_config)
from training.engine import set_bn_mode
from training.teacher_dpo import TeacherDPOTrainer

LR = 1e-3
BETA = 1000.0
SIGMA = torch.sqrt(1.0 - NoiseSchedule().alphas_cumprod).float()


def _one_step(tmp_path, *extra):
    torch.manual_seed(0)
    cfg = tiny_config("teacher-dpo", "train.batch_size=2", f"train.optimizer={{name: sgd, lr: {LR}}}",
                      f"teacher_dpo.beta={BETA}", "teacher_dpo.t_min=100", "teacher_dpo.t_max=900", *extra)
    tr = TeacherDPOTrainer(cfg, tmp_path, source=scenes_source(2))
    return recorded_step(tr, copy.deepcopy(tr.net))


@pytest.fixture(scope="module")
def step(tmp_path_factory):
    return _one_step(tmp_path_factory.mktemp("tdpo"))


def _frozen_copy(net):
    net = copy.deepcopy(net).train()
    set_bn_mode(net, "frozen")
    return net


def test_pairs_are_the_reference_samples_ranked_against_the_ground_truth(step):
    tr, batch, rec = step["tr"], step["batch"], step["rec"]
    xb, tb = batch["x_init_batch"], batch["target_batch"]
    s1, s2 = rec["samples"][0]
    # the reference's one-step samples: x_T - sigma_999 eps_ref(x_T, 999)
    keys = tr.sample_keys(batch)
    z1 = tr.draw_noise(keys, batch["x_init_counts"], "teacher_dpo/z")
    z2 = tr.draw_noise(keys, batch["x_init_counts"], "teacher_dpo/z2")
    assert float((z1 - z2).abs().mean()) > 0.5                    # independent draws
    with torch.no_grad():
        cond = tr.ref.encoder(batch["scan"], batch["scan_batch"])
        for s, z in ((s1, z1), (s2, z2)):
            x_T = batch["x_init"] + z
            eps = tr.ref.denoiser(x_T, xb, torch.full((2,), 999, dtype=torch.long), cond)
            torch.testing.assert_close(s, x_T - SIGMA[999] * eps, rtol=1e-5, atol=1e-5)
    tgt = batch["target"].numpy()
    for b in range(2):
        cd = [chamfer_distance(s[xb == b].numpy(), tgt[tb.numpy() == b]) for s in (s1, s2)]
        w, l_ = (s1, s2) if cd[0] <= cd[1] else (s2, s1)
        torch.testing.assert_close(rec["x_w"][xb == b], w[xb == b])
        torch.testing.assert_close(rec["x_l"][xb == b], l_[xb == b])
        assert min(cd) == pytest.approx(rec["m1"][b] if rec["first"][b] else rec["m2"][b])


def test_step_is_minus_lr_times_the_gradient_of_the_dpo_loss(step):
    tr, batch, rec = step["tr"], step["batch"], step["rec"]
    model = _frozen_copy(step["before"])
    ref = tr.ref
    scan, sb, xb = batch["scan"], batch["scan_batch"], batch["x_init_batch"]
    t, eps = rec["t"], rec["eps"]
    sig = SIGMA[t][xb].view(-1, 1)
    terms = []
    for b in range(2):
        m = xb == b
        e = {}
        for side in ("x_w", "x_l"):
            x = rec[side] + sig * eps
            pred = model(scan, sb, x, xb, t)
            with torch.no_grad():
                pref = ref(scan, sb, x, xb, t)
            e[side] = (((pred - eps) ** 2)[m].mean(), ((pref - eps) ** 2)[m].mean())
        inside = (e["x_w"][0] - e["x_w"][1]) - (e["x_l"][0] - e["x_l"][1])
        terms.append(-F.logsigmoid(-BETA * inside))
    loss = torch.stack(terms).mean()
    assert float(loss.detach()) == pytest.approx(math.log(2.0), abs=1e-6)   # model = reference
    assert step["logs"]["loss/dpo"] == pytest.approx(float(loss.detach()), abs=1e-6)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    assert max(float(g.abs().max()) for g in grads if g is not None) > 0
    changed = assert_sgd_update(step["before"], tr.net, grads, LR)
    assert changed > 20, changed
    # the reference stays where it was
    for (k, p0), p1 in zip(step["before"].state_dict().items(), tr.ref.state_dict().values()):
        assert torch.equal(p0, p1), k


def test_the_step_makes_the_model_prefer_the_winners(step):
    """After the step the model denoises the winners better than the losers, relative to the
    reference: the implicit margin (e_w - e_ref_w) - (e_l - e_ref_l) is negative."""
    tr, batch, rec = step["tr"], step["batch"], step["rec"]
    scan, sb, xb = batch["scan"], batch["scan_batch"], batch["x_init_batch"]
    t, eps = rec["t"], rec["eps"]
    sig = SIGMA[t][xb].view(-1, 1)
    tr.net.eval()
    with torch.no_grad():
        e = {}
        for side in ("x_w", "x_l"):
            x = rec[side] + sig * eps
            e[side] = float(((tr.net(scan, sb, x, xb, t) - eps) ** 2).mean() - ((tr.ref(scan, sb, x, xb, t) - eps) ** 2).mean())
    assert e["x_w"] - e["x_l"] < 0


def test_several_pairs_per_scan_keep_the_widest_margin(tmp_path):
    s = _one_step(tmp_path, "teacher_dpo.pairs_per_scan=3")
    rec = s["rec"]
    m = rec["candidates"]                                  # (2, K, B)
    assert m.shape == (2, 3, 2)
    margins = np.abs(m[0] - m[1])
    np.testing.assert_array_equal(rec["pick"], margins.argmax(axis=0))
    np.testing.assert_allclose(np.abs(rec["m1"] - rec["m2"]), margins.max(axis=0))
    assert s["logs"]["metric/margin"] == pytest.approx(margins.max(axis=0).mean())


CELL = 2.0


@pytest.fixture(scope="module")
def region_step(tmp_path_factory):
    return _one_step(tmp_path_factory.mktemp("tdpo_regions"), f"teacher_dpo.pair_regions={CELL}")


def _squares(batch):
    """Each row's (scan, square) of a CELL-metre grid, from its start point, numbered here."""
    keys = [(int(b), int(np.floor(x / CELL)), int(np.floor(y / CELL)))
            for b, (x, y) in zip(batch["x_init_batch"].tolist(), batch["x_init"][:, :2].tolist())]
    ids = {k: i for i, k in enumerate(sorted(set(keys)))}
    return torch.tensor([ids[k] for k in keys]), [k[0] for k in sorted(ids)]


def test_region_pairs_are_mosaics_of_each_squares_better_sample(region_step):
    rec, batch = region_step["rec"], region_step["batch"]
    s1, s2 = rec["samples"][0]
    square, _ = _squares(batch)
    tgt, tb = batch["target"].numpy(), batch["target_batch"].numpy()
    won_by_second = 0
    for r in range(int(square.max()) + 1):
        m = square == r
        first = bool(rec["first_rows"][m.numpy()][0])
        assert bool((torch.as_tensor(rec["first_rows"])[m] == first).all())     # one label per square
        w, l_ = (s1, s2) if first else (s2, s1)
        torch.testing.assert_close(rec["x_w"][m], w[m])
        torch.testing.assert_close(rec["x_l"][m], l_[m])
        won_by_second += not first
    # both samples win squares: the scene decides, square by square
    assert 0 < won_by_second < int(square.max()) + 1
    assert region_step["logs"]["metric/regions"] == pytest.approx((int(square.max()) + 1) / 2)
    # the labels are region_winners' (tests/test_training_preference.py checks its local distances)
    from training.preference import region_winners
    expect, _ = region_winners(s1.numpy(), s2.numpy(), batch["x_init"].numpy(), batch["x_init_batch"].numpy(),
                               tgt, tb, CELL)
    np.testing.assert_array_equal(rec["first_rows"], expect)


def test_region_step_is_minus_lr_times_the_gradient_of_the_per_square_dpo_loss(region_step):
    """Every square is a pair of its own: L = mean over scans of the mean over the scan's squares
    of -log sigmoid(-beta ((e^w_r - e^w_ref,r) - (e^l_r - e^l_ref,r))), e over the square's rows."""
    tr, batch, rec = region_step["tr"], region_step["batch"], region_step["rec"]
    model = _frozen_copy(region_step["before"])
    scan, sb, xb = batch["scan"], batch["scan_batch"], batch["x_init_batch"]
    t, eps = rec["t"], rec["eps"]
    sig = SIGMA[t][xb].view(-1, 1)
    square, scan_of = _squares(batch)
    err = {}
    for side in ("x_w", "x_l"):
        x = rec[side] + sig * eps
        pred = model(scan, sb, x, xb, t)
        with torch.no_grad():
            ref_pred = tr.ref(scan, sb, x, xb, t)
        err[side] = (((pred - eps) ** 2).sum(1), ((ref_pred - eps) ** 2).sum(1))
    per_scan = [[], []]
    for r in range(int(square.max()) + 1):
        m = square == r
        e = {s: (err[s][0][m].mean() / 3, err[s][1][m].mean() / 3) for s in err}
        inside = (e["x_w"][0] - e["x_w"][1]) - (e["x_l"][0] - e["x_l"][1])
        per_scan[scan_of[r]].append(-F.logsigmoid(-BETA * inside))
    loss = torch.stack([torch.stack(v).mean() for v in per_scan]).mean()
    assert float(loss.detach()) == pytest.approx(math.log(2.0), abs=1e-6)   # model = reference
    assert region_step["logs"]["loss/dpo"] == pytest.approx(float(loss.detach()), abs=1e-6)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True, retain_graph=True)
    changed = assert_sgd_update(region_step["before"], tr.net, grads, LR)
    assert changed > 20, changed
    # not the whole-scan loss of the same mosaics: the per-square weighting moves the weights otherwise
    whole = []
    for b in range(2):
        m = xb == b
        e = {s: (err[s][0][m].mean() / 3, err[s][1][m].mean() / 3) for s in err}
        whole.append(-F.logsigmoid(-BETA * ((e["x_w"][0] - e["x_w"][1]) - (e["x_l"][0] - e["x_l"][1]))))
    g_whole = torch.autograd.grad(torch.stack(whole).mean(), list(model.parameters()), allow_unused=True)
    diff = max(float((a - b).abs().max()) for a, b in zip(grads, g_whole) if a is not None and b is not None)
    assert diff > 1e-3 * max(float(a.abs().max()) for a in grads if a is not None)


def test_region_pairs_need_one_pair_per_scan():
    from lidar_completion.errors import ConfigError
    with pytest.raises(ConfigError, match="pairs_per_scan"):
        tiny_config("teacher-dpo", "teacher_dpo.pair_regions=2", "teacher_dpo.pairs_per_scan=3")
    with pytest.raises(ConfigError, match="pair_regions"):
        tiny_config("teacher-dpo", "teacher_dpo.pair_regions=-1")


def test_the_reference_stays_the_frozen_copy_over_steps(tmp_path):
    """A second step on the same batch: the reference is still the model as it was before the first
    (its loss is no longer log 2, which it would be were the current model its own reference)."""
    from training.data import make_loader
    rec = _one_step(tmp_path)
    tr = rec["tr"]
    assert rec["logs"]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-6)
    tr.sampler.set_epoch(0, 0)
    logs = tr.train_step(next(iter(make_loader(tr.dataset, tr.sampler, 0))))
    assert abs(logs["loss/dpo"] - math.log(2)) > 1e-6
    for (k, p0), p1 in zip(rec["before"].state_dict().items(), tr.ref.state_dict().values()):
        assert torch.equal(p0, p1), k


def test_teacher_dpo_needs_frozen_batch_norm():
    """With batch statistics the model differs from its frozen reference before any update (a first
    loss of 77.7 instead of log 2 was measured on a tiny teacher): the config refuses it."""
    from lidar_completion.errors import ConfigError
    with pytest.raises(ConfigError, match="teacher-dpo needs train.batchnorm: frozen"):
        tiny_config("teacher-dpo", "train.batchnorm=train")


def test_a_resume_needs_no_reference_file(tmp_path, caplog):
    """The training state holds the fine-tuned teacher and the frozen reference, but a resume read
    teacher_dpo.reference's file all the same (and failed without it); a fresh run still needs it."""
    from lidar_completion.errors import CheckpointError
    reference = lidiff_teacher_file(tmp_path / "teacher.ckpt", seed=5)
    cfg = tiny_config("teacher-dpo", f"teacher_dpo.reference={reference}", "checkpoint.export=false")
    source = scenes_source(1, n_target=800, n_scan=80)
    first = TeacherDPOTrainer(cfg, tmp_path / "run", max_steps=1, source=source)
    first.run()
    reference.unlink()
    with caplog.at_level("WARNING", logger="training.teacher_dpo"):
        again = TeacherDPOTrainer(cfg, tmp_path / "run", resume=True, max_steps=2, source=source)
    assert f"teacher_dpo.reference {reference} does not exist; the reference's and the teacher's weights " \
           "are taken from the training state" in caplog.text
    for name in ("teacher", "reference"):
        for k, v in first.modules[name].state_dict().items():
            assert torch.equal(again.modules[name].state_dict()[k], v), (name, k)
    assert again.run()["status"] == "finished"
    with pytest.raises(CheckpointError):
        TeacherDPOTrainer(cfg, tmp_path / "fresh", max_steps=1, source=source)
