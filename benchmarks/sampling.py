"""Sampling cost: our inference path vs a LiDiff-style reference path, same scan, steps and seed.

Ours (``lidar_completion.completer.Completer``): the condition encoder runs once per scan, the
unconditional condition (an all-zero cloud) is computed once and cached, and each solver step makes
ONE guided denoiser call (``forward_cfg``: conditional and unconditional passes share voxelisation
and kernel maps).

LiDiff-style reference (as the published pipeline runs it): at every step the condition encoder is
run twice (on the tiled ``x_init`` and on an all-zero cloud of the same size), then the denoiser
twice, conditional and unconditional one after the other. Pre-processing, the solver arithmetic,
post-processing and refinement are shared code, so the two outputs agree up to float rounding.

Prints per-stage times for both paths and, as its last line, ``ratio_vs_lidiff_style=<x>``
(reference total / our total; min over ``--repeats`` runs of each).

    python benchmarks/sampling.py --quick            # tiny networks, 3,000-point x_init, CPU minutes
    python benchmarks/sampling.py --device cuda      # published sizes: full networks, 180,000 points
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

from lidar_completion.completer import STAGES, Completer, _Clock
from lidar_completion.diffusion import sample
from lidar_completion.models import ConditionEncoder, Denoiser, ModelConfig, Refiner
from lidar_completion.preprocess import postprocess
from lidar_completion.settings import add_arguments


def synthetic_scan(seed: int) -> np.ndarray:
    """One HDL-64-like sweep of a procedural street (the project's synthetic generator)."""
    try:
        from lidar_completion.data.synthetic import SyntheticScene
        points, _ = SyntheticScene(seed, 0, 1).scan(0)
        return points
    except ImportError:  # pragma: no cover - generator not installed: a ring scan of a flat street
        rng = np.random.default_rng(seed)
        el = np.deg2rad(np.linspace(-24.9, 2.0, 64))[:, None]
        az = np.linspace(0, 2 * np.pi, 1800, endpoint=False)[None, :]
        d_ground = np.where(el < 0, 1.73 / np.maximum(np.tan(-el), 1e-3), np.inf)
        d_wall = 12.0 / np.maximum(np.abs(np.sin(az) * np.cos(el)), 1e-3)
        d = np.minimum(np.minimum(d_ground, d_wall), 80.0) + rng.normal(0, 0.02, (64, 1800))
        pts = np.stack([d * np.cos(el) * np.cos(az), d * np.cos(el) * np.sin(az), d * np.sin(el)], -1)
        return np.concatenate([pts.reshape(-1, 3), np.zeros((64 * 1800, 1))], 1).astype(np.float32)


def lidiff_style(c: Completer, scan: np.ndarray, seed: int) -> dict:
    """The reference path; returns {"timings", "raw", "points", "encoder_calls", "denoiser_calls"}."""
    clock = _Clock(c.device)
    calls = {"encoder": 0, "denoiser": 0}
    t_start = time.perf_counter()
    with torch.inference_mode():
        with clock("preprocess"):
            _, _, x_init_np, _ = c.prepare(scan)
            x_init = torch.from_numpy(x_init_np).to(c.device)
            gen, _ = c._generator(seed)
        batch = torch.zeros(len(x_init), dtype=torch.long, device=c.device)
        zeros = torch.zeros_like(x_init)

        def denoise(x, t):
            t1 = torch.tensor([t], device=c.device)
            with c._autocast():
                with clock("encoder"):
                    cond = c.encoder(x_init, batch)          # recomputed at every step...
                    uncond = c.encoder(zeros, batch)         # ...and the scan-independent one too
                    calls["encoder"] += 2
                with clock("denoiser"):
                    eps_c = c.denoiser(x, batch, t1, cond)
                    eps_u = c.denoiser(x, batch, t1, uncond)
                    calls["denoiser"] += 2
            eps_c, eps_u = eps_c.float(), eps_u.float()
            return eps_u + c.guidance * (eps_c - eps_u)

        loop_start = time.perf_counter()
        x0 = sample(denoise, x_init, c.solver, gen)
        if clock.cuda:
            torch.cuda.synchronize()
        clock.times["solver"] = (time.perf_counter() - loop_start - clock.times["encoder"]
                                 - clock.times["denoiser"])
        with clock("postprocess"):
            raw_t = postprocess(x0, x_init, c.post_max_range)
            raw = raw_t.cpu().numpy()
        points = raw
        if c.refine:
            with clock("refinement"):
                points = c.refine_points(raw_t).cpu().numpy()
    times = dict(clock.times)
    times["total"] = time.perf_counter() - t_start
    return {"timings": times, "raw": raw, "points": points, **{f"{k}_calls": v for k, v in calls.items()}}


class _Counting(torch.nn.Module):
    """Wraps a module and counts forward / forward_cfg calls (for the report)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, *args):
        self.calls += 1
        return self.inner(*args)


class _CountingDenoiser(_Counting):
    def forward_cfg(self, *args):
        self.calls += 1
        return self.inner.forward_cfg(*args)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="tiny networks and a 3,000-point x_init (n_fps 300 x tile 10): CPU minutes")
    ap.add_argument("--config", choices=("full", "tiny"), default=None,
                    help="network widths (default: full, tiny with --quick)")
    ap.add_argument("--checkpoint", default=None, help="load weights from a checkpoint instead of random")
    ap.add_argument("--n-fps", type=int, default=None, help="FPS budget (default 18000; 300 with --quick)")
    ap.add_argument("--tile", type=int, default=10)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--guidance", type=float, default=3.5)
    ap.add_argument("--no-refine", action="store_true")
    ap.add_argument("--scan", default=None,
                    help="scan file (.bin/.npy/.ply/.pcd); default: a synthetic HDL-64 sweep")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3,
                    help="alternating runs of each path; the fastest of each is reported")
    add_arguments(ap, only=("device", "backend", "precision"))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 2)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads or min(2, os.cpu_count() or 1))
    n_fps = args.n_fps or (300 if args.quick else 18000)
    config_name = args.config or ("tiny" if args.quick else "full")
    kw = dict(steps=args.steps, guidance=args.guidance, refine=not args.no_refine,
              device=args.device, seed=args.seed, n_fps=n_fps, tile=args.tile,
              precision=args.precision)
    if args.checkpoint:
        c = Completer.from_checkpoint(args.checkpoint, backend=args.backend, **kw)  # "auto": the env's
        config_name = f"checkpoint {args.checkpoint}"
    else:
        torch.manual_seed(args.seed)
        cfg = ModelConfig.full() if config_name == "full" else ModelConfig.tiny()
        c = Completer(ConditionEncoder(cfg, backend=args.backend), Denoiser(cfg, backend=args.backend),
                      Refiner(cfg, backend=args.backend), **kw)
    c.encoder = _Counting(c.encoder).eval()
    c.denoiser = _CountingDenoiser(c.denoiser).eval()

    if args.scan:
        from lidar_completion.io import read_cloud
        scan = read_cloud(args.scan)
    else:
        scan = synthetic_scan(args.seed)
    dev = c.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    print(f"device {name}; networks {config_name}; backend {c.encoder.inner.backend}; "
          f"precision {args.precision}")
    print(f"scan {len(scan)} points; n_fps {n_fps} x tile {args.tile}; {args.steps} steps; "
          f"w {args.guidance}; refine {c.refine}; seed {args.seed}")

    # warm-up (allocator, kernel caches, cached unconditional condition) on both paths
    c.steps = 1
    c.complete_detailed(scan)
    lidiff_style(c, scan, args.seed)
    c.steps = args.steps

    ours_runs, ref_runs = [], []
    enc_calls = den_calls = 0
    for _ in range(max(1, args.repeats)):
        e0, d0 = c.encoder.calls, c.denoiser.calls
        res = c.complete_detailed(scan)
        enc_calls, den_calls = c.encoder.calls - e0, c.denoiser.calls - d0
        ours_runs.append(res)
        ref_runs.append(lidiff_style(c, scan, args.seed))
    ours = min(ours_runs, key=lambda r: r.timings["total"])
    ref = min(ref_runs, key=lambda r: r["timings"]["total"])

    print(f"{'stage':<13}{'ours [s]':>11}{'lidiff-style [s]':>18}")
    for stage in STAGES + ("total",):
        print(f"{stage:<13}{ours.timings.get(stage, 0.0):>11.3f}{ref['timings'].get(stage, 0.0):>18.3f}")
    print(f"{'encoder calls':<13}{enc_calls:>11d}{ref['encoder_calls']:>18d}   (ours: + 1 cached "
          "unconditional encoding for the first scan of a size)")
    print(f"{'denoiser calls':<13}{den_calls:>10d}{ref['denoiser_calls']:>18d}   (ours: cond + uncond "
          "in one call)")
    if ours.raw.shape == ref["raw"].shape:
        print(f"outputs: {len(ours.points)} points each; max |ours - reference| over the raw "
              f"completion = {float(np.abs(ours.raw - ref['raw']).max()):.2e} m")
    else:
        print(f"outputs: raw completion sizes differ ({len(ours.raw)} vs {len(ref['raw'])}) "
              "- points at the band edge after float rounding")
    ratio = ref["timings"]["total"] / ours.timings["total"]
    print(f"ratio_vs_lidiff_style={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
