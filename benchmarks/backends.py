"""Sparse backends compared on one machine: per stage, end to end, peak GPU memory.

    python benchmarks/backends.py --device cuda                   # triton vs torch, published + student
    python benchmarks/backends.py                                 # CPU: torch vs MinkowskiEngine (when built)
    python benchmarks/backends.py --device cuda --cases student   # one case
    python benchmarks/backends.py --quick                         # small clouds, one repeat (a smoke run)

Cases (``--cases``):

* ``published``: the published widths (LiDiff / Distillation-DPO networks) with random weights
  (timing does not depend on their values) at the published budget (18,000 FPS points tiled x10),
  8 solver steps with classifier-free guidance, then the refiner (x6 points);
* ``student``: the shipped student checkpoint at its own budget and guidance, 8 steps, refined;
* ``tiny``: the quarter-width networks with random weights at the published budget.

The scan is a synthetic HDL-64E scan from :mod:`lidar_completion.data.synthetic` cut to 120,000
points. Each (case, backend, precision) row gives the median of ``--repeats`` complete scans after
one warm-up scan (kernel compilation, tile tuning and CUDA graph capture happen there), with the
Completer's stage times (preprocessing = filters + FPS + tiling; encoder; denoiser per solver step
(both guidance halves); refiner; ``--fps`` picks where the sampling runs, ``--fps-parts`` its
approximate sector variant, ``--fps-candidates`` how many candidates each program of the device
kernel offers per exchange, a row per value of either) and the time to build every kernel map of one denoiser pass
(``maps``: voxelisation, the coordinate sets of all strides, the neighbour / child / parent tables
and, for triton, their bitmask-sorted plans). ``--forward`` adds per-network forward times.

The last line is ``triton_vs_torch=<torch seconds / triton seconds per scan, published widths, bf16>
published8_bf16_s=<triton seconds per scan, published widths, 8 steps, bf16>`` (``nan`` where a side
did not run; the rows of the first ``--fps-parts`` and ``--fps-candidates`` values); on the CPU,
``torch_vs_minkowski_cpu=<MinkowskiEngine time / torch time>`` of the per-network forward passes.
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
from unittest import mock

import numpy as np
import torch

from lidar_completion import sparse
from lidar_completion.checkpoints import default_checkpoint_path, make_random_checkpoint
from lidar_completion.sparse.triton_backend import ENV_FPS_CANDIDATES, FPS_CANDIDATES, fps_candidates_default
from lidar_completion.completer import Completer
from lidar_completion.models import ConditionEncoder, Denoiser, ModelConfig, Refiner

CASES = ("published", "student", "tiny")


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


def timed(fn, device, repeats, warmup=1):
    for _ in range(warmup):   # allocator, kernel compilation, tuning, graph capture
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def network_forward_times(cfg, backend, device, points, repeats):
    """Median forward time of each network on ``points`` (as LiDiff's inference feeds them)."""
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


def map_time(backend, device, x_init: torch.Tensor, sigma: float, repeats: int) -> float:
    """Seconds to build every kernel map of one denoiser pass over ``x_init`` plus noise of
    ``sigma`` metres (what a solver step builds before its first convolution)."""
    B = sparse.get_backend(backend, device)
    if backend == "minkowski":
        return float("nan")   # MinkowskiEngine builds its maps inside the layers
    g = torch.Generator(device=device).manual_seed(0)
    pts = x_init + sigma * torch.randn(x_init.shape, generator=g, device=device)
    batch = torch.zeros(len(pts), dtype=torch.long, device=device)

    def build():
        _, x = B.voxelize(pts, batch, 0.05)
        m = x.manager
        m.level(16)
        for s in (1, 2, 4, 8, 16):
            if backend == "triton":
                m.gather_plan("conv3", s, 64)
                if s < 16:
                    m.gather_plan("down", s, 64)
                if s > 1:
                    m.gather_plan("up", s, 64)
            else:
                m.neighbour_table(s)
                if s < 16:
                    m.child_table(s)
        return m
    with torch.inference_mode():
        return timed(build, device, repeats)


def end_to_end(ckpt, backend, device, scan, steps, precision, repeats, guidance=None, fps="auto", fps_parts=1):
    c = Completer.from_checkpoint(ckpt, steps=steps, guidance=guidance, refine=True, device=str(device),
                                  seed=0, backend=backend, precision=precision, fps=fps, fps_parts=fps_parts)
    res = [None]

    def run():
        res[0] = c.complete_detailed(scan)

    run()   # warm-up outside the peak-memory window: compilation, tuning, graph capture
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = timed(run, device, repeats, warmup=0)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else float("nan")
    modes = []   # CUDA graphs of the denoiser, the refiner and the encoder: replay / ordinary (auto) / off
    for g in (c._graphed, c._graphed_refiner, c._graphed_encoder):
        mode = "off" if g is None else ("replay" if g.replaying else "ordinary")
        if g is not None and g.tuning:
            mode += f"({g.tuning[0] * 1000:.1f}ms/{g.tuning[1] * 1000:.1f}ms)"
        modes.append(mode)
    return c, t, peak, res[0], ",".join(modes)


def fps_only(scan: np.ndarray, device, repeats: int, json_path, counts=(18_000, 4_000), parts=(1,),
             candidates=(0,)) -> int:
    """Farthest-point sampling of ``scan``: fpsample on the CPU (the k-d tree variant the
    Completer uses) against the Triton kernel; ``same_indices`` checks the kernel against fpsample's
    textbook implementation (both start from point 0). On CUDA also the kernel with fewer programs
    per cloud (8-64; the default spreads a cloud over every SM), and the kernel with each further
    ``candidates`` value (K candidates per program and exchange; the first value is the one timed
    throughout; ``same_as_default`` must hold, both are exact). Each ``parts`` value above 1 adds
    the approximate sector variant on both (``coverage``: the mean distance from a scan point to its
    nearest sample, against exact sampling's)."""
    import fpsample

    def coverage(samples: np.ndarray) -> float:
        try:
            from scipy.spatial import cKDTree
        except ImportError:   # a GPU machine without scipy: the timings still count
            return float("nan")
        return float(cKDTree(samples).query(scan)[0].mean())

    from lidar_completion.preprocess import farthest_point_sample
    from lidar_completion.sparse.triton_backend import (farthest_point_sample_device,
                                                        farthest_point_sample_sectors_device)

    rows = []
    x = torch.from_numpy(scan).to(device)
    k0 = candidates[0]
    for k in counts:
        cpu = timed(lambda: farthest_point_sample(scan, k), torch.device("cpu"), repeats)
        dev = timed(lambda: farthest_point_sample_device([x], [k], candidates=k0), device, repeats)
        want = farthest_point_sample_device([x], [k], candidates=k0)[0]
        same = bool(np.array_equal(np.asarray(fpsample.fps_sampling(scan, k, start_idx=0)), want.cpu().numpy()))
        rows.append({"points": len(scan), "samples": k, "candidates": k0, "cpu_s": cpu, "device_s": dev,
                     "same_indices": same})
        print(f"fps points={len(scan)} samples={k} candidates={k0} cpu={cpu * 1000:.1f}ms "
              f"device={dev * 1000:.1f}ms same_indices={same}", flush=True)
        for kc in candidates[1:]:   # more samples per exchange: fewer exchanges, the same samples
            t = timed(lambda: farthest_point_sample_device([x], [k], candidates=kc), device, repeats)
            same_c = bool(torch.equal(farthest_point_sample_device([x], [k], candidates=kc)[0], want))
            rows.append({"points": len(scan), "samples": k, "candidates": kc, "device_s": t,
                         "same_as_default": same_c})
            print(f"fps points={len(scan)} samples={k} candidates={kc} device={t * 1000:.1f}ms "
                  f"same_as_default={same_c}", flush=True)
        if device.type == "cuda":   # fewer programs: less polling traffic per step, more points each
            for p in (8, 16, 32, 64):
                t = timed(lambda: farthest_point_sample_device([x], [k], programs=p, candidates=k0), device, repeats)
                same_p = bool(torch.equal(farthest_point_sample_device([x], [k], programs=p, candidates=k0)[0], want))
                rows.append({"points": len(scan), "samples": k, "candidates": k0, "programs": p, "device_s": t,
                             "same_as_default": same_p})
                print(f"fps points={len(scan)} samples={k} candidates={k0} programs={p} device={t * 1000:.1f}ms "
                      f"same_as_default={same_p}", flush=True)
        sector_parts = [q for q in parts if q > 1]
        # the exact sampling's coverage, the reference of the sector rows (only when there are some)
        exact_cover = coverage(scan[farthest_point_sample(scan, k)]) if sector_parts else float("nan")
        for P in sector_parts:
            cpu = timed(lambda: farthest_point_sample(scan, k, P), torch.device("cpu"), repeats)
            dev = timed(lambda: farthest_point_sample_sectors_device(x, k, P), device, repeats)
            idx = farthest_point_sample_sectors_device(x, k, P).cpu().numpy()
            cover = coverage(scan[idx])
            rows.append({"points": len(scan), "samples": k, "parts": P, "cpu_s": cpu, "device_s": dev,
                         "coverage_m": cover, "exact_coverage_m": exact_cover})
            print(f"fps points={len(scan)} samples={k} parts={P} cpu={cpu * 1000:.1f}ms device={dev * 1000:.1f}ms "
                  f"coverage={cover:.4f}m exact={exact_cover:.4f}m", flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1))
    return 0


