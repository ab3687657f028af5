"""Named profiler ranges around the library's stages, for benchmarks that ask where time goes.

The library carries no profiling hooks of its own. :func:`named_regions` wraps a fixed list of
functions (voxelisation, kernel maps, nearest condition cell, convolutions, batch norm, the
denoiser's conditioning, sampling) with ``torch.profiler.record_function`` for the duration of a
``with`` block and puts the originals back afterwards, so that a torch profiler table can be read
stage by stage. :func:`count_syncs` counts the host-device synchronisations of a call, and
:func:`summary` prints what a profile of one scan or one training step says (used by
``benchmarks/profile_completion.py`` and ``python -m training.bench --profile``).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from typing import Callable, Iterable, Sequence

import torch
from torch.profiler import record_function

# kernel-launch entry points as the profiler names them (runtime and driver API)
_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def library_regions() -> list:
    """(owner, attribute, region name) of the library's functions that get a named range."""
    from . import completer
    from .models import networks
    from .sparse import conv_implicit_gemm, kmap, layers, nearest, torch_backend, triton_backend
    return [
        (torch_backend.TorchBackend, "voxelize", "voxelize"),
        (kmap.CoordinateManager, "parent_map", "map.parent"),
        (kmap.CoordinateManager, "downsample_map", "map.downsample"),
        (kmap.CoordinateManager, "child_table", "map.children"),
        (kmap.CoordinateManager, "neighbour_table", "map.neighbour_table"),
        (kmap.CoordinateManager, "neighbour_map", "map.neighbour_pairs"),
        (kmap.CoordinateManager, "neighbour_stats", "map.stats"),
        (kmap.CoordinateManager, "offset_pairs", "map.offset_pairs"),
        (kmap.CoordinateManager, "gather_plan", "map.gather_plan"),
        (kmap.CoordinateManager, "offset_rows", "map.offset_rows"),
        (nearest, "_nearest_bruteforce", "cond.nearest_fallback"),
        # the networks look the nearest cell up through their backend object
        (torch_backend.TorchBackend, "nearest_cell", "cond.nearest_cell"),
        (triton_backend.TritonBackend, "nearest_cell", "cond.nearest_cell"),
        (layers.Convolution, "forward", "conv"),
        (layers.ConvolutionTranspose, "forward", "deconv"),
        (layers.BatchNorm, "forward", "batchnorm"),
        (conv_implicit_gemm, "implicit_gemm", "triton.conv"),
        (conv_implicit_gemm, "weight_gradient", "triton.conv_weight_grad"),
        (networks.Denoiser, "_site_weights", "cond.site_mlps"),
        (networks.Denoiser, "_modulate", "cond.modulate"),
        (completer, "make_x_init", "fps+tile"),
        (completer, "postprocess", "postprocess"),
    ]


def _wrap(fn: Callable, name: str) -> Callable:
    @functools.wraps(fn)
    def inner(*a, **k):
        with record_function(name):
            return fn(*a, **k)
    return inner


@contextlib.contextmanager
def named_regions(extra: Iterable = ()):
    """Within the block, the functions of :func:`library_regions` and ``extra`` ((owner, attribute,
    name) triples) run inside a profiler range of that name; the originals are restored on exit.
    Yields the set of region names."""
    saved = []
    names = set()
    try:
        for owner, attr, name in [*library_regions(), *extra]:
            raw = inspect.getattr_static(owner, attr)
            fn = getattr(owner, attr)
            wrapped = _wrap(fn, name)
            if isinstance(raw, staticmethod):
                wrapped = staticmethod(wrapped)
            own = attr in vars(owner)           # a module's function, or the class's own method
            saved.append((owner, attr, raw, own))
            setattr(owner, attr, wrapped)
            names.add(name)
        yield names
    finally:
        for owner, attr, raw, own in reversed(saved):
            if own:
                setattr(owner, attr, raw)
            else:               # inherited: take the class's own wrapper away again
                delattr(owner, attr)


