"""Convolution by gather-GEMM (torch): one (M, K) gather table, one GEMM per chunk of rows.

``out[..., i, :] = concat_k f_pad[..., table[i, k], :] @ W.reshape(K * C, Cout)`` with ``f_pad`` the
features plus one zero row (the index of "no input"). Three kernels a layer and no atomics, but every
missing neighbour costs a multiply by a zero row: the form for dense levels and one-to-one maps
(stride-2 children, the transposed convolution's parents)."""
from __future__ import annotations

import torch

# bytes of gathered features per chunk of the gather-GEMM and grouped paths
GATHER_BUDGET = {"cuda": 1 << 30, "cpu": 64 << 20}


def gather_budget(device: torch.device) -> int:
    return GATHER_BUDGET.get(device.type, GATHER_BUDGET["cuda"])


def group_count(f: torch.Tensor) -> int:
    """Number of feature groups of ``f`` (..., M, C): the product of its leading dimensions."""
    groups = 1
    for d in f.shape[:-2]:
        groups *= d
    return groups


def with_zero_row(f: torch.Tensor) -> torch.Tensor:
    """``f`` (..., M, C) with one zero row appended: the row that "no input" indexes."""
    return torch.cat([f, f.new_zeros(f.shape[:-2] + (1, f.shape[-1]))], dim=-2)


def gather_gemm(f: torch.Tensor, table: torch.Tensor, w2d: torch.Tensor) -> torch.Tensor:
    """out[..., i, :] = concat_k f_pad[..., table[i, k], :] @ w2d (``table`` entries = M: no input)."""
    k = table.shape[1]
    c = f.shape[-1]
    fp = with_zero_row(f)
    lead = f.shape[:-2]
    n = table.shape[0]
    chunk = max(1024, gather_budget(f.device) // max(1, k * c * f.element_size() * group_count(f)))
    dim = f.dim() - 2
    outs = []
    for s in range(0, n, chunk):
        t = table[s:s + chunk]
        g = fp.index_select(dim, t.reshape(-1)).reshape(lead + (t.shape[0], k * c))
        outs.append(g @ w2d)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


def transposed_all_children(f: torch.Tensor, w: torch.Tensor, inverse: torch.Tensor,
                            k: torch.Tensor) -> torch.Tensor:
    """Transposed 2x2x2 convolution: all 8 child outputs of every coarse cell in one GEMM, then each
    fine row picks its own (parent ``inverse``, offset ``k``). Eight times the GEMM work of the
    exact map, in two kernels."""
    cin, cout = w.shape[1], w.shape[2]
    y = f @ w.permute(1, 0, 2).reshape(cin, 8 * cout)
    y = y.reshape(f.shape[:-2] + (f.shape[-2] * 8, cout))
    return y.index_select(f.dim() - 2, inverse * 8 + k)
