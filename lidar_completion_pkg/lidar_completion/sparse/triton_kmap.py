"""Kernel-map building in Triton: the Triton backend's coordinate manager calls these instead of
chains of torch operations (imported only by the Triton backend).

Why: on an H200 a published-width guided denoiser pass issued about 1,600 kernels, 87 % of
them under 10 us, with the GPU idle between them; counted on the CPU, 807 of a pass's 1,021 torch
operators built the maps and looked up the condition cells (element-wise ops over (rows, 27) and
(rows, 64) int64 intermediates, gathers, sorts). Each function here does in one or two kernels
what took five to twenty torch operations, with int32 outputs and no intermediate of the
(rows, offsets) size; the sorts stay torch's (radix sorts). Every output equals the torch form's
(tests/test_triton.py under the interpreter), except that the lattice search settles more rows.

* :func:`neighbour_bits` - 3x3x3 neighbour table (27 binary searches per row in the sorted keys)
  and each row's neighbour bitmask;
* :func:`child_bits` / :func:`parent_bits` - the tables of the stride-2 and the transposed
  convolutions from the parent map, with their bitmasks;
* :func:`arrange` - a gather plan from a table and its bitmasks: rows sorted by bitmask, the table
  transposed in that order, one OR-ed mask per tile;
* :func:`parent_keys` - the coarse key and the offset inside the parent cell of every row;
* :func:`unique_static` - sorted unique keys with a fixed capacity (static mode);
* :func:`unpack_keys` - the (b, x, y, z) coordinates of packed keys;
* :func:`lattice_nearest` - the nearest condition cell among the lattice points around each query
  (the exact search of :func:`.nearest._nearest_lattice`, widened to a 6x6x6 block for the queries
  the 4x4x4 block leaves, so that fewer rows need the brute force).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .coords import AXIS_BITS, AXIS_OFFSET
from .static import PAD_KEY

_ROWS = 128     # rows per program of the element-wise map kernels


@triton.jit
def _lower_bound(keys_ptr, n, q, iters):
    """First index i in [0, n] with keys[i] >= q (keys sorted ascending), for every element of
    ``q``; ``iters`` >= bit length of n steps of bisection."""
    lo = tl.zeros(q.shape, tl.int32)
    hi = lo + n
    for _ in range(iters):
        active = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(keys_ptr + mid, mask=active, other=0)
        right = active & (v < q)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    return lo


@triton.jit(do_not_specialize=["M", "iters"])
def neighbour_kernel(keys_ptr, delta_ptr, table_ptr, bits_ptr, M, iters, pad_key,
                     K: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr):
    """``table[i, k]`` (int32, (M, K) row-major): the row whose key is ``keys[i] + delta[k]``, or
    -1; ``bits[i]``: bit k set where there is one. A padding row (key ``pad_key``) searches only
    its centre (delta 0), which finds the first padding row, as the torch form does."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_ok = rows < M
    ks = tl.arange(0, KP)
    k_ok = ks < K
    key = tl.load(keys_ptr + rows, mask=row_ok, other=0)
    delta = tl.load(delta_ptr + ks, mask=k_ok, other=0)
    pad = key == pad_key
    # no int64 overflow for padding rows: their off-centre queries become -1 (below every key)
    q = tl.where(pad, 0, key)[:, None] + delta[None, :]
    q = tl.where(pad[:, None], tl.where(delta[None, :] == 0, key[:, None], -1), q)
    pos = _lower_bound(keys_ptr, M, q, iters)
    ok = row_ok[:, None] & k_ok[None, :]
    inside = ok & (pos < M)
    found = tl.load(keys_ptr + pos, mask=inside, other=0)
    hit = inside & (found == q)
    tl.store(table_ptr + rows[:, None] * K + ks[None, :], tl.where(hit, pos, -1), mask=ok)
    bits = tl.sum(tl.where(hit, 1 << ks[None, :], 0), axis=1)
    tl.store(bits_ptr + rows, bits, mask=row_ok)


