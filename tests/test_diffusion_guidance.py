"""Classifier-free guidance: one batched cond+uncond call, w = 1 / w = 0 limits."""
import pytest
import torch
from torch import nn

from lidar_completion.diffusion import cfg_combine, guided_noise, stack_conditions
from lidar_completion.models import Condition, ConditionEncoder, Denoiser, ModelConfig


class BatchDenoiser(nn.Module):
    """Fake denoiser without forward_cfg: depends on points, t and its batch element's condition."""

    def __init__(self):
        super().__init__()
        self.batch_sizes = []

    def forward(self, points, batch, t, cond):
        self.batch_sizes.append(int(t.shape[0]))
        feat = torch.zeros(int(batch.max()) + 1, cond.feats.shape[1])
        feat.index_add_(0, cond.coords[:, 0], cond.feats)
        return torch.tanh(0.1 * points) + feat[batch] * (t[batch].float()[:, None] / 1000.0)


def _conds():
    cond = Condition(torch.tensor([[0, 0, 0, 0], [0, 16, 0, 0]]), torch.tensor([[1.0, 2, 3], [0.5, 0, 1]]))
    uncond = Condition(torch.tensor([[0, 0, 0, 0]]), torch.tensor([[-1.0, 0, 0.5]]))
    return cond, uncond


def test_cfg_combine_limits():
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(1000, 3, generator=g), torch.randn(1000, 3, generator=g)
    assert torch.allclose(cfg_combine(c, u, 1.0), c, atol=1e-6)    # u + (c - u): rounding only
    assert torch.equal(cfg_combine(c, u, 0.0), u)
    assert torch.allclose(cfg_combine(c, u, 3.5), u + 3.5 * (c - u))


def test_stack_conditions_relabels_the_unconditional_element():
    cond, uncond = _conds()
    both = stack_conditions(cond, uncond)
    assert isinstance(both, Condition)
    assert both.coords[:, 0].tolist() == [0, 0, 1]
    assert torch.equal(both.feats[2], uncond.feats[0])


@pytest.mark.parametrize("w", [0.0, 1.0, 3.5, 6.0])
def test_batched_guidance_equals_sequential_passes(w):
    den = BatchDenoiser()
    cond, uncond = _conds()
    pts = torch.randn(200, 3, generator=torch.Generator().manual_seed(0)) * 10
    zero = torch.zeros(200, dtype=torch.long)
    t = torch.tensor([624])
    eps_c, eps_u = den(pts, zero, t, cond), den(pts, zero, t, uncond)
    den.batch_sizes.clear()
    out = guided_noise(den, pts, 624, cond, uncond, w, shortcut=False)
    assert den.batch_sizes == [2]                 # one call, cond and uncond batched
    assert torch.allclose(out, eps_u + w * (eps_c - eps_u), atol=1e-6)
    if w == 1.0:
        assert torch.allclose(out, eps_c, atol=1e-6)
    if w == 0.0:
        assert torch.allclose(out, eps_u, atol=1e-6)


def test_shortcuts_run_a_single_pass():
    den = BatchDenoiser()
    cond, uncond = _conds()
    pts = torch.randn(50, 3, generator=torch.Generator().manual_seed(2))
    zero = torch.zeros(50, dtype=torch.long)
    t = torch.tensor([10])
    assert torch.equal(guided_noise(den, pts, 10, cond, uncond, 1.0), den(pts, zero, t, cond))
    assert torch.equal(guided_noise(den, pts, 10, cond, uncond, 0.0), den(pts, zero, t, uncond))
    assert torch.equal(guided_noise(den, pts, 10, cond, None, 3.5), den(pts, zero, t, cond))
    assert den.batch_sizes == [1] * 6


def calibrate_batchnorm(module, *inputs):
    """Set every BatchNorm's running statistics to those of one batch, then eval().

    Freshly initialised networks (running mean 0, var 1) shrink activations layer by layer until
    the output no longer depends on the condition or t; calibrated ones behave like trained ones."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 1.0
    module.train()
    with torch.no_grad():
        out = module(*inputs)
    module.eval()
    return out


def test_guidance_limits_with_the_real_networks(backend):
    torch.manual_seed(0)
    cfg = ModelConfig.tiny()
    enc, den = ConditionEncoder(cfg, backend=backend), Denoiser(cfg, backend=backend)
    g = torch.Generator().manual_seed(1)
    scan = torch.randn(300, 3, generator=g) * torch.tensor([8.0, 8.0, 1.0])
    noisy = scan + torch.randn(300, 3, generator=g)
    zero = torch.zeros(300, dtype=torch.long)
    t = torch.tensor([500])
    calibrate_batchnorm(den, noisy, zero, t, calibrate_batchnorm(enc, scan, zero))
    with torch.no_grad():
        cond, uncond = enc(scan, zero), enc(torch.zeros(300, 3), zero)
        eps_c, eps_u = den(noisy, zero, t, cond), den(noisy, zero, t, uncond)
        gap = float((eps_c - eps_u).abs().max())
        assert gap > 1e-2
        w1 = guided_noise(den, noisy, 500, cond, uncond, 1.0, shortcut=False)
        w0 = guided_noise(den, noisy, 500, cond, uncond, 0.0, shortcut=False)
        w6 = guided_noise(den, noisy, 500, cond, uncond, 6.0, shortcut=False)
    tol = max(1e-6, 0.02 * gap)
    assert torch.allclose(w1, eps_c, atol=tol, rtol=0)
    assert torch.allclose(w0, eps_u, atol=tol, rtol=0)
    assert torch.allclose(w6, eps_u + 6.0 * (eps_c - eps_u), atol=6 * tol, rtol=0)
