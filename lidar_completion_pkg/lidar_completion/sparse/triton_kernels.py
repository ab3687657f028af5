"""The Triton kernels of the sparse engine (imported only by the Triton backend).

* :func:`implicit_gemm_kernel` - one sparse convolution as an output-stationary masked implicit
  GEMM over a gather table, with the skip concatenation as two K segments and batch norm, residual
  add and ReLU in the epilogue;
* :func:`nearest_cell_kernel` - exact nearest cell of the same batch element by brute force in
  float64 on integer coordinates (exact), ties to the smallest index; :func:`nearest_rows_kernel`
  the same for a list of rows, in place;
* :func:`fps_kernel` - exact farthest-point sampling of one cloud per program;
* :func:`fps_grid_kernel` - the same with each cloud split over many programs that trade their
  candidates through global memory at every step; :func:`fps_rounds_kernel` - the same samples
  with several taken per exchange;
* :func:`modulate_kernel` - features times the gathered weight row of each row's condition cell.

Under the interpreter (``TRITON_INTERPRET=1``) the same kernels run on CPU tensors; its bf16
``tl.dot`` is wrong (triton-lang/triton#11584), so callers set ``DOT_F32`` there and the operands
are upcast before the product.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _mma(acc, a, w, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """acc += a @ w: in fp32 with ``PRECISION`` (the interpreter's bf16 product is wrong, and fp32
    operands choose ieee / tf32 / tf32x3), otherwise in the weights' dtype with fp32 accumulation."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision=PRECISION)
    return tl.dot(a.to(w.dtype), w, acc)


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
        acc = _mma(acc, a, w, DOT_F32, PRECISION)
        if PAIR:
            a2 = tl.load(base + stride_g + src[:, None] * stride_m + c[None, :], mask=a_mask, other=0.0)
            acc2 = _mma(acc2, a2, w, DOT_F32, PRECISION)
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


@triton.jit
def _masked_products(acc, acc2, a_base, b_base, stride_ag, stride_am, stride_bg, stride_bm, w_ptr, table_ptr,
                     rows, tile_mask, offs, in_range, M, CA, CB, N, cols, col_ok,
                     KVOL: tl.constexpr, IDENTITY: tl.constexpr, HAS_B: tl.constexpr, PAIR: tl.constexpr,
                     DOT_F32: tl.constexpr, PRECISION: tl.constexpr, BK: tl.constexpr):
    """The K loop of one tile over all KVOL offsets, skipping those whose bit of the tile mask is
    clear; per offset the channel chunks of segment a, then of segment b."""
    cin = CA + CB
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
    return acc, acc2