@triton.jit(do_not_specialize=["M"])
def child_kernel(parent_ptr, k_ptr, table_ptr, bits_ptr, M, BM: tl.constexpr):
    """Fine row i is child ``k[i]`` of coarse row ``parent[i]``: ``table[parent, k] = i`` (the table
    prefilled with -1) and bit k of ``bits[parent]`` set. Each (parent, k) has one child."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    ok = rows < M
    p = tl.load(parent_ptr + rows, mask=ok, other=0)
    k = tl.load(k_ptr + rows, mask=ok, other=0).to(tl.int32)
    tl.store(table_ptr + p * 8 + k, rows, mask=ok)
    tl.atomic_or(bits_ptr + p, 1 << k, mask=ok)


@triton.jit(do_not_specialize=["M"])
def parent_kernel(parent_ptr, k_ptr, table_ptr, bits_ptr, M, BM: tl.constexpr):
    """Fine row i reads its parent at its own offset: ``table[i, k[i]] = parent[i]``, -1 in the
    other 7 columns, ``bits[i] = 1 << k[i]``."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    ok = rows < M
    p = tl.load(parent_ptr + rows, mask=ok, other=0).to(tl.int32)
    k = tl.load(k_ptr + rows, mask=ok, other=0).to(tl.int32)
    cols = tl.arange(0, 8)
    tl.store(table_ptr + rows[:, None] * 8 + cols[None, :],
             tl.where(cols[None, :] == k[:, None], p[:, None], -1), mask=ok[:, None])
    tl.store(bits_ptr + rows, 1 << k, mask=ok)


@triton.jit(do_not_specialize=["M"])
def arrange_kernel(order_ptr, table_ptr, out_table_ptr, out_order_ptr, M,
                   K: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr):
    """Position i of the plan holds row ``order[i]``: ``out_table[k, i] = table[order[i], k]``
    (transposed, int32) and ``out_order[i] = order[i]`` as int32."""
    i = tl.program_id(0) * BM + tl.arange(0, BM)
    ok = i < M
    r = tl.load(order_ptr + i, mask=ok, other=0)
    ks = tl.arange(0, KP)
    mask = ok[:, None] & (ks < K)[None, :]
    v = tl.load(table_ptr + r[:, None] * K + ks[None, :], mask=mask, other=-1)
    tl.store(out_table_ptr + ks[None, :] * M + i[:, None], v, mask=mask)
    tl.store(out_order_ptr + i, r.to(tl.int32), mask=ok)


@triton.jit
def _or(a, b):
    return a | b


@triton.jit(do_not_specialize=["M"])
def tile_mask_kernel(bits_ptr, mask_ptr, M, BLOCK: tl.constexpr):
    """``mask[t]``: the OR of ``bits`` over rows t * BLOCK ... t * BLOCK + BLOCK - 1."""
    t = tl.program_id(0)
    i = t * BLOCK + tl.arange(0, BLOCK)
    b = tl.load(bits_ptr + i, mask=i < M, other=0).to(tl.int32)
    tl.store(mask_ptr + t, tl.reduce(b, 0, _or))


