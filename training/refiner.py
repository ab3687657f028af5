"""Refiner training (docs/method.md, "Networks"): jittered dense points in, 6 points per input point out
(input + tanh offsets within +-1 m, the input point itself dropped), Chamfer loss to the dense target.

The input is the dense ground truth subsampled and jittered with N(0, 0.2^2) clipped at +-0.3 m
(see :class:`training.sources.RefinerView`); the loss is per sample and averaged over the global batch:
``chamfer_l2sq`` (mean squared nearest-neighbour distance both ways, summed; what the published
refiner trains with) or ``chamfer_l1`` (the CD metric, 0.5 x mean Euclidean both ways).
Nearest neighbours come from a KD-tree on detached CPU copies (scipy), distances are recomputed in
torch, so the loss is differentiable in the refiner's offsets.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .engine import Trainer
from .losses import chamfer_loss, global_mean
from .netio import build_networks, export_inference, load_init


class RefinerTrainer(Trainer):
    kind = "refiner"

    def build(self) -> None:
        _, _, ref = build_networks(self.model_config, self.backend, refiner=True, encoder=False, denoiser=False)
        if self.cfg.get("init"):
            load_init(self.cfg["init"], refiner=ref)
        self.net = ref
        self.modules["refiner"] = ref
        self.trainable["refiner"] = ref

    def upsample(self, model, inp, inp_b):
        up = self.model_config.refine_up
        off = model(inp, inp_b).view(inp.shape[0], up, 3)
        out = (inp[:, None, :] + off).reshape(-1, 3)
        return out, inp_b.repeat_interleave(up)

    def train_step(self, batch: dict) -> dict:
        dev = self.device
        inp = batch["input"].to(dev)
        inp_b = batch["input_batch"].to(dev)
        tgt = batch["target"].to(dev)
        tgt_b = batch["target_batch"].to(dev)
        self.set_train(self.net, True)
        with self.autocast():
            out, out_b = self.upsample(self.wrapped["refiner"], inp, inp_b)
        out = out.float()
        kind = self.cfg["refiner"]["loss"]
        per_sample = [chamfer_loss(out[out_b == b], tgt[tgt_b == b], kind) for b in range(batch["batch_size"])]
        loss = global_mean(torch.stack(per_sample).sum(), len(per_sample))
        self.guard("loss", loss)
        opt = self.optimizers["main"]
        opt.zero_grad(set_to_none=True)
        self.backward(loss)
        gnorm = self.clip_and_step("main", self.cfg["train"]["grad_clip"])
        return {"loss": float(loss.detach()), "grad_norm": gnorm}

    @torch.no_grad()
    def render(self, batch: dict) -> dict | None:
        dev = self.device
        m = batch["input_batch"] == 0
        inp = batch["input"][m].to(dev)
        self.net.eval()
        out, _ = self.upsample(self.net, inp, torch.zeros(len(inp), dtype=torch.long, device=dev))
        self.set_train(self.net, True)
        return {"jittered input": inp.cpu().numpy(), "refined (x6)": out.cpu().numpy(),
                "target": batch["target"][batch["target_batch"] == 0].numpy()}

    def validation_predictor(self, guidance: float):
        from .validation import refiner_predictor
        return refiner_predictor(self.net, self.cfg, self.device)

    def export(self, path: Path):
        return export_inference(path, self.model_config, "refiner", refiner=self.net,
                                meta={"trained_by": "training.refiner", "step": self.step, "config": self.cfg})
