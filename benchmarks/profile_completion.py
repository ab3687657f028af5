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
import gzip
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backends import synthetic_scan  # noqa: E402

from lidar_completion.checkpoints import make_random_checkpoint  # noqa: E402
from lidar_completion.completer import Completer  # noqa: E402
from lidar_completion.models import ModelConfig  # noqa: E402
from lidar_completion.profiling import count_syncs, named_regions, summary  # noqa: E402
from lidar_completion.settings import add_arguments  # noqa: E402

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

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with named_regions() as names, profile(activities=acts, record_shapes=False) as prof:
        c.complete_detailed(scan)
    sort_dev = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    text = summary(prof, names, device.type, top=args.top)["text"]
    print("\n" + text.replace("kernel launches=", "per scan: kernel launches="))
    print(f"\n## the torch profiler's table by {sort_dev}")
    print(prof.key_averages().table(sort_by=sort_dev, row_limit=args.top, max_name_column_width=48))
    if args.trace:
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            prof.export_chrome_trace(tmp.name)
            with open(tmp.name, "rb") as src, gzip.open(args.trace, "wb") as dst:
                dst.write(src.read())
        print(f"trace written to {args.trace}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
