"""Sparse voxel tensors and the layer modules the networks are built from.

This package is the only place that touches MinkowskiEngine or Triton. Three backends implement one
interface (:class:`SparseBackend`):

* ``"minkowski"`` - MinkowskiEngine 0.5.4 (the reference, compiled; built by the setup script);
* ``"torch"``     - pure PyTorch: kernel maps from sorted coordinate keys, gather / grouped / scatter
  convolution algorithms. The CPU path; runs on every device torch runs on;
* ``"triton"``    - our Triton kernels on CUDA: the same kernel maps arranged for a masked implicit
  GEMM (output rows sorted by neighbour bitmask, tiles that skip absent offsets, no atomics), batch
  norm / ReLU / residual / skip concatenation fused into the convolution. On the CPU it runs only
  under the Triton interpreter (``TRITON_INTERPRET=1`` in the environment before start-up), slowly,
  for checks.

Layout (as the sparse engines the field holds up): :mod:`.coords` (voxel indices, packed keys),
:mod:`.static` (fixed shapes for CUDA graphs), :mod:`.kmap` (kernel-map building), one module per
convolution algorithm (:mod:`.conv_scatter`, :mod:`.conv_gather`, :mod:`.conv_grouped`,
:mod:`.conv_implicit_gemm`), :mod:`.layers` (the modules), one module per backend, and
:mod:`.nearest` (the nearest condition cell), :mod:`.sharing` (kernel maps shared between networks
that see the same points: :func:`shared_maps`).

All backends produce modules whose parameters carry MinkowskiEngine's names and layouts (a
convolution's ``kernel`` of shape ``(kernel_volume, in, out)``, ``(in, out)`` for 1x1; BatchNorm
wrapped as ``.bn``), so one state dict serves all three and the published LiDiff checkpoints load
into any.

Backend choice: ``backend="auto"|"minkowski"|"torch"|"triton"``; ``None`` and ``"auto"`` follow
``LIDAR_COMPLETION_BACKEND`` when it is set. ``auto`` takes Triton on a CUDA device when it imports,
else torch (on a CPU the faster of the two that run there: docs/benchmarks.md); MinkowskiEngine, the
reference, runs only when named. ``LIDAR_COMPLETION_HIDE_MINKOWSKI=1`` makes MinkowskiEngine
invisible (CI uses it to prove that every command runs without it).
"""
from __future__ import annotations

import importlib
import os
import warnings
from functools import lru_cache

from ..constants import BACKENDS
from ..errors import ConfigError
from .coords import Field, pack_keys, unpack_keys, voxel_indices
from .interface import SparseBackend
from .nearest import nearest_cell
from .sharing import shared_maps
from .static import (PAD_BATCH, StaticShapes, caching_allowed, grow_capacity, static_shapes, tensor_version,
                     use_static_shapes)

ENV_BACKEND = "LIDAR_COMPLETION_BACKEND"
ENV_HIDE_MINKOWSKI = "LIDAR_COMPLETION_HIDE_MINKOWSKI"

__all__ = ["BACKENDS", "ENV_BACKEND", "ENV_HIDE_MINKOWSKI", "Field", "PAD_BATCH", "SparseBackend",
           "StaticShapes", "caching_allowed", "get_backend", "grow_capacity", "minkowski_available",
           "nearest_cell", "pack_keys", "resolve_backend", "shared_maps", "static_shapes", "tensor_version",
           "triton_available", "triton_interpreted", "unpack_keys", "use_static_shapes", "voxel_indices"]


def minkowski_hidden() -> bool:
    return os.environ.get(ENV_HIDE_MINKOWSKI, "").strip().lower() not in ("", "0", "false", "no")