def default_backends(device) -> list[str]:
    if device.type == "cuda":
        return ["torch"] + (["triton"] if sparse.triton_available() else [])
    names = ["torch"] + (["minkowski"] if sparse.minkowski_available() else [])
    return names + (["triton"] if sparse.triton_interpreted() else [])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--cases", nargs="+", choices=CASES, default=None,
                   help="default: published and student on CUDA, tiny on the CPU")
    p.add_argument("--backends", nargs="+", choices=[b for b in sparse.BACKENDS if b != "auto"], default=None,
                   help="default: torch and triton on CUDA; torch and MinkowskiEngine (when built) on the CPU")
    p.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=None,
                   help="default: fp32 and bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--steps", type=int, default=8, help="solver steps (default 8)")
    p.add_argument("--quick", action="store_true", help="a 20,000-point scan, budget 2,000 x 4, one repeat")
    p.add_argument("--forward", action="store_true", help="also time each network's forward pass")
    p.add_argument("--repeats", type=int, default=None, help="timed scans per row (median; default 3, quick 1)")
    p.add_argument("--checkpoint", default=None, help="the student case's checkpoint (default: the shipped one)")
    p.add_argument("--fps", choices=("auto", "cpu", "device"), default="auto",
                   help="where the Completer samples the scan (default auto: the device on CUDA with Triton)")
    p.add_argument("--fps-parts", type=int, nargs="+", default=[1], metavar="P",
                   help="farthest-point sampling in P azimuth sectors (1 = exact; default 1); several values: "
                        "a row each (--fps-only: the sector variants beside the exact one)")
    p.add_argument("--fps-candidates", type=int, nargs="+", choices=FPS_CANDIDATES, default=None, metavar="K",
                   help="device farthest-point sampling with K candidates per program and exchange (0: one "
                        "sample per exchange; default: LIDAR_COMPLETION_FPS_CANDIDATES, else 0); several values: "
                        "a row each")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--fps-only", action="store_true",
                   help="only time farthest-point sampling of the scan: the CPU's (fpsample) against the "
                        "Triton kernel on the device, 18,000 and 4,000 samples (quick: 1,000 and 200)")
    args = p.parse_args(argv)
    if any(not 1 <= q <= 256 for q in args.fps_parts):
        p.error(f"--fps-parts takes values in 1..256, got {args.fps_parts}")
    if args.fps_candidates is None:
        args.fps_candidates = [fps_candidates_default()]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    cases = args.cases or (["published", "student"] if cuda else ["tiny"])
    backends = args.backends or default_backends(device)
    precisions = args.precisions or (["fp32", "bf16"] if cuda else ["fp32"])
    repeats = args.repeats or (1 if args.quick else 3)
    scan = synthetic_scan(20_000 if args.quick else 120_000)
    budget = {"n_fps": 2_000, "tile": 4} if args.quick else {"n_fps": 18_000, "tile": 10}
    results = {"device": str(device), "torch": torch.__version__, "cases": cases, "backends": backends,
               "gpu": torch.cuda.get_device_name(device) if cuda else None, "scan_points": len(scan),
               "threads": torch.get_num_threads(), "rows": [], "forward": {}}
    try:
        import triton
        results["triton"] = triton.__version__
    except ImportError:
        pass
    if args.fps_only:
        return fps_only(scan, device, repeats, args.json, (1_000, 200) if args.quick else (18_000, 4_000),
                        args.fps_parts, args.fps_candidates)
    print(f"# device={device} gpu={results['gpu']} torch={torch.__version__} triton={results.get('triton')} "
          f"threads={torch.get_num_threads()} backends={backends} cases={cases} scan={len(scan)}", flush=True)
    with tempfile.TemporaryDirectory() as d:
        for case in cases:
            if case == "student":
                ckpt, guidance = args.checkpoint or default_checkpoint_path(), None
            else:
                cfg = ModelConfig.full() if case == "published" else ModelConfig.tiny()
                sampling = dict(budget, steps=args.steps, guidance=3.5, process="local")
                ckpt = make_random_checkpoint(Path(d) / f"{case}.pt", config=cfg, sampling=sampling)
                guidance = 3.5
                if args.forward:
                    n = budget["n_fps"] * budget["tile"]
                    pts = np.tile(scan[: budget["n_fps"]], (budget["tile"], 1))[:n]
                    for b in backends:
                        t = network_forward_times(cfg, b, device, pts, repeats)
                        results["forward"].setdefault(case, {})[b] = t
                        print(f"forward case={case} backend={b} points={n} "
                              + " ".join(f"{k}={v * 1000:.1f}ms" for k, v in t.items()), flush=True)
            for b, prec, parts, kc in ((b, q, P, K) for b in backends for q in precisions for P in args.fps_parts
                                       for K in args.fps_candidates):
                with mock.patch.dict(os.environ, {ENV_FPS_CANDIDATES: str(kc)}):   # what the Completer reads
                    c, t, peak, r, graphs = end_to_end(ckpt, b, device, scan, args.steps, prec, repeats, guidance,
                                                        args.fps, parts)
                x_init = torch.from_numpy(c.prepare(scan)[2]).to(device)
                maps = map_time(b, device, x_init, 0.5, repeats)
                st = r.timings
                row = {"case": case, "backend": b, "precision": prec, "steps": args.steps,
                       "cuda_graphs": graphs, "seconds": t, "peak_mib": peak, "maps_s": maps,
                       "preprocess_s": st.get("preprocess"), "encoder_s": st.get("encoder"),
                       "denoiser_step_s": st.get("denoiser", float("nan")) / max(1, args.steps),
                       "refiner_s": st.get("refinement"), "points_out": int(len(r.points)),
                       "budget": [c.n_fps, c.tile], "fps": "device" if c.fps_on_device else "cpu",
                       "fps_parts": parts, "fps_candidates": kc}
                results["rows"].append(row)
                print(f"complete case={case} backend={b} precision={prec} steps={args.steps} "
                      f"graphs={graphs} time={t * 1000:.1f}ms peak_gpu={peak:.0f}MiB "
                      f"preprocess={row['preprocess_s'] * 1000:.1f}ms maps={maps * 1000:.1f}ms "
                      f"encoder={row['encoder_s'] * 1000:.1f}ms "
                      f"denoiser/step={row['denoiser_step_s'] * 1000:.1f}ms "
                      f"refiner={(row['refiner_s'] or float('nan')) * 1000:.1f}ms "
                      f"out={row['points_out']} budget={c.n_fps}x{c.tile} fps={row['fps']} fps_parts={parts} "
                      f"fps_candidates={kc}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))

    def seconds(case, backend, prec):
        hit = [r["seconds"] for r in results["rows"]
               if r["case"] == case and r["backend"] == backend and r["precision"] == prec
               and r["fps_parts"] == args.fps_parts[0] and r["fps_candidates"] == args.fps_candidates[0]]
        return hit[0] if hit else float("nan")

    if cuda or "triton" in backends:
        torch_s, triton_s = seconds("published", "torch", "bf16"), seconds("published", "triton", "bf16")
        print(f"triton_vs_torch={torch_s / triton_s:.3f} published8_bf16_s={triton_s:.4f}")
    else:
        fw = results["forward"].get("tiny", {})
        ratio = (sum(fw["minkowski"].values()) / sum(fw["torch"].values())
                 if "minkowski" in fw and "torch" in fw else float("nan"))
        print("torch_vs_minkowski_cpu=nan" if math.isnan(ratio) else f"torch_vs_minkowski_cpu={ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
