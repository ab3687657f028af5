"""Backend-independent pieces: voxel indices, coordinate keys, the exact nearest-cell lookup."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import CloudFormatError

# Coordinates are packed into one int64 key: 9 bits of batch index, 18 bits per axis (offset 2**17).
# Keys sort exactly like (b, x, y, z) lexicographically, so torch.unique(sorted=True) yields the
# canonical row order. 2**17 voxels of 5 cm = 6.5 km from the sensor: far beyond any LiDAR scene.
AXIS_BITS = 18
AXIS_OFFSET = 1 << (AXIS_BITS - 1)
MAX_BATCH = 1 << 9
# keep a margin so that neighbour queries (up to 16 voxels x 2) never carry into the next field
AXIS_LIMIT = AXIS_OFFSET - 64


def voxel_indices(points: torch.Tensor, voxel_size: float) -> torch.Tensor:
    """Integer voxel index per point, exactly as LiDiff: float32 division, round half to even."""
    if points.dtype != torch.float32:
        points = points.float()
    vs = torch.tensor(voxel_size, dtype=torch.float32, device=points.device)
    return torch.round(points / vs).long()


def check_coordinate_range(coords: torch.Tensor) -> None:
    """Raise CloudFormatError when voxel coordinates cannot be packed into keys (one host read)."""
    if coords.numel() == 0:
        return
    bmin, bmax, extent = torch.stack([coords[:, 0].min(), coords[:, 0].max(),
                                      coords[:, 1:].abs().max()]).tolist()
    if bmin < 0 or bmax >= MAX_BATCH:
        raise CloudFormatError(f"batch index out of range 0..{MAX_BATCH - 1}")
    if extent >= AXIS_LIMIT:
        raise CloudFormatError(
            f"a point lies {extent} voxels from the origin; at most {AXIS_LIMIT} are supported "
            "(is the cloud in metres and centred on the sensor?)")


def pack_keys(coords: torch.Tensor) -> torch.Tensor:
    """(M, 4) int64 (b, x, y, z) -> (M,) int64 keys, monotonic in lexicographic order."""
    b = coords[:, 0]
    x = coords[:, 1] + AXIS_OFFSET
    y = coords[:, 2] + AXIS_OFFSET
    z = coords[:, 3] + AXIS_OFFSET
    return (((((b << AXIS_BITS) + x) << AXIS_BITS) + y) << AXIS_BITS) + z


def offset_key(dx: int, dy: int, dz: int) -> int:
    """Key difference of a coordinate offset (packing is linear inside the valid range)."""
    return (dx << (2 * AXIS_BITS)) + (dy << AXIS_BITS) + dz


@dataclass
class Field:
    """Points of a batch and their voxel: ``inverse[i]`` is the stride-1 row of point ``i``."""
    inverse: torch.Tensor
    num_points: int


def nearest_cell(query: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Index into ``ref`` of the nearest cell of the same batch element, for every ``query`` row.

    ``query`` (M, 4) and ``ref`` (E, 4) are int64 ``(b, x, y, z)`` integer coordinates; ``ref`` must be
    sorted lexicographically. Distance: squared Euclidean over x, y, z. Ties (frequent: corners of a
    regular grid) are broken by the smallest ``(b, x, y, z)``, i.e. the smallest ref index. That is the
    canonical rule of the reference fixtures; the published code used MinkowskiEngine's hash order.

    CPU: a k-d tree per batch element. Other devices: one lattice search over all rows and batch
    elements at once (:func:`_nearest_lattice`), exact brute force for the rows it cannot settle;
    one host read in all (two when some rows fall back), whatever the batch size.
    """
    if query.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=query.device)
    if ref.shape[0] == 0:
        raise CloudFormatError("condition has no cells")
    if query.device.type != "cpu":
        return _nearest_device(query, ref)
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


