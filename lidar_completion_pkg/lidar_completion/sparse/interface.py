"""The interface every sparse backend implements (MinkowskiEngine, torch, Triton).

The networks are written against this and nothing else: a backend is a namespace of four layer
factories and eleven functions on its own sparse-tensor type, which the networks never look inside.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class SparseBackend(Protocol):
    name: str
    supports_groups: bool    # features may carry leading group dims (G, M, C) sharing one kernel map

    # layer factories; parameters carry MinkowskiEngine's names and layouts on every backend
    Convolution: Callable[..., nn.Module]            # (in, out, kernel_size=3|1|2, stride=1|1|2)
    ConvolutionTranspose: Callable[..., nn.Module]   # (in, out, kernel_size=2, stride=2)
    BatchNorm: Callable[..., nn.Module]              # (num_features), the torch module in ``.bn``
    ReLU: Callable[..., nn.Module]

    def voxelize(self, points: torch.Tensor, batch: torch.Tensor, voxel_size: float) -> tuple[Any, Any]:
        """(field, stride-1 sparse tensor of the mean xyz of the points in each voxel)."""

    def slice(self, x: Any, field: Any) -> torch.Tensor:
        """Features of a stride-1 tensor, one row per point of ``field``."""

    def feats(self, x: Any) -> torch.Tensor:
        """The feature matrix (..., M, C), rows in the order of :meth:`coords`."""

    def with_feats(self, x: Any, feats: torch.Tensor) -> Any:
        """A tensor on the same coordinates with other features."""

    def coords(self, x: Any) -> torch.Tensor:
        """(M, 4) int64 ``(b, x, y, z)`` cell coordinates."""

    def stride(self, x: Any) -> int:
        """The tensor stride (1, 2, 4, ...)."""

    def cat(self, a: Any, b: Any) -> Any:
        """Features of two tensors on the same coordinates, concatenated (a first)."""

    def modulate(self, x: Any, weights: list, rows: list) -> Any:
        """``x`` with its features times ``weights[g]`` (E_g, C) at ``rows[g]`` (M,) per voxel; with
        several conditions one feature group each, (G, M, C)."""

    def cache(self, x: Any) -> dict:
        """A dictionary that lives as long as the kernel maps of ``x`` (one forward pass)."""

    def nearest_cell(self, query: torch.Tensor, ref: torch.Tensor, check_batches: bool = True) -> torch.Tensor:
        """Index into ``ref`` (E, 4, sorted) of the nearest cell of the same batch element for every
        ``query`` row (M, 4); ties to the smallest index (see :func:`.nearest.nearest_cell`)."""
