"""`lidar-completion complete IN -o OUT`: complete one scan file."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import CloudFormatError, ConfigError

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "complete",
        help="complete one scan file (.bin/.npy/.ply/.pcd) into a dense scene",
        description="Complete one LiDAR scan with the few-step diffusion model: range/z filters, "
                    "farthest-point sampling, the SDE-DPM-Solver++ with classifier-free guidance, "
                    "post-processing and (unless --no-refine) the x6 refinement network. Input and "
                    "output formats follow the file extensions: .bin (KITTI float32 x,y,z,intensity), "
                    ".npy, .ply, .pcd (ascii or binary).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("input", metavar="IN", help="input scan (.bin, .npy, .ply or .pcd)")
    p.add_argument("-o", "--output", metavar="OUT", required=True,
                   help="output cloud (.bin, .npy, .ply or .pcd); parent folders are created")
    p.add_argument("--checkpoint", metavar="P", default=None,
                   help="checkpoint (ours or a published Lightning file); default: the shipped student")
    p.add_argument("--refiner-checkpoint", metavar="R", default=None,
                   help="take the refiner from this file (e.g. LiDiff's refine_net.ckpt next to diff_net.ckpt)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow loading a Lightning file that needs pickled Python objects (runs code from "
                        "the file: only for files you trust)")
    p.add_argument("--steps", type=int, default=None,
                   help="solver steps (default: the checkpoint's, 8 for the student)")
    p.add_argument("--process", choices=("local", "vp"), default=None,
                   help="the solver's forward process: 'local' (x_t = x_0 + sigma_t eps, what the networks are "
                        "trained on) or 'vp' (the published LiDiff sampler); default: the checkpoint's "
                        "(vp for published checkpoints)")
    p.add_argument("--guidance", type=float, default=None, metavar="W",
                   help="classifier-free guidance weight w (default: the checkpoint's, 3.5 for the "
                        "student; 1 = conditional only)")
    p.add_argument("--no-refine", action="store_true", help="skip the x6 refinement network")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 or auto")
    p.add_argument("--seed", type=int, default=None,
                   help="noise seed; the same seed gives the same output for the same input "
                        "(default: fresh randomness, the seed used is logged)")
    p.add_argument("--backend", default="auto", choices=("auto", "minkowski", "torch"),
                   help="sparse-convolution backend (auto honours LIDAR_COMPLETION_BACKEND)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="autocast precision on CUDA (CPU always runs fp32)")
    p.add_argument("--n-fps", type=int, default=None, metavar="N",
                   help="farthest-point-sampling budget of the input scan (default: the checkpoint's; "
                        "the published models use 18,000)")
    p.add_argument("--tile", type=int, default=None,
                   help="x_init = the sampled scan tiled this many times (default: the checkpoint's; "
                        "published: 10)")
    p.add_argument("--ascii", action="store_true", help="write .ply/.pcd as ascii instead of binary")
    p.add_argument("--render", metavar="PNG", default=None,
                   help="also draw input vs completion (bird's-eye and oblique views) to this PNG")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..completer import Completer
    from ..io import FORMATS, read_cloud, render_comparison_png, write_cloud

    out = Path(args.output)
    if out.suffix.lower() not in FORMATS:
        raise CloudFormatError(f"output {out}: unsupported extension {out.suffix or '(none)'!r}; "
                               f"expected one of {', '.join(FORMATS)}")
    if args.render and Path(args.render).suffix.lower() != ".png":
        raise ConfigError(f"--render expects a .png path, got {args.render!r}")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")

    scan = read_cloud(args.input)          # CloudFormatError for missing / malformed files
    completer = Completer.from_checkpoint(args.checkpoint, refiner_checkpoint=args.refiner_checkpoint,
                                          allow_pickle=True if args.trust_checkpoint else None,
                                          steps=args.steps, guidance=args.guidance,
                                          process=args.process, refine=not args.no_refine, device=args.device,
                                          seed=args.seed, backend=args.backend,
                                          precision=args.precision,
                                          **{k: v for k, v in (("n_fps", args.n_fps), ("tile", args.tile))
                                             if v is not None})
    result = completer.complete_detailed(scan)
    write_cloud(out, result.points, binary=not args.ascii)
    times = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items() if k != "total" and v > 0)
    print(f"{args.input}: {result.num_input} points -> {len(result.points)} points in "
          f"{result.timings['total']:.2f} s ({result.steps} {result.process} steps, w={result.guidance:g}, "
          f"seed {result.seed}) -> {out}")
    log.info("stage times: %s", times)
    if args.render:
        render_comparison_png(args.render, {"input": scan, "completion": result.points},
                              title=f"{Path(args.input).name}: {result.steps} steps, "
                                    f"w={result.guidance:g}")
        print(f"render -> {args.render}")
    return 0
