"""Voxel keys and the spatial indexes of the ground-truth builder.

* :func:`voxel_indices`, :func:`pack_keys` / :func:`unpack_keys`: integer voxel coordinates packed
  into one non-negative int64 per voxel (21 bits per axis);
* :class:`VoxelHashSet`: a vectorised open-addressing hash set of such keys (O(n) amortised inserts);
* :class:`VoxelMap`: an incrementally built voxel-subsampled map (the first point of every voxel);
  :func:`batch_voxel_map` is its straightforward reference;
* :class:`MapIndex`: a map bucketed into square columns for radius queries.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import numpy as np

from ..errors import DatasetError

__all__ = ["voxel_indices", "pack_keys", "unpack_keys", "VoxelHashSet", "VoxelMap", "batch_voxel_map",
           "MapIndex"]

_KEY_BITS = 21
_KEY_OFFSET = 1 << (_KEY_BITS - 1)
_KEY_MASK = (1 << _KEY_BITS) - 1


def voxel_indices(points: np.ndarray, voxel_size: float) -> np.ndarray:
    """Integer voxel coordinates ``floor(p / voxel_size)`` (int64, (N, 3))."""
    return np.floor(np.asarray(points, dtype=np.float64)[:, :3] / voxel_size).astype(np.int64)


def pack_keys(ijk: np.ndarray) -> np.ndarray:
    """Pack (N, 3) integer voxel coordinates (each within +-2^20) into non-negative int64 keys."""
    ijk = np.asarray(ijk, dtype=np.int64)
    if ijk.size and (ijk.min() < -_KEY_OFFSET or ijk.max() >= _KEY_OFFSET):
        raise DatasetError(f"voxel coordinates out of range (+-{_KEY_OFFSET} voxels): "
                           f"found {ijk.min()}..{ijk.max()}; is the map in metres?")
    u = ijk + _KEY_OFFSET
    return (u[:, 0] << (2 * _KEY_BITS)) | (u[:, 1] << _KEY_BITS) | u[:, 2]


def unpack_keys(keys: np.ndarray) -> np.ndarray:
    keys = np.asarray(keys, dtype=np.int64)
    return np.stack([(keys >> (2 * _KEY_BITS)) & _KEY_MASK, (keys >> _KEY_BITS) & _KEY_MASK,
                     keys & _KEY_MASK], 1) - _KEY_OFFSET


_HASH_MULT = np.uint64(0x9E3779B97F4A7C15)


class VoxelHashSet:
    """Open-addressing (linear probing) hash set of non-negative int64 keys, vectorised in numpy.

    ``insert`` and ``contains`` take whole arrays; the table doubles when half full, so inserting n
    keys in total costs O(n) amortised.
    """

    EMPTY = -1

    def __init__(self, capacity: int = 1 << 16):
        cap = 1 << max(4, int(math.ceil(math.log2(max(capacity, 16)))))
        self._table = np.full(cap, self.EMPTY, dtype=np.int64)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    @property
    def capacity(self) -> int:
        return len(self._table)

    def _hash(self, keys: np.ndarray) -> np.ndarray:
        shift = np.uint64(64 - int(math.log2(len(self._table))))
        return ((keys.astype(np.uint64) * _HASH_MULT) >> shift).astype(np.int64)

    def _grow(self, needed: int) -> None:
        cap = len(self._table)
        while needed * 2 > cap:
            cap *= 2
        if cap == len(self._table):
            return
        old = self._table[self._table != self.EMPTY]
        self._table = np.full(cap, self.EMPTY, dtype=np.int64)
        self._n = 0
        self._insert_unique(old)

    def insert(self, keys: np.ndarray) -> np.ndarray:
        """Insert ``keys``; returns a bool array, True where a key was not in the set before.
        Duplicates inside ``keys`` are allowed (only the first occurrence counts as new)."""
        keys = np.asarray(keys, dtype=np.int64)
        if keys.size == 0:
            return np.zeros(0, dtype=bool)
        if keys.min() < 0:
            raise ValueError("VoxelHashSet keys must be non-negative")
        uniq, first = np.unique(keys, return_index=True)
        self._grow(self._n + len(uniq))
        new_u = self._insert_unique(uniq)
        out = np.zeros(len(keys), dtype=bool)
        out[first[new_u]] = True
        return out

    def _probe(self, keys: np.ndarray):
        """The start of a linear probe for every key: (table, slot mask, rows still probing, their
        slots)."""
        return self._table, len(self._table) - 1, np.arange(len(keys)), self._hash(keys)

    def _insert_unique(self, keys: np.ndarray) -> np.ndarray:
        table, mask, pending, slot = self._probe(keys)
        new = np.zeros(len(keys), dtype=bool)
        while pending.size:
            k = keys[pending]
            cur = table[slot]
            done = cur == k
            empty = cur == self.EMPTY
            e_idx = np.flatnonzero(empty)
            if e_idx.size:
                _, first = np.unique(slot[e_idx], return_index=True)
                winners = e_idx[first]
                table[slot[winners]] = k[winners]
                new[pending[winners]] = True
                done[winners] = True
            advance = ~done & ~empty
            slot[advance] = (slot[advance] + 1) & mask
            keep = ~done
            pending, slot = pending[keep], slot[keep]
        self._n += int(new.sum())
        return new

    def contains(self, keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, dtype=np.int64)
        table, mask, pending, slot = self._probe(keys)
        out = np.zeros(len(keys), dtype=bool)
        while pending.size:
            cur = table[slot]
            found = cur == keys[pending]
            out[pending[found]] = True
            cont = ~found & (cur != self.EMPTY)
            pending, slot = pending[cont], (slot[cont] + 1) & mask
        return out

    def keys(self) -> np.ndarray:
        return self._table[self._table != self.EMPTY]


class VoxelMap:
    """Incremental voxel-subsampled map: ``add(points_world)`` keeps, for every voxel not seen
    before, the first point of the batch that falls in it. Points are stored as float32 and voxel
    keys are computed from the float32 values, so stored points and keys always agree."""

    def __init__(self, voxel_size: float = 0.1):
        self.voxel_size = float(voxel_size)
        self._set = VoxelHashSet()
        self._chunks: List[np.ndarray] = []
        self._cache: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self._set)

    def add(self, points_world: np.ndarray) -> int:
        p32 = np.ascontiguousarray(np.asarray(points_world)[:, :3], dtype=np.float32)
        if not len(p32):
            return 0
        keys = pack_keys(voxel_indices(p32, self.voxel_size))
        new = self._set.insert(keys)
        if new.any():
            self._chunks.append(p32[new])
            self._cache = None
        return int(new.sum())

    @property
    def points(self) -> np.ndarray:
        """(M, 3) float32 map points in insertion order."""
        if self._cache is None:
            self._cache = (np.concatenate(self._chunks) if self._chunks
                           else np.zeros((0, 3), np.float32))
            self._chunks = [self._cache]
        return self._cache


def batch_voxel_map(points_world: Sequence[np.ndarray], voxel_size: float = 0.1) -> np.ndarray:
    """Straightforward reference: concatenate everything, keep the first point of every voxel."""
    p = np.concatenate([np.asarray(x)[:, :3] for x in points_world]).astype(np.float32)
    keys = pack_keys(voxel_indices(p, voxel_size))
    _, first = np.unique(keys, return_index=True)
    return p[np.sort(first)]


class MapIndex:
    """The map bucketed into ``tile`` x ``tile`` m columns (sorted once) for radius queries."""

    def __init__(self, points: np.ndarray, tile: float = 10.0):
        self.tile = float(tile)
        pts = np.ascontiguousarray(points[:, :3], dtype=np.float32)
        if len(pts):
            txy = np.floor(pts[:, :2].astype(np.float64) / self.tile).astype(np.int64)
            key = (txy[:, 0] + _KEY_OFFSET) << 32 | (txy[:, 1] + _KEY_OFFSET)
            order = np.argsort(key, kind="stable")
            key = key[order]
            self.points = pts[order]
            self.order = order
            self.tile_keys, self.starts = np.unique(key, return_index=True)
            self.ends = np.append(self.starts[1:], len(key))
        else:
            self.points = pts
            self.order = np.zeros(0, np.int64)
            self.tile_keys = self.starts = self.ends = np.zeros(0, np.int64)

    def query(self, center: np.ndarray, radius: float, return_indices: bool = False):
        """Map points within ``radius`` (3D) of ``center``; with ``return_indices`` also their
        indices in the original map array."""
        cx, cy = float(center[0]), float(center[1])
        t0x, t1x = math.floor((cx - radius) / self.tile), math.floor((cx + radius) / self.tile)
        t0y, t1y = math.floor((cy - radius) / self.tile), math.floor((cy + radius) / self.tile)
        gx, gy = np.meshgrid(np.arange(t0x, t1x + 1), np.arange(t0y, t1y + 1), indexing="ij")
        keys = ((gx.ravel() + _KEY_OFFSET) << 32) | (gy.ravel() + _KEY_OFFSET)
        pos = np.searchsorted(self.tile_keys, keys)
        found = pos < len(self.tile_keys)
        found[found] = self.tile_keys[pos[found]] == keys[found]
        pos = pos[found]
        if len(pos) == 0:
            empty = np.zeros((0, 3), np.float32)
            return (empty, np.zeros(0, np.int64)) if return_indices else empty
        starts, ends = self.starts[pos], self.ends[pos]
        pts = np.concatenate([self.points[a:b] for a, b in zip(starts.tolist(), ends.tolist())])
        c32 = np.asarray(center[:3], dtype=np.float64).astype(np.float32)
        d = pts - c32
        inside = np.einsum("ij,ij->i", d, d) <= np.float32(radius * radius)
        if return_indices:
            sel = np.concatenate([np.arange(a, b) for a, b in zip(starts.tolist(), ends.tolist())])
            return pts[inside], self.order[sel[inside]]
        return pts[inside]
