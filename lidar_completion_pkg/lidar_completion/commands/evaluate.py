"""`lidar-completion evaluate` (a checkpoint on a sequence) and `evaluate-files` (completions made
elsewhere): the same metrics, per-frame JSON lines, summary.json / summary.md and plots."""
from __future__ import annotations

import argparse

from ..cli import add_threads_argument, apply_threads
from ..errors import ConfigError
from ..io import BIN_FORMATS
from ..metrics import EMD_MODES
from ..settings import BY_NAME, CompletionSettings, add_arguments

METRICS_TEXT = """\
metrics (lidar_completion.metrics; docs/method.md, "Metrics"):
  CD              0.5 (mean_gt min_pred |g-p| + mean_pred min_gt |p-g|), metres
  JSD-BEV         Jensen-Shannon distance (as published; the papers call it JSD) of 0.5 m
                  bird's-eye occupancy over [-50, 50]^3 m; JSD-3D: raw 200^3 counts
  EMD             Wasserstein-1 in metres between 0.5 m voxel masses (exact OT; merged voxels with
                  a proven error bound for large scenes)
  EMD published   Distillation-DPO's Sinkhorn (eps 0.001, 1e-9 floor, > 130k voxels dropped):
                  not an optimal-transport distance, for comparison with its tables only
  IoU             occupied voxels at 0.5 / 0.2 / 0.1 m, |x|,|y|,|z| <= 50 m, TP/FP/FN summed over
                  frames; the legacy +-25 / +-10 / +-5 m variant is reported too
  P / R / F       at 0.05 and 0.10 m, and the published area over 0.05-0.10 m

empty predictions (0 points): recall and F are 0 and count in the means; precision, CD, JSD and EMD
  are undefined for an empty cloud and leave the frame out of their means; summary.json counts such
  frames (empty_predictions) and the run ends with a warning naming how many there were.

outputs in OUT: frames.jsonl (one JSON line per frame, appended as it is computed; a rerun skips
frames already there; a folder written with other settings, or by an earlier version that did
not record them all, is refused), run.json, summary.json, summary.md, cd_histogram.png,
metrics_over_sequence.png, bev_best{1,2,3}_*.png and bev_worst{1,2,3}_*.png."""

EVAL_EPILOG = METRICS_TEXT + """

examples:
  lidar-completion evaluate /data/semantickitti/dataset --sequence 08 --checkpoint student.pt \\
      --steps 8 --out eval/ddpo8
  lidar-completion evaluate data/synth --sequence 00 --baseline input --limit 20 --out eval/input"""

FILES_EPILOG = METRICS_TEXT + """

examples:
  lidar-completion evaluate-files lidiff_out/ gt/ --out eval/lidiff
  lidar-completion evaluate-files preds/ gt/ --input-dir scans/ --emd ot
  lidar-completion evaluate-files preds/ /data/gt_cache/08 --out eval/theirs   # GT-cache targets
  lidar-completion evaluate-files dense/ gt_copy/ --gt-bin-format xyz  # vs copied targets (scored whole)

predictions that cannot be read or hold NaN/inf coordinates are recorded as failed frames (with the
file's name) and left out; an unusable ground-truth file (unreadable, NaN/inf, no points) stops the
run, naming the file. A rerun into the same --out keeps the frames already scored, except those
whose prediction or ground-truth file changed since (size or modification time): they are scored
again."""

STATUS_TEXT = """

exit status: 0 when every frame was evaluated; 1 for an error, or when frames failed (a scan that
could not be completed, a prediction that could not be read): they are named, counted apart from
the evaluated frames (summary.json: frames, failed_frames) and left out of every metric."""


def _at_least(low: int, what: str):
    """An argparse type: an integer >= ``low`` (``what`` names it in the error)."""
    def parse(value: str) -> int:
        try:
            v = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v
    return parse


_positive = _at_least(1, "a positive integer")
_non_negative = _at_least(0, "an integer >= 0")


