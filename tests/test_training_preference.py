"""Preference options of the distillation (training/preference.py, ``distill.*``): each option changes
what it says - the ranking metric, how a pair's second sample is made, how many candidate pairs are
drawn - and the spread diagnostic measures what it says."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lidar_completion import metrics as M
from lidar_completion.checkpoints import WEIGHTS_DIR
from lidar_completion.errors import ConfigError
from test_training_distill import SIGMA, _run_one_step, _trainer
from test_training_utils import assert_sgd_update, tiny_config
from training.engine import set_bn_mode
from training.preference import (PreferenceMetric, cd_unseen, local_sample, rank_pair, region_winners,
                                 sample_timesteps, spread, widest_pair)


# -- the metrics ---------------------------------------------------------------------------------
def _clouds():
    rng = np.random.default_rng(0)
    seen = rng.uniform(-2, 2, (400, 3)).astype(np.float32)             # where the scan looks
    hidden = (rng.uniform(-2, 2, (400, 3)) + [20, 0, 0]).astype(np.float32)   # what it does not see
    scan = seen
    return scan, seen, hidden


def test_cd_unseen_ignores_what_the_scan_sees():
    scan, seen, hidden = _clouds()
    target = np.concatenate([seen, hidden])
    wrong_seen = np.concatenate([seen + [0, 0, 0.4], hidden])           # error only near the scan
    wrong_hidden = np.concatenate([seen, hidden + [0, 0, 0.4]])         # error only away from it
    assert M.chamfer_distance(wrong_seen, target) > 0.1
    assert cd_unseen(wrong_seen, target, scan, radius=1.0) == pytest.approx(0.0, abs=1e-6)
    assert cd_unseen(wrong_hidden, target, scan, radius=1.0) == pytest.approx(
        M.chamfer_distance(hidden + [0, 0, 0.4], hidden), rel=1e-6)
    # nothing unseen in the prediction: the whole clouds' CD
    assert cd_unseen(seen, target, scan, 1.0) == pytest.approx(M.chamfer_distance(seen, target))


def test_named_metrics_their_direction_and_the_composite():
    scan, seen, hidden = _clouds()
    target = np.concatenate([seen, hidden])
    pred = np.concatenate([seen, hidden + [0, 0, 0.4]])
    spec = {"metric": "iou", "iou_voxel": 0.5}
    iou = PreferenceMetric.from_spec(spec)
    assert not iou.lower_is_better
    assert iou.score(pred, target, scan) == pytest.approx(M.iou(pred, target, 0.5))
    assert list(iou.first_wins(np.array([0.3, 0.1]), np.array([0.2, 0.2]))) == [True, False]
    comp = PreferenceMetric.from_spec({"metric": "composite", "composite": {"cd": 2.0, "iou": 1.0, "jsd_bev": 0.5},
                                       "iou_voxel": 0.5})
    expected = 2.0 * M.chamfer_distance(pred, target) - M.iou(pred, target, 0.5) + 0.5 * M.jsd_bev(pred, target)
    assert comp.lower_is_better and comp.score(pred, target, scan) == pytest.approx(expected)
    dotted = PreferenceMetric.from_spec({"metric": "lidar_completion.metrics.jsd_bev", "metric_lower_is_better": True})
    assert dotted.score(pred, target, scan) == pytest.approx(M.jsd_bev(pred, target))


def test_bad_preference_settings_are_refused():
    with pytest.raises(ConfigError, match="distill.composite"):
        tiny_config("distill", "distill.metric=composite", "distill.composite={cd: 1, emd: 2}")
    with pytest.raises(ConfigError, match="pairs_per_scan"):
        tiny_config("distill", "distill.pairs_per_scan=0")
    with pytest.raises(ConfigError, match="pair_steps"):
        tiny_config("distill", "distill.pair_steps=0")
    with pytest.raises(ConfigError, match="spread_samples"):
        tiny_config("distill", "distill.spread_every_steps=5", "distill.spread_samples=1")
    # a dotted path that is no metric fails at start, naming the key
    with pytest.raises(ConfigError, match=r"distill.metric 'os.path.join' failed on two small point clouds.*TypeError"):
        tiny_config("distill", "distill.metric=os.path.join")
    with pytest.raises(ConfigError, match=r"teacher_dpo.metric 'math.log' failed"):
        tiny_config("teacher-dpo", "teacher_dpo.metric=math.log")
    with pytest.raises(ConfigError, match="pair_regions"):
        tiny_config("distill", "distill.pair_regions=-1")
    # a composite replaces the default weights rather than adding to them
    cfg = tiny_config("distill", "distill.metric=composite", "distill.composite={iou: 1}")
    assert cfg["distill"]["composite"] == {"iou": 1}


def test_helpers():
    assert sample_timesteps(1, 999) == [999]
    assert sample_timesteps(2, 999) == [999, 500]
    np.testing.assert_array_equal(widest_pair(np.array([[0.1, 0.5], [0.3, 0.5]]), np.array([[0.2, 0.1], [0.3, 0.45]])),
                                  [0, 0])
    absdiff, std = spread(np.array([[1.0, 0.0], [2.0, 0.0], [4.0, 0.0]]))
    np.testing.assert_allclose(absdiff, [2.0, 0.0])        # (1 + 3 + 2) / 3
    np.testing.assert_allclose(std, [np.std([1.0, 2.0, 4.0]), 0.0])


def test_region_winners_pick_each_regions_better_sample():
    rng = np.random.default_rng(1)
    # two scans of the same ground: a 4 m x 4 m plate of target points, anchors on the same grid
    plate = np.stack(np.meshgrid(np.arange(0.05, 4, 0.1), np.arange(0.05, 4, 0.1)), -1).reshape(-1, 2)
    target1 = np.concatenate([plate, np.zeros((len(plate), 1))], 1)
    target = np.concatenate([target1, target1])
    target_rows = np.repeat([0, 1], len(plate))
    anchors = np.concatenate([target1[::4], target1[::4]])
    rows = np.repeat([0, 1], len(anchors) // 2)
    left = anchors[:, 0] < 2.0
    jitter = rng.normal(0, 0.01, anchors.shape)
    # scan 0: g1 is right on the left half, off by 0.3 m on the right half; g2 the other way round.
    # scan 1: g1 is off everywhere (g2 wins every region of it)
    off = np.array([0, 0, 0.3])
    g1 = anchors + jitter + np.where((left & (rows == 0))[:, None], 0, off)
    g2 = anchors + jitter + np.where((~left & (rows == 0))[:, None] | (rows == 1)[:, None], 0, off)
    first, stats = region_winners(g1, g2, anchors, rows, target, target_rows, cell=2.0)
    assert stats["regions"] == 8                        # 2 x 2 squares of 2 m, per scan
    np.testing.assert_array_equal(first, left & (rows == 0))
    assert stats["second_won"] == pytest.approx(6 / 8)
    # both terms of the local CD grow by about the 0.3 m offset (the target's side a little less:
    # its points were up to 0.2 m from the nearest row already)
    assert 0.45 < stats["region_margin"] < 0.6
    # the mosaic of winners is on the target everywhere, the mosaic of losers off it everywhere
    win = np.where(first[:, None], g1, g2)
    lose = np.where(first[:, None], g2, g1)
    assert np.abs(win[:, 2]).max() < 0.05 and np.abs(lose[:, 2] - 0.3).max() < 0.05
    # one region for everything: the whole-sample comparison; ties go to the first sample
    first, stats = region_winners(g1, g1.copy(), anchors, rows, target, target_rows, cell=100.0)
    assert first.all() and stats["regions"] == 2 and stats["second_won"] == 0.0
    # a region with no target point is judged by its rows' distance to the target alone
    far = anchors + [50.0, 0, 0]
    first, stats = region_winners(far + off, far, far, rows, target, target_rows, cell=2.0)
    assert not first.any() and stats["regions"] == 8


def test_rank_pair_by_regions_needs_no_whole_scan_metrics():
    """With regions the winner and loser mosaics, their metrics and the logs do not depend on the
    whole-scan metrics m1, m2: passing None (what a training step without a record does) gives the
    same result without computing them; a whole-scan ranking without them is refused."""
    rng = np.random.default_rng(3)
    B, n = 2, 300
    rows = torch.as_tensor(np.repeat(np.arange(B), n))
    anchors = rng.uniform(-6, 6, (B * n, 3)).astype(np.float32)
    target = (anchors + rng.normal(0, 0.05, anchors.shape)).astype(np.float32)
    batch = {"x_init": torch.as_tensor(anchors), "target": torch.as_tensor(target),
             "target_batch": torch.as_tensor(np.repeat(np.arange(B), n)),
             "scan": torch.as_tensor(anchors[::3]), "scan_batch": torch.as_tensor(np.repeat(np.arange(B), n)[::3])}
    s1 = torch.as_tensor(anchors + rng.normal(0, 0.2, anchors.shape).astype(np.float32))
    s2 = torch.as_tensor(anchors + rng.normal(0, 0.2, anchors.shape).astype(np.float32))
    metric = PreferenceMetric.from_spec({"metric": "cd"})
    m1, m2 = metric.per_scan(s1, rows, batch, B), metric.per_scan(s2, rows, batch, B)
    full = rank_pair(metric, s1, s2, m1, m2, rows, batch, B, 3.0)
    lean = rank_pair(metric, s1, s2, None, None, rows, batch, B, 3.0)
    assert lean.first is None and full.first is not None
    assert 0 < full.first_rows.mean() < 1                   # a real mosaic: both samples win somewhere
    torch.testing.assert_close(lean.x_w, full.x_w)
    torch.testing.assert_close(lean.x_l, full.x_l)
    np.testing.assert_array_equal(lean.first_rows, full.first_rows)
    np.testing.assert_allclose(lean.mw, full.mw)
    np.testing.assert_allclose(lean.ml, full.ml)
    assert lean.logs == full.logs
    with pytest.raises(ValueError, match="needs the metrics"):
        rank_pair(metric, s1, s2, None, None, rows, batch, B, 0.0)


# -- the options in a distillation step -----------------------------------------------------------
def _student_eps(step, x, t, with_uncond: float | None = None):
    tr, batch = step["tr"], step["batch"]
    student = copy.deepcopy(step["before"]["student"]).train()
    set_bn_mode(student, tr.bn_mode)
    xb, B = batch["x_init_batch"], batch["batch_size"]
    tt = torch.full((B,), int(t), dtype=torch.long)
    with torch.no_grad():
        cond = tr.encoder(batch["scan"], batch["scan_batch"])
        eps_c = student(x, xb, tt, cond)
        if with_uncond is None:
            return eps_c
        n = int(batch["scan_counts"].max())
        uncond = tr.encoder(torch.zeros(n * B, 3), torch.arange(B).repeat_interleave(n))
        eps_u = student(x, xb, tt, uncond)
    return eps_u + with_uncond * (eps_c - eps_u)


def test_metric_option_ranks_by_that_metric(tmp_path):
    step = _run_one_step(tmp_path, "dpo", "distill.metric=iou", "distill.iou_voxel=0.5")
    batch, rec = step["batch"], step["rec"]
    N = batch["x_init"].shape[0]
    xb, tb, tgt = batch["x_init_batch"].numpy(), batch["target_batch"].numpy(), batch["target"].numpy()
    for b in range(2):
        ious = [M.iou(rec["G"][s * N:(s + 1) * N][xb == b].numpy(), tgt[tb == b], 0.5) for s in (0, 1)]
        assert [rec["m1"][b], rec["m2"][b]] == pytest.approx(ious)
        assert rec["first"][b] == (ious[0] >= ious[1])          # higher IoU wins


def test_pair_guidance_makes_the_second_sample_guided(tmp_path):
    # from the shipped teacher: an untrained network hardly uses its condition
    step = _run_one_step(tmp_path, "dpo", "distill.pair_guidance=3.0", "distill.pair_noise=independent",
                         "train.batchnorm=frozen", f"distill.teacher={WEIGHTS_DIR / 'teacher.pt'}",
                         "distill.noise_scale=1.0")
    batch, rec = step["batch"], step["rec"]
    N = batch["x_init"].shape[0]
    x1, x2 = batch["x_init"] + rec["z"], batch["x_init"] + rec["z2"]
    G1 = x1 - SIGMA[999] * _student_eps(step, x1, 999)
    G2 = x2 - SIGMA[999] * _student_eps(step, x2, 999, with_uncond=3.0)
    torch.testing.assert_close(rec["G"][:N], G1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rec["G"][N:], G2, rtol=1e-5, atol=1e-5)
    assert float((G2 - (x2 - SIGMA[999] * _student_eps(step, x2, 999))).abs().max()) > 1e-3   # guidance matters
    moved = max(float((p1 - p0).detach().abs().max()) for p0, p1 in
                zip(step["before"]["student"].parameters(), step["tr"].student.parameters()))
    assert moved > 0


def test_pair_steps_make_the_second_sample_in_several_steps(tmp_path):
    step = _run_one_step(tmp_path, "dpo", "distill.pair_steps=2")
    batch, rec = step["batch"], step["rec"]
    N = batch["x_init"].shape[0]
    x = batch["x_init"] + 1.1 * rec["z"]
    eps = _student_eps(step, x, 999)
    x0 = x - SIGMA[999] * eps
    x_mid = x0 + SIGMA[500] * eps                      # deterministic local step 999 -> 500
    G2 = x_mid - SIGMA[500] * _student_eps(step, x_mid, 500)
    torch.testing.assert_close(rec["G"][N:], G2, rtol=1e-4, atol=1e-4)
    # the helper with a fake denoiser: the same recursion
    d = local_sample(lambda x, t: torch.full_like(x, t / 1000.0), torch.zeros(2, 3), [999, 500], SIGMA)
    e1, e2 = 0.999, 0.5
    torch.testing.assert_close(d, torch.full((2, 3), -SIGMA[999] * e1 + SIGMA[500] * e1 - SIGMA[500] * e2))


def test_several_pairs_per_scan_keep_the_widest_margin(tmp_path):
    step = _run_one_step(tmp_path, "dpo", "distill.pairs_per_scan=3", "train.batchnorm=frozen")
    tr, batch, rec = step["tr"], step["batch"], step["rec"]
    keys, counts = tr.sample_keys(batch), batch["x_init_counts"]
    cands = [tr.draw_noise(keys, counts, "distill/z" + ("" if c == 0 else f"/{c}")) for c in range(3)]
    margins = []
    xb, tb, tgt = batch["x_init_batch"], batch["target_batch"].numpy(), batch["target"].numpy()
    for z in cands:
        G = [batch["x_init"] + s * z - SIGMA[999] * _student_eps(step, batch["x_init"] + s * z, 999) for s in (1.0, 1.1)]
        margins.append([abs(M.chamfer_distance(G[0][xb == b].numpy(), tgt[tb == b])
                            - M.chamfer_distance(G[1][xb == b].numpy(), tgt[tb == b])) for b in range(2)])
    margins = np.array(margins)                        # (K, B)
    pick = margins.argmax(axis=0)
    for b in range(2):                                 # the kept pair started from the chosen candidate's noise
        torch.testing.assert_close(rec["z"][xb == b], cands[pick[b]][xb == b])
    np.testing.assert_allclose(np.abs(rec["m1"] - rec["m2"]), margins.max(axis=0), rtol=1e-3, atol=1e-6)
    assert step["logs"]["metric/margin"] >= step["logs"]["metric/candidate_margin"]


def test_region_pairs_train_each_side_on_the_mosaic_of_regional_winners(tmp_path):
    step = _run_one_step(tmp_path, "dpo", "distill.pair_noise=independent", "distill.noise_scale=1.0",
                         "distill.pair_regions=1.5", "train.batchnorm=frozen")
    batch, rec, logs = step["batch"], step["rec"], step["logs"]
    N = batch["x_init"].shape[0]
    G1, G2 = rec["G"][:N].numpy(), rec["G"][N:].numpy()
    first, stats = region_winners(G1, G2, batch["x_init"].numpy(), batch["x_init_batch"].numpy(),
                                  batch["target"].numpy(), batch["target_batch"].numpy(), 1.5)
    assert 0 < first.mean() < 1                        # both samples win somewhere
    np.testing.assert_array_equal(rec["first_rows"], first)
    win, lose = rec["side_samples"]["aux_w"].numpy(), rec["side_samples"]["aux_l"].numpy()
    np.testing.assert_array_equal(win, np.where(first[:, None], G1, G2))
    np.testing.assert_array_equal(lose, np.where(first[:, None], G2, G1))
    assert logs["metric/switch"] == pytest.approx(stats["second_won"])
    assert logs["metric/regions"] == pytest.approx(stats["regions"] / 2)
    # the mosaic of regional winners beats the loser mosaic by CD on every scan, and by more than
    # the better of the two whole samples beats the other (the regional differences add up)
    assert (rec["mw"] < rec["ml"]).all()
    assert np.abs(rec["ml"] - rec["mw"]).mean() > np.abs(rec["m1"] - rec["m2"]).mean()
    # the student moved (its gradient flows through both mosaics)
    moved = sum(float((a - b).detach().abs().sum()) for a, b in zip(step["tr"].student.parameters(),
                                                         step["before"]["student"].parameters()))
    assert moved > 0
    # the same step unrecorded (as training runs: no whole-scan metrics computed) updates the
    # student exactly as the recorded one, with the same preference logs
    from training.data import make_loader
    tr2, _ = _trainer(tmp_path / "plain", "dpo", "distill.pair_noise=independent", "distill.noise_scale=1.0",
                      "distill.pair_regions=1.5", "train.batchnorm=frozen")
    tr2.sampler.set_epoch(0, 0)
    plain_logs = tr2.train_step(next(iter(make_loader(tr2.dataset, tr2.sampler, 0))))
    assert tr2.last_record == {}                        # nothing recorded
    for a, b in zip(tr2.student.parameters(), step["tr"].student.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert plain_logs["metric/switch"] == logs["metric/switch"] and plain_logs["metric/margin"] == logs["metric/margin"]


def test_spread_diagnostic_compares_the_margin_with_independent_samples(tmp_path):
    step = _run_one_step(tmp_path, "dpo", "distill.spread_every_steps=1", "distill.spread_samples=3",
                         "train.batchnorm=frozen")
    tr, batch, logs = step["tr"], step["batch"], step["logs"]
    keys, counts = tr.sample_keys(batch), batch["x_init_counts"]
    xb, tb, tgt = batch["x_init_batch"], batch["target_batch"].numpy(), batch["target"].numpy()
    vals = []
    for j in range(3):
        x = batch["x_init"] + tr.draw_noise(keys, counts, f"distill/spread/{j}")
        G = x - SIGMA[999] * _student_eps(step, x, 999)
        vals.append([M.chamfer_distance(G[xb == b].numpy(), tgt[tb == b]) for b in range(2)])
    absdiff, std = spread(np.array(vals))
    assert logs["metric/spread"] == pytest.approx(absdiff.mean(), rel=1e-4)
    assert logs["metric/spread_std"] == pytest.approx(std.mean(), rel=1e-4)
    assert logs["metric/margin_over_spread"] == pytest.approx(logs["metric/margin"] / logs["metric/spread"])
    assert "metric/spread" not in _run_one_step(tmp_path / "off", "dpo")["logs"]


# -- generating on the inference trajectory (distill.gen_steps) -----------------------------------
def _gen_reference(step, K: int, w: float):
    """Each scan's sample recomputed alone: k steps of the K-step local solver with the student
    copy taken before the step (guided with w, the trainer's keyed noises), then the unguided x_0
    prediction at the k-th timestep with the graph kept."""
    from lidar_completion.diffusion import DPMSolverSDE
    tr, batch, rec = step["tr"], step["batch"], step["rec"]
    student = copy.deepcopy(step["before"]["student"]).train()
    set_bn_mode(student, tr.bn_mode)
    solver = DPMSolverSDE(tr.schedule, K, process="local")
    xb, sb = batch["x_init_batch"], batch["scan_batch"]
    n_unc = int(batch["scan_counts"].max())
    one = torch.ones(1, dtype=torch.long)
    Gs = []
    for b in range(batch["batch_size"]):
        rows = xb == b
        x_init, z = batch["x_init"][rows], rec["z"][rows]
        zb = torch.zeros(len(x_init), dtype=torch.long)
        with torch.no_grad():
            cond = tr.encoder(batch["scan"][sb == b], torch.zeros(int((sb == b).sum()), dtype=torch.long))
            uncond = tr.encoder(torch.zeros(n_unc, 3), torch.zeros(n_unc, dtype=torch.long))
            y, prev = z.clone(), None
            for i in range(int(rec["gen_k"][b])):
                t = one * int(solver.timesteps[i])
                e_c, e_u = student(x_init + y, zb, t, cond), student(x_init + y, zb, t, uncond)
                noise = tr.draw_noise(rec["keys"], batch["x_init_counts"], f"distill/gen/noise/{i}")[rows]
                y, prev = solver.step(e_u + w * (e_c - e_u), i, y, noise=noise if solver.needs_noise(i) else None,
                                      prev_x0=prev)
        t = one * int(solver.timesteps[int(rec["gen_k"][b])])
        x = x_init + y
        Gs.append(x - SIGMA[t] * student(x, zb, t, cond))
    return student, torch.cat(Gs)


def test_gen_steps_train_the_student_where_the_solver_uses_it(tmp_path):
    K, w = 4, 2.0
    step = _run_one_step(tmp_path, "vsd", f"distill.gen_steps={K}", f"distill.gen_guidance={w}",
                         "train.batchnorm=frozen", f"distill.teacher={WEIGHTS_DIR / 'teacher.pt'}", "seed=3")
    tr, batch, rec = step["tr"], step["batch"], step["rec"]
    k = rec["gen_k"].tolist()
    # two scans at different depths of the trajectory: one at its start (the one-step sample), one after
    # three solver steps (second-order and stochastic ones among them)
    assert sorted(k) == [0, 3], k
    assert step["logs"]["gen/k"] == pytest.approx(np.mean(k))
    student, G = _gen_reference(step, K, w)
    torch.testing.assert_close(rec["G"], G.detach(), rtol=1e-4, atol=1e-4)
    # the samples are not the one-step ones
    x_T = batch["x_init"] + rec["z"]
    assert float((rec["G"] - (x_T - SIGMA[999] * _student_eps(step, x_T, 999))).abs().max()) > 1e-2
    # the student's update is -lr x the gradient of mean(sg(eps_T - eps_aux) * G) through the last pass
    xb, t, eps = batch["x_init_batch"], rec["t"], rec["eps"]
    x = G.detach() + SIGMA[t][xb].view(-1, 1) * eps
    with torch.no_grad():
        cond = tr.encoder(batch["scan"], batch["scan_batch"])
        d = tr.teacher(x, xb, t, cond) - tr.aux["aux"].eval()(x, xb, t, cond)
    grads = torch.autograd.grad((d * G).mean(), list(student.parameters()), allow_unused=True)
    assert assert_sgd_update(step["before"]["student"], tr.student, grads, 0.5) > 20


def test_gen_steps_pair_shares_the_trajectory_and_bad_settings_are_refused(tmp_path):
    step = _run_one_step(tmp_path, "dpo", "distill.gen_steps=3", "train.batchnorm=frozen", "seed=3")
    rec = step["rec"]
    assert max(rec["gen_k"].tolist()) >= 1, rec["gen_k"]
    one = copy.deepcopy(step)
    one["rec"] = dict(rec, z=rec["z"])
    _, G1 = _gen_reference(one, 3, 1.0)
    one["rec"] = dict(rec, z=1.1 * rec["z"])
    _, G2 = _gen_reference(one, 3, 1.0)
    torch.testing.assert_close(rec["G"], torch.cat([G1, G2]).detach(), rtol=1e-4, atol=1e-4)
    for bad in (["distill.gen_steps=0"], ["distill.gen_steps=4", "distill.generator=vp"],
                ["distill.gen_steps=4", "distill.pair_steps=2"], ["distill.gen_guidance=0"]):
        with pytest.raises(ConfigError, match="gen_"):
            tiny_config("distill", *bad)
