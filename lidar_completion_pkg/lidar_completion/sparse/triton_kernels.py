"""The Triton kernels of the sparse engine (imported only by the Triton backend).

* :func:`implicit_gemm_kernel` - one sparse convolution as an output-stationary masked implicit
  GEMM over a gather table, with the skip concatenation as two K segments and batch norm, residual
  add and ReLU in the epilogue;
* :func:`nearest_cell_kernel` - exact nearest cell of the same batch element by brute force in
  int64 (squared distance and index packed into one key, so the minimum breaks ties by index);
* :func:`fps_kernel` - exact farthest-point sampling of one cloud per program.

Under the interpreter (``TRITON_INTERPRET=1``) the same kernels run on CPU tensors; its bf16
``tl.dot`` is wrong (triton-lang/triton#11584), so callers set ``DOT_F32`` there and the operands
are upcast before the product.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _segment_products(acc, acc2, base, stride_g, stride_m, src, valid, C, w_seg, N, cols, col_ok,
                      PAIR: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr, BK: tl.constexpr):
    """acc += in[src, :C] @ w_seg[:C, cols] for one K segment; with ``PAIR`` also acc2 for the next
    feature group (base + stride_g), sharing the weight tile."""
    ck = tl.arange(0, BK)
    for c0 in range(0, C, BK):
        c = c0 + ck
        a_mask = valid[:, None] & (c[None, :] < C)
        w = tl.load(w_seg + c[:, None] * N + cols[None, :], mask=(c[:, None] < C) & col_ok[None, :], other=0.0)
        a = tl.load(base + src[:, None] * stride_m + c[None, :], mask=a_mask, other=0.0)
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(a.to(w.dtype), w, acc)
        if PAIR:
            a2 = tl.load(base + stride_g + src[:, None] * stride_m + c[None, :], mask=a_mask, other=0.0)
            if DOT_F32:
                acc2 = tl.dot(a2.to(tl.float32), w.to(tl.float32), acc2, input_precision=PRECISION)
            else:
                acc2 = tl.dot(a2.to(w.dtype), w, acc2)
    return acc, acc2


@triton.jit
def _epilogue_store(acc, g, rows64, out_mask, cols, col_ok, M, N, out_ptr, scale_ptr, shift_ptr, res_ptr,
                    stride_rg, stride_rm,
                    AFFINE: tl.constexpr, RESIDUAL: tl.constexpr, RELU: tl.constexpr):
    if AFFINE:
        scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
        shift = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)
        acc = acc * scale[None, :] + shift[None, :]
    if RESIDUAL:
        r = tl.load(res_ptr + g * stride_rg + rows64[:, None] * stride_rm + cols[None, :], mask=out_mask,
                    other=0.0)
        acc = acc + r.to(tl.float32)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    tl.store(out_ptr + g * M * N + rows64[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=out_mask)


# Row counts change with every scan: not specialised on (a compiled variant per divisibility class
# of M would double the compile time for nothing). Channel counts and row strides are per layer.
@triton.jit(do_not_specialize=["M", "stride_ag", "stride_bg", "stride_rg"])
def implicit_gemm_kernel(
        a_ptr, b_ptr, w_ptr, out_ptr,
        order_ptr, table_ptr, tile_mask_ptr,
        scale_ptr, shift_ptr, res_ptr,
        M, CA, CB, N,
        stride_ag, stride_am, stride_bg, stride_bm, stride_rg, stride_rm,
        KVOL: tl.constexpr, IDENTITY: tl.constexpr, HAS_B: tl.constexpr, AFFINE: tl.constexpr,
        RESIDUAL: tl.constexpr, RELU: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
        PAIR: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out[g, r, n] = epilogue(sum_k sum_c in[g, table[r, k], c] * w[k, c, n]).

    Output rows come in tiles of BM in the order of ``order`` (rows sorted by neighbour bitmask);
    ``table`` (KVOL, M) holds, in that order, the input row of each offset or -1; a tile visits
    only the offsets set in its ``tile_mask``. ``IDENTITY``: a 1x1 convolution (row r reads row r,
    no table). The input is the concatenation [a | b] of two segments of CA and CB channels
    (``HAS_B``), each with its own group and row strides (a group stride of 0 broadcasts one
    feature set over all groups). Weights (KVOL, CA + CB, N), contiguous, in the compute dtype.
    ``PAIR``: the program computes feature groups 2 p and 2 p + 1 together (the two halves of
    classifier-free guidance), loading each weight tile and table entry once for both.
    Epilogue: ``acc * scale + shift`` (``AFFINE``: eval-mode batch norm), ``+ res`` (``RESIDUAL``),
    ``max(., 0)`` (``RELU``); fp32 accumulation, stored in the output's dtype. Every output row is
    written by exactly one program: no atomics."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if PAIR:
        g = 2 * tl.program_id(2).to(tl.int64)
    else:
        g = tl.program_id(2).to(tl.int64)
    offs = pid_m * BM + tl.arange(0, BM)
    in_range = offs < M
    if IDENTITY:
        rows = offs
        tile_mask = 1
    else:
        rows = tl.load(order_ptr + offs, mask=in_range, other=0)
        tile_mask = tl.load(tile_mask_ptr + pid_m)
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < N
    cin = CA + CB
    a_base = a_ptr + g * stride_ag
    b_base = b_ptr + g * stride_bg
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(KVOL):
        if (tile_mask >> k) & 1:
            if IDENTITY:
                src = rows.to(tl.int64)
                valid = in_range
            else:
                src32 = tl.load(table_ptr + k * M + offs, mask=in_range, other=-1)
                valid = src32 >= 0
                src = tl.where(valid, src32, 0).to(tl.int64)
            w_k = w_ptr + k * cin * N
            acc, acc2 = _segment_products(acc, acc2, a_base, stride_ag, stride_am, src, valid, CA, w_k, N,
                                          cols, col_ok, PAIR, DOT_F32, PRECISION, BK)
            if HAS_B:
                acc, acc2 = _segment_products(acc, acc2, b_base, stride_bg, stride_bm, src, valid, CB,
                                              w_k + CA * N, N, cols, col_ok, PAIR, DOT_F32, PRECISION, BK)
    rows64 = rows.to(tl.int64)
    out_mask = in_range[:, None] & col_ok[None, :]
    _epilogue_store(acc, g, rows64, out_mask, cols, col_ok, M, N, out_ptr, scale_ptr, shift_ptr, res_ptr,
                    stride_rg, stride_rm, AFFINE, RESIDUAL, RELU)
    if PAIR:
        _epilogue_store(acc2, g + 1, rows64, out_mask, cols, col_ok, M, N, out_ptr, scale_ptr, shift_ptr,
                        res_ptr, stride_rg, stride_rm, AFFINE, RESIDUAL, RELU)


# squared distance (< 2**39 for |coordinates| < 2**17) and reference index (< 2**22) in one key
NEAREST_INDEX_BITS = 22


@triton.jit(do_not_specialize=["M", "E"])
def nearest_cell_kernel(q_ptr, r_ptr, out_ptr, M, E,
                        BQ: tl.constexpr, BR: tl.constexpr, INDEX_BITS: tl.constexpr):
    """For each query row (b, x, y, z) of ``q`` (M, 4) int64: the index of the nearest row of ``r``
    (E, 4) int64 with the same b (squared Euclidean distance over x, y, z; ties to the smallest
    index), or -1 when no row of ``r`` has that b. Exact: integer arithmetic throughout."""
    pid = tl.program_id(0)
    qs = pid * BQ + tl.arange(0, BQ)
    q_ok = qs < M
    qb = tl.load(q_ptr + qs * 4, mask=q_ok, other=-1)
    qx = tl.load(q_ptr + qs * 4 + 1, mask=q_ok, other=0)
    qy = tl.load(q_ptr + qs * 4 + 2, mask=q_ok, other=0)
    qz = tl.load(q_ptr + qs * 4 + 3, mask=q_ok, other=0)
    none = 0x7FFFFFFFFFFFFFFF
    best = tl.full((BQ,), none, dtype=tl.int64)
    for r0 in range(0, E, BR):
        rs = r0 + tl.arange(0, BR)
        r_ok = rs < E
        rb = tl.load(r_ptr + rs * 4, mask=r_ok, other=-2)
        rx = tl.load(r_ptr + rs * 4 + 1, mask=r_ok, other=0)
        ry = tl.load(r_ptr + rs * 4 + 2, mask=r_ok, other=0)
        rz = tl.load(r_ptr + rs * 4 + 3, mask=r_ok, other=0)
        dx = qx[:, None] - rx[None, :]
        dy = qy[:, None] - ry[None, :]
        dz = qz[:, None] - rz[None, :]
        d2 = dx * dx + dy * dy + dz * dz
        key = (d2 << INDEX_BITS) | rs.to(tl.int64)[None, :]
        key = tl.where(qb[:, None] == rb[None, :], key, none)
        best = tl.minimum(best, tl.min(key, axis=1))
    idx = tl.where(best == none, -1, best & ((1 << INDEX_BITS) - 1))
    tl.store(out_ptr + qs, idx, mask=q_ok)


@triton.jit
def fps_kernel(p_ptr, start_ptr, count_ptr, n_out_ptr, out_start_ptr, dist_ptr, out_ptr,
               BLOCK: tl.constexpr):
    """Exact farthest-point sampling, one cloud per program.

    Cloud ``c`` is ``p[start[c] : start[c] + count[c]]`` (xyz, float32, (N, 3)); it takes
    ``n_out[c]`` samples, written as indices into ``p`` at ``out[out_start[c] ...]``. The first
    sample is the cloud's first point; each next one is the point farthest (Euclidean, ties to the
    smallest index) from every sample so far. ``dist`` (N,) float32 is scratch: the running
    squared distance of each point to the samples."""
    c = tl.program_id(0)
    start = tl.load(start_ptr + c).to(tl.int64)
    n = tl.load(count_ptr + c)
    n_out = tl.load(n_out_ptr + c)
    o = tl.load(out_start_ptr + c).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    inf = float("inf")
    for b0 in range(0, n, BLOCK):
        i = b0 + lanes
        tl.store(dist_ptr + start + i, tl.full((BLOCK,), inf, tl.float32), mask=i < n)
    last = 0
    tl.store(out_ptr + o, start)
    for s in range(1, n_out):
        lx = tl.load(p_ptr + (start + last) * 3)
        ly = tl.load(p_ptr + (start + last) * 3 + 1)
        lz = tl.load(p_ptr + (start + last) * 3 + 2)
        best_d = tl.full((BLOCK,), -1.0, tl.float32)
        best_i = tl.full((BLOCK,), 0, tl.int32)
        for b0 in range(0, n, BLOCK):
            i = b0 + lanes
            ok = i < n
            x = tl.load(p_ptr + (start + i) * 3, mask=ok, other=0.0)
            y = tl.load(p_ptr + (start + i) * 3 + 1, mask=ok, other=0.0)
            z = tl.load(p_ptr + (start + i) * 3 + 2, mask=ok, other=0.0)
            d = (x - lx) * (x - lx) + (y - ly) * (y - ly) + (z - lz) * (z - lz)
            old = tl.load(dist_ptr + start + i, mask=ok, other=-1.0)
            d = tl.minimum(old, d)
            tl.store(dist_ptr + start + i, d, mask=ok)
            d = tl.where(ok, d, -1.0)
            take = d > best_d      # strictly greater: the earlier block keeps a tie
            best_d = tl.where(take, d, best_d)
            best_i = tl.where(take, i, best_i)
        top = tl.max(best_d, axis=0)
        last = tl.min(tl.where(best_d == top, best_i, 0x7FFFFFFF), axis=0)
        tl.store(out_ptr + o + s, start + last)


@triton.jit(do_not_specialize=["M", "G", "rows_per_split", "stride_xg", "stride_gg"])
def weight_grad_kernel(x_ptr, go_ptr, dw_ptr, order_ptr, table_ptr,
                       M, CX, C_OFF, CIN, N, G, rows_per_split,
                       stride_xg, stride_xm, stride_gg, stride_gm,
                       KVOL: tl.constexpr, IDENTITY: tl.constexpr, DOT_F32: tl.constexpr,
                       PRECISION: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr):
    """dW[k, C_OFF + c, n] += sum_g sum_r x[g, table[r, k], c] * grad_out[g, order[r], n] over one
    split of ``rows_per_split`` rows (program axis 1): the weight gradient of one input segment of
    CX channels, as a gather-GEMM per offset (program axis 0). Splits add into the fp32 ``dW``
    (KVOL, CIN, N) with atomics; ``table`` / ``order`` are a gather plan (any tile size)."""
    k = tl.program_id(0)
    split = tl.program_id(1)
    tiles_n = tl.cdiv(N, BN)
    c = (tl.program_id(2) // tiles_n) * BC + tl.arange(0, BC)
    n = (tl.program_id(2) % tiles_n) * BN + tl.arange(0, BN)
    c_ok = c < CX
    n_ok = n < N
    acc = tl.zeros((BC, BN), dtype=tl.float32)
    start = split * rows_per_split
    for g in range(G):
        x_base = x_ptr + g * stride_xg
        go_base = go_ptr + g * stride_gg
        for r0 in range(start, start + rows_per_split, BR):
            r = r0 + tl.arange(0, BR)
            ok = r < M
            if IDENTITY:
                src = r.to(tl.int64)
                valid = ok
                out_rows = r.to(tl.int64)
            else:
                src32 = tl.load(table_ptr + k * M + r, mask=ok, other=-1)
                valid = src32 >= 0
                src = tl.where(valid, src32, 0).to(tl.int64)
                out_rows = tl.load(order_ptr + r, mask=ok, other=0).to(tl.int64)
            x = tl.load(x_base + src[:, None] * stride_xm + c[None, :], mask=valid[:, None] & c_ok[None, :],
                        other=0.0)
            go = tl.load(go_base + out_rows[:, None] * stride_gm + n[None, :],
                         mask=valid[:, None] & n_ok[None, :], other=0.0)
            if DOT_F32:
                acc = tl.dot(tl.trans(x.to(tl.float32)), go.to(tl.float32), acc, input_precision=PRECISION)
            else:
                acc = tl.dot(tl.trans(x.to(go.dtype)), go, acc)
    tl.atomic_add(dw_ptr + (k * CIN + C_OFF + c[:, None]) * N + n[None, :], acc,
                  mask=c_ok[:, None] & n_ok[None, :])