@triton.jit(do_not_specialize=["M"])
def parent_keys_kernel(keys_ptr, coarse_ptr, k_ptr, M, sh, pad_key, AXIS: tl.constexpr, BM: tl.constexpr):
    """For a level at stride ``2**sh``: each row's key with the low ``sh + 1`` bits of every axis
    field cleared (the parent cell's key; padding keys stay ``pad_key``) and its offset inside the
    parent cell, ``x + 2 y + 4 z`` of the bits at ``sh``."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    ok = rows < M
    key = tl.load(keys_ptr + rows, mask=ok, other=0)
    low = (tl.full((BM,), 1, tl.int64) << (sh + 1)) - 1
    clear = low | (low << AXIS) | (low << (2 * AXIS))
    coarse = tl.where(key == pad_key, key, key & ~clear)
    k = ((key >> (2 * AXIS + sh)) & 1) + 2 * ((key >> (AXIS + sh)) & 1) + 4 * ((key >> sh) & 1)
    tl.store(coarse_ptr + rows, coarse, mask=ok)
    tl.store(k_ptr + rows, k, mask=ok)


@triton.jit(do_not_specialize=["M"])
def first_flag_kernel(skeys_ptr, flag_ptr, M, BM: tl.constexpr):
    """``flag[i] = 1`` where sorted key i differs from key i - 1 (always at i = 0)."""
    i = tl.program_id(0) * BM + tl.arange(0, BM)
    ok = i < M
    cur = tl.load(skeys_ptr + i, mask=ok, other=0)
    prev = tl.load(skeys_ptr + i - 1, mask=ok & (i > 0), other=0)
    tl.store(flag_ptr + i, ((i == 0) | (cur != prev)).to(tl.int32), mask=ok)


@triton.jit(do_not_specialize=["M", "cap"])
def unique_finish_kernel(skeys_ptr, order_ptr, ids_ptr, ukeys_ptr, dump_ptr, count_ptr, M, cap, pad_key,
                         BM: tl.constexpr):
    """After the sort and the inclusive count of group starts ``ids``: the first row of each group
    writes the group's key to ``ukeys[id]`` (ids past the capacity and padding go to slot ``cap``,
    which is dropped), every row writes its slot to ``dump[order[i]]``; the program holding the
    last row writes the number of distinct real keys."""
    i = tl.program_id(0) * BM + tl.arange(0, BM)
    ok = i < M
    sk = tl.load(skeys_ptr + i, mask=ok, other=0)
    ids = tl.load(ids_ptr + i, mask=ok, other=0).to(tl.int64) - 1
    prev = tl.load(skeys_ptr + i - 1, mask=ok & (i > 0), other=0)
    first = (i == 0) | (sk != prev)
    real = sk != pad_key
    slot = tl.where(real & (ids < cap), ids, cap)
    tl.store(ukeys_ptr + slot, sk, mask=ok & first & (slot < cap))
    src = tl.load(order_ptr + i, mask=ok, other=0)
    tl.store(dump_ptr + src, slot, mask=ok)
    last = ok & (i == M - 1)
    tl.store(count_ptr + i * 0, tl.where(real, ids + 1, ids), mask=last)


@triton.jit(do_not_specialize=["M"])
def unpack_kernel(keys_ptr, out_ptr, M, AXIS: tl.constexpr, OFFSET: tl.constexpr, BM: tl.constexpr):
    """(M, 4) int64 ``(b, x, y, z)`` of packed keys (:func:`.coords.unpack_keys`)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    ok = rows < M
    key = tl.load(keys_ptr + rows, mask=ok, other=0)
    field = (1 << AXIS) - 1
    cols = tl.arange(0, 4)
    shift = (3 - cols) * AXIS                               # b, x, y, z from the top field down
    v = key[:, None] >> shift[None, :]
    v = tl.where(cols[None, :] == 0, v, (v & field) - OFFSET)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * 4 + cols[None, :], v, mask=ok[:, None])