def _nearest_device(query: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The device path of :func:`nearest_cell` (few large kernels, no per-batch loop on the host)."""
    qb, rb = query[:, 0], ref[:, 0]
    present = torch.zeros(MAX_BATCH, dtype=torch.bool, device=query.device).index_fill_(0, rb, True)
    missing = ~present[qb]                  # query rows whose batch element has no cell
    if ref.shape[0] == 1:  # the unconditional condition of one cloud: a single cell
        if bool(missing.any()):
            _raise_missing(qb, missing)
        return torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    out, unresolved, off_lattice = _nearest_lattice(query[:, 1:], ref[:, 1:], qb, rb)
    any_unresolved, any_off, any_missing = torch.stack(
        [unresolved.any(), off_lattice, missing.any()]).tolist()           # the one host read
    if any_missing:
        _raise_missing(qb, missing)
    if any_off:          # cells not on the 16-lattice (not an encoder output): brute force everywhere
        return _nearest_bruteforce(query[:, 1:], ref[:, 1:], qb, rb, check=False)
    if any_unresolved:   # no cell within the searched block: exact brute force for those rows
        rows = torch.nonzero(unresolved, as_tuple=True)[0]
        out[rows] = _nearest_bruteforce(query[rows, 1:], ref[:, 1:], qb[rows], rb, check=False)
    return out


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
    k = min(16, n_ref)
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


def _nearest_lattice(q: torch.Tensor, r: torch.Tensor, qb: torch.Tensor | None = None,
                     rb: torch.Tensor | None = None):
    """Exact 1-NN of the rows that have a reference cell close by, when every reference cell lies on
    the 16-lattice. Returns ``(index, unresolved, off_lattice)``: ``unresolved`` marks the rows this
    search cannot settle (their index is meaningless), ``off_lattice`` is a 0-d bool tensor, true when
    some reference cell is not on the lattice (then nothing here is meaningful). No host reads.

    Looks at the 4x4x4 lattice points around each query (its own cell's corner -16..+32 per axis),
    within the query's own batch element (``qb`` / ``rb``, default all 0). Any lattice point outside
    that block differs by >= 32 along some axis, so a best candidate with squared distance < 32**2
    is the global nearest."""
    L = LATTICE
    if qb is None:
        qb = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    if rb is None:
        rb = torch.zeros(r.shape[0], dtype=torch.long, device=r.device)
    rkeys = pack_keys(torch.cat([rb.view(-1, 1), r], 1))
    order = torch.argsort(rkeys)
    skeys = rkeys[order]
    base = torch.div(q, L, rounding_mode="floor") * L
    d = torch.arange(-1, 3, device=q.device) * L
    offs = torch.stack(torch.meshgrid(d, d, d, indexing="ij"), -1).reshape(-1, 3)  # (64, 3)
    cand = base[:, None, :] + offs[None, :, :]                                    # (M, 64, 3)
    cb = qb.view(-1, 1, 1).expand(-1, 64, 1)
    ckeys = pack_keys(torch.cat([cb, cand], -1).reshape(-1, 4)).view(-1, 64)
    pos = torch.searchsorted(skeys, ckeys).clamp_(max=skeys.shape[0] - 1)
    hit = skeys[pos] == ckeys
    d2 = ((q[:, None, :] - cand) ** 2).sum(-1)
    idx = order[pos]
    big = torch.iinfo(torch.long).max
    score = torch.where(hit, (d2 << 40) + idx, torch.full_like(d2, big))
    best = score.min(dim=1).values
    out = best & ((1 << 40) - 1)
    unresolved = (best == big) | ((best >> 40) >= (2 * L) ** 2)
    off_lattice = (r % L != 0).any()
    return out, unresolved, off_lattice


# added to the squared distance of a cell of another batch element: larger than any real squared
# distance (< 3 * (2 * AXIS_LIMIT)**2 < 2**38) and exact in float64 together with it (< 2**53)
_OTHER_BATCH = float(2 ** 45)


def _nearest_bruteforce(q: torch.Tensor, r: torch.Tensor, qb: torch.Tensor | None = None,
                        rb: torch.Tensor | None = None, check: bool = True) -> torch.Tensor:
    """Exact 1-NN on any device, restricted to the query's batch element (``qb`` / ``rb``, default
    all 0): |q|^2 + |r|^2 - 2 q.r in float64 (exact for these integers: every term and sum stays
    below 2**53), chunked; argmin returns the first minimal index, the canonical tie rule. With
    ``check``, raises CloudFormatError when a query's batch element has no cell (one host read)."""
    rf = r.double()
    qf = q.double()
    r2 = (rf * rf).sum(1)
    chunk = max(1, (1 << 25) // max(1, r.shape[0]))
    out = torch.empty(q.shape[0], dtype=torch.long, device=q.device)
    worst = torch.zeros((), dtype=torch.float64, device=q.device)
    for s in range(0, q.shape[0], chunk):
        qc = qf[s:s + chunk]
        d2 = (qc * qc).sum(1, keepdim=True) + r2[None, :] - 2.0 * (qc @ rf.T)
        if qb is not None or rb is not None:
            qbc = (qb[s:s + chunk] if qb is not None else torch.zeros(len(qc), dtype=torch.long, device=q.device))
            rbc = rb if rb is not None else torch.zeros(r.shape[0], dtype=torch.long, device=r.device)
            d2 = d2 + (qbc[:, None] != rbc[None, :]).double() * _OTHER_BATCH
        i = torch.argmin(d2, dim=1)   # the first minimal index: the canonical tie rule
        out[s:s + chunk] = i
        if check:
            worst = torch.maximum(worst, d2.gather(1, i[:, None]).max())
    if check and (qb is not None or rb is not None) and float(worst) >= _OTHER_BATCH:
        qbs = set((qb if qb is not None else torch.zeros(1, dtype=torch.long)).unique().tolist())
        rbs = set((rb if rb is not None else torch.zeros(1, dtype=torch.long)).unique().tolist())
        missing = sorted(qbs - rbs)
        raise CloudFormatError(f"condition has no cells for batch element {missing[0] if missing else '?'}")
    return out
