"""Distillation of a one-step student from the teacher: score distillation (``vsd``, the ScoreLiDAR
baseline) and Distillation-DPO (``dpo``), both in the stop-gradient form of docs/method.md, "Distillation".

Networks: the condition encoder and the teacher denoiser come from a teacher checkpoint (ours or a
published LiDiff / Distillation-DPO file) and stay frozen in eval mode. The student and the auxiliary
("fake score") denoisers start as copies of the teacher. ``dpo`` has two auxiliary networks (winner
and loser), ``vsd`` one.

One-step generation (training only, without guidance). For a scan with tiled input ``x_init`` and
noise ``z``, ``x_T = x_init + z`` (the sampler's start, docs/method.md, "Sampling") and the
student's prediction at t = T-1 = 999 gives the sample

    G = x_T - sigma_T * eps_student(x_T, 999)          (generator: local, default)

the x_0 estimate of the *local* forward process the networks are trained with
(x_t = x_0 + sigma_t eps; sigma_999 = 0.985). ``generator: vp`` instead uses what a one-step
DPM-Solver++ with a zero final sigma returns, ``x_init + (z - sigma_T eps) / alpha_T``
(alpha_999 = 0.17), which magnifies the offsets from x_init about 5.8 times; it is there for
comparison with the published one-step path, not recommended.

One optimisation step on a batch (per rank):

1. encode the scans once (frozen encoder, no gradient);
2. generate with gradient: ``dpo`` two samples per scan from ``x_init + z`` and
   ``x_init + lambda z`` (lambda = 1.1; ``pair_noise: independent``: ``x_init + lambda z2`` with a
   second, independent draw z2) in one batched student pass; ``vsd`` one sample;
   The second sample of a pair can also differ in how it is made: ``pair_guidance`` w != 1 guides
   the student (``eps_u + w (eps_c - eps_u)``), ``pair_steps`` k > 1 makes it in k steps of the
   deterministic local sampler (:func:`training.preference.local_sample`, gradient through the
   last step); ``pairs_per_scan`` K > 1 samples K candidate pairs without gradient and keeps, per
   scan, the pair with the widest metric margin (then made again with gradient);
3. ``dpo``: score both against the target with the preference metric (``metric``: Chamfer distance
   by default, IoU, JSD-BEV, CD on what the scan does not see, a composite, or any callable
   ``(pred, target) -> float`` by dotted path; :mod:`training.preference`), the better is the
   winner ``G_w``, the other the loser ``G_l`` (ties: the first sample wins); with
   ``pair_regions`` r > 0 the comparison is made in every r x r metre square of the ground plane
   instead (a local Chamfer distance, :func:`training.preference.region_winners`) and ``G_w`` is
   the mosaic of the better sample's rows of each square, ``G_l`` the rest; every
   ``spread_every_steps`` steps the metric's spread over independent samples of each scan is
   logged beside the pair's margin;
4. auxiliary update(s): each auxiliary net takes a denoising step on its own side's samples,
   ``x = sg(G_side) + sigma_t' eps'`` with fresh (t', eps') per side, loss = LiDiff's denoising loss
   (``aux_loss: lidiff``) or plain MSE (``mse``, as published);
5. student update: one (t, eps) per scan shared by both sides, ``x_side = sg(G_side) + sigma_t eps``,
   ``d_side = eps_teacher(x_side) - eps_aux_side(x_side)`` without gradient, using the auxiliary nets
   *after* their update of this step (at step 1 they equal the teacher, so the order matters; the
   teacher's passes and the side's auxiliary pass share one voxelisation and set of kernel maps,
   :func:`lidar_completion.sparse.shared_maps`), and

       vsd: L = mean(sg(d) * G)
       dpo: L = mean(sg(d_w) * G_w) - mean(sg(d_l) * G_l)

   optionally with the per-scan ``logsigmoid`` weight of :func:`training.losses.logsigmoid_weights`.

Generating on the inference trajectory (``gen_steps`` K > 1, generator ``local`` only). The one-step
sample trains the student's prediction at t = 999 only, while the student is used with the K-step
solver; its predictions at the later timesteps change only as a side effect of shared weights. With
K > 1 each scan draws k in 0..K-1 per step, the student runs the first k steps of the K-step local
SDE-DPM-Solver++ (the inference sampler, guided with ``gen_guidance``) from x_T = x_init + z without
gradient, keyed noise for the stochastic steps, and the sample is its x_0 prediction at the k-th
timestep t_k of that solver, with gradient:

    G = x_k - sigma_{t_k} * eps_student(x_k, t_k)

(k = 0 is the one-step sample). Both samples of a ``dpo`` pair use the same k and solver noises; the
losses, auxiliary updates and preference are unchanged.

Teacher score: ``teacher_guidance: 1`` (default) evaluates the conditional teacher only, as the
published Distillation-DPO code does; a value w > 1 uses classifier-free guidance
``eps_u + w (eps_c - eps_u)`` with the all-zero-cloud condition (DMD-style "real score with CFG"),
as two passes over the same maps (on the CPU faster than ``forward_cfg``'s feature groups, and the
auxiliary net's pass reuses the maps as well).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lidar_completion import sparse
from lidar_completion.diffusion import DPMSolverSDE
from lidar_completion.errors import CheckpointError
from lidar_completion.fileutil import sha256_file
from lidar_completion.models import Condition

from . import distributed as D
from .config import RANDOM
from .engine import Trainer, freeze, make_optimizer
from .losses import aux_loss, dpo_loss, logsigmoid_weights, vsd_loss
from .netio import build_networks, export_inference, load_pretrained
from .preference import (PreferenceMetric, guided_eps, local_sample, rank_pair, sample_timesteps, spread,
                         widest_pair)

log = logging.getLogger(__name__)


def one_step_sample(student, x_init, z, batch, cond, t_T: int, sigma_T: float, alpha_T: float,
                    generator: str = "local", num_elements: int | None = None) -> torch.Tensor:
    """The student's one-step sample from x_T = x_init + z (see the module docstring)."""
    nb = num_elements if num_elements is not None else int(batch.max()) + 1
    t = torch.full((nb,), int(t_T), dtype=torch.long, device=x_init.device)
    x_T = x_init + z
    eps = student(x_T, batch, t, cond)
    if generator == "local":
        return x_T - sigma_T * eps
    return x_init + (z - sigma_T * eps) / alpha_T


