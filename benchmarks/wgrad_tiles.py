"""Blocks of the Triton weight-gradient kernel, measured on the convolutions of one training step.

Runs a teacher step (the Triton backend, a synthetic sample at the chosen widths and size) and
records every call of :func:`lidar_completion.sparse.conv_implicit_gemm.weight_gradient`. Then,
per layer signature (map kind, channels, feature groups), heaviest first:

* the time of every recorded call with the default blocks (median of a few launches, CUDA events)
  and its useful multiply-adds (the map's pairs times channels), and the same with the loop over
  every row of every offset (``dense``) instead of each offset's listed pairs;
* a sample of its calls with each configuration of a wider list (rows per product, channel
  blocks, splits, warps, pipeline stages), each checked against the default's result, until
  ``--budget`` seconds are spent.

Ends with the sum over all recorded calls: default blocks, dense loop, best configuration per
signature, and the useful TFLOP/s of each. Figures are printed, never asserted.

    python benchmarks/wgrad_tiles.py --device cuda                       # published widths, bf16
    TRITON_INTERPRET=1 python benchmarks/wgrad_tiles.py --device cpu --widths tiny --points 2000 \\
        --precision fp32 --max-configs 2                                 # a CPU check of the script
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemm_tiles import median_ms  # noqa: E402
from training_work import ROOT, teacher  # noqa: E402,F401  (ROOT: the repository on sys.path)

from lidar_completion import sparse  # noqa: E402
from lidar_completion.sparse import conv_implicit_gemm as igemm  # noqa: E402
from lidar_completion.sparse.conv_implicit_gemm import WGRAD_DEFAULT, WGradConfig  # noqa: E402


def explore_list() -> list[WGradConfig]:
    """The configurations tried per signature: longer and shorter products, wider channel blocks,
    more or fewer splits, more warps, 2-4 pipeline stages."""
    out = []
    for br in (32, 64, 128):
        for bc, bn in ((64, 64), (32, 64), (64, 128), (128, 64), (128, 128)):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    out.append(WGradConfig(br, bc, bn, 64, warps, stages))
    out += [WGradConfig(64, 64, 64, s, 4, None) for s in (16, 32, 128, 256)]
    # the likeliest first: the default's neighbours, then the rest
    near = [WGradConfig(64, 64, 64, 64, 4, 3), WGradConfig(128, 64, 64, 64, 4, 3), WGradConfig(64, 64, 64, 64, 8, 3),
            WGradConfig(64, 128, 128, 64, 8, 3), WGradConfig(128, 128, 128, 64, 8, 3)]
    return list(dict.fromkeys(near + out))


class Recorder:
    """Wraps ``weight_gradient`` to keep the arguments of every call while recording."""

    def __init__(self):
        self.calls = []
        self.recording = False
        self.orig = igemm.weight_gradient

    def install(self):
        def recording(segments, grad_out, plan, kvol, interpreted, rows=None, config=None):
            if self.recording:
                keep = (tuple(s.detach().clone() for s in segments), grad_out.detach().clone(), plan, kvol,
                        interpreted, rows)
                self.calls.append(keep)
            return self.orig(segments, grad_out, plan, kvol, interpreted, rows, config)
        igemm.weight_gradient = recording

    def uninstall(self):
        igemm.weight_gradient = self.orig

    def run(self, call, cfg, dense=False):
        segments, grad_out, plan, kvol, interpreted, rows = call
        return self.orig(segments, grad_out, plan, kvol, interpreted, None if dense else rows, cfg)


def signature(call) -> tuple:
    segments, grad_out, plan, kvol, interpreted, rows = call
    groups = max([t.shape[0] for t in (*segments, grad_out) if t.dim() == 3] or [1])
    return (kvol, tuple(s.shape[-1] for s in segments), grad_out.shape[-1], groups, str(grad_out.dtype))


def useful_macs(call) -> float:
    segments, grad_out, plan, kvol, interpreted, rows = call
    groups = max([t.shape[0] for t in (*segments, grad_out) if t.dim() == 3] or [1])
    pairs = grad_out.shape[-2] if plan is None else int((plan[1] >= 0).sum())
    return float(pairs * sum(s.shape[-1] for s in segments) * grad_out.shape[-1] * groups)


def time_call(rec: Recorder, call, cfg, device, reps: int, dense=False) -> tuple[float, torch.Tensor]:
    return median_ms(lambda: rec.run(call, cfg, dense), device, reps)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max().clamp(min=1e-12))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--widths", choices=("full", "tiny"), default="full")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--points", type=int, default=180_000, help="points per sample (default the published 180,000)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--budget", type=float, default=60.0, help="seconds for the wider configurations")
    p.add_argument("--max-configs", type=int, default=None, help="try at most this many configurations")
    p.add_argument("--reps", type=int, default=3, help="timed launches per call (median)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    refusal = sparse.triton_refusal(device)
    if refusal:
        p.error(refusal)
    tmp = Path(tempfile.mkdtemp(prefix="wgrad_tiles_"))
    rec = Recorder()
    try:
        from lidar_completion.data import generate_dataset
        from training.data import make_loader
        generate_dataset(tmp / "data", sequences=["00"], scans=max(2, args.batch), seed=0)
        tr = teacher(args.widths, tmp / "data", args.points, tmp / "run", device=args.device,
                     precision=args.precision, batch=args.batch)
        batch = tr.prepare_batch(next(iter(make_loader(tr.dataset, tr.sampler, 0, "forkserver", 0))))
        tr.train_step(batch)             # warm-up: compiles the default blocks
        rec.install()
        rec.recording = True
        tr.train_step(batch)
        rec.recording = False
        rec.uninstall()
        calls = rec.calls
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        print(f"# {len(calls)} weight-gradient calls in one teacher step ({args.widths} widths, {args.precision}, "
              f"batch {args.batch} x {args.points} points, {name})", flush=True)
        default, sigs = {}, {}
        for i, call in enumerate(calls):
            ms, _ = time_call(rec, call, WGRAD_DEFAULT, device, args.reps)
            dense_ms, _ = time_call(rec, call, WGRAD_DEFAULT, device, args.reps, dense=True)
            default[i] = (ms, dense_ms, useful_macs(call))
            sigs.setdefault(signature(call), []).append(i)
        tot = sum(v[0] for v in default.values())
        tot_dense = sum(v[1] for v in default.values())
        useful = sum(v[2] for v in default.values())
        print(f"default blocks ({WGRAD_DEFAULT.key()}): {tot:.1f} ms of weight gradient per step, useful "
              f"{2 * useful / tot / 1e9:.1f} TFLOP/s; every row of every offset (dense): {tot_dense:.1f} ms "
              f"({tot_dense / tot:.2f}x)", flush=True)
        order = sorted(sigs, key=lambda s: -sum(default[i][0] for i in sigs[s]))
        print("\n## signatures by default time (kvol, input channels, out channels, groups, dtype)")
        for s in order:
            ids = sigs[s]
            ms = sum(default[i][0] for i in ids)
            print(f"  {s}: calls={len(ids)} default={ms:.2f}ms dense={sum(default[i][1] for i in ids):.2f}ms "
                  f"useful={2 * sum(default[i][2] for i in ids) / ms / 1e9:.1f}TFLOP/s", flush=True)
        print("\n## wider configurations per signature (a sample of up to 3 of its calls; speed-up over the default)")
        t_start = time.perf_counter()
        best, results = {}, []
        for s in order:
            ids = sigs[s][:3]
            scale = sum(default[i][0] for i in sigs[s]) / max(sum(default[i][0] for i in ids), 1e-9)
            base_ms = sum(default[i][0] for i in ids)
            refs = {i: rec.run(calls[i], WGRAD_DEFAULT) for i in ids[:1]}
            best[s] = (WGRAD_DEFAULT, base_ms * scale)
            for cfg in explore_list()[:args.max_configs]:
                if time.perf_counter() - t_start > args.budget:
                    break
                try:
                    ms, err = 0.0, 0.0
                    for i in ids:
                        t, out = time_call(rec, calls[i], cfg, device, args.reps)
                        ms += t
                        if i in refs:
                            err = max(err, _rel_err(out, refs[i]))
                except Exception as exc:   # e.g. out of shared memory: not a candidate here
                    print(f"    {cfg.key():20s} failed: {str(exc).splitlines()[0][:100]}", flush=True)
                    continue
                results.append({"signature": list(map(str, s)), "config": cfg.key(), "ms": ms * scale,
                                "default_ms": base_ms * scale, "rel_err": err})
                print(f"    {str(s[:4]):28s} {cfg.key():20s} {ms * scale:8.2f} ms  {base_ms / max(ms, 1e-9):5.2f}x  "
                      f"rel_err={err:.1e}", flush=True)
                if ms * scale < best[s][1] and err < 1e-2:
                    best[s] = (cfg, ms * scale)
            if time.perf_counter() - t_start > args.budget:
                print(f"  (budget of {args.budget:.0f} s spent)", flush=True)
                break
        tot_best = tot - sum(sum(default[i][0] for i in sigs[s]) - best[s][1] for s in best)
        print("\n## best per signature")
        for s, (cfg, ms) in best.items():
            print(f"  {str(s):50s} {cfg.key():20s} {ms:8.2f} ms")
        print(f"\nweight gradient per step: default {tot:.1f} ms, dense {tot_dense:.1f} ms, best per signature "
              f"{tot_best:.1f} ms ({tot / max(tot_best, 1e-9):.2f}x; useful {2 * useful / max(tot_best, 1e-9) / 1e9:.1f} "
              f"TFLOP/s)", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"default_ms": tot, "dense_ms": tot_dense, "best_ms": tot_best,
                                                   "useful_macs": useful,
                                                   "best": {str(s): [c.key(), ms] for s, (c, ms) in best.items()},
                                                   "results": results}, indent=1))
    finally:
        rec.uninstall()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