@triton.jit
def _lattice_best(x, y, z, b, bx, by, bz, c, width: tl.constexpr, todo, skeys_ptr, order_ptr, E, iters,
                  AXIS: tl.constexpr, OFFSET: tl.constexpr):
    """Smallest score (squared distance << 40) + reference index per query among the candidates
    ``c`` of a ``width`` ** 3 block of lattice points from the query's corner - (width / 2 - 1)
    cells (int64 max where none; only ``todo`` rows and candidates below width ** 3 are searched)."""
    half = width // 2 - 1
    ox = (c // (width * width)) * 16 - 16 * half
    oy = ((c // width) % width) * 16 - 16 * half
    oz = (c % width) * 16 - 16 * half
    cx = bx[:, None] + ox[None, :]
    cy = by[:, None] + oy[None, :]
    cz = bz[:, None] + oz[None, :]
    ckey = (b[:, None] << AXIS) + cx + OFFSET        # packed as coords.pack_keys
    ckey = (ckey << AXIS) + cy + OFFSET
    ckey = (ckey << AXIS) + cz + OFFSET
    pos = _lower_bound(skeys_ptr, E, ckey, iters)
    inside = todo[:, None] & (c < width * width * width)[None, :] & (pos < E)
    found = tl.load(skeys_ptr + pos, mask=inside, other=0)
    hit = inside & (found == ckey)
    ref = tl.load(order_ptr + pos, mask=hit, other=0)
    dx = x[:, None] - cx
    dy = y[:, None] - cy
    dz = z[:, None] - cz
    d2 = dx * dx + dy * dy + dz * dz
    return tl.min(tl.where(hit, (d2 << 40) + ref, 0x7FFFFFFFFFFFFFFF), axis=1)


@triton.jit(do_not_specialize=["M", "E", "iters"])
def lattice_nearest_kernel(q_ptr, stride_qm, stride_qc, qb_ptr, stride_qb, skeys_ptr, order_ptr,
                           out_ptr, unresolved_ptr, M, E, iters,
                           AXIS: tl.constexpr, OFFSET: tl.constexpr, BQ: tl.constexpr):
    """The nearest reference cell of the query's batch element among the lattice points around the
    query's own 16-cell corner: first the 4x4x4 block (-16 ... +32 per axis), which settles a
    query whose best is closer than 32 (any lattice point outside the block is 32 or further);
    a program with a query left over then searches the 6x6x6 block (-32 ... +48), which settles
    below 48. Score (squared distance << 40) + reference index, the smallest wins (ties to the
    smallest index); ``unresolved`` where the block has no cell or the best is not closer than
    the bound. ``skeys`` are the reference keys sorted, ``order`` their reference indices."""
    rows = tl.program_id(0) * BQ + tl.arange(0, BQ)
    ok = rows < M
    r64 = rows.to(tl.int64)
    x = tl.load(q_ptr + r64 * stride_qm, mask=ok, other=0)
    y = tl.load(q_ptr + r64 * stride_qm + stride_qc, mask=ok, other=0)
    z = tl.load(q_ptr + r64 * stride_qm + 2 * stride_qc, mask=ok, other=0)
    b = tl.load(qb_ptr + r64 * stride_qb, mask=ok, other=0)
    bx = x - (x & 15)       # floor to the lattice, also for negative coordinates
    by = y - (y & 15)
    bz = z - (z & 15)
    c = tl.arange(0, 64)
    best = _lattice_best(x, y, z, b, bx, by, bz, c, 4, ok, skeys_ptr, order_ptr, E, iters, AXIS, OFFSET)
    more = ok & ((best >> 40) >= 32 * 32)           # also where none was found (int64 max)
    if tl.max(more.to(tl.int32), axis=0) > 0:
        for chunk in tl.static_range(4):            # 216 candidates in 4 x 64
            wide = _lattice_best(x, y, z, b, bx, by, bz, c + 64 * chunk, 6, more, skeys_ptr, order_ptr, E,
                                 iters, AXIS, OFFSET)
            best = tl.where(more, tl.minimum(best, wide), best)
    tl.store(out_ptr + rows, best & ((1 << 40) - 1), mask=ok)
    bound = tl.where(more, 48 * 48, 32 * 32)
    tl.store(unresolved_ptr + rows, ((best >> 40) >= bound).to(tl.int8), mask=ok)


def _grid(m: int, block: int = _ROWS) -> tuple:
    return (max(1, -(-m // block)),)


def neighbour_bits(keys: torch.Tensor, deltas: torch.Tensor):
    """(table (M, 27) int32 with -1 for no neighbour, bitmasks (M,) int32) of the sorted keys of a
    level, for the 27 key deltas of its 3x3x3 offsets."""
    m, k = keys.shape[0], deltas.shape[0]
    table = torch.empty((m, k), dtype=torch.int32, device=keys.device)
    bits = torch.empty(m, dtype=torch.int32, device=keys.device)
    if m:
        neighbour_kernel[_grid(m, 32)](keys, deltas, table, bits, m, m.bit_length(), PAD_KEY,
                                      K=k, KP=triton.next_power_of_2(k), BM=32)
    return table, bits


def child_bits(parent: torch.Tensor, k: torch.Tensor, n_coarse: int):
    """The stride-2 convolution's table ((n_coarse, 8) int32, fine row of each child or -1) and
    bitmasks. ``parent`` may name a dump row ``n_coarse`` (static mode's padding rows)."""
    m = parent.shape[0]
    table = torch.full((n_coarse + 1, 8), -1, dtype=torch.int32, device=parent.device)
    bits = torch.zeros(n_coarse + 1, dtype=torch.int32, device=parent.device)
    if m:
        child_kernel[_grid(m)](parent, k, table, bits, m, BM=_ROWS)
    return table[:n_coarse], bits[:n_coarse]


def parent_bits(parent: torch.Tensor, k: torch.Tensor):
    """The transposed convolution's table ((M_fine, 8) int32: the parent at the row's own offset,
    -1 elsewhere) and bitmasks (one bit per row)."""
    m = parent.shape[0]
    table = torch.empty((m, 8), dtype=torch.int32, device=parent.device)
    bits = torch.empty(m, dtype=torch.int32, device=parent.device)
    if m:
        parent_kernel[_grid(m)](parent, k, table, bits, m, BM=_ROWS)
    return table, bits


def arrange(table: torch.Tensor, bits: torch.Tensor):
    """``(order (M,) int32, table (K, M) int32, bitmasks in that order (uint8 when K <= 8))``: the
    rows sorted by their bitmask (stable), the table transposed in that order (what
    :meth:`.kmap.CoordinateManager.gather_plan` returns, less the tile masks)."""
    m, k = table.shape
    # a radix sort passes over every byte of its keys: the 8-bit masks of the stride-2 and
    # transposed maps sort as uint8 (one pass instead of four; the same stable order)
    sorted_bits, order = torch.sort(bits.to(torch.uint8) if k <= 8 else bits, stable=True)
    out_table = torch.empty((k, m), dtype=torch.int32, device=table.device)
    out_order = torch.empty(m, dtype=torch.int32, device=table.device)
    if m:
        arrange_kernel[_grid(m, 64)](order, table, out_table, out_order, m,
                                     K=k, KP=triton.next_power_of_2(k), BM=64)
    return out_order, out_table, sorted_bits


def tile_masks(sorted_bits: torch.Tensor, block: int) -> torch.Tensor:
    """One OR-ed bitmask per tile of ``block`` consecutive rows (int32 or uint8), as int32."""
    m = sorted_bits.shape[0]
    tiles = -(-m // block)
    masks = torch.empty(tiles, dtype=torch.int32, device=sorted_bits.device)
    if tiles:
        tile_mask_kernel[(tiles,)](sorted_bits, masks, m, BLOCK=block)
    return masks


def parent_keys(keys: torch.Tensor, stride: int):
    """(coarse keys (padding kept), offset inside the parent cell (int64)) of a level's keys."""
    m = keys.shape[0]
    coarse = torch.empty_like(keys)
    k = torch.empty_like(keys)
    if m:
        parent_keys_kernel[_grid(m)](keys, coarse, k, m, stride.bit_length() - 1, PAD_KEY,
                                     AXIS=AXIS_BITS, BM=_ROWS)
    return coarse, k


def unique_static(keys: torch.Tensor, cap: int):
    """:func:`.kmap.unique_static` (the same four outputs) in a sort, a scan and two kernels."""
    m = keys.shape[0]
    dev = keys.device
    ukeys = torch.full((cap,), PAD_KEY, dtype=keys.dtype, device=dev)
    dump = torch.empty(m, dtype=torch.long, device=dev)
    count = torch.zeros((), dtype=torch.long, device=dev)
    if m:
        skeys, order = torch.sort(keys)
        flags = torch.empty(m, dtype=torch.int32, device=dev)
        first_flag_kernel[_grid(m)](skeys, flags, m, BM=_ROWS)
        ids = torch.cumsum(flags, 0, dtype=torch.int32)
        unique_finish_kernel[_grid(m)](skeys, order, ids, ukeys, dump, count, m, cap, PAD_KEY, BM=_ROWS)
    return ukeys, dump.clamp(max=cap - 1), dump, count


def unpack_keys(keys: torch.Tensor) -> torch.Tensor:
    """:func:`.coords.unpack_keys` in one kernel."""
    m = keys.shape[0]
    out = torch.empty((m, 4), dtype=torch.long, device=keys.device)
    if m:
        unpack_kernel[_grid(m)](keys, out, m, AXIS=AXIS_BITS, OFFSET=AXIS_OFFSET, BM=_ROWS)
    return out


def lattice_nearest(q: torch.Tensor, r: torch.Tensor, qb: torch.Tensor | None = None,
                    rb: torch.Tensor | None = None, index=None):
    """:func:`.nearest._nearest_lattice` in one kernel: the same arguments and outputs, with fewer
    rows left unresolved (the 6x6x6 block where the 4x4x4 one does not settle a row); ``index``
    is required (the reference cells' sorted keys, their order and the off-lattice flag)."""
    if index is None:
        raise ValueError("lattice_nearest needs the reference index")
    skeys, order, off_lattice = index
    m = q.shape[0]
    out = torch.empty(m, dtype=torch.long, device=q.device)
    unresolved = torch.empty(m, dtype=torch.int8, device=q.device)
    if qb is None:
        qb = torch.zeros(m, dtype=torch.long, device=q.device)
    if m:
        e = skeys.shape[0]
        lattice_nearest_kernel[_grid(m, 32)](q, q.stride(0), q.stride(1), qb, qb.stride(0), skeys, order,
                                             out, unresolved, m, e, e.bit_length(),
                                             AXIS=AXIS_BITS, OFFSET=AXIS_OFFSET, BQ=32)
    return out, unresolved.view(torch.bool), off_lattice