@dataclass
class _Step:
    """What one distillation step's three parts share (see :meth:`DistillTrainer.train_step`)."""
    keys: list                       # the batch's sample keys (every random draw is keyed by them)
    B: int                           # scans in the batch
    counts: object                   # x_init points per scan
    xb: torch.Tensor                 # scan index of every x_init row
    n_scan: int                      # largest scan (points of the unconditional condition)
    sides: list                      # auxiliary nets: ["aux_w", "aux_l"] (dpo) or ["aux"] (vsd)
    cond: object = None              # the frozen encoder's condition of the scans
    cond_k: object = None            # ... repeated once per side
    gen_k: torch.Tensor | None = None   # gen_steps > 1: the solver steps each scan's sample starts after
    Xb: torch.Tensor | None = None   # scan index of the rows of every side's samples together
    G_all: torch.Tensor | None = None   # the one-step samples, side after side (carry the graph)
    samples: dict = field(default_factory=dict)   # side -> its samples (winner / loser for dpo)
    logs: dict = field(default_factory=dict)


class DistillTrainer(Trainer):
    kind = "distill"
    record = False   # tests set True to keep the last step's draws in ``last_record``

    def _copy_of(self, net):
        """A new denoiser with ``net``'s weights (and train/eval mode). Built and loaded rather than
        ``copy.deepcopy``-ed: MinkowskiEngine's modules do not survive deepcopy."""
        _, fresh, _ = build_networks(self.model_config, self.backend, encoder=False)
        fresh.load_state_dict(net.state_dict())
        ref = next(net.parameters())
        return fresh.to(ref.device).train(net.training)

    def build(self) -> None:
        d = self.cfg["distill"]
        self.mode = d["mode"]
        src = None if d.get("teacher") == RANDOM else d.get("teacher") or self.cfg.get("init")
        student_init = None
        key = "distill.teacher" if d.get("teacher") else "init"
        if self.resumed_without(src, key, "the teacher's weights are"):
            src = None
            enc, teacher, _ = build_networks(self.model_config, self.backend)
        elif src:
            loaded = load_pretrained(src, key=key)
            self.sources[key] = sha256_file(src)   # the export names the exact teacher file it came from
            if loaded.kind == "student":   # a published ScoreLiDAR / Distillation-DPO student file
                loaded = load_pretrained(src, include=("teacher",), key=key)
                student_init = loaded.denoiser
            if loaded.encoder is None or (loaded.denoiser is None and "teacher" not in loaded.extras):
                raise CheckpointError(f"{key}: {src}: a teacher checkpoint needs a condition encoder and "
                                      "a denoiser")
            if loaded.config != self.model_config:
                log.info("model size taken from the teacher checkpoint %s: %s", src, loaded.config.channels)
                self.model_config = loaded.config
            enc, teacher, _ = build_networks(self.model_config, self.backend)
            enc.load_state_dict(loaded.encoder.state_dict())
            teacher.load_state_dict(loaded.extras.get("teacher", loaded.denoiser).state_dict())
        else:
            if getattr(self, "_resume_state", None) is None:   # resumed, the state's teacher replaces them
                log.warning("distill.teacher=random: distilling from a randomly initialised teacher")
            enc, teacher, _ = build_networks(self.model_config, self.backend)
        # the refiner bundled into the export (and used by validation): read now, not after training
        self._refiner = None
        if d.get("refiner"):
            self._refiner = load_pretrained(d["refiner"], key="distill.refiner").refiner
            if self._refiner is None:
                raise CheckpointError(f"distill.refiner: {d['refiner']} has no refiner network")
        self.encoder = freeze(enc)
        self.teacher = freeze(teacher)
        self.student = self._copy_of(teacher)
        if student_init is not None:
            self.student.load_state_dict(student_init.state_dict())
        for p in self.student.parameters():
            p.requires_grad_(True)
        self.aux_names = ["aux_w", "aux_l"] if self.mode == "dpo" else ["aux"]
        self.aux = {}
        for n in self.aux_names:
            a = self._copy_of(teacher)
            for p in a.parameters():
                p.requires_grad_(True)
            self.aux[n] = a
        self.modules.update({"encoder": self.encoder, "teacher": self.teacher, "student": self.student})
        self.modules.update(self.aux)
        self.trainable["student"] = self.student
        self.trainable.update(self.aux)
        self.metric = PreferenceMetric.from_spec(d) if self.mode == "dpo" else None
        T = self.schedule.num_train_timesteps
        abar = float(self.schedule.alphas_cumprod[T - 1])
        self.t_T = T - 1
        self.sigma_T = float(np.sqrt(1.0 - abar))
        self.alpha_T = float(np.sqrt(abar))
        K = int(d["gen_steps"])
        self.gen_solver = DPMSolverSDE(self.schedule, K, process="local") if K > 1 else None
        self._uncond_cache: dict = {}
        self.last_record: dict = {}

    def make_optimizers(self) -> None:
        d = self.cfg["distill"]
        self.optimizers["student"] = make_optimizer(list(self.student.parameters()), self.cfg["train"]["optimizer"])
        aux_spec = d.get("aux_optimizer") or self.cfg["train"]["optimizer"]
        self.optimizers["aux"] = make_optimizer([p for a in self.aux.values() for p in a.parameters()], aux_spec)

    # -- pieces ----------------------------------------------------------------------------------
    def _aux_clip(self):
        c = self.cfg["distill"]["aux_grad_clip"]
        return self.cfg["train"]["grad_clip"] if c == "same" else c

    @torch.no_grad()
    def uncond(self, num_elements: int, num_points: int) -> Condition:
        key = (num_elements, num_points)
        if key not in self._uncond_cache:
            pts = torch.zeros(num_points * num_elements, 3, device=self.device)
            b = torch.arange(num_elements, device=self.device).repeat_interleave(num_points)
            self._uncond_cache = {key: self.encoder(pts, b)}
        return self._uncond_cache[key]

    @torch.no_grad()
    def teacher_score(self, x, xb, t, cond, n_scan_points: int) -> torch.Tensor:
        w = float(self.cfg["distill"]["teacher_guidance"])
        eps_c = self.teacher(x, xb, t, cond)
        if w == 1.0:
            return eps_c
        eps_u = self.teacher(x, xb, t, self.uncond(int(t.shape[0]), n_scan_points))
        return eps_u + w * (eps_c - eps_u)

    def generate(self, gen, x_init, z, st: "_Step", copies: int, with_grad: bool) -> torch.Tensor:
        """The student's samples of ``copies`` stacks of the batch (rows: copy after copy, elements
        ``c * B + b``; ``x_init``, ``z`` and the condition stacked alike): the one-step sample, or
        with ``gen_steps`` > 1 the x_0 prediction after each scan's ``st.gen_k`` steps of the
        inference solver (module docstring)."""
        d = self.cfg["distill"]
        B = st.B
        nb = copies * B
        Xb = torch.cat([st.xb + c * B for c in range(copies)]) if copies > 1 else st.xb
        cond = Condition.concat([st.cond] * copies) if copies > 1 else st.cond
        if self.gen_solver is None:
            with torch.set_grad_enabled(with_grad):
                return one_step_sample(gen, x_init, z, Xb, cond, self.t_T, self.sigma_T, self.alpha_T,
                                       d["generator"], num_elements=nb)
        solver = self.gen_solver
        ts = solver.timesteps.to(self.device)
        k = st.gen_k.repeat(copies)                      # (nb,) steps before the sample
        k_rows = k[Xb].view(-1, 1)
        w = float(d["gen_guidance"])
        uncond = self.uncond(nb, st.n_scan) if w != 1.0 else None
        y, prev_x0 = z.float(), None
        with torch.no_grad():
            for i in range(int(k.max())):
                tt = torch.full((nb,), int(ts[i]), dtype=torch.long, device=self.device)
                eps = guided_eps(self.student, x_init + y, Xb, tt, cond, uncond, w, nb).float()
                noise = None
                if solver.needs_noise(i):
                    noise = self.draw_noise(st.keys, st.counts, f"distill/gen/noise/{i}")
                    noise = torch.cat([noise] * copies) if copies > 1 else noise
                y_next, prev_x0 = solver.step(eps, i, y, noise=noise, prev_x0=prev_x0)
                y = torch.where(k_rows > i, y_next, y)   # a scan stops where its sample starts
        t = ts[k]
        x = (x_init + y).detach()
        with torch.set_grad_enabled(with_grad):
            eps = gen(x, Xb, t, cond)
            return x - self.sigma(t)[Xb].view(-1, 1) * eps

    # -- the step --------------------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict:
        """One optimisation step: :meth:`sample`, :meth:`update_auxiliaries`, then (after the
        auxiliary-only warm-up) :meth:`update_student`."""
        student_phase = self.step >= int(self.cfg["distill"]["aux_warmup_steps"])
        rec = {} if self.record else None
        with self.autocast():   # train.precision: the passes in bf16/fp16, samples and losses in fp32
            step = self.sample(batch, student_phase, rec)
        logs = dict(step.logs)
        logs.update(self.update_auxiliaries(step, rec))
        if student_phase:
            logs.update(self.update_student(step, rec))
        else:
            logs["loss/student"] = float("nan")
        if rec is not None:
            self.last_record = rec
        return logs

    def sample(self, batch: dict, with_grad: bool, rec: dict | None = None) -> "_Step":
        """Step 1: the one-step samples of every scan (with the student's graph when ``with_grad``),
        and for ``dpo`` the preference that makes one of each pair the winner."""
        d = self.cfg["distill"]
        dev = self.device
        B = int(batch["batch_size"])
        st = _Step(keys=self.sample_keys(batch), B=B, counts=batch["x_init_counts"],
                   xb=batch["x_init_batch"].to(dev), n_scan=max(1, int(batch["scan_counts"].max())),
                   sides=list(self.aux_names))
        x_init = batch["x_init"].to(dev)
        with torch.no_grad():
            st.cond = self.encoder(batch["scan"].to(dev), batch["scan_batch"].to(dev))
        k = len(st.sides)
        st.cond_k = Condition.concat([st.cond] * k) if k > 1 else st.cond
        st.Xb = torch.cat([st.xb + i * B for i in range(k)])

        self.set_train(self.student, True)
        gen = self.wrapped["student"] if with_grad else self.student
        if self.gen_solver is not None:
            st.gen_k = self.draw_t(st.keys, "distill/gen_k", 0, self.gen_solver.num_steps - 1)
            st.logs["gen/k"] = float(st.gen_k.float().mean())
        if k == 1:
            z = self.draw_noise(st.keys, st.counts, "distill/z")
            z2 = None
            st.G_all = self.generate(gen, x_init, z, st, 1, with_grad).float()
            self._guard_samples(st.G_all)
            st.samples = {"aux": st.G_all}
        else:
            z, z2 = self._choose_pair(st, batch, x_init)
            G1, G2 = self._pair(gen, x_init, z, z2, st, with_grad)
            st.G_all = torch.cat([G1.float(), G2.float()])
            self._guard_samples(st.G_all)
            st.samples = self._rank_pair(st, batch, rec)
            if int(d["spread_every_steps"]) and self.step % int(d["spread_every_steps"]) == 0:
                st.logs.update(self._spread(st, batch, x_init))
        if rec is not None:
            rec.update(gen_k=None if st.gen_k is None else st.gen_k.clone())
            rec.update(keys=st.keys, z=z.detach().clone(), z2=None if k == 1 else z2.detach().clone(),
                       G=st.G_all.detach().clone(),
                       side_samples={n: v.detach().clone() for n, v in st.samples.items()}, aux=[])
        return st

    def _guard_samples(self, G: torch.Tensor) -> None:
        """A diverged student generates NaN/inf points: stop every rank with the trainers' divergence
        error here, before the ranking metric or a network's voxelisation refuses them on one rank."""
        self.guard("G", G, what="the student's samples")

    # -- preference pairs (training/preference.py) -----------------------------------------------
    def _pair_noises(self, st: "_Step", c: int):
        """The noises of candidate pair ``c``: (z, z), or (z, z2) with an independent z2; the second
        sample starts from x_init + lambda times the second."""
        d = self.cfg["distill"]
        tag = "" if c == 0 else f"/{c}"
        z = self.draw_noise(st.keys, st.counts, f"distill/z{tag}")
        return z, (z if d["pair_noise"] == "scaled" else self.draw_noise(st.keys, st.counts, f"distill/z2{tag}"))

    def _pair(self, gen, x_init, z1, z2, st: "_Step", with_grad: bool):
        """The pair's two samples: the one-step sample from x_init + z1 and the second from
        x_init + z2, made in ``pair_steps`` steps with guidance ``pair_guidance`` (the plain one-step
        sample when both are 1; then both in one batched pass)."""
        d = self.cfg["distill"]
        N, B = st.xb.shape[0], st.B
        w, steps = float(d["pair_guidance"]), int(d["pair_steps"])
        z2 = float(d["noise_scale"]) * z2
        if w == 1.0 and steps == 1:
            G = self.generate(gen, torch.cat([x_init, x_init]), torch.cat([z1, z2]), st, 2, with_grad)
            return G[:N], G[N:]
        G1 = self.generate(gen, x_init, z1, st, 1, with_grad)
        uncond = self.uncond(B, st.n_scan) if w != 1.0 else None

        def denoise(x, t):
            tt = torch.full((B,), int(t), dtype=torch.long, device=x.device)
            return guided_eps(gen, x, st.xb, tt, st.cond, uncond, w, B)

        G2 = local_sample(denoise, x_init + z2, sample_timesteps(steps, self.t_T), self.sigmas,
                          grad_last=with_grad)
        return G1, G2

    def _choose_pair(self, st: "_Step", batch: dict, x_init):
        """The starts (z1, z2) of each scan's pair: with ``pairs_per_scan`` K > 1 the candidate pair
        with the widest metric margin (candidates sampled without gradient), else the only one."""
        K = int(self.cfg["distill"]["pairs_per_scan"])
        cands = [self._pair_noises(st, c) for c in range(K)]
        if K == 1:
            return cands[0]
        m = np.zeros((2, K, st.B))
        for c, (z1, z2) in enumerate(cands):
            G1, G2 = self._pair(self.student, x_init, z1, z2, st, False)
            m[0, c] = self.metric.per_scan(G1, st.xb, batch, st.B)
            m[1, c] = self.metric.per_scan(G2, st.xb, batch, st.B)
        pick = widest_pair(m[0], m[1])                        # (B,) candidate per scan
        rows = torch.as_tensor(pick, device=self.device)[st.xb].view(-1, 1)
        z1 = torch.stack([c[0] for c in cands])               # (K, N, 3)
        z2 = torch.stack([c[1] for c in cands])
        idx = rows.view(1, -1, 1).expand(1, -1, 3)
        st.logs["metric/candidate_margin"] = float(np.abs(m[0] - m[1]).mean())
        return z1.gather(0, idx)[0], z2.gather(0, idx)[0]

    def _spread(self, st: "_Step", batch: dict, x_init) -> dict:
        """The metric's spread over ``spread_samples`` independent one-step samples of every scan
        (no gradient), and the pair's margin relative to it (``metric/margin_over_spread``)."""
        d = self.cfg["distill"]
        S, B = int(d["spread_samples"]), st.B
        zs = [self.draw_noise(st.keys, st.counts, f"distill/spread/{j}") for j in range(S)]
        G = self.generate(self.student, torch.cat([x_init] * S), torch.cat(zs), st, S, False)
        N = st.xb.shape[0]
        vals = np.stack([self.metric.per_scan(G[j * N:(j + 1) * N], st.xb, batch, B) for j in range(S)])
        absdiff, std = spread(vals)
        sums = D.all_reduce_sum_nograd(torch.tensor([absdiff.sum(), std.sum()], dtype=torch.float64,
                                                    device=self.device)).cpu()
        n = float(D.all_reduce_sum_nograd(torch.tensor([float(B)], dtype=torch.float64, device=self.device)))
        out = {"metric/spread": float(sums[0]) / n, "metric/spread_std": float(sums[1]) / n}
        out["metric/margin_over_spread"] = st.logs["metric/margin"] / max(out["metric/spread"], 1e-12)
        return out

    def _rank_pair(self, st: "_Step", batch: dict, rec: dict | None) -> dict:
        """Winner and loser of each scan's pair by the preference metric (logs the margins)."""
        N = st.xb.shape[0]
        G1, G2 = st.G_all[:N], st.G_all[N:]
        cell = float(self.cfg["distill"]["pair_regions"])
        m1 = m2 = None
        if cell <= 0 or rec is not None:   # with regions the whole-scan metrics only go into the record
            m1 = self.metric.per_scan(G1, st.xb, batch, st.B)
            m2 = self.metric.per_scan(G2, st.xb, batch, st.B)
        ranked = rank_pair(self.metric, G1, G2, m1, m2, st.xb, batch, st.B, cell)
        st.logs.update(ranked.logs)
        if rec is not None:
            rec.update(m1=m1, m2=m2, first=ranked.first.copy(), mw=ranked.mw, ml=ranked.ml,
                       first_rows=ranked.first_rows)
        G_w, G_l = ranked.x_w, ranked.x_l
        return {"aux_w": G_w, "aux_l": G_l}

    def update_auxiliaries(self, st: "_Step", rec: dict | None = None) -> dict:
        """Step 2: each auxiliary net takes ``aux_updates_per_step`` denoising steps on the detached
        samples of its own side, ``x = sg(G_side) + sigma_t' eps'`` with fresh (t', eps') - one draw per
        side, or one for both sides with ``aux_shared_draws``."""
        d = self.cfg["distill"]
        kind, reg = d["aux_loss"], float(self.cfg["diffusion"]["reg_weight"])
        for k in range(int(d["aux_updates_per_step"])):
            for name in st.sides:
                self.set_train(self.aux[name], True)
            losses, draws, total = {}, {}, 0.0
            for name in st.sides:
                # shared draws: both sides are noised alike (both samples have the same rows per scan)
                key = "aux" if d["aux_shared_draws"] else name
                t_a = self.draw_t(st.keys, f"distill/{key}/t/{k}", int(d["t_min"]), int(d["t_max"]))
                eps_a = self.draw_noise(st.keys, st.counts, f"distill/{key}/eps/{k}")
                x_a = st.samples[name].detach() + self.sigma(t_a)[st.xb].view(-1, 1) * eps_a
                with self.autocast():
                    pred = self.wrapped[name](x_a, st.xb, t_a, st.cond)
                losses[name] = aux_loss(pred.float(), eps_a, kind, reg)
                total = total + losses[name]
                draws[name] = (t_a, eps_a)
            self.guard("aux", total)
            self.optimizers["aux"].zero_grad(set_to_none=True)
            self.backward(total, "aux")
            gn = self.clip_and_step("aux", self._aux_clip())
            if rec is not None:
                rec["aux"].append({n: (t.clone(), e.clone()) for n, (t, e) in draws.items()})
        logs = {f"loss/{name}": float(losses[name].detach()) for name in st.sides}
        logs["grad_norm/aux"] = gn
        return logs

    def update_student(self, st: "_Step", rec: dict | None = None) -> dict:
        """Step 3: the student descends the stop-gradient score-distillation loss, with one (t, eps)
        per scan shared by every side and the auxiliary nets as updated in step 2."""
        d = self.cfg["distill"]
        t = self.draw_t(st.keys, "distill/t", int(d["t_min"]), int(d["t_max"]))
        eps = self.draw_noise(st.keys, st.counts, "distill/eps")
        sig = self.sigma(t)[st.xb].view(-1, 1)
        for name in st.sides:
            self.aux[name].eval()
        diff = {}
        for name in st.sides:
            # the teacher (both guidance passes) and this side's auxiliary net see the same points:
            # one voxelisation and one set of kernel maps for the three passes
            with torch.no_grad(), self.autocast(), sparse.shared_maps():
                x = st.samples[name].detach() + sig * eps
                eps_T = self.teacher_score(x, st.xb, t, st.cond, st.n_scan).float()
                diff[name] = eps_T - self.aux[name](x, st.xb, t, st.cond).float()
        logs = {}
        if self.mode == "dpo":
            d_w, d_l, G_w, G_l = diff["aux_w"], diff["aux_l"], st.samples["aux_w"], st.samples["aux_l"]
            row_w = None
            if d["weighting"] == "logsigmoid":
                counts = torch.as_tensor(st.counts, device=self.device, dtype=torch.float32)
                div_w = torch.zeros(st.B, device=self.device).index_add_(0, st.xb, (d_w ** 2).sum(1)) / counts
                div_l = torch.zeros(st.B, device=self.device).index_add_(0, st.xb, (d_l ** 2).sum(1)) / counts
                wts = logsigmoid_weights(div_w, div_l, float(d["dpo_beta"]))
                row_w = wts[st.xb]
                logs["dpo/weight"] = float(wts.mean())
            loss = dpo_loss(d_w, G_w, d_l, G_l, row_w)
            alpha = float(d["vsd_weight"])
            if alpha:
                loss = loss + alpha * 0.5 * (vsd_loss(d_w, G_w) + vsd_loss(d_l, G_l))
            logs["score_diff/winner"] = float(d_w.abs().mean())
            logs["score_diff/loser"] = float(d_l.abs().mean())
        else:
            loss = vsd_loss(diff["aux"], st.G_all)
            logs["score_diff"] = float(diff["aux"].abs().mean())
        self.guard("student", loss)
        self.optimizers["student"].zero_grad(set_to_none=True)
        self.backward(loss, "student")
        logs["grad_norm/student"] = self.clip_and_step("student", self.cfg["train"]["grad_clip"])
        logs["loss/student"] = logs["loss"] = float(loss.detach())
        if rec is not None:
            rec.update(t=t.clone(), eps=eps.clone())
        return logs

    # -- rendering / export ----------------------------------------------------------------------
    @torch.no_grad()
    def render(self, batch: dict) -> dict | None:
        dev = self.device
        s0 = batch["scan_batch"] == 0
        x0 = batch["x_init_batch"] == 0
        scan = batch["scan"][s0].to(dev)
        x_init = batch["x_init"][x0].to(dev)
        zb = torch.zeros(len(x_init), dtype=torch.long, device=dev)
        cond = self.encoder(scan, torch.zeros(len(scan), dtype=torch.long, device=dev))
        z = self.draw_noise([tuple(batch["key"][0].tolist())], [len(x_init)], "distill/z")
        self.student.eval()
        G = one_step_sample(self.student, x_init, z, zb, cond, self.t_T, self.sigma_T, self.alpha_T,
                            self.cfg["distill"]["generator"], num_elements=1)
        self.set_train(self.student, True)
        return {"scan": scan.cpu().numpy(), "student, one step": G.cpu().numpy(),
                "target": batch["target"][batch["target_batch"] == 0].numpy()}

    def validation_predictor(self, guidance: float):
        """The student at ``validation.steps`` steps, refined with ``distill.refiner``."""
        from .validation import completer_predictor
        return completer_predictor(self.encoder, self.student, self._refiner, self.cfg, guidance, self.device)

    def export(self, path: Path):
        dc = self.cfg["data"]
        return export_inference(path, self.model_config, "student", encoder=self.encoder, denoiser=self.student,
                                refiner=self._refiner, sampling={"steps": 8, "guidance": 3.5, "process": "local",
                                                           "n_fps": int(dc["scan_points"]), "tile": int(dc["tile"])},
                                meta={"trained_by": f"training.distill ({self.mode})", "step": self.step,
                                      "teacher_sha256": self.sources.get("distill.teacher",
                                                                         self.sources.get("init")),
                                      "config": self.cfg})
