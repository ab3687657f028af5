"""Convolution by per-offset scatter (torch): for each kernel offset, gather the input rows that
exist at that offset, multiply by that offset's weight, scatter-add into their output rows.

Exactly the multiply-adds the map needs (no zero rows), about 80 kernels a layer and one host read
per offset on a GPU (the length of each list): the CPU's form."""
from __future__ import annotations

import torch


def _rows_first(fn):
    """Feature groups (G, M, C) (the two guidance passes of ``Denoiser.forward_cfg``) are convolved
    as (M, G, C): gathering and scatter-adding whole rows of G x C contiguous values along dim 0 is
    3-4.5x faster on the CPU than along dim 1 of (G, M, C) (docs/sparse_engine.md, "Feature groups
    on the CPU"), and one pass over each map serves both groups. The two transposes cost less."""
    def wrapped(f: torch.Tensor, *args):
        if f.dim() == 2:
            return fn(f, *args)
        lead = f.shape[:-2]
        g = f.reshape(-1, *f.shape[-2:]).transpose(0, 1).contiguous()     # (M, G, C)
        out = fn(g, *args)                                                # (M', G, O)
        return out.transpose(0, 1).reshape(*lead, *out.shape[:1], out.shape[-1])
    wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
    return wrapped


@_rows_first
def conv3_scatter(f: torch.Tensor, w: torch.Tensor, maps) -> torch.Tensor:
    """3x3x3 at stride 1: ``maps`` from :meth:`CoordinateManager.neighbour_map` (None for the centre).
    ``f``: (M, C), or (G, M, C) feature groups."""
    out = f @ w[13]
    for k, m in enumerate(maps):
        if m is None or m[0].numel() == 0:
            continue
        out_rows, in_rows = m
        out.index_add_(0, out_rows, f.index_select(0, in_rows) @ w[k])
    return out


def _leading(f: torch.Tensor, rows: int, cout: int) -> list:
    """Shape of an output of ``rows`` rows (dim 0) and ``cout`` channels (last) shaped like ``f``."""
    shape = list(f.shape)
    shape[0], shape[-1] = rows, cout
    return shape


@_rows_first
def down_scatter(f: torch.Tensor, w: torch.Tensor, inverse: torch.Tensor, rows: list,
                 n_coarse: int) -> torch.Tensor:
    """2x2x2 stride 2: every fine row adds into its parent cell (``inverse``) through its offset;
    ``rows[k]`` lists the fine rows at offset k (:meth:`CoordinateManager.downsample_map`)."""
    out = f.new_zeros(_leading(f, n_coarse, w.shape[-1]))
    for k, r in enumerate(rows):
        if r.numel():
            out.index_add_(0, inverse[r], f.index_select(0, r) @ w[k])
    return out


@_rows_first
def up_scatter(f: torch.Tensor, w: torch.Tensor, inverse: torch.Tensor, rows: list,
               n_fine: int) -> torch.Tensor:
    """Transposed 2x2x2 stride 2: every fine row reads its parent through its own offset."""
    out = f.new_zeros(_leading(f, n_fine, w.shape[-1]))
    for k, r in enumerate(rows):
        if r.numel():
            out.index_copy_(0, r, f.index_select(0, inverse[r]) @ w[k])
    return out
