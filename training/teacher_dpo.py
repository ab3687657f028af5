"""Diffusion-DPO fine-tuning of the teacher (``teacher-dpo``), the stage the Distillation-DPO release
runs before distilling: the teacher learns to prefer, for a scan, the completion closer to the
ground truth over the one further from it, measured against a frozen copy of itself.

Networks: the teacher to fine-tune (condition encoder + denoiser, ``teacher_dpo.reference`` or
``init``) and a frozen copy of it, the *reference*, in eval mode.

One step, per scan (docs/training.md, "Teacher preference fine-tuning"):

1. the reference completes the scan twice, from ``x_init + z1`` and ``x_init + lambda z2`` (``pair_noise``
   independent: two draws; scaled: z2 = z1), with ``sample_steps`` steps of the deterministic local
   sampler (:func:`training.preference.local_sample`) at guidance ``sample_guidance``; with
   ``pairs_per_scan`` K > 1, K such pairs and the one with the widest margin;
2. the preference metric against the ground truth (:mod:`training.preference`) makes one the winner
   ``x_w``, the other the loser ``x_l``;
3. one (t, eps) per scan shared by both sides, ``x^s_t = x^s + sigma_t eps`` (the local process),
   and per-scan mean squared errors ``e^s = mean |eps - eps(x^s_t, t)|^2`` of the model (with
   gradient) and of the reference (without):

       L = -log sigmoid(-beta ((e_model^w - e_ref^w) - (e_model^l - e_ref^l)))

   averaged over the scans of the global batch (Diffusion-DPO's loss with our noise model), plus
   ``denoise_weight`` times the teacher's own LiDiff loss on the ground truth (0: off).

With ``pair_regions`` r > 0 the pair is ranked square by square (r x r metres of the ground plane,
:func:`training.preference.region_winners`) and every square is a preference pair of its own: the
errors ``e`` are means over the square's rows, the loss above is taken per square, averaged over a
scan's squares, then over the scans. The label and the loss then have the same granularity: a
square won by the first sample teaches "denoise this square as the first sample did", whatever the
rest of the scan says.

At the first step the model equals the reference, the bracket is 0 and the gradient is
beta / 2 x (grad e_model^w - grad e_model^l): the model moves towards denoising winners better and
losers worse; it does not vanish unless the two samples coincide (tests/test_training_teacher_dpo.py
checks the update against autograd on this formula). The export is a teacher checkpoint.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from lidar_completion import sparse
from lidar_completion.errors import CheckpointError

from .losses import denoising_loss_terms, global_mean
from .config import RANDOM
from .engine import freeze
from .netio import build_networks, load_pretrained
from .preference import PreferenceMetric, guided_eps, local_sample, rank_pair, sample_timesteps, widest_pair
from .teacher import TeacherNet, TeacherTrainer

log = logging.getLogger(__name__)


def per_scan_mse(pred: torch.Tensor, eps: torch.Tensor, rows: torch.Tensor, B: int) -> torch.Tensor:
    """(B,) mean over each group's rows and coordinates of (pred - eps)^2 (a group: a scan, or a
    region of one)."""
    sq = ((pred - eps) ** 2).sum(1)
    sums = torch.zeros(B, device=pred.device, dtype=sq.dtype).index_add(0, rows, sq)
    counts = torch.zeros(B, device=pred.device, dtype=sq.dtype).index_add(0, rows, torch.ones_like(sq))
    return sums / (3.0 * counts)


def dpo_terms(e_model_w, e_ref_w, e_model_l, e_ref_l, beta: float) -> torch.Tensor:
    """Per-scan Diffusion-DPO loss -log sigmoid(-beta ((e_w - e_ref_w) - (e_l - e_ref_l)))."""
    inside = (e_model_w - e_ref_w) - (e_model_l - e_ref_l)
    return -F.logsigmoid(-float(beta) * inside)


class TeacherDPOTrainer(TeacherTrainer):
    """The teacher's render, validation and export (a teacher checkpoint); its own networks and step."""
    kind = "teacher-dpo"
    trained_by = "training.teacher_dpo"
    record = False   # tests set True to keep the last step's draws in ``last_record``

    def build(self) -> None:
        c = self.cfg["teacher_dpo"]
        src = None if c.get("reference") == RANDOM else c.get("reference") or self.cfg.get("init")
        loaded = None
        key = "teacher_dpo.reference" if c.get("reference") else "init"
        resumed = getattr(self, "_resume_state", None)   # (path, state) of --resume, read by __init__
        if self.resumed_without(src, key, "the reference's and the teacher's weights are"):
            pass    # the state's networks replace the file's
        elif src:
            loaded = load_pretrained(src, key=key)
            if loaded.encoder is None or loaded.denoiser is None:
                raise CheckpointError(f"{key}: {src}: a teacher checkpoint needs a condition encoder and a "
                                      "denoiser (a refiner's export has neither: give the teacher's)")
            if loaded.config != self.model_config:
                log.info("model size taken from the reference checkpoint %s: %s", src, loaded.config.channels)
                self.model_config = loaded.config
        elif resumed is None:   # resumed, the state's weights replace the random ones
            log.warning("teacher_dpo.reference=random: fine-tuning a randomly initialised teacher")
        self.net = TeacherNet(*build_networks(self.model_config, self.backend)[:2])
        if loaded is not None:
            self.net.encoder.load_state_dict(loaded.encoder.state_dict())
            self.net.denoiser.load_state_dict(loaded.denoiser.state_dict())
        ref = TeacherNet(*build_networks(self.model_config, self.backend)[:2])
        ref.load_state_dict(self.net.state_dict())
        self.ref = freeze(ref)
        self.modules.update({"teacher": self.net, "reference": self.ref})
        self.trainable["teacher"] = self.net
        self.metric = PreferenceMetric.from_spec(c)
        self.t_T = self.schedule.num_train_timesteps - 1
        self.last_record: dict = {}
        self.load_validation_refiner()

    # -- pairs -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _reference_sample(self, x_T, xb, cond, uncond, B: int) -> torch.Tensor:
        c = self.cfg["teacher_dpo"]
        w = float(c["sample_guidance"])

        def denoise(x, t):
            tt = torch.full((B,), int(t), dtype=torch.long, device=x.device)
            return guided_eps(self.ref.denoiser, x, xb, tt, cond, uncond, w, B)

        return local_sample(denoise, x_T, sample_timesteps(int(c["sample_steps"]), self.t_T), self.sigmas)

    @torch.no_grad()
    def make_pair(self, batch: dict, keys, rec: dict | None = None):
        """(x_w, x_l, logs, groups): each scan's winner and loser among the reference's samples;
        ``groups``: None (one pair per scan), or with ``pair_regions`` (the region of every row
        (N,), the scan of every region (R,)), each region a pair of its own."""
        c = self.cfg["teacher_dpo"]
        dev = self.device
        B = int(batch["batch_size"])
        counts = batch["x_init_counts"]
        xb = batch["x_init_batch"].to(dev)
        x_init = batch["x_init"].to(dev)
        scan, scan_b = batch["scan"].to(dev), batch["scan_batch"].to(dev)
        cond = self.ref.encoder(scan, scan_b)
        uncond = None
        if float(c["sample_guidance"]) != 1.0:
            n_scan = max(1, int(batch["scan_counts"].max()))
            zeros = torch.zeros(n_scan * B, 3, device=dev)
            uncond = self.ref.encoder(zeros, torch.arange(B, device=dev).repeat_interleave(n_scan))
        lam = float(c["noise_scale"])
        K = int(c["pairs_per_scan"])
        cands, m = [], np.zeros((2, K, B))
        for k in range(K):
            tag = "" if k == 0 else f"/{k}"
            z1 = self.draw_noise(keys, counts, f"teacher_dpo/z{tag}")
            z2 = z1 if c["pair_noise"] == "scaled" else self.draw_noise(keys, counts, f"teacher_dpo/z2{tag}")
            s1 = self._reference_sample(x_init + z1, xb, cond, uncond, B)
            s2 = self._reference_sample(x_init + lam * z2, xb, cond, uncond, B)
            m[0, k] = self.metric.per_scan(s1, xb, batch, B)
            m[1, k] = self.metric.per_scan(s2, xb, batch, B)
            cands.append((s1, s2))
        pick = widest_pair(m[0], m[1])
        m1, m2 = m[0, pick, np.arange(B)], m[1, pick, np.arange(B)]
        s1 = torch.stack([a for a, _ in cands])
        s2 = torch.stack([b for _, b in cands])
        idx = torch.as_tensor(pick, device=dev)[xb].view(1, -1, 1).expand(1, -1, 3)
        s1, s2 = s1.gather(0, idx)[0], s2.gather(0, idx)[0]
        ranked = rank_pair(self.metric, s1, s2, m1, m2, xb, batch, B, float(c["pair_regions"]))
        groups = None
        if ranked.regions is not None:                 # one pair per region of a scan (K = 1, config-checked)
            region, keys = ranked.regions
            groups = (torch.as_tensor(region, device=dev), torch.as_tensor(keys[:, 0], device=dev))
        x_w, x_l, logs = ranked.x_w, ranked.x_l, ranked.logs
        if rec is not None:
            rec.update(m1=m1, m2=m2, first=ranked.first.copy(), x_w=x_w.clone(), x_l=x_l.clone(), candidates=m,
                       pick=pick, samples=[(a.clone(), b.clone()) for a, b in cands],
                       first_rows=ranked.first_rows, groups=groups)
        return x_w, x_l, logs, groups

    # -- the step --------------------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict:
        c = self.cfg["teacher_dpo"]
        dev = self.device
        rec = {} if self.record else None
        keys = self.sample_keys(batch)
        B = int(batch["batch_size"])
        with self.autocast():   # train.precision: the passes in bf16/fp16, samples and losses in fp32
            x_w, x_l, logs, groups = self.make_pair(batch, keys, rec)
        x_w, x_l = x_w.float(), x_l.float()
        xb = batch["x_init_batch"].to(dev)
        scan, scan_b = batch["scan"].to(dev), batch["scan_batch"].to(dev)
        t = self.draw_t(keys, "teacher_dpo/t", int(c["t_min"]), int(c["t_max"]))
        eps = self.draw_noise(keys, batch["x_init_counts"], "teacher_dpo/eps")
        sig = self.sigma(t)[xb].view(-1, 1)
        x2 = torch.cat([x_w + sig * eps, x_l + sig * eps])
        xb2, t2 = torch.cat([xb, xb + B]), torch.cat([t, t])
        scan2, scan_b2 = torch.cat([scan, scan]), torch.cat([scan_b, scan_b + B])
        # the reference and the model see the same scans and points: one voxelisation and one set of
        # kernel maps each for the encoder and the denoiser (the model's gradients are unaffected)
        with sparse.shared_maps():
            with torch.no_grad(), self.autocast():
                ref = self.ref(scan2, scan_b2, x2, xb2, t2).float()
            self.set_train(self.net, True)
            with self.autocast():
                pred = self.wrapped["teacher"](scan2, scan_b2, x2, xb2, t2)
        pred = pred.float()
        if groups is None:
            G, g2 = B, xb2                                 # one pair per scan
        else:
            region, region_scan = groups                   # one pair per region of a scan
            G = int(region_scan.shape[0])
            g2 = torch.cat([region, region + G])
        e_model = per_scan_mse(pred, torch.cat([eps, eps]), g2, 2 * G)
        e_ref = per_scan_mse(ref, torch.cat([eps, eps]), g2, 2 * G)
        per_group = dpo_terms(e_model[:G], e_ref[:G], e_model[G:], e_ref[G:], float(c["beta"]))
        if groups is None:
            per_scan = per_group
        else:                                              # a scan's loss: the mean over its regions
            n_reg = torch.zeros(B, device=dev, dtype=per_group.dtype).index_add(
                0, region_scan, torch.ones_like(per_group))
            per_scan = torch.zeros(B, device=dev, dtype=per_group.dtype).index_add(
                0, region_scan, per_group) / n_reg
        loss = global_mean(per_scan.sum(), B)
        logs["loss/dpo"] = float(loss.detach())
        wd = float(c["denoise_weight"])
        if wd > 0:
            loss = loss + wd * self._denoise_loss(batch, keys, scan, scan_b)
        self.guard("loss", loss)
        opt = self.optimizers["main"]
        opt.zero_grad(set_to_none=True)
        self.backward(loss)
        logs["grad_norm"] = self.clip_and_step("main", self.cfg["train"]["grad_clip"])
        logs["loss"] = float(loss.detach())
        with torch.no_grad():
            gap = (e_model[:G] - e_ref[:G]) - (e_model[G:] - e_ref[G:])
            logs["dpo/implicit_margin"] = float(gap.mean())   # < 0: winners denoised better than losers
        if rec is not None:
            rec.update(t=t.clone(), eps=eps.clone())
            self.last_record = rec
        return logs

    def _denoise_loss(self, batch, keys, scan, scan_b) -> torch.Tensor:
        """The teacher's LiDiff loss on the ground truth (training/teacher.py, without dropout)."""
        dev = self.device
        x0, x_b = batch["target"].to(dev), batch["target_batch"].to(dev)
        t = self.draw_t(keys, "teacher_dpo/gt_t")
        eps = self.draw_noise(keys, batch["target_counts"], "teacher_dpo/gt_eps")
        x_t = x0 + self.sigma(t)[x_b].view(-1, 1) * eps
        with self.autocast():
            pred = self.wrapped["teacher"](scan, scan_b, x_t, x_b, t)
        return denoising_loss_terms(pred.float(), eps, float(self.cfg["diffusion"]["reg_weight"]))["loss"]
