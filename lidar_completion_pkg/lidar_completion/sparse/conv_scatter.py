"""Convolution by per-offset scatter (torch): for each kernel offset, gather the input rows that
exist at that offset, multiply by that offset's weight, scatter-add into their output rows.

Exactly the multiply-adds the map needs (no zero rows), about 80 kernels a layer and one host read
per offset on a GPU (the length of each list): the CPU's form.

Backward is written out (:class:`_ScatterConv`) rather than left to autograd: autograd would
differentiate each offset's ``index_select`` by zero-filling a gradient the size of the whole input
and adding the 26 of them up, and keep every offset's gathered rows for the weight gradient. Here
one input-gradient buffer takes every offset's contribution, and only the input and the weights
are kept (docs/benchmarks.md, "Training, time per step")."""
from __future__ import annotations

import functools

import torch

from .coords import CENTRE


def _rows_first(fn):
    """Feature groups (G, M, C) (the two guidance passes of ``Denoiser.forward_cfg``) are convolved
    as (M, G, C): gathering and scatter-adding whole rows of G x C contiguous values along dim 0 is
    3-4.5x faster on the CPU than along dim 1 of (G, M, C) (docs/sparse_engine.md, "Feature groups
    on the CPU"), and one pass over each map serves both groups. The two transposes cost less."""
    @functools.wraps(fn)
    def wrapped(f: torch.Tensor, *args):
        if f.dim() == 2:
            return fn(f, *args)
        lead = f.shape[:-2]
        g = f.reshape(-1, *f.shape[-2:]).transpose(0, 1).contiguous()     # (M, G, C)
        out = fn(g, *args)                                                # (M', G, O)
        return out.transpose(0, 1).reshape(*lead, *out.shape[:1], out.shape[-1])
    return wrapped


def _leading(f: torch.Tensor, rows: int, cout: int) -> list:
    """Shape of an output of ``rows`` rows (dim 0) and ``cout`` channels (last) shaped like ``f``."""
    shape = list(f.shape)
    shape[0], shape[-1] = rows, cout
    return shape


def _apply(f: torch.Tensor, w: torch.Tensor, pairs: list, n_out: int, centre: bool, copy: bool):
    """``out[o] (+)= f[i] @ w[k]`` for every ``(k, o, i)`` of ``pairs`` (dim 0 of ``f`` is the rows),
    on top of ``f @ w[CENTRE]`` (``centre``, a stride-1 map onto the same rows) or of zeros with
    ``n_out`` rows; ``copy``: every output row is written once (index_copy_)."""
    out = f @ w[CENTRE] if centre else f.new_zeros(_leading(f, n_out, w.shape[-1]))
    for k, o, i in pairs:
        p = f.index_select(0, i) @ w[k]
        if copy:
            out.index_copy_(0, o, p)
        else:
            out.index_add_(0, o, p)
    return out


class _ScatterConv(torch.autograd.Function):
    """:func:`_apply` with its backward written out (see the module's docstring). Each output row
    of a pair list appears once per offset, so the gradient of ``out[o] += f[i] @ w[k]`` is
    ``grad_f[i] += grad[o] @ w[k].T`` and ``grad_w[k] = f[i].T @ grad[o]``; run in the autocast state
    of the forward pass, as autograd would."""

    @staticmethod
    def forward(ctx, f, w, pairs, n_out, centre, copy):
        ctx.save_for_backward(f, w)
        ctx.pairs, ctx.centre = pairs, centre
        ctx.device_type = f.device.type
        ctx.autocast = torch.is_autocast_enabled(ctx.device_type)
        ctx.autocast_dtype = torch.get_autocast_dtype(ctx.device_type)
        return _apply(f, w, pairs, n_out, centre, copy)

    @staticmethod
    def backward(ctx, grad):
        f, w = ctx.saved_tensors
        need_f, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        cin, cout = w.shape[-2], w.shape[-1]
        gf = gw = None
        with torch.autocast(ctx.device_type, dtype=ctx.autocast_dtype, enabled=ctx.autocast):
            if need_w:
                gw = torch.zeros_like(w)
            if need_f:
                gf = (grad @ w[CENTRE].transpose(-1, -2)).to(f.dtype) if ctx.centre else torch.zeros_like(f)
            if need_w and ctx.centre:
                gw[CENTRE] += f.reshape(-1, cin).transpose(0, 1) @ grad.reshape(-1, cout)
            for k, o, i in ctx.pairs:
                go = grad.index_select(0, o)
                if need_f:
                    gf.index_add_(0, i, (go @ w[k].transpose(-1, -2)).to(gf.dtype))
                if need_w:
                    gw[k] += f.index_select(0, i).reshape(-1, cin).transpose(0, 1) @ go.reshape(-1, cout)
        return gf, gw, None, None, None, None


def _scatter(f, w, pairs, n_out, centre=False, copy=False):
    if torch.is_grad_enabled() and (f.requires_grad or w.requires_grad):
        return _ScatterConv.apply(f, w, pairs, n_out, centre, copy)
    return _apply(f, w, pairs, n_out, centre, copy)


@_rows_first
def conv3_scatter(f: torch.Tensor, w: torch.Tensor, maps) -> torch.Tensor:
    """3x3x3 at stride 1: ``maps`` from :meth:`CoordinateManager.neighbour_map` (None for the centre).
    ``f``: (M, C), or (G, M, C) feature groups."""
    pairs = [(k, m[0], m[1]) for k, m in enumerate(maps) if m is not None and m[0].numel()]
    return _scatter(f, w, pairs, f.shape[0], centre=True)


@_rows_first
def down_scatter(f: torch.Tensor, w: torch.Tensor, inverse: torch.Tensor, rows: list,
                 n_coarse: int) -> torch.Tensor:
    """2x2x2 stride 2: every fine row adds into its parent cell (``inverse``) through its offset;
    ``rows[k]`` lists the fine rows at offset k (:meth:`CoordinateManager.downsample_map`)."""
    return _scatter(f, w, [(k, inverse[r], r) for k, r in enumerate(rows) if r.numel()], n_coarse)


@_rows_first
def up_scatter(f: torch.Tensor, w: torch.Tensor, inverse: torch.Tensor, rows: list,
               n_fine: int) -> torch.Tensor:
    """Transposed 2x2x2 stride 2: every fine row reads its parent through its own offset."""
    return _scatter(f, w, [(k, r, inverse[r]) for k, r in enumerate(rows) if r.numel()], n_fine, copy=True)
