"""Sparse backends compared: forward time per network and end-to-end completion time per scan.

    python benchmarks/backends.py                    # CPU: torch vs MinkowskiEngine (when built)
    python benchmarks/backends.py --device cuda      # GPU: torch backend, 1/4/8 steps, fp32/bf16
    python benchmarks/backends.py --quick            # smaller clouds, fewer repeats

Weights are random (timing does not depend on their values); the scan is a synthetic HDL-64E scan
from `lidar_completion.data.synthetic` cut to 120,000 points. Prints one line per measurement; the
last line is `torch_vs_minkowski_cpu=<minkowski time / torch time>` (per-network forward times,
summed) when both backends ran on the CPU, else `torch_vs_minkowski_cpu=nan`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lidar_completion import sparse
from lidar_completion.checkpoints import make_random_checkpoint
from lidar_completion.completer import Completer
from lidar_completion.models import ConditionEncoder, Denoiser, ModelConfig, Refiner


def synthetic_scan(n_points: int, seed: int = 0) -> np.ndarray:
    from lidar_completion.data.kitti import read_scan
    from lidar_completion.data.synthetic import generate_dataset

    with tempfile.TemporaryDirectory() as d:
        generate_dataset(d, sequences=1, scans=1, seed=seed)
        pts = read_scan(next(Path(d).glob("sequences/*/velodyne/*.bin")))[:, :3]
    g = np.random.default_rng(seed)
    if len(pts) > n_points:
        pts = pts[g.choice(len(pts), n_points, replace=False)]
    return np.ascontiguousarray(pts, dtype=np.float32)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    fn()  # warm-up (allocator, kernels)
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def network_forward_times(cfg, backend, device, points, repeats):
    """Median forward time of each network on `points` (as LiDiff's inference feeds them)."""
    torch.manual_seed(0)
    enc = ConditionEncoder(cfg, backend).to(device).eval()
    den = Denoiser(cfg, backend).to(device).eval()
    ref = Refiner(cfg, backend).to(device).eval()
    x = torch.from_numpy(points).to(device)
    out = {}
    with torch.no_grad():
        out["encoder"] = timed(lambda: enc(x), device, repeats)
        cond = enc(x)
        t = torch.tensor([500], device=device)
        xt = x + 0.3 * torch.randn_like(x)
        out["denoiser"] = timed(lambda: den(xt, None, t, cond), device, repeats)
        out["refiner"] = timed(lambda: ref(x), device, repeats)
    return out


def end_to_end(ckpt, backend, device, scan, steps, precision, repeats, refine=True):
    c = Completer.from_checkpoint(ckpt, steps=steps, guidance=3.5, refine=refine, device=str(device), seed=0,
                                  backend=backend, precision=precision)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    res = [None]

    def run():
        res[0] = c.complete_detailed(scan)

    t = timed(run, device, repeats)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else float("nan")
    modes = []   # CUDA graphs of the denoiser and the refiner: replay / ordinary (auto) / off
    for g in (c._graphed, c._graphed_refiner):
        mode = "off" if g is None else ("replay" if g.replaying else "ordinary")
        if g is not None and g.tuning:
            mode += f"({g.tuning[0] * 1000:.1f}ms/{g.tuning[1] * 1000:.1f}ms)"
        modes.append(mode)
    return t, peak, res[0], ",".join(modes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--config", choices=("full", "tiny"), default="full", help="network widths")
    p.add_argument("--quick", action="store_true", help="smaller clouds and one repeat (minutes on 2 cores)")
    p.add_argument("--backends", nargs="+", default=None, help="default: every available backend")
    p.add_argument("--steps", nargs="+", type=int, default=None, help="end-to-end step counts (GPU default 1 4 8)")
    p.add_argument("--json", default=None, help="also write all figures to this JSON file")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-forward", action="store_true", help="skip the per-network forward timings")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per figure (median)")
    p.add_argument("--checkpoint", default=None, help="time this checkpoint instead of random weights")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device(args.device)
    cfg = ModelConfig.full() if args.config == "full" else ModelConfig.tiny()
    backends = args.backends or (["torch", "minkowski"] if sparse.minkowski_available() and device.type == "cpu"
                                 else ["torch"])
    sizes = (18_000, 180_000) if not args.quick else (18_000, 60_000)
    repeats = args.repeats or (1 if args.quick else 3)
    scan = synthetic_scan(120_000 if not args.quick else 60_000)
    results = {"device": str(device), "config": cfg.name, "checkpoint": args.checkpoint, "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
               "threads": torch.get_num_threads(), "forward": {}, "end_to_end": []}
    print(f"# device={device} config={cfg.name if not args.checkpoint else args.checkpoint} threads={torch.get_num_threads()} backends={backends}", flush=True)
    base = synthetic_scan(max(sizes), seed=1)
    for n in (() if args.no_forward else sizes):
        # LiDiff's inputs: FPS-like subset tiled x10 (duplicated points); here a random subset tiled
        pts = np.tile(base[: n // 10], (10, 1)) if n >= 100_000 else base[:n]
        for b in backends:
            t = network_forward_times(cfg, b, device, pts, repeats)
            results["forward"].setdefault(b, {})[n] = t
            print(f"forward backend={b} points={n} " + " ".join(f"{k}={v * 1000:.1f}ms" for k, v in t.items()),
                  flush=True)
    with tempfile.TemporaryDirectory() as d:
        ckpt = args.checkpoint or make_random_checkpoint(Path(d) / "random.pt", config=cfg)
        if device.type == "cuda":
            steps_list = args.steps or [1, 4, 8]
            precisions = ["fp32", "bf16"]
        else:
            steps_list = args.steps or [8]
            precisions = ["fp32"]
        for b in backends:
            for steps in steps_list:
                for prec in precisions:
                    t, peak, r, graphs = end_to_end(ckpt, b, device, scan, steps, prec, repeats)
                    row = {"backend": b, "steps": steps, "precision": prec, "cuda_graphs": graphs,
                           "seconds": t, "peak_mib": peak,
                           "points_in": len(scan), "points_out": int(len(r.points)),
                           "stages": {k: round(v, 4) for k, v in r.timings.items()}}
                    results["end_to_end"].append(row)
                    print(f"complete backend={b} steps={steps} precision={prec} graphs={graphs} refine=1 "
                          f"time={t * 1000:.0f}ms "
                          f"peak_gpu={peak:.0f}MiB out={len(r.points)} stages={row['stages']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    ratio = float("nan")
    fw = results["forward"]
    if device.type == "cpu" and "minkowski" in fw and "torch" in fw:
        tm = sum(sum(v.values()) for v in fw["minkowski"].values())
        tt = sum(sum(v.values()) for v in fw["torch"].values())
        ratio = tm / tt
    print(f"torch_vs_minkowski_cpu={ratio:.3f}" if not math.isnan(ratio) else "torch_vs_minkowski_cpu=nan")
    return 0


if __name__ == "__main__":
    sys.exit(main())
