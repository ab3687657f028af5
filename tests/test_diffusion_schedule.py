"""Noise schedule, local forward process and the LiDiff loss (docs/method.md, "Diffusion")."""
import math
import statistics

import pytest
import torch

from lidar_completion.diffusion import (NoiseSchedule, diffusion_loss, diffusion_loss_terms,
                                        q_sample)
from lidar_completion.errors import ConfigError


def test_alpha_bar_at_999_matches_published_value():
    s = NoiseSchedule()
    assert s.num_train_timesteps == 1000
    assert float(s.betas[0]) == pytest.approx(3.5e-5)
    assert float(s.betas[-1]) == pytest.approx(0.007)
    assert float(s.alpha_bar(999)) == pytest.approx(0.02943, abs=1e-4)
    assert float(s.noise_std(999)) == pytest.approx(0.985, abs=1e-3)   # sigma_T in metres
    # the float32 table (used by the solver, as diffusers builds it) agrees to 2e-7
    assert torch.allclose(s.alphas_cumprod_in(torch.float32).double(), s.alphas_cumprod, atol=3e-7)
    # hand recomputation of the product
    prod = 1.0
    for i in range(1000):
        prod *= 1.0 - (3.5e-5 + (0.007 - 3.5e-5) * i / 999)
    assert float(s.alpha_bar(999)) == pytest.approx(prod, rel=1e-9)


def test_schedule_rejects_bad_configuration_and_timesteps():
    with pytest.raises(ConfigError):
        NoiseSchedule(beta_start=0.01, beta_end=0.001)
    with pytest.raises(ConfigError):
        NoiseSchedule(num_train_timesteps=1)
    with pytest.raises(ConfigError, match="0..999"):
        NoiseSchedule().alpha_bar(1000)
    with pytest.raises(ConfigError):
        NoiseSchedule().alpha_bar(torch.tensor([-1, 3]))


def test_q_sample_is_local_and_does_not_shrink():
    s = NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 50, 3, generator=g) * 20
    eps = torch.randn(2, 50, 3, generator=g)
    t = torch.tensor([10, 999])
    xt = s.q_sample(x0, t, eps)
    for b in range(2):
        std = math.sqrt(1.0 - float(s.alphas_cumprod[t[b]]))
        assert torch.allclose(xt[b], x0[b] + std * eps[b], atol=1e-5)
    # packed form (N, 3) + batch index gives the same rows
    batch = torch.tensor([0] * 50 + [1] * 50)
    packed = s.q_sample(x0.reshape(-1, 3), t, eps.reshape(-1, 3), batch=batch)
    assert torch.allclose(packed, xt.reshape(-1, 3), atol=1e-6)
    # a single int timestep, functional form
    assert torch.allclose(q_sample(x0, 500, eps), x0 + s.noise_std(500).float() * eps)
    with pytest.raises(ValueError, match="shape"):
        s.q_sample(x0, t, eps[:, :10])
    with pytest.raises(ValueError, match="one timestep per element"):
        s.q_sample(x0, torch.tensor([1, 2, 3]), eps)


def test_loss_equals_hand_computation():
    eps_hat = torch.tensor([[0.5, -1.0, 2.0], [0.0, 1.5, -0.5]])
    eps = torch.tensor([[0.0, -1.0, 1.0], [1.0, 1.0, 0.0]])
    flat_hat = [0.5, -1.0, 2.0, 0.0, 1.5, -0.5]
    flat = [0.0, -1.0, 1.0, 1.0, 1.0, 0.0]
    mse = sum((a - b) ** 2 for a, b in zip(flat_hat, flat)) / 6
    mean = sum(flat_hat) / 6
    std = statistics.stdev(flat_hat)           # unbiased, like torch.std
    expected = mse + 5.0 * (mean ** 2 + (std - 1.0) ** 2)
    assert float(diffusion_loss(eps_hat, eps)) == pytest.approx(expected, rel=1e-6)
    terms = diffusion_loss_terms(eps_hat, eps)
    assert float(terms["mse"]) == pytest.approx(mse, rel=1e-6)
    assert float(terms["mean"]) == pytest.approx(mean ** 2, rel=1e-6)
    assert float(terms["std"]) == pytest.approx((std - 1.0) ** 2, rel=1e-6)
    assert float(diffusion_loss(eps_hat, eps, reg_weight=0.0)) == pytest.approx(mse, rel=1e-6)


def test_loss_has_gradient_and_checks_shapes():
    eps_hat = torch.randn(4, 30, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    eps = torch.randn(4, 30, 3, generator=torch.Generator().manual_seed(2))
    diffusion_loss(eps_hat, eps).backward()
    assert eps_hat.grad is not None and float(eps_hat.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="same shape"):
        diffusion_loss(eps_hat, eps[:, :5])
