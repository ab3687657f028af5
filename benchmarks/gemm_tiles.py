"""Tile configurations of the Triton implicit GEMM, measured on the convolutions of one real scan.

Runs one completion (random weights of the chosen widths, the Triton backend, no CUDA graphs so
that every convolution call is seen with its true row count) and records every call of
:func:`lidar_completion.sparse.conv_implicit_gemm.implicit_gemm`. Then, per layer signature (map
kind, channels, feature groups, fused epilogue), heaviest first:

* the time of every recorded call with the default tile configuration (median of a few launches,
  CUDA events), the useful multiply-adds (the map's real (row, offset) pairs times channels) and
  the multiply-adds the tiles visit (offsets of each tile's mask times its rows), so that the loss
  to tile masks and the loss to the kernel itself are told apart;
* the same calls with every configuration of a wider list (both K loops, larger and smaller
  tiles, more warps and pipeline stages), each checked against the default's output, until
  ``--budget`` seconds are spent (each new configuration compiles once per epilogue variant).

Ends with the sum over all recorded calls: default tiles against the best configuration per
signature, and the useful TFLOP/s of each. Figures are printed, never asserted.

    python benchmarks/gemm_tiles.py --device cuda                       # published widths, bf16
    TRITON_INTERPRET=1 python benchmarks/gemm_tiles.py --device cpu --config tiny --points 4000 \
        --n-fps 400 --steps 1 --max-configs 2                          # a CPU check of the script
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backends import synthetic_scan  # noqa: E402

from lidar_completion.checkpoints import make_random_checkpoint  # noqa: E402
from lidar_completion.completer import Completer  # noqa: E402
from lidar_completion.models import ModelConfig  # noqa: E402
from lidar_completion.sparse import conv_implicit_gemm as igemm  # noqa: E402
from lidar_completion.sparse.conv_implicit_gemm import Config  # noqa: E402


def explore_list(cin: int, cout: int, groups: int) -> list[Config]:
    """The configurations tried per signature, most promising first: each tile shape with the
    masked K loop at 2 and 3 pipeline stages and the flat K loop at 3; the shipped candidates'
    shapes, then larger / smaller tiles, a K chunk of 32, and pairs of feature groups."""
    bk = igemm._pow2(min(cin, 64), 16, 64)
    bn = igemm._pow2(cout, 16, 128)
    bn64 = min(bn, 64)
    base = [Config(64, bn, bk, 4, 2), Config(128, bn, bk, 8, 2)]
    if cout > 128:
        base.append(Config(64, igemm._pow2(cout, 16, 256), bk, 8, 2))
        base.append(Config(128, igemm._pow2(cout, 16, 256), bk, 8, 2))
    base += [Config(128, bn64, bk, 4, 2), Config(64, bn64, bk, 4, 2), Config(32, bn64, bk, 4, 2),
             Config(64, bn, min(bk, 32), 4, 2), Config(256, bn64, bk, 8, 2)]
    if groups % 2 == 0:
        base += [Config(64, bn64, bk, 4, 2, True), Config(64, bn, bk, 8, 2, True), Config(128, bn64, bk, 8, 2, True)]
    out = []
    for c in base:
        out += [c, Config(c.bm, c.bn, c.bk, c.warps, 3, c.pair), Config(c.bm, c.bn, c.bk, c.warps, 3, c.pair, True)]
    return list(dict.fromkeys(out))


class Recorder:
    """Wraps ``implicit_gemm`` to keep the arguments of every call (and to force a configuration)."""

    def __init__(self):
        self.calls = []
        self.recording = False
        self.forced = None
        self._orig = igemm.implicit_gemm
        self._choose = igemm.TUNER.choose

    def install(self):
        def recording(*args, **kwargs):
            if self.recording:
                self.calls.append((args, kwargs))
            return self._orig(*args, **kwargs)
        igemm.implicit_gemm = recording

        def choose(key, options, run, device):
            return self.forced if self.forced is not None else self._choose(key, options, run, device)
        igemm.TUNER.choose = choose

    def run(self, call, cfg):
        self.forced = cfg
        try:
            args, kwargs = call
            return self._orig(*args, **kwargs)
        finally:
            self.forced = None


def signature(call) -> tuple:
    (segments, weight, plan_for, rows, epilogue, out_dtype, kind, interpreted), _ = call
    groups = max([s.shape[0] for s in segments if s.dim() == 3] or [1])
    return (kind, weight.shape[0], tuple(s.shape[-1] for s in segments), weight.shape[2], groups,
            epilogue.scale is not None, epilogue.residual is not None, bool(epilogue.relu))


def macs(call, bm: int) -> tuple[float, float]:
    """(useful, visited) multiply-adds of a call: real (row, offset) pairs, and the rows times the
    offsets each tile of ``bm`` rows visits, both times channels and groups."""
    (segments, weight, plan_for, rows, epilogue, out_dtype, kind, interpreted), _ = call
    kvol, cin, n = weight.shape
    groups = max([s.shape[0] for s in segments if s.dim() == 3] or [1])
    plan = plan_for(bm)
    if plan is None:
        return float(rows * cin * n * groups), float(-(-rows // bm) * bm * cin * n * groups)
    _, table, masks = plan
    pairs = int((table >= 0).sum())
    bits = ((masks[:, None] >> torch.arange(kvol, device=masks.device, dtype=torch.int32)) & 1).sum()
    return float(pairs * cin * n * groups), float(int(bits) * bm * cin * n * groups)


def median_ms(fn, device, reps: int) -> tuple[float, object]:
    """(milliseconds of ``fn()``: the median of ``reps`` launches timed with CUDA events, or one
    wall-clock run off CUDA, the result of a first untimed run (compilation, warm-up))."""
    out = fn()
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000, out
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times)), out


def time_call(rec: Recorder, call, cfg, device, reps: int) -> tuple[float, torch.Tensor]:
    return median_ms(lambda: rec.run(call, cfg), device, reps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--config", choices=("full", "tiny"), default="full", help="random weights of these widths")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--points", type=int, default=120_000, help="points of the synthetic scan")
    p.add_argument("--n-fps", type=int, default=None, help="FPS budget (default 18,000)")
    p.add_argument("--steps", type=int, default=8, help="solver steps of the recorded completion")
    p.add_argument("--budget", type=float, default=120.0, help="seconds for the wider configurations")
    p.add_argument("--max-configs", type=int, default=None, help="try at most this many configurations")
    p.add_argument("--reps", type=int, default=3, help="timed launches per call (median)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cfg = ModelConfig.full() if args.config == "full" else ModelConfig.tiny()
    kw = {} if args.n_fps is None else {"n_fps": args.n_fps}
    scan = synthetic_scan(args.points)
    with tempfile.TemporaryDirectory() as d:
        ckpt = make_random_checkpoint(Path(d) / "random.pt", config=cfg)
        c = Completer.from_checkpoint(ckpt, steps=args.steps, guidance=3.5, device=str(device), seed=0,
                                      backend="triton", precision=args.precision, process="local",
                                      cuda_graphs=False, **kw)
    rec = Recorder()
    rec.install()
    c.complete_detailed(scan)            # warm-up: compiles the default tiles
    rec.recording = True
    with torch.inference_mode():
        c.complete_detailed(scan)
    rec.recording = False
    calls = rec.calls
    print(f"# {len(calls)} convolution calls in one scan ({args.config} widths, {args.precision}, "
          f"{args.steps} steps, {'gpu=' + torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'})",
          flush=True)
    default = {}
    sigs: dict = {}
    for i, call in enumerate(calls):
        sig = signature(call)
        (segments, weight, *_), _ = call
        opts = igemm.candidates(call[0][3], weight.shape[1], weight.shape[2], device.type != "cuda", sig[4])
        ms, _ = time_call(rec, call, opts[0], device, args.reps)
        useful, visited = macs(call, opts[0].bm)
        default[i] = (opts[0], ms, useful, visited)
        sigs.setdefault(sig, []).append(i)
    total_default = sum(v[1] for v in default.values())
    total_useful = sum(v[2] for v in default.values())
    total_visited = sum(v[3] for v in default.values())
    print(f"default tiles: {total_default:.1f} ms of convolution per scan, useful "
          f"{2 * total_useful / total_default / 1e9:.1f} TFLOP/s, tiles visit "
          f"{total_visited / max(total_useful, 1):.2f}x the useful multiply-adds", flush=True)
    order = sorted(sigs, key=lambda s: -sum(default[i][1] for i in sigs[s]))
    print("\n## signatures by default time (kind, kvol, input channels, out channels, groups, affine, "
          "residual, relu)")
    for s in order:
        ids = sigs[s]
        ms = sum(default[i][1] for i in ids)
        u = sum(default[i][2] for i in ids)
        v = sum(default[i][3] for i in ids)
        rows = [calls[i][0][3] for i in ids]
        print(f"  {s}: calls={len(ids)} rows={min(rows)}-{max(rows)} default={ms:.2f}ms "
              f"useful={2 * u / ms / 1e9:.1f}TFLOP/s visited/useful={v / max(u, 1):.2f}", flush=True)
    print("\n## wider configurations per signature (a sample of up to 4 of its calls; speed-up over the default)")
    t_start = time.perf_counter()
    best = {}
    results = []
    for s in order:
        ids = sigs[s][::max(1, len(sigs[s]) // 4)][:4]   # a sample of its calls, spread over the steps
        scale = sum(default[i][1] for i in sigs[s]) / max(sum(default[i][1] for i in ids), 1e-9)
        base_ms = sum(default[i][1] for i in ids)
        refs = {i: rec.run(calls[i], default[i][0]).float() for i in ids[:2]}
        tried = explore_list(sum(s[2]), s[3], s[4])[:args.max_configs]
        best[s] = (default[ids[0]][0], base_ms * scale)
        for cfgx in tried:
            if time.perf_counter() - t_start > args.budget:
                break
            if cfgx.pair and s[4] % 2:
                continue
            try:
                ms = 0.0
                err = 0.0
                for i in ids:
                    t, out = time_call(rec, calls[i], cfgx, device, args.reps)
                    ms += t
                    if i in refs:
                        r = refs[i]
                        err = max(err, float((out.float() - r).abs().max() / r.abs().max().clamp(min=1e-6)))
            except Exception as exc:   # e.g. out of shared memory: not a candidate here
                print(f"    {cfgx.key():16s} failed: {str(exc).splitlines()[0][:100]}", flush=True)
                continue
            results.append({"signature": list(map(str, s)), "config": cfgx.key(), "ms": ms * scale,
                            "default_ms": base_ms * scale, "rel_err": err})
            print(f"    {str(s[:5]):32s} {cfgx.key():16s} {ms * scale:8.2f} ms  {base_ms / ms:5.2f}x  rel_err={err:.1e}",
                  flush=True)
            if ms * scale < best[s][1]:
                best[s] = (cfgx, ms * scale)
        if time.perf_counter() - t_start > args.budget:
            print(f"  (budget of {args.budget:.0f} s spent)", flush=True)
            break
    total_best = total_default - sum(sum(default[i][1] for i in sigs[s]) - best[s][1] for s in best)
    print("\n## best per signature")
    for s, (cfgx, ms) in best.items():
        print(f"  {str(s):60s} {cfgx.key():16s} {ms:8.2f} ms")
    print(f"\nconvolution per scan: default {total_default:.1f} ms, best per signature {total_best:.1f} ms "
          f"({total_default / total_best:.2f}x; useful {2 * total_useful / total_best / 1e9:.1f} TFLOP/s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"default_ms": total_default, "best_ms": total_best,
                                               "useful_macs": total_useful, "visited_macs": total_visited,
                                               "best": {str(s): [c.key(), ms] for s, (c, ms) in best.items()},
                                               "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
