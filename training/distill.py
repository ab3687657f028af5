"""Distillation of a one-step student from the teacher: score distillation (``vsd``, the ScoreLiDAR
baseline) and Distillation-DPO (``dpo``), both in the stop-gradient form of METHOD.md §4.

Networks: the condition encoder and the teacher denoiser come from a teacher checkpoint (ours or a
published LiDiff / Distillation-DPO file) and stay frozen in eval mode. The student and the auxiliary
("fake score") denoisers start as copies of the teacher. ``dpo`` has two auxiliary networks (winner
and loser), ``vsd`` one.

One-step generation (training only, without guidance). For a scan with tiled input ``x_init`` and
noise ``z``, ``x_T = x_init + z`` (the sampler's start, METHOD.md §3) and the student's prediction
at t = T-1 = 999 gives the sample

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
3. ``dpo``: score both against the target with the preference metric (Chamfer distance by default;
   any callable ``(pred, target) -> float`` on numpy arrays, named by dotted path in the config),
   the better is the winner ``G_w``, the other the loser ``G_l`` (ties: the z sample wins);
4. auxiliary update(s): each auxiliary net takes a denoising step on its own side's samples,
   ``x = sg(G_side) + sigma_t' eps'`` with fresh (t', eps') per side, loss = LiDiff's denoising loss
   (``aux_loss: lidiff``) or plain MSE (``mse``, as published);
5. student update: one (t, eps) per scan shared by both sides, ``x_side = sg(G_side) + sigma_t eps``,
   ``d_side = eps_teacher(x_side) - eps_aux_side(x_side)`` without gradient, using the auxiliary nets
   *after* their update of this step (at step 1 they equal the teacher, so the order matters), and

       vsd: L = mean(sg(d) * G)
       dpo: L = mean(sg(d_w) * G_w) - mean(sg(d_l) * G_l)

   optionally with the per-scan ``logsigmoid`` weight of :func:`training.losses.logsigmoid_weights`.

Teacher score: ``teacher_guidance: 1`` (default) evaluates the conditional teacher only, as the
published Distillation-DPO code does; a value w > 1 uses classifier-free guidance
``eps_u + w (eps_c - eps_u)`` with the all-zero-cloud condition (DMD-style "real score with CFG").
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from lidar_completion.errors import CheckpointError
from lidar_completion.models import Condition

from . import distributed as D
from .config import resolve_callable
from .engine import Trainer, freeze, make_optimizer
from .losses import aux_loss, dpo_loss, logsigmoid_weights, vsd_loss
from .netio import build_networks, export_inference, load_pretrained

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
        src = d.get("teacher") or self.cfg.get("init")
        student_init = None
        if src:
            loaded = load_pretrained(src)
            if loaded.kind == "student":   # a published ScoreLiDAR / Distillation-DPO student file
                loaded = load_pretrained(src, include=("teacher",))
                student_init = loaded.denoiser
            if loaded.encoder is None or (loaded.denoiser is None and "teacher" not in loaded.extras):
                raise CheckpointError(f"{src}: a teacher checkpoint needs a condition encoder and a denoiser")
            if loaded.config != self.model_config:
                log.info("model size taken from the teacher checkpoint %s: %s", src, loaded.config.channels)
                self.model_config = loaded.config
            enc, teacher, _ = build_networks(self.model_config, self.backend)
            enc.load_state_dict(loaded.encoder.state_dict())
            teacher.load_state_dict(loaded.extras.get("teacher", loaded.denoiser).state_dict())
        else:
            log.warning("distill.teacher is not set: distilling from a randomly initialised teacher")
            enc, teacher, _ = build_networks(self.model_config, self.backend)
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
        self.metric = resolve_callable(d["metric"]) if self.mode == "dpo" else None
        T = self.schedule.num_train_timesteps
        abar = float(self.schedule.alphas_cumprod[T - 1])
        self.t_T = T - 1
        self.sigma_T = float(np.sqrt(1.0 - abar))
        self.alpha_T = float(np.sqrt(abar))
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

    def preference(self, G1, G2, xb, target, tb, B):
        """Per-scan metric of both samples and the winner mask (True: the z sample won)."""
        lower = bool(self.cfg["distill"]["metric_lower_is_better"])
        g1, g2 = G1.detach().float().cpu().numpy(), G2.detach().float().cpu().numpy()
        xb_np, tb_np, tg = xb.cpu().numpy(), tb.cpu().numpy(), target.cpu().numpy()
        m1, m2 = np.zeros(B), np.zeros(B)
        for b in range(B):
            tgt = tg[tb_np == b]
            m1[b] = float(self.metric(g1[xb_np == b], tgt))
            m2[b] = float(self.metric(g2[xb_np == b], tgt))
        first = (m1 <= m2) if lower else (m1 >= m2)
        return m1, m2, first

    # -- the step --------------------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict:
        d = self.cfg["distill"]
        dev = self.device
        keys = self.sample_keys(batch)
        B = int(batch["batch_size"])
        scan, scan_b = batch["scan"].to(dev), batch["scan_batch"].to(dev)
        x_init, xb = batch["x_init"].to(dev), batch["x_init_batch"].to(dev)
        counts = batch["x_init_counts"]
        N = x_init.shape[0]
        t_min, t_max = int(d["t_min"]), int(d["t_max"])
        student_phase = self.step >= int(d["aux_warmup_steps"])
        rec = {} if self.record else None

        with torch.no_grad():
            cond = self.encoder(scan, scan_b)
        sides = 2 if self.mode == "dpo" else 1
        cond_k = Condition.concat([cond] * sides) if sides > 1 else cond

        # 1. one-step samples (with the student's graph when the student trains this step)
        z = self.draw_noise(keys, counts, "distill/z")
        if sides == 2:
            lam = float(d["noise_scale"])
            X0 = torch.cat([x_init, x_init])
            z2 = z if d.get("pair_noise", "scaled") == "scaled" else self.draw_noise(keys, counts, "distill/z2")
            Z = torch.cat([z, lam * z2])
            Xb = torch.cat([xb, xb + B])
        else:
            X0, Z, Xb = x_init, z, xb
        self.set_train(self.student, True)
        gen = self.wrapped["student"] if student_phase else self.student
        with torch.set_grad_enabled(student_phase):
            G_all = one_step_sample(gen, X0, Z, Xb, cond_k, self.t_T, self.sigma_T, self.alpha_T,
                                    d["generator"], num_elements=sides * B)
        logs: dict = {}
        if sides == 2:
            G1, G2 = G_all[:N], G_all[N:]
            m1, m2, first = self.preference(G1, G2, xb, batch["target"], batch["target_batch"], B)
            first_t = torch.as_tensor(first, device=dev)
            rows = first_t[xb].view(-1, 1)
            G_w = torch.where(rows, G1, G2)
            G_l = torch.where(rows, G2, G1)
            mw, ml = np.where(first, m1, m2), np.where(first, m2, m1)
            stats = D.all_reduce_sum_nograd(torch.tensor(
                [mw.sum(), ml.sum(), np.abs(ml - mw).sum(), float((~first).sum()), float(B)], dtype=torch.float64,
                device=dev)).cpu()
            n = float(stats[4])
            logs.update({"metric/winner": float(stats[0]) / n, "metric/loser": float(stats[1]) / n,
                         "metric/margin": float(stats[2]) / n, "metric/switch": float(stats[3]) / n})
            side_samples = {"aux_w": G_w, "aux_l": G_l}
            if rec is not None:
                rec.update(m1=m1, m2=m2, first=first.copy())
        else:
            side_samples = {"aux": G_all}
        if rec is not None:
            rec.update(keys=keys, z=z.detach().clone(), z2=None if sides == 1 else z2.detach().clone(),
                       G=G_all.detach().clone(),
                       side_samples={k: v.detach().clone() for k, v in side_samples.items()}, aux=[])

        # 2. auxiliary update(s) on the detached samples of their own side
        kind = d["aux_loss"]
        reg = float(self.cfg["diffusion"]["reg_weight"])
        for k in range(int(d["aux_updates_per_step"])):
            total = 0.0
            for name in self.aux_names:
                self.set_train(self.aux[name], True)
            losses = {}
            draws = {}
            for name in self.aux_names:
                t_a = self.draw_t(keys, f"distill/{name}/t/{k}", t_min, t_max)
                eps_a = self.draw_noise(keys, counts, f"distill/{name}/eps/{k}")
                x_a = side_samples[name].detach() + self.sigma(t_a)[xb].view(-1, 1) * eps_a
                pred = self.wrapped[name](x_a, xb, t_a, cond)
                losses[name] = aux_loss(pred, eps_a, kind, reg)
                total = total + losses[name]
                draws[name] = (t_a, eps_a)
            self.guard("aux", total)
            self.optimizers["aux"].zero_grad(set_to_none=True)
            total.backward()
            gn = self.clip_and_step("aux", self._aux_clip())
            if rec is not None:
                rec["aux"].append({n: (t.clone(), e.clone()) for n, (t, e) in draws.items()})
        for name in self.aux_names:
            logs[f"loss/{name}"] = float(losses[name].detach())
        logs["grad_norm/aux"] = gn

        if not student_phase:
            logs["loss/student"] = float("nan")
            if rec is not None:
                self.last_record = rec
            return logs

        # 3. student update through the stop-gradient score-distillation loss
        t = self.draw_t(keys, "distill/t", t_min, t_max)
        eps = self.draw_noise(keys, counts, "distill/eps")
        sig = self.sigma(t)[xb].view(-1, 1)
        for name in self.aux_names:
            self.aux[name].eval()
        n_scan = max(1, int(batch["scan_counts"].max()))
        with torch.no_grad():
            if sides == 2:
                x_w = G_w.detach() + sig * eps
                x_l = G_l.detach() + sig * eps
                eps_T = self.teacher_score(torch.cat([x_w, x_l]), Xb, torch.cat([t, t]), cond_k, n_scan)
                d_w = eps_T[:N] - self.aux["aux_w"](x_w, xb, t, cond)
                d_l = eps_T[N:] - self.aux["aux_l"](x_l, xb, t, cond)
            else:
                x_s = G_all.detach() + sig * eps
                d_s = self.teacher_score(x_s, xb, t, cond, n_scan) - self.aux["aux"](x_s, xb, t, cond)
        if sides == 2:
            row_w = None
            if d["weighting"] == "logsigmoid":
                div_w = torch.zeros(B, device=dev).index_add_(0, xb, (d_w ** 2).sum(1)) / torch.as_tensor(
                    counts, device=dev, dtype=torch.float32)
                div_l = torch.zeros(B, device=dev).index_add_(0, xb, (d_l ** 2).sum(1)) / torch.as_tensor(
                    counts, device=dev, dtype=torch.float32)
                wts = logsigmoid_weights(div_w, div_l, float(d["dpo_beta"]))
                row_w = wts[xb]
                logs["dpo/weight"] = float(wts.mean())
            loss = dpo_loss(d_w, G_w, d_l, G_l, row_w)
            alpha = float(d["vsd_weight"])
            if alpha:
                loss = loss + alpha * 0.5 * (vsd_loss(d_w, G_w) + vsd_loss(d_l, G_l))
            logs["score_diff/winner"] = float(d_w.abs().mean())
            logs["score_diff/loser"] = float(d_l.abs().mean())
        else:
            loss = vsd_loss(d_s, G_all)
            logs["score_diff"] = float(d_s.abs().mean())
        self.guard("student", loss)
        self.optimizers["student"].zero_grad(set_to_none=True)
        loss.backward()
        logs["grad_norm/student"] = self.clip_and_step("student", self.cfg["train"]["grad_clip"])
        logs["loss/student"] = float(loss.detach())
        logs["loss"] = float(loss.detach())
        if rec is not None:
            rec.update(t=t.clone(), eps=eps.clone())
            self.last_record = rec
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

    def export(self, path: Path):
        refiner = None
        ref_src = self.cfg["distill"].get("refiner")
        if ref_src:
            refiner = load_pretrained(ref_src).refiner
        dc = self.cfg["data"]
        return export_inference(path, self.model_config, "student", encoder=self.encoder, denoiser=self.student,
                                refiner=refiner, sampling={"steps": 8, "guidance": 3.5, "process": "local",
                                                           "n_fps": int(dc["scan_points"]), "tile": int(dc["tile"])},
                                meta={"trained_by": f"training.distill ({self.mode})", "step": self.step,
                                      "config": self.cfg})
