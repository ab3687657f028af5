"""The LiDiff denoising loss (docs/method.md, "Diffusion").

    L = MSE(eps_hat, eps) + reg_weight * (mean(eps_hat)^2 + (std(eps_hat) - 1)^2)

with mean and (unbiased) standard deviation taken over every element of the whole batch, and
reg_weight = 5 as published. The loss is a function of four sums over the batch
(:func:`loss_sums`): squared errors, the predictions, their squares and the element count. The
trainers add those sums over processes before :func:`loss_from_sums`, so that N processes compute
the loss of their union batch, the non-separable mean/std regulariser included.
"""
from __future__ import annotations

import torch

__all__ = ["diffusion_loss", "diffusion_loss_terms", "loss_sums", "loss_from_sums", "REG_WEIGHT"]

REG_WEIGHT = 5.0


def loss_sums(eps_hat: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """float64 ``[sum (eps_hat - eps)^2, sum eps_hat, sum eps_hat^2, count]`` (differentiable in
    ``eps_hat``); raises ValueError when the shapes differ."""
    if eps_hat.shape != eps.shape:
        raise ValueError(f"eps_hat and eps must have the same shape, got {tuple(eps_hat.shape)} "
                         f"and {tuple(eps.shape)}")
    e = eps_hat.double()
    count = torch.tensor(float(e.numel()), dtype=torch.float64, device=e.device)
    return torch.stack([((e - eps.double()) ** 2).sum(), e.sum(), (e ** 2).sum(), count])


def loss_from_sums(sums: torch.Tensor, reg_weight: float = REG_WEIGHT) -> dict:
    """The loss and its parts from :func:`loss_sums` (possibly added over processes):
    ``{"loss", "mse", "mean", "std"}`` (``mean``/``std`` are the squared penalty terms, before
    weighting), float64."""
    se, s1, s2, n = sums[0], sums[1], sums[2], sums[3].detach()
    if float(n) < 2:
        raise ValueError(f"the loss needs at least 2 elements (for the std term), got {int(n)}")
    mse = se / n
    mean = s1 / n
    var = (s2 - s1 * s1 / n) / (n - 1.0)
    std = torch.sqrt(torch.clamp(var, min=1e-30))
    mean_term = mean ** 2
    std_term = (std - 1.0) ** 2
    loss = mse + reg_weight * (mean_term + std_term)
    return {"loss": loss, "mse": mse, "mean": mean_term, "std": std_term}


def diffusion_loss_terms(eps_hat: torch.Tensor, eps: torch.Tensor,
                         reg_weight: float = REG_WEIGHT) -> dict:
    """The loss and its parts over one batch, in ``eps_hat``'s dtype (see :func:`loss_from_sums`)."""
    terms = loss_from_sums(loss_sums(eps_hat, eps), reg_weight)
    return {k: v.to(eps_hat.dtype) for k, v in terms.items()}


def diffusion_loss(eps_hat: torch.Tensor, eps: torch.Tensor, reg_weight: float = REG_WEIGHT) -> torch.Tensor:
    """Scalar LiDiff loss of predicted noise ``eps_hat`` against the true noise ``eps``."""
    return diffusion_loss_terms(eps_hat, eps, reg_weight)["loss"]