def _non_negative_float(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a distance in metres, got {value!r}") from None
    if not 0 <= v < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a distance >= 0 in metres, got {value!r}")
    return v


def _common(p, out_default: str, every: bool) -> None:
    p.add_argument("--out", metavar="DIR", default=None,
                   help="output folder (created; a rerun with the same settings resumes there) "
                        f"(default {out_default})")
    p.add_argument("--limit", type=_positive, default=None, metavar="N",
                   help="evaluate at most N frames" + (" (after --every)" if every else
                                                         " (the first in natural file-name order: 2 before 10)"))
    p.add_argument("--emd", choices=EMD_MODES, default="both",
                   help="which EMD to compute: ours (ot), the published variant, both or none "
                        "(EMD dominates the metric time: seconds per frame) (default both)")
    p.add_argument("--metric-workers", type=_non_negative, default=1, metavar="N",
                   help="threads computing metrics while the next frame is predicted, or 0: after "
                        "each frame's completion, before the next (slower). The time per scan includes "
                        "what the metric threads take from the completion: on a machine of few cores "
                        "it is the completion's alone only with 0 (default 1)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots and renders")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--restart", action="store_true",
                   help="discard the per-frame results already in --out instead of resuming")
    p.add_argument("--label", default=None, help="model name in the summary table")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="evaluate a checkpoint (or the input-scan baseline) on a sequence",
        description="Complete every frame of a SemanticKITTI-layout sequence in a fixed order with a "
                    "seeded Completer (frame i uses seed + i) and score it against the cached ground "
                    "truth (build it with `lidar-completion build-gt`, or pass --build-gt).",
        epilog=EVAL_EPILOG + STATUS_TEXT, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset_root", metavar="DATASET_ROOT",
                   help="folder containing sequences/SS/{velodyne,labels,poses.txt,calib.txt}")
    p.add_argument("--sequence", default="08", metavar="SS", help="sequence id (default 08)")
    p.add_argument("--baseline", choices=("input",), default=None,
                   help="evaluate a baseline instead of a model: 'input' scores the filtered input "
                        "scan itself")
    p.add_argument("--every", type=_positive, default=1, metavar="K",
                   help="evaluate every K-th frame (default 1)")
    seed = BY_NAME["seed"]
    p.add_argument("--seed", type=int, default=0,
                   help=f"base seed; frame i uses seed + i, which must be in {seed.allowed_text()} as "
                        "--seed of `complete` (default 0)")
    p.add_argument("--gt-cache", metavar="DIR", default=None,
                   help="ground-truth cache folder (default: DATASET_ROOT/gt_cache)")
    p.add_argument("--build-gt", action="store_true",
                   help="build (or finish) the ground-truth cache of the sequence first")
    _common(p, "evaluation_<model|input>_<SS>", every=True)
    add_threads_argument(p)
    add_arguments(p, exclude=("seed",))   # --seed above is the base seed of the frames
    p.set_defaults(func=run)

    f = subparsers.add_parser(
        "evaluate-files", help="score completions made elsewhere against ground-truth files",
        description="Pair PRED_DIR and GT_DIR clouds (.bin/.npy/.ply/.pcd) by file name without "
                    "extension and compute the same metrics and outputs as `evaluate`, so numbers "
                    "from other code (e.g. the original LiDiff / Distillation-DPO) compare side by "
                    "side.",
        epilog=FILES_EPILOG + STATUS_TEXT, formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("pred_dir", metavar="PRED_DIR", help="folder of predicted clouds")
    f.add_argument("gt_dir", metavar="GT_DIR", help="folder of ground-truth clouds (same stems)")
    f.add_argument("--input-dir", metavar="DIR", default=None,
                   help="folder of input scans (same stems, .bin read as KITTI), only drawn in the "
                        "renders")
    f.add_argument("--bin-format", choices=("auto",) + BIN_FORMATS, default="auto",
                   help="how .bin files in PRED_DIR and GT_DIR are read: 'kitti' float32 x, y, z, "
                        "intensity (16 bytes a point); 'xyz' float32 x, y, z (12 bytes a point, as "
                        "`build-gt` writes its targets); 'auto' (default) xyz for a folder of the "
                        "ground-truth cache, recognised by its manifest.json (CACHE/SS or "
                        "CACHE/SS/targets), KITTI elsewhere: pass xyz for targets copied out of "
                        "the cache")
    f.add_argument("--max-range", type=_non_negative_float, default=50.0, metavar="M",
                   help="keep the predicted points closer than M metres to the sensor (the origin), "
                        "as the published evaluation (LiDiff's eval_path) crops completions read "
                        "from files; 0 keeps every point (default 50)")
    for role, folder in (("pred", "PRED_DIR"), ("gt", "GT_DIR")):
        f.add_argument(f"--{role}-bin-format", choices=BIN_FORMATS, default=None,
                       help=f"the same for {folder} alone [--bin-format's]" + (
                           ": `complete` writes .bin completions as KITTI scans (--bin-format there "
                           "changes it), the cache's targets are xyz" if role == "pred" else ""))
    _common(f, "evaluation_<name of PRED_DIR>", every=False)
    f.set_defaults(func=run_files)


def _options(args, **extra):
    from ..evaluation import EvalOptions
    return EvalOptions(limit=args.limit, emd=args.emd, plots=not args.no_plots,
                       progress=not args.no_progress, restart=args.restart,
                       metric_workers=args.metric_workers, label=args.label, **extra)


def _status(summary, out, files: bool = False) -> int:
    """1, with a line naming them, when frames failed (they are in no metric of the summary, which
    a script reading only the exit status must not take for a complete evaluation); else 0."""
    import sys
    from pathlib import Path

    failed = summary.get("failed_frames") or []
    if not failed:
        return 0
    names = ", ".join(map(str, failed[:10])) + (" ..." if len(failed) > 10 else "")
    total = summary.get("frames", 0) + len(failed)
    rerun = "a rerun scores them again once their files changed" if files else \
        "a rerun keeps them, --restart computes every frame again"
    print(f"error: {len(failed)} of {total} frames failed and are left out of the summary: {names} "
          f"(their errors: {Path(out) / 'frames.jsonl'}; {rerun})", file=sys.stderr)
    return 1


def run(args) -> int:
    from ..evaluation import evaluate_sequence, print_summary

    if args.baseline and args.checkpoint:
        raise ConfigError("--baseline input evaluates the input scan without a model; drop "
                          "--checkpoint (or --baseline)")
    if args.baseline:
        # the baseline is the scan as the dataset filters it: completion settings would be ignored
        from ..settings import OPTIONS
        given = [opt.flag for opt in OPTIONS if opt.name in vars(args)
                 and opt.name != "seed"                         # evaluate's own --seed
                 and getattr(args, opt.name) != opt.default]
        if given:
            raise ConfigError(f"--baseline input scores the input scan as the dataset filters it (the "
                              f"ground-truth cache's input limits), without a model: {', '.join(given)} "
                              f"would change nothing; drop {'it' if len(given) == 1 else 'them'}")
    BY_NAME["seed"].check_flag(args.seed)   # the range of `complete --seed` (seed + i: evaluation.runner)
    apply_threads(args.threads)
    out = args.out or ("evaluation_" + (args.baseline or "model") + f"_{args.sequence}")
    summary = evaluate_sequence(
        args.dataset_root, sequence=args.sequence, out=out,
        settings=CompletionSettings.from_args(args),
        options=_options(args, every=args.every, seed=args.seed), baseline=args.baseline,
        cache_root=args.gt_cache, build_gt=args.build_gt)
    print_summary(summary, out)
    return _status(summary, out)


def run_files(args) -> int:
    from pathlib import Path

    from ..evaluation import evaluate_files, print_summary

    out = args.out or f"evaluation_{Path(args.pred_dir).resolve().name}"
    summary = evaluate_files(args.pred_dir, args.gt_dir, out, input_dir=args.input_dir,
                             options=_options(args),
                             bin_format={"pred": args.pred_bin_format or args.bin_format,
                                         "gt": args.gt_bin_format or args.bin_format},
                             max_range=args.max_range or None)
    print_summary(summary, out)
    return _status(summary, out, files=True)