@triton.jit
def _flat_products(acc, acc2, a_base, b_base, stride_ag, stride_am, stride_bg, stride_bm, w_ptr, table_ptr,
                   list_ptr, offs, in_range, M, CA, CB, N, cols, col_ok, HAS_B: tl.constexpr,
                   PAIR: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr, BK: tl.constexpr):
    """The K loop of one tile as one flat loop over (listed offset, channel chunk) pairs - per
    offset the chunks of segment a, then of segment b - with no branch in its body: the form
    Triton's software pipeliner can overlap (the next gather's loads under this product).
    ``list_ptr``: the tile's row of :meth:`.kmap.CoordinateManager.tile_offsets`."""
    ck = tl.arange(0, BK)
    chunks_a = tl.cdiv(CA, BK)
    chunks = chunks_a
    if HAS_B:
        chunks += tl.cdiv(CB, BK)
    count = tl.load(list_ptr)
    cin = CA + CB
    for it in range(0, count * chunks):
        j = it // chunks
        c = it - j * chunks
        k = tl.load(list_ptr + 1 + j)
        src32 = tl.load(table_ptr + k * M + offs, mask=in_range, other=-1)
        valid = src32 >= 0
        src = tl.where(valid, src32, 0).to(tl.int64)
        if HAS_B:   # segment a's chunks, then segment b's: pointers chosen per iteration
            in_a = c < chunks_a
            c0 = tl.where(in_a, c, c - chunks_a) * BK
            ch = c0 + ck
            ch_ok = ch < tl.where(in_a, CA, CB)
            a_ptrs = tl.where(in_a, a_base + src[:, None] * stride_am, b_base + src[:, None] * stride_bm) + ch[None, :]
            w_rows = tl.where(in_a, c0, CA + c0) + ck
            g_step = tl.where(in_a, stride_ag, stride_bg)
        else:       # one segment: plain affine pointers (alignment known, no select)
            c0 = c * BK
            ch = c0 + ck
            ch_ok = ch < CA
            a_ptrs = a_base + src[:, None] * stride_am + ch[None, :]
            w_rows = ch
            g_step = stride_ag
        a_mask = valid[:, None] & ch_ok[None, :]
        w = tl.load(w_ptr + k * cin * N + w_rows[:, None] * N + cols[None, :],
                    mask=ch_ok[:, None] & col_ok[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        acc = _mma(acc, a, w, DOT_F32, PRECISION)
        if PAIR:
            a2 = tl.load(a_ptrs + g_step, mask=a_mask, other=0.0)
            acc2 = _mma(acc2, a2, w, DOT_F32, PRECISION)
    return acc, acc2


# Row counts change with every scan: not specialised on (a compiled variant per divisibility class
# of M would double the compile time for nothing). Channel counts, row strides and the feature-group
# strides (rows x channels) are specialised: Triton then knows that a row of a gathered tile starts
# on a 16-byte boundary, and the gathers become vectorised asynchronous copies that the pipeliner
# overlaps with the products. Left unspecialised, the group strides made every gathered element a
# separate 2-byte load that the loop waited for (Triton 3.6, sm_90: measured on an H200, see
# docs/benchmarks.md). A group stride is a multiple of 16 whenever the channel count is, so this
# costs no extra compilation for any layer but the 3-channel stems.
@triton.jit(do_not_specialize=["M"])
def implicit_gemm_kernel(
        a_ptr, b_ptr, w_ptr, out_ptr,
        order_ptr, table_ptr, tile_mask_ptr, tile_list_ptr,
        scale_ptr, shift_ptr, res_ptr,
        M, CA, CB, N,
        stride_ag, stride_am, stride_bg, stride_bm, stride_rg, stride_rm,
        KVOL: tl.constexpr, IDENTITY: tl.constexpr, HAS_B: tl.constexpr, AFFINE: tl.constexpr,
        RESIDUAL: tl.constexpr, RELU: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
        PAIR: tl.constexpr, FLAT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
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
    written by exactly one program: no atomics. ``FLAT`` (with a table): the tile's offsets come
    listed (``tile_list``, :meth:`.kmap.CoordinateManager.tile_offsets`) and the K loop is one
    branch-free loop (:func:`_flat_products`) instead of a loop over all KVOL offsets that tests
    the tile mask (:func:`_masked_products`)."""
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
    a_base = a_ptr + g * stride_ag
    b_base = b_ptr + g * stride_bg
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    if FLAT and not IDENTITY:
        acc, acc2 = _flat_products(acc, acc2, a_base, b_base, stride_ag, stride_am, stride_bg, stride_bm, w_ptr,
                                   table_ptr, tile_list_ptr + pid_m * (KVOL + 1), offs, in_range, M, CA, CB,
                                   N, cols, col_ok, HAS_B, PAIR, DOT_F32, PRECISION, BK)
    else:
        acc, acc2 = _masked_products(acc, acc2, a_base, b_base, stride_ag, stride_am, stride_bg, stride_bm,
                                     w_ptr, table_ptr, rows, tile_mask, offs, in_range, M, CA, CB, N, cols,
                                     col_ok, KVOL, IDENTITY, HAS_B, PAIR, DOT_F32, PRECISION, BK)
    rows64 = rows.to(tl.int64)
    out_mask = in_range[:, None] & col_ok[None, :]
    _epilogue_store(acc, g, rows64, out_mask, cols, col_ok, M, N, out_ptr, scale_ptr, shift_ptr, res_ptr,
                    stride_rg, stride_rm, AFFINE, RESIDUAL, RELU)
    if PAIR:
        _epilogue_store(acc2, g + 1, rows64, out_mask, cols, col_ok, M, N, out_ptr, scale_ptr, shift_ptr,
                        res_ptr, stride_rg, stride_rm, AFFINE, RESIDUAL, RELU)


@triton.jit
def _nearest_in_ref(qb, qx, qy, qz, r_ptr, E, BQ: tl.constexpr, BR: tl.constexpr):
    """(squared distance, index) of the nearest row of the float64 planes ``r`` (4, E) with the
    query's batch element, for a block of queries given as float64 b, x, y, z; (inf, 0) where
    none. Each program keeps a (BQ, BR) running minimum - column j sees the reference rows j,
    j + BR, j + 2 BR, ... in increasing order and keeps the first of equal distances - and reduces
    it once at the end: the smallest distance, then the smallest index among the columns that
    reach it."""
    inf = float("inf")
    best_d = tl.full((BQ, BR), inf, tl.float64)
    best_i = tl.full((BQ, BR), 0, tl.int32)
    cols = tl.arange(0, BR)
    for r0 in range(0, E, BR):
        rs = r0 + cols
        r_ok = rs < E
        rb = tl.load(r_ptr + rs, mask=r_ok, other=-2.0)
        rx = tl.load(r_ptr + E + rs, mask=r_ok, other=0.0)
        ry = tl.load(r_ptr + 2 * E + rs, mask=r_ok, other=0.0)
        rz = tl.load(r_ptr + 3 * E + rs, mask=r_ok, other=0.0)
        dx = qx[:, None] - rx[None, :]
        dy = qy[:, None] - ry[None, :]
        dz = qz[:, None] - rz[None, :]
        d = dx * dx + dy * dy + dz * dz
        d = tl.where(qb[:, None] == rb[None, :], d, inf)
        better = d < best_d
        best_d = tl.where(better, d, best_d)
        best_i = tl.where(better, rs[None, :], best_i)
    nearest = tl.min(best_d, axis=1)
    idx = tl.min(tl.where(best_d == nearest[:, None], best_i, 0x7FFFFFFF), axis=1)
    return nearest, tl.where(nearest == inf, 0, idx)


@triton.jit(do_not_specialize=["M", "E"])
def nearest_cell_kernel(q_ptr, r_ptr, out_ptr, M, E, BQ: tl.constexpr, BR: tl.constexpr):
    """For each query row of ``q``: the index of the nearest row of ``r`` with the same batch
    element (squared Euclidean distance over x, y, z; ties to the smallest index), or -1 when no
    row of ``r`` has that batch element.

    ``q`` (4, M) and ``r`` (4, E) are float64 planes b, x, y, z holding integers: every difference,
    square and sum stays an integer below 2**53 for coordinates below 2**17 in magnitude, so the
    distances are exact (float64 runs at half the fp32 rate on the GPU; int64 products are
    emulated). See :func:`_nearest_in_ref` for the order of the search."""
    pid = tl.program_id(0)
    qs = pid * BQ + tl.arange(0, BQ)
    q_ok = qs < M
    qb = tl.load(q_ptr + qs, mask=q_ok, other=-1.0)
    qx = tl.load(q_ptr + M + qs, mask=q_ok, other=0.0)
    qy = tl.load(q_ptr + 2 * M + qs, mask=q_ok, other=0.0)
    qz = tl.load(q_ptr + 3 * M + qs, mask=q_ok, other=0.0)
    nearest, idx = _nearest_in_ref(qb, qx, qy, qz, r_ptr, E, BQ, BR)
    idx = tl.where(nearest == float("inf"), -1, idx)
    tl.store(out_ptr + qs, idx.to(tl.int64), mask=q_ok)


@triton.jit(do_not_specialize=["n", "E"])
def nearest_rows_kernel(q_ptr, stride_qm, stride_qc, rows_ptr, n, todo_ptr, r_ptr, out_ptr, E,
                        BQ: tl.constexpr, BR: tl.constexpr):
    """:func:`nearest_cell_kernel` for the listed rows of an int64 (M, 4) ``(b, x, y, z)`` query
    whose ``todo`` flag (int8) is set, written in place into ``out[row]`` (0 where the batch element
    has no cell, as the float64 GEMM fallback gives); the other listed rows are left alone. The
    listed rows must be distinct."""
    i = tl.program_id(0) * BQ + tl.arange(0, BQ)
    ok = i < n
    row = tl.load(rows_ptr + i, mask=ok, other=0)
    todo = ok & (tl.load(todo_ptr + row, mask=ok, other=0) != 0)
    base = q_ptr + row.to(tl.int64) * stride_qm
    qb = tl.load(base, mask=todo, other=-1).to(tl.float64)
    qx = tl.load(base + stride_qc, mask=todo, other=0).to(tl.float64)
    qy = tl.load(base + 2 * stride_qc, mask=todo, other=0).to(tl.float64)
    qz = tl.load(base + 3 * stride_qc, mask=todo, other=0).to(tl.float64)
    _, idx = _nearest_in_ref(qb, qx, qy, qz, r_ptr, E, BQ, BR)
    tl.store(out_ptr + row, idx.to(tl.int64), mask=todo)


@triton.jit
def _fps_cloud(c, start_ptr, count_ptr, n_out_ptr, out_start_ptr):
    """Cloud ``c`` of a sampling launch: (its first row in the points, its size, its sample count,
    its first row in the output)."""
    start = tl.load(start_ptr + c).to(tl.int64)
    n = tl.load(count_ptr + c)
    n_out = tl.load(n_out_ptr + c)
    o = tl.load(out_start_ptr + c).to(tl.int64)
    return start, n, n_out, o


@triton.jit
def _xyz(p_ptr, rows, ok):
    """x, y, z of the (N, 3) float32 points at ``rows`` (0 where not ``ok``)."""
    x = tl.load(p_ptr + rows * 3, mask=ok, other=0.0)
    y = tl.load(p_ptr + rows * 3 + 1, mask=ok, other=0.0)
    z = tl.load(p_ptr + rows * 3 + 2, mask=ok, other=0.0)
    return x, y, z


@triton.jit
def _sq(x, y, z, qx, qy, qz):
    """Squared distance in float32, evaluated as the textbook loop does (the kernels compile
    without fused multiply-adds, so each product is rounded)."""
    return (x - qx) * (x - qx) + (y - qy) * (y - qy) + (z - qz) * (z - qz)


@triton.jit
def fps_kernel(p_ptr, start_ptr, count_ptr, n_out_ptr, out_start_ptr, dist_ptr, out_ptr,
               BLOCK: tl.constexpr):
    """Exact farthest-point sampling, one cloud per program.

    Cloud ``c`` is ``p[start[c] : start[c] + count[c]]`` (xyz, float32, (N, 3)); it takes
    ``n_out[c]`` samples, written as indices into ``p`` at ``out[out_start[c] ...]``. The first
    sample is the cloud's first point; each next one is the point farthest (Euclidean, ties to the
    smallest index) from every sample so far. ``dist`` (N,) float32 is scratch: the running
    squared distance of each point to the samples."""
    start, n, n_out, o = _fps_cloud(tl.program_id(0), start_ptr, count_ptr, n_out_ptr, out_start_ptr)
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
            x, y, z = _xyz(p_ptr, start + i, ok)
            d = _sq(x, y, z, lx, ly, lz)
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


@triton.jit
def fps_grid_kernel(p_ptr, start_ptr, count_ptr, n_out_ptr, out_start_ptr, slot_ptr, status_ptr, out_ptr,
                    P, max_polls, BLOCK: tl.constexpr, PB: tl.constexpr):
    """Exact farthest-point sampling with every cloud split over ``P`` programs that trade their
    candidates through global memory at each step (program axis 0: the chunk, axis 1: the cloud).

    Inputs as :func:`fps_kernel`. Program ``j`` keeps its chunk of ``ceil(n / P)`` points (at most
    ``BLOCK``) and their running distances in registers for the whole run. At step ``s`` it
    publishes one 64-bit key per chunk, ``float bits of the largest distance << 32 | (2**24 - 1 -
    its index) << 8 | s mod 256``, into ``slot[cloud, s mod 2, j]`` and polls the ``P`` keys of the
    step until every one carries the step's tag; the largest key is the sample (the farthest point,
    ties to the smallest index), the same in every program. Each key validates itself by its tag,
    so no fence or barrier is needed; two slot buffers suffice because no program can start step
    s + 2 before every program has read step s. ``slot`` (clouds, 2, PB) int64 starts zeroed.
    (Publishing the candidate's coordinates beside its key, to spare the load of the winner's
    point, made each poll read four times the words: 141 ms instead of 55 ms for 18,000 of
    120,000 points on an H200.)

    Every program of a launch must be resident at once (the caller launches at most one per SM),
    and the interpreter runs programs one after another, so it takes ``P == 1``. A step that polls
    ``max_polls`` times without completing sets ``status`` to 1 and ends the program instead of
    hanging. Clouds are limited to 2**24 - 1 points (the index field)."""
    j = tl.program_id(0)
    c = tl.program_id(1)
    start, n, n_out, o = _fps_cloud(c, start_ptr, count_ptr, n_out_ptr, out_start_ptr)
    chunk = tl.cdiv(n, P)
    lanes = tl.arange(0, BLOCK)
    i = j * chunk + lanes
    ok = (lanes < chunk) & (i < n)
    x, y, z = _xyz(p_ptr, start + i, ok)
    dist = tl.where(ok, float("inf"), -1.0)     # -1: no point here, never the farthest
    slots = slot_ptr + c.to(tl.int64) * 2 * PB
    peers = tl.arange(0, PB)
    is_peer = peers < P
    if j == 0:
        tl.store(out_ptr + o, start)
    last = 0
    failed = 0
    s = 1
    while (s < n_out) & (failed == 0):
        lx = tl.load(p_ptr + (start + last) * 3)
        ly = tl.load(p_ptr + (start + last) * 3 + 1)
        lz = tl.load(p_ptr + (start + last) * 3 + 2)
        dist = tl.minimum(dist, _sq(x, y, z, lx, ly, lz))
        far = tl.max(dist, axis=0)
        at = tl.min(tl.where(dist == far, i, 0x7FFFFFFF), axis=0)
        tag = (s & 0xFF).to(tl.int64)
        key = (far.to(tl.int32, bitcast=True).to(tl.int64) << 32) | ((0xFFFFFF - at).to(tl.int64) << 8) | tag
        key = tl.where(far >= 0.0, key, tag)
        buf = slots + (s % 2) * PB
        tl.store(buf + j, key)
        keys = tl.load(buf + peers, mask=is_peer, other=tag, volatile=True)
        ready = tl.sum(((keys & 0xFF) == tag).to(tl.int32), axis=0)
        polls = 1
        while (ready < PB) & (polls < max_polls):
            keys = tl.load(buf + peers, mask=is_peer, other=tag, volatile=True)
            ready = tl.sum(((keys & 0xFF) == tag).to(tl.int32), axis=0)
            polls += 1
        if ready < PB:
            failed = 1
            tl.store(status_ptr, 1)
        best = tl.max(keys, axis=0)
        last = 0xFFFFFF - ((best >> 8) & 0xFFFFFF).to(tl.int32)
        if j == 0:
            tl.store(out_ptr + o + s, start + last)
        s += 1


@triton.jit
def fps_rounds_kernel(p_ptr, start_ptr, count_ptr, n_out_ptr, out_start_ptr, slot_ptr, status_ptr, out_ptr,
                      P, max_polls, BLOCK: tl.constexpr, PB: tl.constexpr, K: tl.constexpr):
    """Exact farthest-point sampling as :func:`fps_grid_kernel` (same inputs, same samples), with
    several samples taken per exchange instead of one.

    Program ``j`` holds points ``j, j + P, j + 2 P, ...`` (at most ``BLOCK``), not a run of
    consecutive ones: a scan arrives in the sensor's azimuth order, and a run of it is one patch
    of space, whose best points lower each other's distances and settle fewer samples per round
    (on a 120,000-point scan in sensor order, twice the rounds).

    Every point's key is ``float bits of its running distance << 24 | (2**24 - 1 - its index)``:
    the largest key is the textbook algorithm's next sample (the farthest point, ties to the
    smallest index), and a key can only fall as samples are added. In each round every program
    publishes its ``K`` largest keys (the candidates) and its next one, tagged with the round
    number as in :func:`fps_grid_kernel`; the bound ``B`` is the largest of the programs' next keys,
    so every point that is no candidate has a key of at most ``B`` for the rest of the round. Then
    every program runs the textbook loop on the candidates alone - take the largest key, lower the
    candidates' distances by it - for as long as the largest key exceeds ``B``: each sample so taken
    is the one the textbook loop takes next, because no other point can reach it. The program folds
    each sample into its own points' distances as it goes. Every program reads the same keys and
    takes the same samples; the round's first sample always exceeds ``B``, so every round takes
    one sample at least, and on a scan tens of them (18,000 of 120,000 points over 132 programs:
    17,999 exchanges for :func:`fps_grid_kernel`, about 500 here with ``K`` = 2, about 37 samples
    each: ``benchmarks/fps_rounds.py``).

    ``slot`` (clouds, 2, PB, K + 1) int64 starts zeroed; ``status`` is set to 1 when a round polls
    ``max_polls`` times without every key, and to 2 if a round took no sample (which the argument
    above rules out), and the program ends instead of hanging. The same residency rule as
    :func:`fps_grid_kernel` holds; under the interpreter ``P == 1``."""
    j = tl.program_id(0)
    c = tl.program_id(1)
    start, n, n_out, o = _fps_cloud(c, start_ptr, count_ptr, n_out_ptr, out_start_ptr)
    lanes = tl.arange(0, BLOCK)
    i = lanes * P + j                   # every P-th point: each program's points spread over the scan
    ok = i < n
    x, y, z = _xyz(p_ptr, start + i, ok)
    inv = (0xFFFFFF - i).to(tl.int64)
    # the first sample is the cloud's first point
    lx = tl.load(p_ptr + start * 3)
    ly = tl.load(p_ptr + start * 3 + 1)
    lz = tl.load(p_ptr + start * 3 + 2)
    dist = tl.where(ok, _sq(x, y, z, lx, ly, lz), -1.0)
    if j == 0:
        tl.store(out_ptr + o, start)
    slots = slot_ptr + c.to(tl.int64) * 2 * PB * (K + 1)
    peers = tl.arange(0, PB)
    is_peer = peers < P
    kk = tl.arange(0, K)
    s = 1
    r = 1
    failed = 0
    while (s < n_out) & (failed == 0):
        tag = (r & 0xFF).to(tl.int64)
        buf = slots + (r % 2) * PB * (K + 1)
        key = tl.where(ok, (dist.to(tl.int32, bitcast=True).to(tl.int64) << 24) | inv, 0)
        for q in tl.static_range(K + 1):      # the K largest keys, then the next one
            top = tl.max(key, axis=0)
            tl.store(buf + j * (K + 1) + q, (top << 8) | tag)
            key = tl.where(key == top, 0, key)
        cptr = buf + peers[:, None] * (K + 1) + kk[None, :]
        bptr = buf + peers * (K + 1) + K
        cand = tl.load(cptr, mask=is_peer[:, None], other=tag, volatile=True)
        nxt = tl.load(bptr, mask=is_peer, other=tag, volatile=True)
        ready = tl.sum(tl.sum(((cand & 0xFF) == tag).to(tl.int32), axis=1), axis=0) + \
            tl.sum(((nxt & 0xFF) == tag).to(tl.int32), axis=0)
        polls = 1
        while (ready < PB * (K + 1)) & (polls < max_polls):
            cand = tl.load(cptr, mask=is_peer[:, None], other=tag, volatile=True)
            nxt = tl.load(bptr, mask=is_peer, other=tag, volatile=True)
            ready = tl.sum(tl.sum(((cand & 0xFF) == tag).to(tl.int32), axis=1), axis=0) + \
                tl.sum(((nxt & 0xFF) == tag).to(tl.int32), axis=0)
            polls += 1
        if ready < PB * (K + 1):
            failed = 1
            tl.store(status_ptr, 1)
        else:
            bound = tl.max(nxt >> 8, axis=0)
            ck = cand >> 8
            live = ck > bound                  # the others cannot be taken this round
            ck = tl.where(live, ck, 0)
            ci = 0xFFFFFF - (ck & 0xFFFFFF)
            cd = (ck >> 24).to(tl.int32).to(tl.float32, bitcast=True)
            cx, cy, cz = _xyz(p_ptr, start + ci, live)
            s0 = s
            more = 1
            while more == 1:
                best = tl.max(tl.max(ck, axis=1), axis=0)
                if (best > bound) & (s < n_out):
                    at = 0xFFFFFF - (best & 0xFFFFFF)
                    # the sample's coordinates from the candidates' registers, not a dependent load
                    hit = ck == best
                    sx = tl.max(tl.max(tl.where(hit, cx, -float("inf")), axis=1), axis=0)
                    sy = tl.max(tl.max(tl.where(hit, cy, -float("inf")), axis=1), axis=0)
                    sz = tl.max(tl.max(tl.where(hit, cz, -float("inf")), axis=1), axis=0)
                    if j == 0:
                        tl.store(out_ptr + o + s, start + at)
                    s += 1
                    dist = tl.minimum(dist, _sq(x, y, z, sx, sy, sz))
                    cd = tl.minimum(cd, _sq(cx, cy, cz, sx, sy, sz))
                    ck = tl.where(live, (cd.to(tl.int32, bitcast=True).to(tl.int64) << 24) | (ck & 0xFFFFFF), 0)
                else:
                    more = 0
            if s == s0:
                failed = 1
                tl.store(status_ptr, 2)
        r += 1


@triton.jit(do_not_specialize=["M"])
def modulate_kernel(f_ptr, w_ptr, idx_ptr, out_ptr, M, C, stride_f, stride_o,
                    BM: tl.constexpr, BC: tl.constexpr):
    """``out[m, c] = f[m, c] * w[idx[m], c]`` in fp32, rounded once to the output's dtype (what
    ``f * w.index_select(0, idx)`` computes, without the gathered matrix): the denoiser's
    modulation of the features by the weight of each row's nearest condition cell. ``w`` (E, C)
    contiguous, ``idx`` (M,) int64, row strides ``stride_f`` / ``stride_o``."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    r_ok = rows < M
    ok = r_ok[:, None] & (cols < C)[None, :]
    src = tl.load(idx_ptr + rows, mask=r_ok, other=0)
    r64 = rows.to(tl.int64)
    f = tl.load(f_ptr + r64[:, None] * stride_f + cols[None, :], mask=ok, other=0.0)
    w = tl.load(w_ptr + src[:, None] * C + cols[None, :], mask=ok, other=0.0)
    out = f.to(tl.float32) * w.to(tl.float32)
    # compiled, the cast rounds to nearest even, as torch does (the interpreter truncates)
    tl.store(out_ptr + r64[:, None] * stride_o + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["M", "G", "rows_per_split"])   # group strides specialised: see above
