"""Voxel coordinates and their packed keys: voxel indices of points, the int64 key of a (b, x, y, z)
coordinate, kernel offsets and their key deltas, the per-point :class:`Field`."""
from __future__ import annotations

from dataclasses import dataclass

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


_VOXEL_SIZE: dict = {}


def voxel_indices(points: torch.Tensor, voxel_size: float) -> torch.Tensor:
    """Integer voxel index per point, exactly as LiDiff: float32 division, round half to even.

    The divisor is a device tensor (a host scalar would be turned into a multiplication by its
    reciprocal on CUDA, which rounds differently); it is kept per device, so no host-to-device copy
    happens per call (none is allowed while a CUDA graph is captured). It is made outside inference
    mode, even when the first call runs in it: an inference tensor cannot be saved for the backward
    pass of a later call that differentiates with respect to the points."""
    if points.dtype != torch.float32:
        points = points.float()
    key = (float(voxel_size), str(points.device))
    vs = _VOXEL_SIZE.get(key)
    if vs is None:
        with torch.inference_mode(False):
            vs = _VOXEL_SIZE[key] = torch.tensor(voxel_size, dtype=torch.float32, device=points.device)
    return torch.round(points / vs).long()


def check_coordinate_range(coords: torch.Tensor, points: torch.Tensor | None = None) -> None:
    """Raise CloudFormatError when voxel coordinates cannot be packed into keys, or when ``points``
    (the points they were computed from) hold NaN or infinite values (one host read).

    The points are checked, not the coordinates: a non-finite value becomes an arbitrary integer
    (INT64_MIN on the CPU, whose absolute value overflows to a negative number), so it can pass any
    range test on the coordinates."""
    if coords.numel() == 0:
        return
    checks = [coords[:, 0].min(), coords[:, 0].max(), coords[:, 1:].abs().max()]
    if points is not None:
        checks.append((~torch.isfinite(points).all(dim=1)).sum())
    found = torch.stack(checks).tolist()
    if points is not None and found[3]:
        raise CloudFormatError(f"{found[3]} of {points.shape[0]} points are not finite (NaN or inf)")
    bmin, bmax, extent = found[:3]
    if bmin < 0 or bmax >= MAX_BATCH:
        raise CloudFormatError(f"batch index out of range 0..{MAX_BATCH - 1}")
    if extent >= AXIS_LIMIT:
        exc = CloudFormatError(
            f"a point lies {extent} voxels from the origin; at most {AXIS_LIMIT} are supported "
            "(is the cloud in metres and centred on the sensor?)")
        exc.reason, exc.extent = "coordinate_range", int(extent)   # read by the Completer
        raise exc


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




def unpack_keys(keys: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_keys`: (M,) keys -> (M, 4) int64 (b, x, y, z)."""
    mask = (1 << AXIS_BITS) - 1
    z = (keys & mask) - AXIS_OFFSET
    y = ((keys >> AXIS_BITS) & mask) - AXIS_OFFSET
    x = ((keys >> (2 * AXIS_BITS)) & mask) - AXIS_OFFSET
    b = keys >> (3 * AXIS_BITS)
    return torch.stack([b, x, y, z], dim=1)


# Kernel offsets in MinkowskiEngine's storage order: x fastest, then y, then z (``kernel[k]`` of a
# size-3 kernel is the offset ``k = (dx+1) + 3 (dy+1) + 9 (dz+1)``; size 2: ``k = dx + 2 dy + 4 dz``).
KERNEL3_OFFSETS = [(dx, dy, dz) for dz in (-1, 0, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
KERNEL2_OFFSETS = [(dx, dy, dz) for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)]
CENTRE = 13   # index of (0, 0, 0) in KERNEL3_OFFSETS

_DELTAS: dict = {}


def kernel3_deltas(stride: int, device: torch.device) -> torch.Tensor:
    """Key differences of the 27 offsets of a 3x3x3 kernel at ``stride``, kept on the device (a
    fresh host-to-device copy per level would wait for the device)."""
    key = (stride, str(device))
    if key not in _DELTAS:
        _DELTAS[key] = torch.tensor([offset_key(dx * stride, dy * stride, dz * stride)
                                     for dx, dy, dz in KERNEL3_OFFSETS], dtype=torch.long, device=device)
    return _DELTAS[key]
