"""Convolution by grouped offsets (torch): the centre offset as one GEMM, the 26 others as batched
GEMMs over per-offset row lists padded to one length L, then one scatter-add per chunk.

26 L + M rows of work and about six kernels a layer: the form for sparse levels (the noisy stride-1
points of the denoiser), where most rows miss most of their 26 neighbours and the gather form would
multiply all those zero rows."""
from __future__ import annotations

import torch

from .conv_gather import gather_budget, group_count, with_zero_row


def grouped_offsets(f: torch.Tensor, out_rows: torch.Tensor, in_rows: torch.Tensor,
                    w: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    """``out_rows`` / ``in_rows`` (26, L) from :meth:`CoordinateManager.offset_pairs`; ``side``: the
    kernel without its centre, (26, C, Cout)."""
    dim = f.dim() - 2
    lead = f.shape[:-2]
    c, cout = f.shape[-1], w.shape[-1]
    out = f @ w[13]
    width = in_rows.shape[1]
    if width == 0:
        return out
    fp = with_zero_row(f)
    per = max(1, gather_budget(f.device) // max(1, width * c * f.element_size() * group_count(f)))
    for k0 in range(0, 26, per):
        k1 = min(26, k0 + per)
        idx = in_rows[k0:k1].reshape(-1)
        g = fp.index_select(dim, idx).reshape(lead + (k1 - k0, width, c))
        y = torch.matmul(g, side[k0:k1])                                    # (..., k, L, Cout)
        rows = out_rows[k0:k1].reshape(-1)
        y = y.reshape(lead + ((k1 - k0) * width, cout))
        if dim == 0:
            out.index_add_(0, rows, y)
        else:   # per feature group: rows of contiguous (M, Cout) slices add faster than a strided dim
            # (indexed one group at a time: autograd refuses in-place writes to the views that
            # iterating a tensor makes, which training with guidance groups would hit)
            ov, yv = out.view(-1, *out.shape[-2:]), y.view(-1, *y.shape[-2:])
            for i in range(ov.shape[0]):
                ov[i].index_add_(0, rows, yv[i])
    return out
