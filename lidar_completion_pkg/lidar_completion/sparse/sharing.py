"""Kernel maps shared between networks that see the same points (:func:`shared_maps`).

A denoiser pass spends part of its time on coordinates alone: voxelising the points, building each
stride's coordinate set and the kernel maps between them (and, on the Triton backend, arranging them
for the implicit GEMM). All of it depends on the points and the voxel size, none of it on the
network's weights. Where several networks (or one network several times) run on the very same points
- the distillation's frozen teacher, its guidance pass and an auxiliary net on one noisy sample, or
Diffusion-DPO's trained model and its frozen reference - the first pass can build them and the
others reuse them::

    with sparse.shared_maps():
        eps_teacher = teacher(x, batch, t, cond)
        eps_aux = aux(x, batch, t, cond)           # voxelisation and kernel maps of the call above

Inside the block, voxelising a points tensor that was voxelised before returns the earlier call's
coordinate manager (its coordinate sets and every map built on it since, by whichever network) and
its point-to-voxel assignment. The per-voxel features are computed again, so gradients flow as in
separate calls and the results are those of separate calls. A reuse needs the *same tensor objects*
(points and batch index) unmodified since (their version counters), the same voxel size and engine
and the same inference-mode state; anything else voxelises afresh. Nothing is shared in static mode
(CUDA graph capture), and the MinkowskiEngine backend does not take part (it keeps its own maps).
Outside a ``shared_maps`` block nothing is kept. ``LIDAR_COMPLETION_SHARE_MAPS=0`` in the
environment turns sharing off everywhere (to measure what it saves). The entries hold references to
their tensors until the block ends, so keep the block around the passes that share, not a whole
training loop.
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch

from .static import caching_allowed, tensor_version

__all__ = ["ENV_SHARE", "hits", "lookup", "remember", "shared_maps", "sharing_active"]

ENV_SHARE = "LIDAR_COMPLETION_SHARE_MAPS"

_STATE = threading.local()


@contextlib.contextmanager
def shared_maps():
    """Within the block, passes over the same points tensor share voxelisation and kernel maps
    (see the module docstring). Nested blocks share the outermost block's entries."""
    outer = getattr(_STATE, "entries", None)
    if outer is None:
        _STATE.entries = []
        _STATE.hits = 0
    try:
        yield
    finally:
        if outer is None:
            _STATE.entries = None


def sharing_active() -> bool:
    """True inside a :func:`shared_maps` block, outside static mode, unless LIDAR_COMPLETION_SHARE_MAPS=0."""
    if getattr(_STATE, "entries", None) is None or not caching_allowed():
        return False
    return os.environ.get(ENV_SHARE, "1").strip().lower() not in ("0", "false", "no", "off")


def hits() -> int:
    """Reuses in the current block (0 outside one); for tests and benchmarks."""
    return int(getattr(_STATE, "hits", 0)) if getattr(_STATE, "entries", None) is not None else 0


def _stamp(points: torch.Tensor, batch: torch.Tensor, voxel_size: float, engine) -> tuple:
    return (tensor_version(points), tensor_version(batch), float(voxel_size), id(engine),
            torch.is_inference_mode_enabled())


def lookup(points: torch.Tensor, batch: torch.Tensor, voxel_size: float, engine):
    """The earlier voxelisation ``(inverse, rows, manager)`` of these very tensors in the current
    block, or None."""
    if not sharing_active():
        return None
    stamp = _stamp(points, batch, voxel_size, engine)
    for p, b, s, value in _STATE.entries:
        if p is points and b is batch and s == stamp:
            _STATE.hits += 1
            return value
    return None


def remember(points: torch.Tensor, batch: torch.Tensor, voxel_size: float, engine, value) -> None:
    """Keep ``value`` = ``(inverse, rows, manager)`` for later passes over these tensors in the block."""
    if sharing_active():
        _STATE.entries.append((points, batch, _stamp(points, batch, voxel_size, engine), value))
