"""Noise schedule and the local forward process of LiDiff ("local point denoising").

docs/method.md, "Noise schedule and forward process": linear betas from 3.5e-5 to 0.007 over
T = 1000 steps, and a forward process that adds noise around the clean points without shrinking them:

    x_t = x_0 + sqrt(1 - alpha_bar_t) * eps

The tables are kept in float64 (as the published training code does) and cast to the dtype of the
tensors they are applied to.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError

__all__ = ["NoiseSchedule", "q_sample"]


@dataclass(frozen=True)
class NoiseSchedule:
    """Linear beta schedule. ``alphas_cumprod[t]`` is alpha_bar_t for integer t in 0..T-1."""

    beta_start: float = 3.5e-5
    beta_end: float = 0.007
    num_train_timesteps: int = 1000
    betas: torch.Tensor = field(init=False, repr=False, compare=False)
    alphas_cumprod: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if int(self.num_train_timesteps) < 2:
            raise ConfigError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if not (0.0 < self.beta_start <= self.beta_end < 1.0):
            raise ConfigError("betas must satisfy 0 < beta_start <= beta_end < 1, got "
                              f"beta_start={self.beta_start}, beta_end={self.beta_end}")
        betas = torch.linspace(self.beta_start, self.beta_end, int(self.num_train_timesteps),
                               dtype=torch.float64)
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", torch.cumprod(1.0 - betas, dim=0))

    @property
    def alphas(self) -> torch.Tensor:
        return 1.0 - self.betas

    def alphas_cumprod_in(self, dtype: torch.dtype) -> torch.Tensor:
        """alpha_bar computed entirely in ``dtype`` (betas, then the cumulative product).

        The published sampler (diffusers) builds its tables in float32; the solver uses
        ``alphas_cumprod_in(torch.float32)`` to follow it exactly (the float64 table differs by at
        most 2e-7).
        """
        betas = torch.linspace(self.beta_start, self.beta_end, int(self.num_train_timesteps), dtype=dtype)
        return torch.cumprod(1.0 - betas, dim=0)

    def alpha_bar(self, t) -> torch.Tensor:
        """alpha_bar_t (float64) for an int or an integer tensor of timesteps."""
        return self.alphas_cumprod[self._index(t)]

    def noise_std(self, t) -> torch.Tensor:
        """sqrt(1 - alpha_bar_t): the standard deviation of the forward-process noise (float64)."""
        return torch.sqrt(1.0 - self.alpha_bar(t))

    def _index(self, t) -> torch.Tensor:
        idx = torch.as_tensor(t).to(device="cpu", dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_train_timesteps):
            raise ConfigError(f"timesteps must lie in 0..{self.num_train_timesteps - 1}, got "
                              f"min {int(idx.min())}, max {int(idx.max())}")
        return idx

    def q_sample(self, x0: torch.Tensor, t, noise: torch.Tensor,
                 batch: torch.Tensor | None = None) -> torch.Tensor:
        """Noise clean points: ``x_0 + sqrt(1 - alpha_bar_t) * noise``.

        ``t`` is an int (one timestep for everything) or a LongTensor of shape (B,), one timestep per
        batch element. Points are either dense, ``x0`` of shape (B, N, 3), or packed, ``x0`` of shape
        (N, 3) with ``batch`` (N,) giving each row's element index in 0..B-1.
        """
        if noise.shape != x0.shape:
            raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
        std = self.noise_std(t).to(device=x0.device, dtype=x0.dtype)
        if std.ndim == 0:
            return x0 + std * noise
        if std.ndim != 1:
            raise ValueError(f"t must be an int or a 1-D tensor (B,), got shape {tuple(std.shape)}")
        if batch is not None:
            if batch.shape[0] != x0.shape[0]:
                raise ValueError(f"batch must have one entry per row of x0 ({x0.shape[0]}), got "
                                 f"{batch.shape[0]}")
            per_row = std[batch.to(device=x0.device, dtype=torch.long)]
            return x0 + per_row.view(-1, *([1] * (x0.ndim - 1))) * noise
        if x0.shape[0] != std.shape[0]:
            raise ValueError(f"dense x0 needs one timestep per element: x0 has {x0.shape[0]} elements, "
                             f"t has {std.shape[0]}; pass `batch` for packed points")
        return x0 + std.view(-1, *([1] * (x0.ndim - 1))) * noise


def q_sample(x0: torch.Tensor, t, noise: torch.Tensor, batch: torch.Tensor | None = None,
             schedule: NoiseSchedule | None = None) -> torch.Tensor:
    """Functional form of :meth:`NoiseSchedule.q_sample` (default LiDiff schedule)."""
    return (schedule or _default_schedule()).q_sample(x0, t, noise, batch=batch)


_DEFAULT: list = []


def _default_schedule() -> NoiseSchedule:
    if not _DEFAULT:
        _DEFAULT.append(NoiseSchedule())
    return _DEFAULT[0]