def weight_grad_kernel(x_ptr, go_ptr, dw_ptr, order_ptr, table_ptr, count_ptr,
                       M, CX, C_OFF, CIN, N, G, rows_per_split,
                       stride_xg, stride_xm, stride_gg, stride_gm,
                       KVOL: tl.constexpr, IDENTITY: tl.constexpr, COMPACT: tl.constexpr, DOT_F32: tl.constexpr,
                       PRECISION: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr):
    """dW[k, C_OFF + c, n] += sum_g sum_r x[g, table[r, k], c] * grad_out[g, order[r], n] over one
    split of ``rows_per_split`` rows (program axis 1): the weight gradient of one input segment of
    CX channels, as a gather-GEMM per offset (program axis 0). Splits add into the fp32 ``dW``
    (KVOL, CIN, N) with atomics. ``table`` / ``order`` are a gather plan (any tile size); with
    ``COMPACT`` they are its pairs listed per offset (``CoordinateManager.offset_rows``: row k of
    ``table`` the input rows, of ``order`` the output rows, ``count[k]`` of them), and a split
    covers only the listed pairs (a split past them adds nothing)."""
    k = tl.program_id(0)
    split = tl.program_id(1)
    tiles_n = tl.cdiv(N, BN)
    c = (tl.program_id(2) // tiles_n) * BC + tl.arange(0, BC)
    n = (tl.program_id(2) % tiles_n) * BN + tl.arange(0, BN)
    c_ok = c < CX
    n_ok = n < N
    acc = tl.zeros((BC, BN), dtype=tl.float32)
    start = split * rows_per_split
    end = start + rows_per_split
    if COMPACT:
        end = tl.minimum(end, tl.load(count_ptr + k))
    if end > start:
        for g in range(G):
            x_base = x_ptr + g * stride_xg
            go_base = go_ptr + g * stride_gg
            for r0 in range(start, end, BR):
                r = r0 + tl.arange(0, BR)
                if IDENTITY:
                    ok = r < M
                    src = r.to(tl.int64)
                    valid = ok
                    out_rows = r.to(tl.int64)
                elif COMPACT:
                    valid = r < end
                    src = tl.load(table_ptr + k * M + r, mask=valid, other=0).to(tl.int64)
                    out_rows = tl.load(order_ptr + k * M + r, mask=valid, other=0).to(tl.int64)
                else:
                    ok = r < M
                    src32 = tl.load(table_ptr + k * M + r, mask=ok, other=-1)
                    valid = src32 >= 0
                    src = tl.where(valid, src32, 0).to(tl.int64)
                    out_rows = tl.load(order_ptr + r, mask=ok, other=0).to(tl.int64)
                x = tl.load(x_base + src[:, None] * stride_xm + c[None, :], mask=valid[:, None] & c_ok[None, :],
                            other=0.0)
                go = tl.load(go_base + out_rows[:, None] * stride_gm + n[None, :],
                             mask=valid[:, None] & n_ok[None, :], other=0.0)
                acc = _mma(acc, tl.trans(x), go, DOT_F32, PRECISION)
        tl.atomic_add(dw_ptr + (k * CIN + C_OFF + c[:, None]) * N + n[None, :], acc,
                      mask=c_ok[:, None] & n_ok[None, :])
