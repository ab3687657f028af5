"""Where one completion spends its time: per-stage wall times, host-device synchronisations per
denoiser call, and the torch profiler's view of one scan, grouped by named regions of our code.

    python benchmarks/profile_completion.py --device cuda                 # shipped student, 8 steps
    python benchmarks/profile_completion.py --device cuda --config full   # random published-width nets
    python benchmarks/profile_completion.py --device cpu --n-fps 2000     # a quick CPU look

The named regions (voxelize, kernel maps, nearest condition cell, 3x3x3 / stride-2 / transposed
convolutions, batch norm, conditioning MLPs, FPS, ...) are added by wrapping those functions with
``torch.profiler.record_function`` for this run only; the library itself carries no profiling
hooks. ``--trace FILE`` also writes a Chrome trace (open it in chrome://tracing or Perfetto).
Figures are printed, never asserted.
"""
from __future__ import annotations

import argparse
import functools
import gzip
import inspect
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backends import synthetic_scan  # noqa: E402

from lidar_completion import completer as completer_mod  # noqa: E402
from lidar_completion.checkpoints import make_random_checkpoint  # noqa: E402
from lidar_completion.completer import Completer  # noqa: E402
from lidar_completion.models import ModelConfig, networks  # noqa: E402
from lidar_completion.settings import add_arguments  # noqa: E402
from lidar_completion.sparse import conv_implicit_gemm, kmap, layers, nearest, torch_backend  # noqa: E402

# (owner, attribute, region name): functions wrapped with a named profiler range
REGIONS = [
    (torch_backend.TorchBackend, "voxelize", "voxelize"),
    (kmap.CoordinateManager, "parent_map", "map.parent"),
    (kmap.CoordinateManager, "downsample_map", "map.downsample"),
    (kmap.CoordinateManager, "child_table", "map.children"),
    (kmap.CoordinateManager, "neighbour_table", "map.neighbour_table"),
    (kmap.CoordinateManager, "neighbour_map", "map.neighbour_pairs"),
    (kmap.CoordinateManager, "neighbour_stats", "map.stats"),
    (kmap.CoordinateManager, "offset_pairs", "map.offset_pairs"),
    (kmap.CoordinateManager, "gather_plan", "map.gather_plan"),
    (nearest, "_nearest_bruteforce", "cond.nearest_fallback"),
    (layers.Convolution, "forward", "conv"),
    (layers.ConvolutionTranspose, "forward", "deconv"),
    (layers.BatchNorm, "forward", "batchnorm"),
    (conv_implicit_gemm, "implicit_gemm", "triton.conv"),
    (networks.Denoiser, "_site_weights", "cond.site_mlps"),
    (networks.Denoiser, "_modulate", "cond.modulate"),
    (completer_mod, "make_x_init", "fps+tile"),
    (completer_mod, "postprocess", "postprocess"),
]


def _wrap(fn, name):
    @functools.wraps(fn)
    def inner(*a, **k):
        with record_function(name):
            return fn(*a, **k)
    return inner


def install_regions():
    # the networks look the nearest cell up through their backend object
    from lidar_completion.sparse import triton_backend
    for owner in (torch_backend.TorchBackend, triton_backend.TritonBackend):
        owner.nearest_cell = staticmethod(_wrap(owner.nearest_cell, "cond.nearest_cell"))
    for owner, attr, name in REGIONS:
        wrapped = _wrap(getattr(owner, attr), name)
        if isinstance(inspect.getattr_static(owner, attr), staticmethod):
            wrapped = staticmethod(wrapped)
        setattr(owner, attr, wrapped)


