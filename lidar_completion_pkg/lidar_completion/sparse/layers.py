"""The layer modules of the torch and Triton backends.

They hold the parameters, with MinkowskiEngine's names and layouts (a convolution's ``kernel`` of
shape ``(kernel_volume, in, out)``, ``(in, out)`` for 1x1; the batch norm module in ``.bn``), so one
state dict serves every backend. What a layer computes is decided by the *engine* of its input's
coordinate manager (``x.manager.engine``): the torch engine runs one of the torch convolution
algorithms at once, the Triton engine may defer the work so that batch norm, ReLU, the residual add
and a skip concatenation fuse into one kernel (see :mod:`.triton_backend`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .static import tensor_version


def _reset_kernel(kernel: torch.Tensor, in_channels: int, kernel_volume: int) -> None:
    # the same initialisation as MinkowskiEngine's convolutions
    stdv = 1.0 / math.sqrt(in_channels * kernel_volume)
    with torch.no_grad():
        kernel.uniform_(-stdv, stdv)


def frozen(*tensors: torch.Tensor) -> bool:
    """True when no autograd graph is recorded through these tensors (inference)."""
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


class Convolution(nn.Module):
    """Sparse convolution, kernel size 1 or 3 at stride 1, or kernel size 2 at stride 2."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        if (kernel_size, stride) not in ((1, 1), (3, 1), (2, 2)):
            raise ValueError(f"unsupported convolution kernel_size={kernel_size} stride={stride}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = kernel_size, stride
        volume = kernel_size ** 3
        shape = (in_channels, out_channels) if kernel_size == 1 else (volume, in_channels, out_channels)
        self.kernel = nn.Parameter(torch.empty(shape))
        _reset_kernel(self.kernel, in_channels, volume)
        self._derived = {}

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"

    def derived(self, name: str, make):
        """``make(kernel)`` (a re-arranged or converted copy of the weights), kept between calls at
        inference and rebuilt when the weights change (pointer and version counter); computed afresh
        (differentiably) while autograd records through the weights."""
        w = self.kernel
        if not frozen(w):
            return make(w)
        stamp = (w.data_ptr(), tensor_version(w), torch.is_inference_mode_enabled())
        hit = self._derived.get(name)
        if hit is None or hit[0] != stamp:
            with torch.no_grad():
                hit = self._derived[name] = (stamp, make(w))
        return hit[1]

    def side_kernel(self) -> torch.Tensor:
        """The 26 non-centre offsets' weights, (26, in, out)."""
        return self.derived("side", lambda w: torch.cat([w[:13], w[14:]], dim=0))

    def forward(self, x):
        return x.manager.engine.convolution(self, x)


class ConvolutionTranspose(nn.Module):
    """Transposed sparse convolution, kernel size 2 and stride 2, onto the existing finer coordinates."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 2, stride: int = 2):
        super().__init__()
        if (kernel_size, stride) != (2, 2):
            raise ValueError("only kernel_size=2, stride=2 transposed convolutions are supported")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = kernel_size, stride
        self.kernel = nn.Parameter(torch.empty(8, in_channels, out_channels))
        _reset_kernel(self.kernel, in_channels, 8)
        self._derived = {}

    derived = Convolution.derived

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=2, stride=2"

    def forward(self, x):
        fine_stride = x.stride // 2
        if fine_stride < 1 or fine_stride not in x.manager.levels:
            raise ValueError(f"no finer coordinate set at stride {fine_stride} to write onto")
        return x.manager.engine.transposed(self, x)


class BatchNorm(nn.Module):
    """BatchNorm over voxel features; the torch module sits in ``.bn`` as in MinkowskiEngine."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.bn = nn.BatchNorm1d(num_features, eps=eps, momentum=momentum)
        self._affine_cache = None

    @property
    def uses_running_stats(self) -> bool:
        bn = self.bn
        return not bn.training and bn.track_running_stats and bn.running_var is not None

    def affine(self, dtype: torch.dtype):
        """(shift, scale) of the inference map, recomputed only when a statistic or parameter
        changed (tensor version counters: load_state_dict, optimiser steps, .to() all move them)."""
        bn = self.bn
        parts = (bn.running_mean, bn.running_var, bn.weight, bn.bias)
        if not frozen(*parts):
            return self._affine_terms(dtype)   # differentiable, not cached
        # inference tensors (made under torch.inference_mode) must not reach autograd outside it
        stamp = (dtype, bn.eps, torch.is_inference_mode_enabled()) + tuple(
            None if t is None else (t.data_ptr(), tensor_version(t)) for t in parts)
        cache = self._affine_cache
        if cache is None or cache[0] != stamp:
            with torch.no_grad():
                cache = self._affine_cache = (stamp,) + self._affine_terms(dtype)
        return cache[1], cache[2]

    def _affine_terms(self, dtype: torch.dtype):
        bn = self.bn
        scale = torch.rsqrt(bn.running_var.float() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.float()
        shift = -bn.running_mean.float() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.float()
        return shift.to(dtype), scale.to(dtype)

    def forward(self, x):
        return x.manager.engine.batch_norm(self, x)


class ReLU(nn.Module):
    def forward(self, x):
        return x.manager.engine.relu(x)
