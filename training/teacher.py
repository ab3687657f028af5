"""Teacher training: LiDiff's denoising objective with condition dropout (docs/method.md, "Diffusion").

For each sample: t ~ U{0..T-1}, eps ~ N(0, I) over the target points, x_t = x_0 + sqrt(1 - abar_t) eps
(the local forward process), loss = MSE(eps_hat, eps) + 5 (mean(eps_hat)^2 + (std(eps_hat) - 1)^2)
over the global batch. With probability ``teacher.cond_dropout`` (0.1) a sample's condition is the
encoding of an all-zero cloud (its scan points all moved to the origin), which trains the
unconditional branch used by classifier-free guidance. The published code drops the condition for the
whole batch at once (and never with batch size 1); we draw it per sample, so batch size 1 per GPU
still trains the unconditional branch. The condition encoder trains jointly with the denoiser.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lidar_completion.errors import CheckpointError

from . import rng as R
from .engine import Trainer
from .losses import denoising_loss_terms
from .netio import build_networks, export_inference, load_init, load_pretrained


class TeacherNet(nn.Module):
    """Condition encoder + denoiser as one module (one DDP wrapper, one forward per step)."""

    def __init__(self, encoder: nn.Module, denoiser: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.denoiser = denoiser

    def forward(self, scan, scan_batch, x_t, x_batch, t, all_dropped: bool = False):
        if all_dropped:
            # every condition of this batch is the all-zero cloud: a single voxel, on which batch norm
            # cannot compute training statistics; encode it with the running statistics, as at inference
            bns = [m for m in self.encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            modes = [m.training for m in bns]
            for m in bns:
                m.eval()
            try:
                cond = self.encoder(scan, scan_batch)
            finally:
                for m, mode in zip(bns, modes):
                    m.train(mode)
        else:
            cond = self.encoder(scan, scan_batch)
        return self.denoiser(x_t, x_batch, t, cond)


class TeacherTrainer(Trainer):
    kind = "teacher"
    trained_by = "training.teacher"

    def build(self) -> None:
        enc, den, _ = build_networks(self.model_config, self.backend, refiner=False)
        if self.cfg.get("init"):
            load_init(self.cfg["init"], encoder=enc, denoiser=den)
        self.net = TeacherNet(enc, den)
        self.modules["teacher"] = self.net
        self.trainable["teacher"] = self.net
        self.load_validation_refiner()

    def load_validation_refiner(self) -> None:
        """``validation.refiner``, read at start as the config's other files are: a missing file, or
        one without a refiner, found at the first validation cost the steps since the last checkpoint."""
        v = self.cfg["validation"]
        self._val_refiner = None
        if int(v["every_steps"]) > 0 and v.get("refiner") and v.get("refine", True):
            self._val_refiner = load_pretrained(v["refiner"], key="validation.refiner").refiner
            if self._val_refiner is None:
                raise CheckpointError(f"validation.refiner: {v['refiner']} has no refiner network (a "
                                      "teacher's or student's export has none: give the refiner's, e.g. "
                                      "<refiner run>/refiner.pt)")

    def train_step(self, batch: dict) -> dict:
        dev = self.device
        keys = self.sample_keys(batch)
        scan = batch["scan"].to(dev)
        scan_b = batch["scan_batch"].to(dev)
        x0 = batch["target"].to(dev)
        x_b = batch["target_batch"].to(dev)
        t = self.draw_t(keys, "teacher/t")
        eps = self.draw_noise(keys, batch["target_counts"], "teacher/eps")
        x_t = x0 + self.sigma(t)[x_b].view(-1, 1) * eps
        p = float(self.cfg["teacher"]["cond_dropout"])
        drop = torch.tensor([R.uniform(self.seed, e, q, "teacher/drop") < p for e, q in keys],
                            dtype=torch.bool, device=dev)
        if bool(drop.any()):
            scan = torch.where(drop[scan_b].view(-1, 1), torch.zeros_like(scan), scan)
        model = self.wrapped["teacher"]
        self.set_train(self.net, True)
        with self.autocast():
            eps_hat = model(scan, scan_b, x_t, x_b, t, all_dropped=bool(drop.all()))
        terms = denoising_loss_terms(eps_hat.float(), eps, float(self.cfg["diffusion"]["reg_weight"]))
        self.guard("loss", terms["loss"])
        opt = self.optimizers["main"]
        opt.zero_grad(set_to_none=True)
        self.backward(terms["loss"])
        gnorm = self.clip_and_step("main", self.cfg["train"]["grad_clip"])
        terms = {k: v.detach() for k, v in terms.items()}
        return {"loss": float(terms["loss"]), "loss/mse": float(terms["mse"]), "loss/mean": float(terms["mean"]),
                "loss/std": float(terms["std"]), "grad_norm": gnorm, "cond_dropped": float(drop.float().mean())}

    @torch.no_grad()
    def render(self, batch: dict) -> dict | None:
        """One-step x0 estimate of the first sample at t = 500 next to its target and scan."""
        dev = self.device
        m0 = batch["target_batch"] == 0
        s0 = batch["scan_batch"] == 0
        x0 = batch["target"][m0].to(dev)
        scan = batch["scan"][s0].to(dev)
        t = torch.tensor([500], device=dev)
        eps = torch.randn(x0.shape, generator=R.generator(self.seed, self.step, "render")).to(dev)
        x_t = x0 + self.sigma(t) * eps
        self.net.eval()
        zb = torch.zeros(len(x0), dtype=torch.long, device=dev)
        eps_hat = self.net(scan, torch.zeros(len(scan), dtype=torch.long, device=dev), x_t, zb, t)
        self.set_train(self.net, True)
        est = x_t - self.sigma(t) * eps_hat
        return {"scan": scan.cpu().numpy(), "x_t (t=500)": x_t.cpu().numpy(),
                "estimate of x_0": est.cpu().numpy(), "target": x0.cpu().numpy()}

    def validation_predictor(self, guidance: float):
        from .validation import completer_predictor
        return completer_predictor(self.net.encoder, self.net.denoiser, self._val_refiner, self.cfg,
                                   guidance, self.device)

    def export(self, path: Path):
        d = self.cfg["data"]
        return export_inference(path, self.model_config, "teacher", encoder=self.net.encoder,
                                denoiser=self.net.denoiser, sampling={"steps": 50, "guidance": 6.0,
                                                                      "process": "local",
                                                                      "n_fps": int(d["scan_points"]),
                                                                      "tile": int(d["tile"])},
                                meta={"trained_by": self.trained_by, "step": self.step,
                                      "config": self.cfg})
