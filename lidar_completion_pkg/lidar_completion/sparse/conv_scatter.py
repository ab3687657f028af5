"""Convolution by per-offset scatter (torch): for each kernel offset, gather the input rows that
exist at that offset, multiply by that offset's weight, scatter-add into their output rows.

Exactly the multiply-adds the map needs (no zero rows), about 80 kernels a layer and one host read
per offset on a GPU (the length of each list): the CPU's form."""
from __future__ import annotations

import torch


def conv3_scatter(f: torch.Tensor, w: torch.Tensor, maps) -> torch.Tensor:
    """3x3x3 at stride 1: ``maps`` from :meth:`CoordinateManager.neighbour_map` (None for the centre)."""
    dim = f.dim() - 2
    out = f @ w[13]
    for k, m in enumerate(maps):
        if m is None or m[0].numel() == 0:
            continue
        out_rows, in_rows = m
        out.index_add_(dim, out_rows, f.index_select(dim, in_rows) @ w[k])
    return out


def _leading(f: torch.Tensor, rows: int, cout: int) -> list:
    shape = list(f.shape)
    shape[-2], shape[-1] = rows, cout
    return shape


def down_scatter(f: torch.Tensor, w: torch.Tensor, inverse: torch.Tensor, rows: list,
                 n_coarse: int) -> torch.Tensor:
    """2x2x2 stride 2: every fine row adds into its parent cell (``inverse``) through its offset;
    ``rows[k]`` lists the fine rows at offset k (:meth:`CoordinateManager.downsample_map`)."""
    dim = f.dim() - 2
    out = f.new_zeros(_leading(f, n_coarse, w.shape[-1]))
    for k, r in enumerate(rows):
        if r.numel():
            out.index_add_(dim, inverse[r], f.index_select(dim, r) @ w[k])
    return out


def up_scatter(f: torch.Tensor, w: torch.Tensor, inverse: torch.Tensor, rows: list,
               n_fine: int) -> torch.Tensor:
    """Transposed 2x2x2 stride 2: every fine row reads its parent through its own offset."""
    dim = f.dim() - 2
    out = f.new_zeros(_leading(f, n_fine, w.shape[-1]))
    for k, r in enumerate(rows):
        if r.numel():
            out.index_copy_(dim, r, f.index_select(dim, inverse[r]) @ w[k])
    return out
