"""Rigid transforms and ranges of (N, 3) point arrays (float64 results, column by column)."""
from __future__ import annotations

import numpy as np

__all__ = ["range_of", "rotate", "transform", "inverse_transform"]


def range_of(points: np.ndarray) -> np.ndarray:
    """Distance of every point from the origin (float64)."""
    p = np.asarray(points)[:, :3].astype(np.float64)
    return np.sqrt((p * p).sum(1))


def rotate(points: np.ndarray, rot: np.ndarray, offset=None) -> np.ndarray:
    """``points @ rot.T + offset`` for (N, 3) points, float64, computed column by column (numpy's
    matmul of a tall (N, 3) array goes through BLAS and is an order of magnitude slower, worse still
    when BLAS threads compete for the cores)."""
    p = np.asarray(points)
    x, y, z = (p[:, i].astype(np.float64) for i in range(3))
    out = np.empty((len(p), 3), dtype=np.float64)
    for i in range(3):
        out[:, i] = x * rot[i, 0] + y * rot[i, 1] + z * rot[i, 2]
        if offset is not None:
            out[:, i] += offset[i]
    return out


def transform(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """Apply a 4x4 pose to (N, >=3) points (float64 result, xyz only)."""
    return rotate(np.asarray(points)[:, :3], pose[:3, :3], pose[:3, 3])


def inverse_transform(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """World points -> the frame of ``pose`` (float64)."""
    rt = pose[:3, :3].T
    return rotate(np.asarray(points)[:, :3], rt, -(rt @ pose[:3, 3]))
