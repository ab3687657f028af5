"""Diffusion process of LiDiff: schedule and local forward process, loss, sampler, guidance."""
from .guidance import cfg_combine, guided_noise, stack_conditions  # noqa: F401
from .losses import REG_WEIGHT, diffusion_loss, diffusion_loss_terms  # noqa: F401
from .sampler import DPMSolverSDE, StepOutput, linspace_timesteps, sample  # noqa: F401
from .schedule import NoiseSchedule, q_sample  # noqa: F401

__all__ = ["NoiseSchedule", "q_sample", "diffusion_loss", "diffusion_loss_terms", "REG_WEIGHT",
           "DPMSolverSDE", "StepOutput", "linspace_timesteps", "sample", "cfg_combine", "guided_noise",
           "stack_conditions"]
