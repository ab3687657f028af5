"""Count what one guided denoiser pass launches on the Triton backend: torch operators and Triton kernels.

The pass is the one a CUDA graph captures at every solver step (static mode: fixed capacities, no
host reads). On a GPU every torch operator is one or more kernels and every kernel costs a few
microseconds of launch and gap even inside a graph, so the count is the figure to bring down
beside the GEMM time. It is counted twice: with the kernel maps and the lattice search built by the
Triton map kernels (the default) and by torch operations (``LIDAR_COMPLETION_TRITON_MAPS=0``).

Runs on CUDA, or on the CPU under the Triton interpreter (``TRITON_INTERPRET=1``, set here when
there is no GPU), where only the counts mean anything::

    python benchmarks/launch_count.py                 # tiny widths, 2,000-point scan, on the CPU
    python benchmarks/launch_count.py --device cuda --widths full --points 120000

Prints, per variant, the operators by the function of this package that called them, the Triton
launches by kernel, and a last line
``launches_per_pass maps_torch=<ops + kernels> maps_triton=<ops + kernels> ratio=<torch / triton>``.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

# metadata-only operators (no kernel on any device)
_VIEWS = {"detach", "view", "_unsafe_view", "t", "alias", "slice", "select", "unsqueeze", "squeeze", "expand",
          "as_strided", "transpose", "permute", "lift_fresh", "empty", "new_empty", "empty_like", "split",
          "unbind", "reshape", "_reshape_alias", "empty_strided", "promote_types", "size", "stride",
          "is_same_size", "result_type"}


def _site() -> str:
    """The innermost function of this package on the stack (the one that issued the operator)."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename.replace(os.sep, "/")
        if "/lidar_completion/" in path:
            return f"{path.split('/lidar_completion/')[-1]}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


def count_pass(run_pass):
    """(operator count by calling site, operator count by name, Triton launches by kernel) of ``run_pass()``."""
    import triton
    from torch.utils._python_dispatch import TorchDispatchMode

    sites, names, launches = collections.Counter(), collections.Counter(), collections.Counter()
    inside = [0]
    patched = []
    for modname, clsname in (("triton.runtime.jit", "JITFunction"), ("triton.runtime.interpreter", "InterpretedFunction")):
        try:
            cls = getattr(__import__(modname, fromlist=[clsname]), clsname)
        except (ImportError, AttributeError):
            continue
        orig = cls.run

        def run(self, *a, _orig=orig, **k):
            fn = getattr(self, "fn", self)
            launches[getattr(fn, "__name__", "?")] += 1
            inside[0] += 1
            try:
                return _orig(self, *a, **k)
            finally:
                inside[0] -= 1
        cls.run = run
        patched.append((cls, orig))

    class Counting(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket.__name__)
            if not inside[0] and name not in _VIEWS:     # the interpreter's own copies are not counted
                names[name] += 1
                sites[_site()] += 1
            return func(*args, **(kwargs or {}))

    try:
        with Counting():
            run_pass()
    finally:
        for cls, orig in patched:
            cls.run = orig
    return sites, names, launches


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu (Triton interpreter) or cuda")
    ap.add_argument("--widths", choices=("tiny", "full"), default="tiny")
    ap.add_argument("--points", type=int, default=2000, help="points of the synthetic scan (default 2,000)")
    ap.add_argument("--top", type=int, default=12, help="calling sites to list per variant")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import numpy as np
    import torch

    from lidar_completion import sparse
    from lidar_completion.diffusion.guidance import guided_noise
    from lidar_completion.models import ConditionEncoder, Denoiser, ModelConfig
    from lidar_completion.sparse.triton_backend import ENV_MAPS

    why = sparse.triton_refusal(torch.device(args.device))
    if why is not None:
        print(f"error: {why}", file=sys.stderr)
        return 1
    g = np.random.default_rng(0)
    r, a = g.uniform(4, 25, args.points), g.uniform(0, 2 * np.pi, args.points)
    scan = np.stack([r * np.cos(a), r * np.sin(a), g.normal(-1.6, 0.3, args.points)], 1)
    pts = torch.tensor(scan, dtype=torch.float32, device=args.device)
    batch = torch.zeros(args.points, dtype=torch.long, device=args.device)
    cfg = ModelConfig.full() if args.widths == "full" else ModelConfig.tiny()
    torch.manual_seed(0)
    enc = ConditionEncoder(cfg, "triton").eval().to(args.device)
    den = Denoiser(cfg, "triton").eval().to(args.device)
    noisy = pts + 0.3 * torch.randn_like(pts)
    totals = {}
    old = os.environ.get(ENV_MAPS)
    try:
        for label, value in (("maps_torch", "0"), ("maps_triton", "1")):
            os.environ[ENV_MAPS] = value
            with torch.inference_mode():
                cond = enc(pts, batch)
                uncond = enc.empty_condition(50, 1)
                caps = sparse.StaticShapes()
                with sparse.use_static_shapes(caps):      # sizing pass, as the graph runner's first call
                    guided_noise(den, noisy, 500, cond, uncond, 3.5)
                _, summary = caps.summary()
                plan_caps = {k: int(v) + 256 for k, v in zip(caps.sizes, summary.tolist()[1:])}

                def one_pass():
                    with sparse.use_static_shapes(sparse.StaticShapes(plan_caps)):
                        guided_noise(den, noisy, 500, cond, uncond, 3.5)
                if not sparse.triton_interpreted():
                    one_pass()                              # compile outside the count
                sites, names, launches = count_pass(one_pass)
            ops, kernels = sum(names.values()), sum(launches.values())
            totals[label] = ops + kernels
            print(f"== {label}: {ops} torch operators, {kernels} Triton launches per guided pass")
            for site, n in sites.most_common(args.top):
                print(f"   {n:5d}  {site}")
            print("   Triton: " + ", ".join(f"{k} {v}" for k, v in launches.most_common()))
    finally:
        if old is None:
            os.environ.pop(ENV_MAPS, None)
        else:
            os.environ[ENV_MAPS] = old
    print(f"launches_per_pass maps_torch={totals['maps_torch']} maps_triton={totals['maps_triton']} "
          f"ratio={totals['maps_torch'] / max(1, totals['maps_triton']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