@contextlib.contextmanager
def sync_counter():
    """Counts the synchronising CUDA calls made inside the block (torch's sync debug mode). Yields
    a dict that holds, after the block, ``count`` and ``sites`` ({"file:line": count}, where in the
    Python code each synchronisation was asked for). The debug mode is put back as it was, and the
    block's other warnings are issued again afterwards."""
    result: dict = {"count": 0, "sites": {}}
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield result
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    for w in caught:
        if "synchroniz" in str(w.message).lower():
            site = f"{w.filename}:{w.lineno}"
            result["sites"][site] = result["sites"].get(site, 0) + 1
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    result["count"] = sum(result["sites"].values())


def count_syncs(fn: Callable) -> tuple:
    """(number of synchronising CUDA calls while ``fn()`` runs, {message: count})."""
    with sync_counter() as r:
        fn()
    return r["count"], r["sites"]


def _device_us(event) -> float:
    return float(getattr(event, "device_time_total", getattr(event, "cuda_time_total", 0.0)))


def _self_device_us(event) -> float:
    return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))


def summary(prof, names: Sequence[str], device_type: str, top: int = 30) -> dict:
    """What a profile says, as printable text and figures.

    Returns ``{"text": str, "regions": [...], "top": [...], "launches": int, "syncs": int,
    "total_ms": float}``: the named regions (calls, CPU and device milliseconds), the ``top`` operators and kernels by self device time (CPU time without a device),
    kernel launches and synchronising / copying runtime calls (CUDA only, else 0)."""
    # kineto also reports each range (ours, the optimiser's, ...) as a device-side "user annotation"
    # event spanning its kernels: a copy of their time, not a kernel
    cpu_type = torch.autograd.DeviceType.CPU
    ka = [e for e in prof.key_averages()
          if not (getattr(e, "is_user_annotation", False) and getattr(e, "device_type", cpu_type) != cpu_type)]
    cuda = device_type == "cuda"
    regions = []
    host = [e for e in ka if e.key in set(names)]
    for e in sorted(host, key=lambda e: -e.cpu_time_total):
        regions.append({"name": e.key, "calls": e.count, "cpu_ms": round(e.cpu_time_total / 1000, 3),
                        "device_ms": round(_device_us(e) / 1000, 3)})
    self_time = _self_device_us if cuda else (lambda e: float(e.self_cpu_time_total))
    ops = [e for e in ka if e.key not in set(names)]
    if cuda:
        # the kernels and copies themselves: an operator's self device time repeats its kernels'
        on_device = [e for e in ops if getattr(e, "device_type", None) not in (None, cpu_type)]
        ops = on_device or ops
    ops.sort(key=lambda e: -self_time(e))
    top_rows = [{"name": e.key, "calls": e.count, "self_ms": round(self_time(e) / 1000, 3)}
                for e in ops[:top] if self_time(e) > 0]
    launches = sum(e.count for e in ka if e.key in _LAUNCHES) if cuda else 0
    syncs = sum(e.count for e in ka if "Synchronize" in e.key or e.key.startswith("cudaMemcpy")) if cuda else 0
    total = sum(self_time(e) for e in ops) / 1000
    lines = ["## named regions (CPU time includes waiting for the device at syncs; device time counts the "
             "kernels launched from the range's own thread, so not autograd's backward threads)"]
    for r in regions:
        lines.append(f"  {r['name']:26s} calls={r['calls']:6d} cpu={r['cpu_ms']:9.1f}ms device={r['device_ms']:9.1f}ms")
    what = "self device time" if cuda else "self CPU time"
    lines.append(f"## top operators and kernels by {what} (all: {total:.1f} ms)")
    for r in top_rows:
        lines.append(f"  {r['self_ms']:9.2f}ms {100 * r['self_ms'] / max(total, 1e-9):5.1f}%  calls={r['calls']:5d}  "
                     f"{r['name'][:90]}")
    if cuda:
        lines.append(f"kernel launches={launches} sync/memcpy calls={syncs}")
    return {"text": "\n".join(lines), "regions": regions, "top": top_rows, "launches": launches,
            "syncs": syncs, "total_ms": round(total, 3)}


__all__ = ["count_syncs", "library_regions", "named_regions", "summary", "sync_counter"]
