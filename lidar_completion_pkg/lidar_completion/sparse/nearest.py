"""The exact nearest condition cell of every voxel (1-NN within the same batch element).

The denoiser conditions each voxel on the feature of its nearest stride-16 cell of the condition
encoder. Distances are squared Euclidean between integer cell coordinates, so ties are frequent
(corners of a regular grid); they are broken by the smallest ``(b, x, y, z)``, a rule that does not
depend on any hash order and that the reference fixtures use.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import CloudFormatError
from .coords import MAX_BATCH, offset_key, pack_keys
from .static import StaticShapes, PAD_BATCH, caching_allowed, static_shapes, tensor_version


def nearest_cell(query: torch.Tensor, ref: torch.Tensor, check_batches: bool = True,
                 bruteforce=None, lattice=None, fill=None) -> torch.Tensor:
    """Index into ``ref`` of the nearest cell of the same batch element, for every ``query`` row.

    ``query`` (M, 4) and ``ref`` (E, 4) are int64 ``(b, x, y, z)`` integer coordinates; ``ref`` must be
    sorted lexicographically. Distance: squared Euclidean over x, y, z. Ties (frequent: corners of a
    regular grid) are broken by the smallest ``(b, x, y, z)``, i.e. the smallest ref index. That is the
    canonical rule of the reference fixtures; the published code used MinkowskiEngine's hash order.

    CPU: a k-d tree per batch element. Other devices: one lattice search over all rows and batch
    elements at once (:func:`_nearest_lattice`), exact brute force for the rows it cannot settle;
    one host read in all (two when some rows fall back), whatever the batch size. The reference
    side (sorted keys) is kept for the last few ``ref`` tensors, so the solver steps that look up
    the same condition share it. ``check_batches=False`` skips the check that every query's batch
    element has cells (for callers that checked the same batch elements already). ``bruteforce``
    replaces the exact fallback off the CPU (the signature of :func:`_nearest_bruteforce`; the
    Triton backend passes its integer kernel), ``lattice`` the lattice search (the signature of
    :func:`_nearest_lattice`; the Triton backend passes its one-kernel search), ``fill`` the
    static mode's fallback in place (the signature of
    :func:`~.triton_backend.nearest_rows`; instead of ``bruteforce`` there).
    """
    if query.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=query.device)
    if ref.shape[0] == 0:
        raise CloudFormatError("condition has no cells")
    plan = static_shapes()
    if plan is not None:
        return _nearest_static(query, ref, check_batches, plan, bruteforce or _nearest_bruteforce, lattice, fill)
    if query.device.type != "cpu":
        return _nearest_device(query, ref, check_batches, bruteforce or _nearest_bruteforce, lattice)
    out = torch.empty(query.shape[0], dtype=torch.long)
    qb = query[:, 0]
    rb = ref[:, 0]
    for b in torch.unique(qb).tolist():
        qmask = qb == b
        rsel = torch.nonzero(rb == b, as_tuple=True)[0]
        if rsel.numel() == 0:
            raise CloudFormatError(f"condition has no cells for batch element {b}")
        local = _nearest_kdtree(query[qmask, 1:].numpy(), ref[rsel, 1:].numpy())
        out[qmask] = rsel[torch.from_numpy(local)]
    return out


def _without_cells(qb: torch.Tensor, rb: torch.Tensor) -> torch.Tensor:
    """Mask of the query rows whose batch element has no reference cell (no host read)."""
    present = torch.zeros(MAX_BATCH, dtype=torch.bool, device=qb.device).index_fill_(0, rb, True)
    return ~present[qb]


def _nearest_device(query: torch.Tensor, ref: torch.Tensor, check_batches: bool = True,
                    bruteforce=None, lattice=None) -> torch.Tensor:
    """The device path of :func:`nearest_cell` (few large kernels, no per-batch loop on the host)."""
    qb, rb = query[:, 0], ref[:, 0]
    missing = _without_cells(qb, rb) if check_batches else None
    if ref.shape[0] == 1:  # the unconditional condition of one cloud: a single cell
        if missing is not None and bool(missing.any()):
            _raise_missing(qb, missing)
        return torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    out, unresolved, off_lattice = (lattice or _nearest_lattice)(query[:, 1:], ref[:, 1:], qb, rb,
                                                                 _reference_index(ref))
    flags = [unresolved.any(), off_lattice] + ([missing.any()] if missing is not None else [])
    any_unresolved, any_off, *any_missing = torch.stack(flags).tolist()     # the one host read
    if any_missing and any_missing[0]:
        _raise_missing(qb, missing)
    bruteforce = bruteforce or _nearest_bruteforce
    if any_off:          # cells not on the 16-lattice (not an encoder output): brute force everywhere
        return bruteforce(query[:, 1:], ref[:, 1:], qb, rb, check=False)
    if any_unresolved:   # no cell within the searched block: exact brute force for those rows
        rows = torch.nonzero(unresolved, as_tuple=True)[0]
        out[rows] = bruteforce(query[rows, 1:], ref[:, 1:], qb[rows], rb, check=False)
    return out


def _nearest_static(query: torch.Tensor, ref: torch.Tensor, check_batches: bool,
                    plan: StaticShapes, bruteforce=None, lattice=None, fill=None) -> torch.Tensor:
    """:func:`_nearest_device` with fixed shapes and no host read (static mode, any device).

    Query rows of batch :data:`PAD_BATCH` are padding: their answer is meaningless and they never
    take a place in the fallback. Reference rows of that batch are padding too (never a real
    query's nearest: other batch elements are excluded). The brute-force fallback runs on a fixed
    number of rows (the plan's capacity ``("unresolved", n)``); more unresolved rows than that, a
    reference off the 16-lattice, or a query whose batch element has no cell raise the plan's flag."""
    key = ("unresolved", plan.ordinal("nearest"))
    qb, rb = query[:, 0], ref[:, 0]
    real = qb != PAD_BATCH
    if check_batches:
        plan.flag((_without_cells(qb, rb) & real).any())
    m = query.shape[0]
    cap = plan.capacity(key, m)
    if ref.shape[0] == 1:
        plan.size(key, torch.zeros((), dtype=torch.long, device=query.device), cap)
        return torch.zeros(m, dtype=torch.long, device=query.device)
    # the reference side once per pass (every level of a pass looks up the same condition)
    hit = plan.memo.get(("reference", id(ref)))
    if hit is None or hit[0] is not ref:
        hit = plan.memo[("reference", id(ref))] = (ref, _build_reference_index(ref))
    out, unresolved, off_lattice = (lattice or _nearest_lattice)(query[:, 1:], ref[:, 1:], qb, rb, hit[1])
    plan.flag(off_lattice)
    unresolved = unresolved & real
    plan.size(key, unresolved.sum(), cap)
    # the first ``cap`` unresolved rows (stable order), then resolved ones, whose answers are kept
    rows = torch.argsort((~unresolved).to(torch.uint8), stable=True)[:cap]
    if fill is not None:
        fill(query, ref, rows, unresolved, out, plan.memo)
    else:
        brute = (bruteforce or _nearest_bruteforce)(query[rows, 1:], ref[:, 1:], qb[rows], rb, check=False)
        out = out.index_copy(0, rows, torch.where(unresolved[rows], brute, out[rows]))
    # padding rows and rows past the capacity hold no answer: keep them a valid index
    return out.clamp_(max=ref.shape[0] - 1)


_REF_CACHE: list = []   # [(ref tensor, version, index)], most recent last


def _reference_index(ref: torch.Tensor):
    """(sorted keys, their order, off-lattice flag) of the reference cells, kept for the last 4
    ``ref`` tensors (the same condition is looked up at every solver step and level)."""
    if not caching_allowed():
        return _build_reference_index(ref)
    version = tensor_version(ref)
    for i, (r, v, index) in enumerate(_REF_CACHE):
        if r is ref and v == version:
            return index
    index = _build_reference_index(ref)
    _REF_CACHE.append((ref, version, index))
    del _REF_CACHE[:-4]
    return index


def _raise_missing(qb: torch.Tensor, missing: torch.Tensor):
    raise CloudFormatError(f"condition has no cells for batch element {int(qb[missing][0])}")


def _nearest_kdtree(q: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Exact 1-NN with smallest-index tie breaking, on the CPU (scipy cKDTree)."""
    from scipy.spatial import cKDTree

    n_ref = r.shape[0]
    if n_ref == 1:
        return np.zeros(q.shape[0], dtype=np.int64)
    tree = cKDTree(r.astype(np.float64))
    qf = q.astype(np.float64)
    result = np.empty(q.shape[0], dtype=np.int64)
    todo = np.arange(q.shape[0])
    # Two neighbours first: most rows have one nearest cell (ties: 3 % of the rows at stride 1,
    # about a quarter at strides 8 and 16, where rows sit on the condition's 16-grid), so asking
    # every row for 16 cost 2.8x as much (docs/benchmarks.md, "Sparse backends on the CPU"); rows
    # whose last neighbour is still tied ask again for 4x as many.
    k = min(2, n_ref)
    while todo.size:
        d, i = tree.query(qf[todo], k=k)
        if k == 1:
            result[todo] = i
            break
        dmin = d[:, :1]
        tied = d == dmin
        # among the candidates at the minimal distance take the smallest index
        cand = np.where(tied, i, np.iinfo(np.int64).max)
        result[todo] = cand.min(axis=1)
        # rows whose k-th neighbour is still tied may have more equidistant cells: retry with more
        unresolved = tied[:, -1] & (k < n_ref)
        todo = todo[unresolved]
        k = min(4 * k, n_ref)
    return result


LATTICE = 16  # the condition cells are stride-16 cell corners


def _build_reference_index(ref: torch.Tensor):
    rkeys = pack_keys(ref)
    order = torch.argsort(rkeys)
    return rkeys[order], order, (ref[:, 1:] % LATTICE != 0).any()


_LATTICE_BLOCK: dict = {}


def _lattice_block(device):
    """The 64 candidate offsets (-16..+32 per axis) as (64, 3) coordinates and (64,) key deltas."""
    key = str(device)
    if key not in _LATTICE_BLOCK:
        d = [-LATTICE, 0, LATTICE, 2 * LATTICE]
        offs = [(dx, dy, dz) for dx in d for dy in d for dz in d]
        _LATTICE_BLOCK[key] = (torch.tensor(offs, dtype=torch.long, device=device),
                               torch.tensor([offset_key(*o) for o in offs], dtype=torch.long, device=device))
    return _LATTICE_BLOCK[key]


def _nearest_lattice(q: torch.Tensor, r: torch.Tensor, qb: torch.Tensor | None = None,
                     rb: torch.Tensor | None = None, index=None):
    """Exact 1-NN of the rows that have a reference cell close by, when every reference cell lies on
    the 16-lattice. Returns ``(index, unresolved, off_lattice)``: ``unresolved`` marks the rows this
    search cannot settle (their index is meaningless), ``off_lattice`` is a 0-d bool tensor, true when
    some reference cell is not on the lattice (then nothing here is meaningful). No host reads.

    Looks at the 4x4x4 lattice points around each query (its own cell's corner -16..+32 per axis),
    within the query's own batch element (``qb`` / ``rb``, default all 0). Any lattice point outside
    that block differs by >= 32 along some axis, so a best candidate with squared distance < 32**2
    is the global nearest. ``index``: :func:`_reference_index` of the reference cells, if known."""
    L = LATTICE
    if qb is None:
        qb = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    if index is None:
        if rb is None:
            rb = torch.zeros(r.shape[0], dtype=torch.long, device=r.device)
        # a throw-away tensor: build the index without filling the cache of reused conditions
        index = _build_reference_index(torch.cat([rb.view(-1, 1), r], 1))
    skeys, order, off_lattice = index
    offs, deltas = _lattice_block(q.device)
    base = torch.div(q, L, rounding_mode="floor") * L
    # candidate keys: the base corner's key plus each offset's key delta (packing is linear here:
    # |coordinates| < AXIS_LIMIT leaves room for the -16..+32 offsets)
    ckeys = pack_keys(torch.cat([qb.view(-1, 1), base], 1))[:, None] + deltas[None, :]
    pos = torch.searchsorted(skeys, ckeys).clamp_(max=skeys.shape[0] - 1)
    hit = skeys[pos] == ckeys
    d2 = (((q - base)[:, None, :] - offs[None, :, :]) ** 2).sum(-1)
    big = torch.iinfo(torch.long).max
    score = torch.where(hit, (d2 << 40) + order[pos], big)
    best = score.min(dim=1).values
    out = best & ((1 << 40) - 1)
    unresolved = (best == big) | ((best >> 40) >= (2 * L) ** 2)
    return out, unresolved, off_lattice


def _nearest_bruteforce(q: torch.Tensor, r: torch.Tensor, qb: torch.Tensor | None = None,
                        rb: torch.Tensor | None = None, check: bool = True) -> torch.Tensor:
    """Exact 1-NN on any device, restricted to the query's batch element (``qb`` / ``rb``, default
    all 0). Ranks the cells of a query by ``|r|^2 - 2 q.r`` (its squared distance less ``|q|^2``,
    a per-query constant) in float64: one GEMM with the ``|r|^2`` term fused, exact for these
    integers (every term stays below 2**53); cells of other batch elements are set to +inf.
    Chunked; argmin returns the first minimal index, the canonical tie rule. With ``check``,
    raises CloudFormatError when a query's batch element has no cell (one host read)."""
    rf = r.double()
    qf = q.double()
    r2 = (rf * rf).sum(1)
    rt = rf.T
    batched = qb is not None or rb is not None
    chunk = max(1, (1 << 25) // max(1, r.shape[0]))
    out = torch.empty(q.shape[0], dtype=torch.long, device=q.device)
    worst = torch.zeros((), dtype=torch.float64, device=q.device)
    for s in range(0, q.shape[0], chunk):
        qc = qf[s:s + chunk]
        d2 = torch.addmm(r2[None, :], qc, rt, alpha=-2.0)
        if batched:
            qbc = (qb[s:s + chunk] if qb is not None else torch.zeros(len(qc), dtype=torch.long, device=q.device))
            rbc = rb if rb is not None else torch.zeros(r.shape[0], dtype=torch.long, device=r.device)
            d2.masked_fill_(qbc[:, None] != rbc[None, :], float("inf"))
        i = torch.argmin(d2, dim=1)   # the first minimal index: the canonical tie rule
        out[s:s + chunk] = i
        if check and batched:
            worst = torch.maximum(worst, d2.gather(1, i[:, None]).max())
    if check and batched and bool(torch.isinf(worst)):
        qbs = set((qb if qb is not None else torch.zeros(1, dtype=torch.long)).unique().tolist())
        rbs = set((rb if rb is not None else torch.zeros(1, dtype=torch.long)).unique().tolist())
        missing = sorted(qbs - rbs)
        raise CloudFormatError(f"condition has no cells for batch element {missing[0] if missing else '?'}")
    return out
