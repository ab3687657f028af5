"""The LiDiff denoising loss (METHOD.md §3).

    L = MSE(eps_hat, eps) + reg_weight * (mean(eps_hat)^2 + (std(eps_hat) - 1)^2)

with mean and (unbiased) standard deviation taken over every element of the whole batch, and
reg_weight = 5 as published.
"""
from __future__ import annotations

import torch

__all__ = ["diffusion_loss", "diffusion_loss_terms", "REG_WEIGHT"]

REG_WEIGHT = 5.0


def diffusion_loss_terms(eps_hat: torch.Tensor, eps: torch.Tensor,
                         reg_weight: float = REG_WEIGHT) -> dict:
    """The loss and its parts: ``{"loss", "mse", "mean", "std"}`` (``mean``/``std`` are the squared
    penalty terms, before weighting)."""
    if eps_hat.shape != eps.shape:
        raise ValueError(f"eps_hat and eps must have the same shape, got {tuple(eps_hat.shape)} "
                         f"and {tuple(eps.shape)}")
    if eps_hat.numel() < 2:
        raise ValueError(f"the loss needs at least 2 elements (for the std term), got {eps_hat.numel()}")
    mse = torch.mean((eps_hat - eps) ** 2)
    mean_term = eps_hat.mean() ** 2
    std_term = (eps_hat.std() - 1.0) ** 2
    loss = mse + reg_weight * (mean_term + std_term)
    return {"loss": loss, "mse": mse, "mean": mean_term, "std": std_term}


def diffusion_loss(eps_hat: torch.Tensor, eps: torch.Tensor, reg_weight: float = REG_WEIGHT) -> torch.Tensor:
    """Scalar LiDiff loss of predicted noise ``eps_hat`` against the true noise ``eps``."""
    return diffusion_loss_terms(eps_hat, eps, reg_weight)["loss"]
