"""Sparse voxel tensors and the layer modules the networks are built from.

This package is the only place that touches MinkowskiEngine. Two backends sit behind one interface:

* ``"minkowski"`` - MinkowskiEngine 0.5.4 (the reference, compiled; built by scripts/install_minkowski.sh);
* ``"torch"``     - pure PyTorch: kernel maps from sorted coordinate keys, gather -> matmul -> scatter-add.
  Runs on every device torch runs on.

Both produce modules whose parameters carry MinkowskiEngine's names and layouts (a convolution's
``kernel`` of shape ``(kernel_volume, in, out)``, ``(in, out)`` for 1x1; BatchNorm wrapped as ``.bn``),
so one state dict serves both backends and the published LiDiff checkpoints load into either.

Backend choice: ``backend="auto"|"minkowski"|"torch"``; ``None`` and ``"auto"`` follow
``LIDAR_COMPLETION_BACKEND`` when it is set. ``auto`` takes MinkowskiEngine when it imports, else torch. Setting
``LIDAR_COMPLETION_HIDE_MINKOWSKI=1`` makes MinkowskiEngine invisible (used by CI to prove that every
command runs without it).
"""
from __future__ import annotations

import importlib
import os
import warnings
from functools import lru_cache

from ..errors import ConfigError

BACKENDS = ("auto", "minkowski", "torch")
ENV_BACKEND = "LIDAR_COMPLETION_BACKEND"
ENV_HIDE_MINKOWSKI = "LIDAR_COMPLETION_HIDE_MINKOWSKI"


def minkowski_hidden() -> bool:
    return os.environ.get(ENV_HIDE_MINKOWSKI, "").strip().lower() not in ("", "0", "false", "no")


@lru_cache(maxsize=1)
def _minkowski_importable() -> bool:
    try:
        with warnings.catch_warnings():  # its CPU-only build warns on every import
            warnings.filterwarnings("ignore", message=".*compiled with CPU_ONLY.*")
            importlib.import_module("MinkowskiEngine")
    except Exception:  # ImportError, or a broken build raising OSError/RuntimeError
        return False
    return True


def minkowski_available() -> bool:
    """True when MinkowskiEngine imports and has not been hidden with LIDAR_COMPLETION_HIDE_MINKOWSKI."""
    return (not minkowski_hidden()) and _minkowski_importable()


def resolve_backend(name: str | None = None) -> str:
    """Turn ``None``/``"auto"``/a backend name into ``"minkowski"`` or ``"torch"``."""
    name = "" if name is None else str(name).strip().lower()
    if name in ("", "auto"):  # the environment variable sets what "auto" means
        name = (os.environ.get(ENV_BACKEND, "") or "auto").strip().lower()
    if name not in BACKENDS:
        raise ConfigError(f"unknown sparse backend {name!r}; expected one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "minkowski" if minkowski_available() else "torch"
    if name == "minkowski" and not minkowski_available():
        why = ("it is hidden by LIDAR_COMPLETION_HIDE_MINKOWSKI" if minkowski_hidden()
               else "it does not import (build it with scripts/install_minkowski.sh)")
        raise ConfigError(f"sparse backend 'minkowski' requested but {why}; use backend='torch'")
    return name


def get_backend(name: str | None = None):
    """The backend object (module-level singleton) for ``name`` (see :func:`resolve_backend`)."""
    resolved = resolve_backend(name)
    if resolved == "torch":
        from . import torch_backend
        return torch_backend.BACKEND
    from . import minkowski_backend
    return minkowski_backend.BACKEND


from .common import Field, nearest_cell, voxel_indices  # noqa: E402,F401
