"""Multiply-adds of one training step's convolutions on the Triton backend: useful against visited.

A teacher step is run on the CPU with the Triton kernels replaced by recorders (nothing is
computed: the convolutions return zeros), so any machine can count, for the published widths and
a published-size sample (18,000 x 10 points), what the kernels would do:

* forward and input gradient (the implicit GEMM over the gather plan): the useful multiply-adds
  (one per existing (row, offset) pair and channel pair) and those the tiles visit (every row of
  a tile for each offset set in the tile's mask, tiles of 64 rows);
* weight gradient: the useful multiply-adds and those of a loop over every row of every offset
  (``LIDAR_COMPLETION_TRITON_WGRAD=dense``) - the listed-pairs loop (the default) visits the
  useful ones, up to its last partial block of rows.

One row per diffusion timestep (the noise level sets how sparse the maps are: at small t the noisy
points lie on the surfaces, at large t they fill space), then their mean. Figures are counts, not
times; what they cost on a GPU is measured by ``python -m training.bench --device cuda``::

    python benchmarks/training_work.py                       # published widths, t = 10 ... 999
    python benchmarks/training_work.py --widths tiny --points 40000
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BLOCK = 64   # rows per tile of the implicit GEMM and per block of the weight gradient's loop


def _popcount(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.int64)
    n = torch.zeros_like(x)
    for b in range(32):
        n += (x >> b) & 1
    return n


class Recorder:
    """Stand-ins for the convolution kernels that count multiply-adds by phase."""

    def __init__(self):
        self.macs = defaultdict(float)
        self.backward = False

    def implicit_gemm(self, segments, weight, plan_for, rows, epilogue, out_dtype, kind, interpreted):
        kvol, cin, n = weight.shape
        grouped = [s.shape[0] for s in segments if s.dim() == 3]
        groups = max(grouped) if grouped else 1
        phase = "input_grad" if self.backward else "forward"
        plan = plan_for(BLOCK)
        if plan is None:
            useful = visited = float(rows)
        else:
            _, table, masks = plan
            useful = float((table >= 0).sum())
            visited = float(_popcount(masks).sum()) * BLOCK
        self.macs[f"{phase}_useful"] += useful * cin * n * groups
        self.macs[f"{phase}_visited"] += visited * cin * n * groups
        shape = (groups, rows, n) if grouped else (rows, n)
        return torch.zeros(shape, dtype=out_dtype, device=weight.device)

    def weight_gradient(self, segments, grad_out, plan, kvol, interpreted, rows=None):
        grouped = [t.shape[0] for t in (*segments, grad_out) if t.dim() == 3]
        groups = max(grouped) if grouped else 1
        m, n = grad_out.shape[-2], grad_out.shape[-1]
        cin = sum(t.shape[-1] for t in segments)
        if plan is None:
            useful = dense = float(m)
        else:
            useful = float((plan[1] >= 0).sum())
            dense = float(kvol * m)
        self.macs["weight_grad_useful"] += useful * cin * n * groups
        self.macs["weight_grad_dense"] += dense * cin * n * groups
        return torch.zeros((kvol, cin, n), dtype=torch.float32, device=grad_out.device)


def teacher(widths: str, data: Path, points: int, out: Path, device: str = "cpu", precision: str = "fp32",
            batch: int = 1):
    """A teacher trainer on the Triton backend over the synthetic drive in ``data`` (no condition
    dropout, the scans sampled on the CPU), for one step at a time."""
    from training.__main__ import trainer_class
    from training.bench import CONFIGS, NAMES
    from training.config import load_config
    over = [f"device={device}", "backend=triton", "threads=2", "data.kind=synthetic", f"data.root={data}",
            "data.sequences=['00']", "data.num_workers=0", "log.tensorboard=false", "log.progress=false",
            "checkpoint.every_steps=0", "checkpoint.export=false", "train.max_steps=null", "data.build_gt=true",
            f"train.batch_size={batch}", "data.sample_on=cpu", "teacher.cond_dropout=0",
            f"train.precision={precision}",
            f"data.scan_points={points // 10}", "data.tile=10", f"data.target_points={points}"]
    cfg = load_config(CONFIGS / f"{NAMES[(widths, 'teacher')]}.yaml", kind="teacher", overrides=over)
    return trainer_class("teacher")(cfg, out, max_steps=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", choices=("full", "tiny"), default="full")
    ap.add_argument("--points", type=int, default=180_000, help="points per sample (default the published 180,000)")
    ap.add_argument("--t", default="10,100,300,500,700,999", help="comma-separated diffusion timesteps")
    ap.add_argument("--data", default=None, help="synthetic dataset folder (default: a temporary one)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)

    from lidar_completion.data import generate_dataset
    from lidar_completion.sparse import conv_implicit_gemm as igemm
    from lidar_completion.sparse import triton_backend
    from training.data import make_loader

    tmp = Path(tempfile.mkdtemp(prefix="training_work_"))
    data = Path(args.data) if args.data else tmp / "data"
    if not (data / "sequences" / "00" / "poses.txt").exists():
        generate_dataset(data, sequences=["00"], scans=2, seed=0)
    rec = Recorder()
    conv = triton_backend._ImplicitGemmConv
    saved = (igemm.implicit_gemm, igemm.weight_gradient, triton_backend.triton_refusal,
             triton_backend.TritonEngine.__dict__["maps"], triton_backend.TritonBackend.__dict__["modulate"],
             conv.__dict__["backward"])
    backward = conv.backward

    def marked_backward(ctx, grad_out):      # the implicit GEMMs run in here are input gradients
        rec.backward = True
        try:
            return backward(ctx, grad_out)
        finally:
            rec.backward = False
    conv.backward = staticmethod(marked_backward)
    igemm.implicit_gemm, igemm.weight_gradient = rec.implicit_gemm, rec.weight_gradient
    triton_backend.triton_refusal = lambda device: None              # nothing runs a Triton kernel
    triton_backend.TritonEngine.maps = None                          # maps from torch operations
    triton_backend.TritonBackend.modulate = triton_backend.TorchBackend.__dict__["modulate"]
    rows = []
    try:
        tr = teacher(args.widths, data, args.points, tmp / "run")
        loader = make_loader(tr.dataset, tr.sampler, 0, "forkserver", 0)
        batch = tr.prepare_batch(next(iter(loader)))
        print(f"# teacher, {args.widths} widths, {len(batch['target'])} points per sample, batch 1, tiles of {BLOCK} rows")
        print(f"{'t':>5} {'fwd useful':>11} {'fwd visited':>11} {'in-grad useful':>14} {'in-grad visited':>15} "
              f"{'w-grad useful':>13} {'w-grad dense':>12} {'dense/useful':>12}   (GMAC)")
        for t in (int(v) for v in args.t.split(",")):
            rec.macs.clear()
            tr.draw_t = lambda keys, purpose, low=0, high=None, t=t: torch.full((len(keys),), t, dtype=torch.long)
            tr.train_step(batch)
            g = {k: v / 1e9 for k, v in rec.macs.items()}
            rows.append(g)
            print(f"{t:5d} {g['forward_useful']:11.1f} {g['forward_visited']:11.1f} {g['input_grad_useful']:14.1f} "
                  f"{g['input_grad_visited']:15.1f} {g['weight_grad_useful']:13.1f} {g['weight_grad_dense']:12.1f} "
                  f"{g['weight_grad_dense'] / g['weight_grad_useful']:12.2f}", flush=True)
    finally:
        (igemm.implicit_gemm, igemm.weight_gradient, triton_backend.triton_refusal,
         triton_backend.TritonEngine.maps, triton_backend.TritonBackend.modulate, conv.backward) = saved
        shutil.rmtree(tmp, ignore_errors=True)
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    dense_total = mean["forward_visited"] + mean["input_grad_visited"] + mean["weight_grad_dense"]
    compact_total = mean["forward_visited"] + mean["input_grad_visited"] + mean["weight_grad_useful"]
    print(f"mean over t: visited per step {dense_total:.1f} GMAC with the dense weight gradient, "
          f"{compact_total:.1f} with the listed pairs ({dense_total / compact_total:.2f}x); useful "
          f"{mean['forward_useful'] + mean['input_grad_useful'] + mean['weight_grad_useful']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
