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
    """Raise CloudFormatError when voxel coordinates cannot be packed into keys."""
    if coords.numel() == 0:
        return
    if int(coords[:, 0].min()) < 0 or int(coords[:, 0].max()) >= MAX_BATCH:
        raise CloudFormatError(f"batch index out of range 0..{MAX_BATCH - 1}")
    extent = int(coords[:, 1:].abs().max())
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
    """
    out = torch.empty(query.shape[0], dtype=torch.long, device=query.device)
    if query.shape[0] == 0:
        return out
    if ref.shape[0] == 0:
        raise CloudFormatError("condition has no cells")
    qb = query[:, 0]
    rb = ref[:, 0]
    batches = torch.unique(qb).tolist()
    for b in batches:
        qmask = qb == b
        rsel = torch.nonzero(rb == b, as_tuple=True)[0]
        if rsel.numel() == 0:
            raise CloudFormatError(f"condition has no cells for batch element {b}")
        q = query[qmask, 1:]
        r = ref[rsel, 1:]
        if query.device.type == "cpu":
            local = _nearest_kdtree(q.numpy(), r.numpy())
            local = torch.from_numpy(local)
        elif bool((r % LATTICE == 0).all()):
            local = _nearest_lattice(q, r)
        else:
            local = _nearest_bruteforce(q, r)
        out[qmask] = rsel[local]
    return out


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


def _nearest_lattice(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Exact 1-NN when every reference cell lies on the 16-lattice (the GPU path: a few large
    kernels, no per-row work on the host).

    Looks at the 4x4x4 lattice points around each query (its own cell's corner -16..+32 per axis).
    Any lattice point outside that block differs by >= 32 along some axis, so a best candidate with
    squared distance < 32**2 is the global nearest; the other rows fall back to brute force."""
    L = LATTICE
    zero = torch.zeros(r.shape[0], 1, dtype=torch.long, device=r.device)
    rkeys = pack_keys(torch.cat([zero, r], 1))
    order = torch.argsort(rkeys)
    skeys = rkeys[order]
    base = torch.div(q, L, rounding_mode="floor") * L
    d = torch.arange(-1, 3, device=q.device) * L
    offs = torch.stack(torch.meshgrid(d, d, d, indexing="ij"), -1).reshape(-1, 3)  # (64, 3)
    cand = base[:, None, :] + offs[None, :, :]                                    # (M, 64, 3)
    ckeys = pack_keys(torch.cat([torch.zeros_like(cand[..., :1]), cand], -1).reshape(-1, 4)).view(-1, 64)
    pos = torch.searchsorted(skeys, ckeys).clamp_(max=skeys.shape[0] - 1)
    hit = skeys[pos] == ckeys
    d2 = ((q[:, None, :] - cand) ** 2).sum(-1)
    idx = order[pos]
    big = torch.iinfo(torch.long).max
    score = torch.where(hit, (d2 << 40) + idx, torch.full_like(d2, big))
    best = score.min(dim=1).values
    out = best & ((1 << 40) - 1)
    unresolved = (best == big) | ((best >> 40) >= (2 * L) ** 2)
    if bool(unresolved.any()):
        rows = torch.nonzero(unresolved, as_tuple=True)[0]
        out[rows] = _nearest_bruteforce(q[rows], r)
    return out


def _nearest_bruteforce(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Exact 1-NN on any device: chunked squared distances in float64 (exact for these integers);
    argmin returns the first minimal index, which is the canonical tie rule."""
    rf = r.double()
    qf = q.double()
    chunk = max(1, (1 << 25) // max(1, r.shape[0]))
    out = torch.empty(q.shape[0], dtype=torch.long, device=q.device)
    for s in range(0, q.shape[0], chunk):
        d2 = ((qf[s:s + chunk, None, :] - rf[None, :, :]) ** 2).sum(-1)
        out[s:s + chunk] = torch.argmin(d2, dim=1)
    return out
