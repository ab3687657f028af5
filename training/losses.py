"""Losses of the three trainers, written so that DDP on N ranks equals one process on the union batch.

Every loss is a function of *sums* over the batch (sum of squared errors, sum and sum of squares of
the prediction, per-sample Chamfer terms ...). The sums are added over ranks with a differentiable
all-reduce (:func:`training.distributed.all_reduce_sum`); with DDP's gradient averaging that gives the
exact gradient of the loss of the global batch, including LiDiff's non-separable mean/std regulariser.
Single-process runs skip the all-reduce.

Distillation losses (docs/method.md, "Distillation"; the stop-gradient form). For a one-step student
sample ``G`` (which carries the student's graph), a timestep ``t`` and noise ``eps``:

    x_t = sg(G) + sigma_t * eps
    d   = eps_teacher(x_t) - eps_aux(x_t)          (evaluated without gradient)
    vsd: L = mean(sg(d) * G)
    dpo: L = mean(sg(d_w) * G_w) - mean(sg(d_l) * G_l)

so dL/dG = d / numel: the variational-score-distillation gradient reaches the student. The published
code multiplies by ``x_t - G = sigma_t eps`` instead of ``G``, which has no path to the student
(identically zero gradient); that defect is deliberately not reproduced.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import cKDTree

from lidar_completion.diffusion.losses import REG_WEIGHT, loss_from_sums, loss_sums

from . import distributed as D


# ---------------------------------------------------------------------------------------------
# denoising losses
def denoising_loss_terms(eps_hat: torch.Tensor, eps: torch.Tensor, reg_weight: float = REG_WEIGHT) -> dict:
    """The core's LiDiff loss (:mod:`lidar_completion.diffusion.losses`) over the *global* batch:
    its sums are added over ranks before the loss is formed from them."""
    terms = loss_from_sums(D.all_reduce_sum(loss_sums(eps_hat, eps)), reg_weight)
    return {k: v.float() for k, v in terms.items()}


def mse_loss_global(eps_hat: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Plain MSE over the global batch (the published auxiliary loss)."""
    s = D.all_reduce_sum(loss_sums(eps_hat, eps))
    return (s[0] / s[3].detach()).float()


def aux_loss(eps_hat: torch.Tensor, eps: torch.Tensor, kind: str, reg_weight: float = REG_WEIGHT) -> torch.Tensor:
    if kind == "mse":
        return mse_loss_global(eps_hat, eps)
    return denoising_loss_terms(eps_hat, eps, reg_weight)["loss"]


def global_mean(local_sum: torch.Tensor, local_count: float) -> torch.Tensor:
    """(sum over ranks of local_sum) / (sum over ranks of local_count), differentiable in local_sum."""
    s = torch.stack([local_sum.double(), torch.tensor(float(local_count), dtype=torch.float64,
                                                      device=local_sum.device)])
    s = D.all_reduce_sum(s)
    return (s[0] / s[1].detach()).float()


# ---------------------------------------------------------------------------------------------
# Chamfer distance
def nn_indices(query: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Index into ``ref`` of every ``query`` point's nearest neighbour (scipy cKDTree)."""
    tree = cKDTree(ref)
    _, idx = tree.query(query, k=1, workers=-1)
    return idx


def chamfer_terms(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared nearest-neighbour distances pred->target (N,) and target->pred (M,), differentiable
    in both clouds (indices from a KD-tree on detached CPU copies, distances in torch)."""
    p = pred.detach().float().cpu().numpy()
    q = target.detach().float().cpu().numpy()
    i_pq = torch.from_numpy(nn_indices(p, q)).to(pred.device)
    i_qp = torch.from_numpy(nn_indices(q, p)).to(pred.device)
    d_pq = ((pred - target.index_select(0, i_pq)) ** 2).sum(1)
    d_qp = ((target - pred.index_select(0, i_qp)) ** 2).sum(1)
    return d_pq, d_qp


def chamfer_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "chamfer_l2sq") -> torch.Tensor:
    """Differentiable Chamfer loss of one sample.

    ``chamfer_l2sq``: mean squared NN distance both ways, summed (what the published refiner trains
    with, pytorch3d's default). ``chamfer_l1``: 0.5 * (mean NN distance both ways), the CD metric
    (``lidar_completion.metrics.chamfer_distance``), differentiable."""
    d_pq, d_qp = chamfer_terms(pred, target)
    if kind == "chamfer_l2sq":
        return d_pq.mean() + d_qp.mean()
    if kind == "chamfer_l1":
        return 0.5 * (torch.sqrt(d_pq.clamp_min(1e-12)).mean() + torch.sqrt(d_qp.clamp_min(1e-12)).mean())
    raise ValueError(f"unknown chamfer loss {kind!r}")


# ---------------------------------------------------------------------------------------------
# distillation
def score_distillation_sum(d: torch.Tensor, G: torch.Tensor, row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """sum(sg(d) * G) (times a per-row weight): the local numerator of the stop-gradient loss."""
    prod = d.detach() * G
    if row_weight is not None:
        prod = prod * row_weight.detach().view(-1, 1)
    return prod.sum()


def vsd_loss(d: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """mean(sg(eps_teacher - eps_aux) * G) over the global batch."""
    return global_mean(score_distillation_sum(d, G), G.numel())


def dpo_loss(d_w: torch.Tensor, G_w: torch.Tensor, d_l: torch.Tensor, G_l: torch.Tensor,
             row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """mean(sg(d_w) * G_w) - mean(sg(d_l) * G_l) over the global batch (optionally weighted per row)."""
    s = score_distillation_sum(d_w, G_w, row_weight) - score_distillation_sum(d_l, G_l, row_weight)
    return global_mean(s, G_w.numel())


def logsigmoid_weights(div_w: torch.Tensor, div_l: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-sample weights of the ``logsigmoid`` option: 2 * sigmoid(beta * (D_w - D_l)), detached.

    D_side is the per-sample mean of |eps_teacher - eps_aux_side|^2: how far the student's winner
    (loser) distribution is from the teacher. The weight is the derivative of
    ``-log sigmoid(-beta (D_w - D_l))`` (Diffusion-DPO's loss on the divergence margin), normalised
    to 1 at zero margin, with the divergences' own gradients replaced by their score-distillation
    surrogates. Pairs that already favour the winner (D_w << D_l) get little weight; pairs the student
    gets wrong get up to 2."""
    return (2.0 * torch.sigmoid(beta * (div_w - div_l))).detach()
