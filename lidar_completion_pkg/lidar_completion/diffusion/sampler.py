"""SDE-DPM-Solver++ (multistep, data prediction) of order 2 for epsilon-predicting models.

It reproduces, without depending on it, the diffusers ``DPMSolverMultistepScheduler`` configured as
LiDiff uses it (docs/method.md, "Sampling"): ``algorithm_type="sde-dpmsolver++"``, ``solver_order=2``,
``lower_order_final=True``, ``timestep_spacing="linspace"``, ``prediction_type="epsilon"``, linear
betas 3.5e-5..0.007, and the diffusers defaults ``final_sigmas_type="zero"`` (the last step goes to
sigma = 0 and therefore returns the model's clean-sample prediction), no Karras / exponential / beta /
Lu sigmas, no thresholding, ``lambda_min_clipped=-inf``.

In VP notation alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t), lambda_t = log(alpha_t /
sigma_t), h = lambda_next - lambda_cur. From the model output eps at the current step the solver forms
the data prediction x0 = (y - sigma_cur eps) / alpha_cur and moves to

    first order:  y' = (sigma_next / sigma_cur) e^-h y + alpha_next (1 - e^-2h) x0
                       + sigma_next sqrt(1 - e^-2h) z
    second order: the same with x0 replaced by D0 + D1 / 2, D0 = x0, D1 = (x0 - x0_prev) / r,
                  r = (lambda_cur - lambda_prev) / h   (the "midpoint" form)

The first step is first order (no history yet) and so is the last (lower-order final step; with the
final sigma equal to zero it is forced, as in diffusers).

Unlike the diffusers object, the solver holds no per-run state: :meth:`DPMSolverSDE.step` receives
the previous data prediction explicitly and returns the new one. One solver object may therefore be
shared by any number of scans (or threads) without leaking history from one scan into the next.

LiDiff runs the solver on offsets from the initial cloud: ``y = x - x_init`` with ``y_T ~ N(0, I)``,
and the model is evaluated at ``x_init + y``. :func:`sample` implements that loop.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
import torch

from ..constants import PROCESSES  # "vp" (published) or "local" (see the module docstring)
from ..errors import ConfigError
from .schedule import NoiseSchedule

__all__ = ["DPMSolverSDE", "PROCESSES", "StepOutput", "linspace_timesteps", "sample"]



def linspace_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """diffusers' "linspace" spacing: ``round(linspace(0, T-1, n+1))`` reversed, without the final 0.

    ``np.round`` rounds halves to even (499.5 -> 500), which is what the published schedule uses;
    for 8 steps this gives 999, 874, 749, 624, 500, 375, 250, 125.
    """
    if int(num_steps) != num_steps or num_steps < 1:
        raise ConfigError(f"the number of solver steps must be a positive integer, got {num_steps!r}")
    if num_steps > num_train_timesteps:
        raise ConfigError(f"at most {num_train_timesteps} solver steps are possible, got {num_steps}")
    grid = np.linspace(0, num_train_timesteps - 1, int(num_steps) + 1).round()
    return grid[::-1][:-1].astype(np.int64).copy()


class StepOutput(NamedTuple):
    prev_sample: torch.Tensor           # the sample at the next (less noisy) timestep
    pred_original_sample: torch.Tensor  # the data prediction x0 of this step (history for the next)


class _Coefficients(NamedTuple):
    order: int
    alpha_cur: float
    sigma_cur: float
    c_sample: float   # multiplies the current sample
    c_x0: float       # multiplies D0 = x0
    c_d1: float       # multiplies (x0 - x0_prev); 0 for first-order steps
    c_noise: float    # multiplies the injected standard normal noise


class DPMSolverSDE:
    """Stateless SDE-DPM-Solver++ (order 1 or 2) over ``num_steps`` linspace-spaced timesteps.

    >>> solver = DPMSolverSDE(NoiseSchedule(), num_steps=8)
    >>> solver.timesteps.tolist()
    [999, 874, 749, 624, 500, 375, 250, 125]
    """

    def __init__(self, schedule: NoiseSchedule | None = None, num_steps: int = 8, order: int = 2,
                 process: str = "vp"):
        if order not in (1, 2):
            raise ConfigError(f"solver order must be 1 or 2, got {order!r}")
        if process not in PROCESSES:
            raise ConfigError(f"solver process must be one of {', '.join(PROCESSES)}, got {process!r}")
        self.schedule = schedule or NoiseSchedule()
        self.order = int(order)
        self.process = process
        ts = linspace_timesteps(num_steps, self.schedule.num_train_timesteps)
        self.timesteps = torch.from_numpy(ts)
        self.num_steps = len(ts)
        # float32 tables, like the published sampler; the arithmetic below is float64
        abar = self.schedule.alphas_cumprod_in(torch.float32).double().numpy()[ts]
        if process == "local":   # x_t = x_0 + sigma_t eps: alpha_t = 1 at every t
            alphas = [1.0] * (len(abar) + 1)
        else:
            alphas = [math.sqrt(a) for a in abar] + [1.0]      # final: sigma = 0, alpha = 1
        sigmas = [math.sqrt(1.0 - a) for a in abar] + [0.0]
        lambdas = [math.log(a) - math.log(s) for a, s in zip(alphas[:-1], sigmas[:-1])] + [math.inf]
        self._coef = []
        for i in range(self.num_steps):
            a_c, s_c, a_n, s_n = alphas[i], sigmas[i], alphas[i + 1], sigmas[i + 1]
            if s_n == 0.0:   # final step to sigma = 0: e^-h = 0, returns the data prediction
                self._coef.append(_Coefficients(1, a_c, s_c, 0.0, a_n, 0.0, 0.0))
                continue
            h = lambdas[i + 1] - lambdas[i]
            e_h = math.exp(-h)
            one_m = -math.expm1(-2.0 * h)          # 1 - e^-2h, accurately for small h
            c_sample = s_n / s_c * e_h
            c_x0 = a_n * one_m
            c_noise = s_n * math.sqrt(one_m)
            step_order = 1 if (self.order == 1 or i == 0) else 2
            c_d1 = 0.0
            if step_order == 2:
                r = (lambdas[i] - lambdas[i - 1]) / h
                c_d1 = 0.5 * c_x0 / r
            self._coef.append(_Coefficients(step_order, a_c, s_c, c_sample, c_x0, c_d1, c_noise))

    def __repr__(self) -> str:
        return (f"DPMSolverSDE(num_steps={self.num_steps}, order={self.order}, process={self.process!r}, "
                f"timesteps={self.timesteps.tolist()})")

    def __len__(self) -> int:
        return self.num_steps

    def step_order(self, index: int) -> int:
        """1 or 2: the order used at step ``index`` (first and last steps are first order)."""
        return self._coef[index].order

    def needs_noise(self, index: int) -> bool:
        """False for the final step to sigma = 0, whose noise coefficient is zero."""
        return self._coef[index].c_noise != 0.0

    def predict_x0(self, model_output: torch.Tensor, index: int, sample: torch.Tensor) -> torch.Tensor:
        """Data prediction from an epsilon prediction at step ``index``."""
        c = self._coef[index]
        return (sample - c.sigma_cur * model_output) / c.alpha_cur

    def step(self, model_output: torch.Tensor, index: int, sample: torch.Tensor,
             noise: torch.Tensor | None = None, prev_x0: torch.Tensor | None = None) -> StepOutput:
        """One solver step from ``timesteps[index]`` to the next timestep (or to 0 after the last).

        ``model_output`` is the predicted noise at ``sample``; ``noise`` a standard normal tensor of the
        sample's shape (required unless :meth:`needs_noise` is False); ``prev_x0`` the
        ``pred_original_sample`` of the previous step (required for second-order steps).
        """
        if not 0 <= index < self.num_steps:
            raise IndexError(f"step index {index} outside 0..{self.num_steps - 1}")
        if model_output.shape != sample.shape:
            raise ValueError(f"model output shape {tuple(model_output.shape)} differs from the sample "
                             f"shape {tuple(sample.shape)}")
        c = self._coef[index]
        sample = sample.float()
        x0 = self.predict_x0(model_output.float(), index, sample)
        out = c.c_x0 * x0
        if c.c_sample != 0.0:
            out = out + c.c_sample * sample
        if c.order == 2:
            if prev_x0 is None:
                raise ValueError(f"step {index} is second order and needs prev_x0 (the "
                                 "pred_original_sample of the previous step)")
            out = out + c.c_d1 * (x0 - prev_x0)
        if c.c_noise != 0.0:
            if noise is None:
                raise ValueError(f"step {index} is stochastic and needs a standard normal `noise`")
            out = out + c.c_noise * noise.to(dtype=out.dtype)
        return StepOutput(out, x0)


def sample(denoise: Callable[[torch.Tensor, int], torch.Tensor], x_init: torch.Tensor,
           solver: DPMSolverSDE, generator: torch.Generator | None = None, *,
           initial_noise: torch.Tensor | None = None,
           callback: Callable[[int, int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run the solver on offsets from ``x_init`` and return the final points ``x_init + y_0``.

    ``denoise(x, t)`` gets the current absolute points (same shape as ``x_init``) and the integer
    timestep and returns the (guided) noise prediction. Noise is drawn from ``generator`` (on
    ``x_init``'s device): first ``y_T`` (unless ``initial_noise`` is given), then one draw per
    stochastic step. ``callback(index, t, x)`` is called after each step with the new points.
    Every piece of solver history lives in this call.
    """
    x_init = x_init.float()
    if initial_noise is None:
        y = torch.randn(x_init.shape, generator=generator, device=x_init.device, dtype=x_init.dtype)
    else:
        if initial_noise.shape != x_init.shape:
            raise ValueError(f"initial_noise shape {tuple(initial_noise.shape)} differs from x_init "
                             f"{tuple(x_init.shape)}")
        y = initial_noise.to(device=x_init.device, dtype=x_init.dtype)
    prev_x0 = None
    for i, t in enumerate(solver.timesteps.tolist()):
        eps = denoise(x_init + y, t)
        z = None
        if solver.needs_noise(i):
            z = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
        y, prev_x0 = solver.step(eps, i, y, noise=z, prev_x0=prev_x0)
        if callback is not None:
            callback(i, t, x_init + y)
    return x_init + y