def count_syncs(fn):
    """Number of synchronising CUDA calls (torch's sync debug mode warnings) while running fn."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    sites = {}
    for w in caught:
        msg = str(w.message)
        if "synchroniz" in msg.lower():
            sites[msg[:90]] = sites.get(msg[:90], 0) + 1
    return sum(sites.values()), sites


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="default: the shipped student (or random --config weights)")
    p.add_argument("--config", choices=("full", "tiny"), default=None,
                   help="random weights of these widths instead of a checkpoint")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--guidance", type=float, default=3.5)
    add_arguments(p, only=("device", "precision", "backend"))
    p.set_defaults(device="cuda" if torch.cuda.is_available() else "cpu", backend="torch")
    p.add_argument("--points", type=int, default=120_000, help="points of the synthetic scan")
    p.add_argument("--n-fps", type=int, default=None, help="FPS budget (default: the checkpoint's, 18,000)")
    p.add_argument("--top", type=int, default=30, help="rows of each profiler table")
    p.add_argument("--trace", default=None, help="write a gzipped Chrome trace here")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--process", choices=("local", "vp"), default=None,
                   help="the solver's forward process (default: the checkpoint's; with --config, local, "
                        "as benchmarks/backends.py runs the published case - under vp the noisy points "
                        "lie far from the condition, and the exact nearest-cell fallback does more work)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    scan = synthetic_scan(args.points)
    kw = {} if args.n_fps is None else {"n_fps": args.n_fps}
    with tempfile.TemporaryDirectory() as d:
        ckpt = args.checkpoint
        if args.config is not None:
            cfg = ModelConfig.full() if args.config == "full" else ModelConfig.tiny()
            ckpt = make_random_checkpoint(Path(d) / "random.pt", config=cfg)
        process = args.process or ("local" if args.config is not None else None)
        c = Completer.from_checkpoint(ckpt, steps=args.steps, guidance=args.guidance, device=str(device),
                                      seed=0, backend=args.backend, precision=args.precision,
                                      process=process, **kw)
    print(f"# {c!r} gpu={torch.cuda.get_device_name() if device.type == 'cuda' else None} "
          f"torch={torch.__version__} points={len(scan)}", flush=True)
    c.complete_detailed(scan)  # warm-up: allocator, kernels, unconditional cache
    walls = []
    for _ in range(3):
        t0 = time.perf_counter()
        r = c.complete_detailed(scan)
        walls.append(time.perf_counter() - t0)
    print(f"wall median={np.median(walls) * 1000:.0f}ms (3 runs) stages="
          + " ".join(f"{k}={v * 1000:.1f}ms" for k, v in r.timings.items()), flush=True)
    print(f"per denoiser call={r.timings['denoiser'] / args.steps * 1000:.1f}ms "
          f"points_out={len(r.points)}", flush=True)
    for name, g in (("denoiser", c._graphed), ("refiner", c._graphed_refiner), ("encoder", c._graphed_encoder)):
        print(f"cuda graphs {name}: active={c.graphs_active}" + ("" if g is None else
              f" captures={g.captures} replays={g.replays} fallbacks={g.fallbacks} replaying={g.replaying}"
              f" tuning(replay s, ordinary s)={g.tuning}"), flush=True)

    if device.type == "cuda":
        filtered, scan_fps, x_init_np, _ = c.prepare(scan)
        x = torch.from_numpy(x_init_np).to(device)
        with torch.inference_mode(), c._autocast():
            cond = c.encoder(torch.from_numpy(scan_fps).to(device),
                             torch.zeros(len(scan_fps), dtype=torch.long, device=device))
            uncond = c.unconditional(len(scan_fps))
            xt = x + 0.5 * torch.randn_like(x)
            n, sites = count_syncs(lambda: c.denoise_guided(xt, 500, cond, uncond))
        print(f"host syncs per guided denoiser call: {n}", flush=True)
        for msg, k in sorted(sites.items(), key=lambda kv: -kv[1])[:12]:
            print(f"  {k:4d} x {msg}")

    install_regions()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=False) as prof:
        c.complete_detailed(scan)
    sort_dev = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ka = prof.key_averages()
    print("\n## named regions (CPU total includes waiting for the device at syncs)")
    names = {r[2] for r in REGIONS} | {"cond.nearest_cell"}
    rows = [e for e in ka if e.key in names]
    rows.sort(key=lambda e: -e.cpu_time_total)
    for e in rows:
        dev = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0))
        print(f"  {e.key:22s} calls={e.count:6d} cpu_total={e.cpu_time_total / 1000:9.1f}ms "
              f"device_total={dev / 1000:9.1f}ms")
    print(f"\n## top ops by {sort_dev}")
    print(ka.table(sort_by=sort_dev, row_limit=args.top, max_name_column_width=48))
    if device.type == "cuda":
        launches = sum(e.count for e in ka if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
        syncs = sum(e.count for e in ka if "Synchronize" in e.key or e.key.startswith("cudaMemcpy"))
        print(f"kernel launches per scan={launches} sync/memcpy calls per scan={syncs}")
    if args.trace:
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            prof.export_chrome_trace(tmp.name)
            with open(tmp.name, "rb") as src, gzip.open(args.trace, "wb") as dst:
                dst.write(src.read())
        print(f"trace written to {args.trace}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