def import_minkowski():
    """Import MinkowskiEngine (every import of it in this package goes through here), with the BLAS
    library it links single-threaded unless the user chose otherwise.

    Why: its CPU build calls the system OpenBLAS, whose own pthread pool busy-waits between calls,
    beside torch's OpenMP threads that also spin between parallel regions; the two pools fought
    for the cores. Shipped student, 1,000 x 10 points, 2 threads on a 2-core machine: 6.5-7.3 s per
    scan, 3.8-4.5 s with OpenBLAS at one thread (``benchmarks/cpu_threads.py --backend minkowski``,
    docs/benchmarks.md). OpenBLAS reads ``OPENBLAS_NUM_THREADS`` once, when the library loads with
    this import; the variable is set for that moment only, so that child processes and numpy's own
    BLAS are left as they were."""
    import sys

    if "MinkowskiEngine" in sys.modules:
        return sys.modules["MinkowskiEngine"]
    unset = "OPENBLAS_NUM_THREADS" not in os.environ
    if unset:
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        with warnings.catch_warnings():  # its CPU-only build warns on every import
            warnings.filterwarnings("ignore", message=".*compiled with CPU_ONLY.*")
            return importlib.import_module("MinkowskiEngine")
    finally:
        if unset:
            os.environ.pop("OPENBLAS_NUM_THREADS", None)


@lru_cache(maxsize=1)
def _minkowski_importable() -> bool:
    try:
        import_minkowski()
    except Exception:  # ImportError, or a broken build raising OSError/RuntimeError
        return False
    return True


def minkowski_available() -> bool:
    """True when MinkowskiEngine imports and has not been hidden with LIDAR_COMPLETION_HIDE_MINKOWSKI."""
    return (not minkowski_hidden()) and _minkowski_importable()


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when Triton imports."""
    try:
        importlib.import_module("triton")
    except Exception:
        return False
    return True


def triton_interpreted() -> bool:
    """True when Triton runs its kernels in the interpreter (``TRITON_INTERPRET=1`` was set before
    Triton was imported): kernels then take CPU tensors."""
    if not triton_available():
        return False
    import triton
    return bool(triton.knobs.runtime.interpret)


def _device_type(device) -> str | None:
    if device is None:
        return None
    return getattr(device, "type", None) or str(device).split(":")[0].strip().lower()


def triton_refusal(device) -> str | None:
    """Why the Triton backend cannot run on ``device`` (None: it can)."""
    if not triton_available():
        return "Triton does not import (pip install triton; it comes with CUDA builds of torch)"
    kind = _device_type(device)
    if kind == "cuda" or kind is None:
        return None
    if kind == "cpu":
        if triton_interpreted():
            return None
        return ("the Triton backend runs on the CPU only in the Triton interpreter (slow; for checks): "
                "start with TRITON_INTERPRET=1 in the environment, or use backend 'torch' on the CPU")
    return f"the Triton backend runs on CUDA devices (or the CPU under TRITON_INTERPRET=1), not {device}"


def resolve_backend(name: str | None = None, device=None) -> str:
    """Turn ``None``/``"auto"``/a backend name into ``"minkowski"``, ``"torch"`` or ``"triton"``.

    ``device`` (optional) is where the network will run: ``auto`` takes Triton on CUDA, and an
    explicit ``triton`` is refused with a ConfigError where it cannot run there."""
    name = "" if name is None else str(name).strip().lower()
    if name in ("", "auto"):  # the environment variable sets what "auto" means
        name = (os.environ.get(ENV_BACKEND, "") or "auto").strip().lower()
    if name not in BACKENDS:
        raise ConfigError(f"unknown sparse backend {name!r}; expected one of {', '.join(BACKENDS)}")
    if name == "auto":
        if _device_type(device) == "cuda" and triton_available():
            return "triton"
        return "torch"   # MinkowskiEngine is the reference, slower than torch on a CPU: named only
    if name == "minkowski" and not minkowski_available():
        why = ("it is hidden by LIDAR_COMPLETION_HIDE_MINKOWSKI" if minkowski_hidden()
               else "it does not import (build it with scripts/setup/install_minkowski.sh)")
        raise ConfigError(f"sparse backend 'minkowski' requested but {why}; use backend='torch'")
    if name == "triton":
        why = triton_refusal(device)
        if why is not None:
            raise ConfigError(f"sparse backend 'triton' requested but {why}")
    return name


def get_backend(name: str | None = None, device=None) -> SparseBackend:
    """The backend object (module-level singleton) for ``name`` (see :func:`resolve_backend`)."""
    resolved = resolve_backend(name, device)
    if resolved == "torch":
        from . import torch_backend
        return torch_backend.BACKEND
    if resolved == "triton":
        from . import triton_backend
        return triton_backend.BACKEND
    from . import minkowski_backend
    return minkowski_backend.BACKEND
