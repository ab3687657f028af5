"""Classifier-free guidance: ``eps = eps_u + w (eps_c - eps_u)`` (docs/method.md, "Classifier-free guidance").

:func:`guided_noise` is the single place where a denoiser is evaluated with guidance during sampling.
The conditional and unconditional predictions come from ONE denoiser call: the denoiser's own
``forward_cfg(points, batch, t, cond, uncond)`` when it has one (the networks share voxelisation and
kernel maps between the two passes there), otherwise a batch of two elements (element 0 conditioned on
the scan, element 1 on the unconditional condition).
"""
from __future__ import annotations

import torch

__all__ = ["cfg_combine", "guided_noise", "stack_conditions"]


def cfg_combine(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """``eps_u + w (eps_c - eps_u)``: w = 1 gives the conditional, w = 0 the unconditional prediction."""
    return eps_uncond + guidance * (eps_cond - eps_uncond)


def stack_conditions(cond, uncond):
    """One two-element condition: ``cond``'s cells as element 0, ``uncond``'s as element 1.

    Conditions are ``(coords (M, 4) with the batch index in column 0, feats (M, C))`` named tuples;
    both inputs are single-element (index 0).
    """
    u_coords = uncond.coords.clone()
    u_coords[:, 0] = 1
    return type(cond)(torch.cat([cond.coords, u_coords]), torch.cat([cond.feats, uncond.feats]))


def _t_tensor(t, device) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.long, device=device).view(-1)[:1]


def guided_noise(denoiser, points: torch.Tensor, t, cond, uncond, guidance: float,
                 shortcut: bool = True) -> torch.Tensor:
    """Guided noise prediction (N, 3) for the noisy points ``points`` (N, 3) of one scan at step ``t``.

    ``cond`` is the scan's condition, ``uncond`` the condition of an all-zero cloud. With
    ``shortcut`` (the default) w = 1 runs only the conditional pass and w = 0 only the unconditional
    one, which gives the same result as the guided formula at half the cost.
    """
    device = points.device
    t1 = _t_tensor(t, device)
    batch = torch.zeros(points.shape[0], dtype=torch.long, device=device)
    if uncond is None or (shortcut and guidance == 1.0):
        return denoiser(points, batch, t1, cond)
    if shortcut and guidance == 0.0:
        return denoiser(points, batch, t1, uncond)
    forward_cfg = getattr(denoiser, "forward_cfg", None)
    if forward_cfg is not None:
        eps_c, eps_u = forward_cfg(points, batch, t1, cond, uncond)
    else:
        n = points.shape[0]
        out = denoiser(torch.cat([points, points]), torch.cat([batch, batch + 1]),
                       torch.cat([t1, t1]), stack_conditions(cond, uncond))
        eps_c, eps_u = out[:n], out[n:]
    return cfg_combine(eps_c, eps_u, guidance)
