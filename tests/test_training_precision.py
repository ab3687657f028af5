"""train.precision in the distillation and the teacher's DPO stage: the network passes run under
autocast (their outputs are in the reduced dtype), the samples, losses and master weights stay fp32,
fp16 keeps one loss scaler per optimiser, and the reduced-precision step moves the weights the way the
fp32 step does (the same draws; the cosine of the two updates is close to one).

The scenes are small (1,200 target points) to keep the four cases near 30 s."""
from __future__ import annotations

import copy

import pytest
import torch

from test_training_utils import scenes_source, tiny_config
from training.data import make_loader
from training.distill import DistillTrainer
from training.teacher_dpo import TeacherDPOTrainer

DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _update(before: torch.nn.Module, after: torch.nn.Module) -> torch.Tensor:
    b, a = before.state_dict(), after.state_dict()
    return torch.cat([(a[k].float() - b[k].float()).flatten() for k in b if b[k].is_floating_point()])


def _step(kind: str, precision: str, tmp_path, spy_dtypes: list | None = None):
    torch.manual_seed(0)
    if kind == "distill":
        cfg = tiny_config("distill", "train.batch_size=2", "distill.aux_warmup_steps=0", "train.grad_clip=null",
                          "train.optimizer={name: sgd, lr: 0.5}", "distill.aux_optimizer={name: sgd, lr: 0.05}",
                          "distill.vsd_weight=0", f"train.precision={precision}", mode="dpo")
        tr = DistillTrainer(cfg, tmp_path, source=scenes_source(2, n_target=1200, n_scan=120))
        nets = {"student": tr.student, "aux_w": tr.aux["aux_w"], "aux_l": tr.aux["aux_l"]}
    else:
        cfg = tiny_config("teacher-dpo", "train.batch_size=2", "train.optimizer={name: sgd, lr: 1e-3}",
                          "teacher_dpo.beta=1000.0", f"train.precision={precision}")
        tr = TeacherDPOTrainer(cfg, tmp_path, source=scenes_source(2, n_target=1200, n_scan=120))
        nets = {"teacher": tr.net.denoiser}
    if precision == "fp16":   # a GradScaler skips its first steps while its scale (2^16) overflows
        tr.scalers = {k: torch.amp.GradScaler("cpu", init_scale=64.0) for k in tr.scalers}   # fp16: start low
    before = {n: copy.deepcopy(m) for n, m in nets.items()}
    hooks = [m.register_forward_hook(lambda mod, i, o: spy_dtypes.append(o.dtype))
             for m in nets.values()] if spy_dtypes is not None else []
    tr.sampler.set_epoch(0, 0)
    batch = next(iter(make_loader(tr.dataset, tr.sampler, 0)))
    try:
        logs = tr.train_step(batch)
    finally:
        for h in hooks:
            h.remove()
    return tr, logs, {n: _update(before[n], m) for n, m in nets.items()}, nets


_FP32: dict = {}


def _fp32_update(kind: str, tmp_path) -> dict:
    """The fp32 step's updates, once per kind for the module (the same seeds make the same step)."""
    if kind not in _FP32:
        _FP32[kind] = _step(kind, "fp32", tmp_path)[2]
    return _FP32[kind]


@pytest.mark.parametrize("kind", ["distill", "teacher-dpo"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_step_follows_the_fp32_step(kind, precision, tmp_path):
    seen = []
    tr, logs, upd, nets = _step(kind, precision, tmp_path / precision, seen)
    upd32 = _fp32_update(kind, tmp_path / "fp32")
    assert seen and set(seen) == {DTYPE[precision]}
    assert torch.isfinite(torch.tensor(logs["loss"])), logs
    for name, m in nets.items():
        assert all(p.dtype == torch.float32 for p in m.parameters()), name
        assert upd[name].abs().max() > 0, f"{name} did not move"
        cos = torch.nn.functional.cosine_similarity(upd[name], upd32[name], dim=0)
        # The student's update is weighted by the score differences eps_teacher - eps_aux of nets
        # that are near copies at step 0: each score's bf16 error (about 1 %) is not small against
        # them, so its cosine is lower (0.76 here); two unrelated directions in this many weights
        # would give a cosine near 0.
        assert cos > (0.5 if name == "student" else 0.95), (name, float(cos))
    if precision == "fp16":
        assert set(tr.scalers) == set(tr.optimizers)
        assert all(sc.get_scale() == 64.0 for sc in tr.scalers.values())   # no step was skipped
