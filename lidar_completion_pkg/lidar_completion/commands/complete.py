"""`lidar-completion complete IN -o OUT`: complete one scan file."""
from __future__ import annotations

import logging
from pathlib import Path

from ..errors import CloudFormatError, ConfigError
from ..settings import CompletionSettings, add_arguments

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "complete",
        help="complete one scan file (.bin/.npy/.ply/.pcd) into a dense scene",
        description="Complete one LiDAR scan with the few-step diffusion model: range/z filters, "
                    "farthest-point sampling, the SDE-DPM-Solver++ with classifier-free guidance, "
                    "post-processing and (unless --no-refine) the x6 refinement network. Input and "
                    "output formats follow the file extensions: .bin (KITTI float32 x,y,z,intensity), "
                    ".npy, .ply, .pcd (ascii, binary or binary_compressed).",
    )
    p.add_argument("input", metavar="IN", help="input scan (.bin, .npy, .ply or .pcd)")
    p.add_argument("-o", "--output", metavar="OUT", required=True,
                   help="output cloud (.bin, .npy, .ply or .pcd); parent folders are created")
    p.add_argument("--ascii", action="store_true", help="write .ply/.pcd as ascii instead of binary")
    p.add_argument("--render", metavar="PNG", default=None,
                   help="also draw input vs completion (bird's-eye and oblique views) to this PNG")
    add_arguments(p)
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
    settings = CompletionSettings.from_args(args)   # ConfigError for values out of range

    scan = read_cloud(args.input)          # CloudFormatError for missing / malformed files
    completer = Completer.from_settings(settings)
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
