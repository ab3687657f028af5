#!/usr/bin/env python3
"""Validation curves of training runs side by side: where does a run improve on its start, where is
its best, does it still move at the end?

Reads the ``val/*`` scalars that a run with ``validation.every_steps`` logs to its ``metrics.jsonl``
(training/validation.py) and prints one Markdown table: a row per validation step, a column per run,
then per run its value at the first validation (the start: for a distillation, the teacher's copy),
its best and the step of the best, its last, and best - start and last - start (negative: the run
improved on where it started, for a metric where lower is better).

    python scripts/research/validation_curves.py --run tg3.5=runs/curve/vsd_tg35 \\
        --run tg2.5=runs/curve/vsd_tg25 --out runs/curve/curves.md --plot runs/curve/curves.png

``--doc FILE`` writes the table, with the command, between the markers DOC_BEGIN and DOC_END of that
file. A resumed run logs to the same file; where a step was logged twice the later line counts.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOC_BEGIN = "<!-- validation-curves: begin (scripts/research/validation_curves.py --doc) -->"
DOC_END = "<!-- validation-curves: end -->"
HIGHER_IS_BETTER = ("val/iou",)


def read_curve(run_dir: Path, metric: str) -> dict[int, float]:
    """step -> value of ``metric`` in ``run_dir/metrics.jsonl`` (the last line of a step wins)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{run_dir}: no metrics.jsonl (is it a training run's folder?)")
    curve: dict[int, float] = {}
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            # a run killed mid-write leaves a partial last line; anything else is a broken file
            if n == len(lines):
                continue
            raise SystemExit(f"{path}:{n}: not a JSON line")
        if metric in rec:
            try:
                value = float(rec[metric])
            except (TypeError, ValueError):
                value = math.nan
            curve[int(rec["step"])] = value
    if not curve:
        raise SystemExit(f"{path}: no {metric} logged (was the run trained with validation.every_steps > 0?)")
    return dict(sorted(curve.items()))


def summarise(curve: dict[int, float], lower_is_better: bool = True) -> dict:
    steps = list(curve)
    finite = [s for s in steps if math.isfinite(curve[s])]
    if not finite:
        raise SystemExit("every logged value is non-finite")
    pick = min if lower_is_better else max
    best = pick(finite, key=lambda s: (curve[s], s))
    start, last = steps[0], steps[-1]
    return {"start_step": start, "start": curve[start], "best_step": best, "best": curve[best],
            "last_step": last, "last": curve[last], "best_minus_start": curve[best] - curve[start],
            "last_minus_start": curve[last] - curve[start]}


def render(curves: dict[str, dict[int, float]], summaries: dict[str, dict], metric: str) -> str:
    labels = list(curves)
    steps = sorted({s for c in curves.values() for s in c})
    fmt = lambda v: "-" if v is None or not math.isfinite(v) else f"{v:.4f}"  # noqa: E731
    lines = [f"| step | {' | '.join(labels)} |", "|---|" + "---|" * len(labels)]
    for s in steps:
        lines.append(f"| {s} | " + " | ".join(fmt(curves[lab].get(s)) for lab in labels) + " |")
    lines += ["", "| run | start | best (step) | last (step) | best - start | last - start |",
              "|---|---|---|---|---|---|"]
    for lab in labels:
        m = summaries[lab]
        lines.append(f"| {lab} | {fmt(m['start'])} (step {m['start_step']}) | {fmt(m['best'])} "
                     f"({m['best_step']}) | {fmt(m['last'])} ({m['last_step']}) | "
                     f"{m['best_minus_start']:+.4f} | {m['last_minus_start']:+.4f} |")
    lines += ["", f"`{metric}` at each validation step ('-': not validated at that step in that run)."]
    return "\n".join(lines)


def plot(curves: dict[str, dict[int, float]], metric: str, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for lab, c in curves.items():
        ax.plot(list(c), list(c.values()), marker="o", label=lab)
    ax.set_xlabel("training step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", default=[], metavar="LABEL=DIR",
                   help="a training run's folder (holding metrics.jsonl) and its label; repeat")
    p.add_argument("--metric", default="val/cd",
                   help="the logged scalar (default val/cd; val/jsd_bev, val/best, ...)")
    p.add_argument("--out", help="also write the table to this Markdown file (and OUT with .json)")
    p.add_argument("--plot", help="also draw the curves into this PNG")
    p.add_argument("--doc", metavar="MARKDOWN", help="write the table into this file's block")
    args = p.parse_args(argv)
    if not args.run:
        p.error("give at least one --run LABEL=DIR")
    runs = {}
    for spec in args.run:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            p.error(f"--run {spec!r}: expected LABEL=DIR")
        if label in runs:
            p.error(f"--run: label {label!r} given twice")
        runs[label] = Path(path)
    args.runs = runs
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    lower = args.metric not in HIGHER_IS_BETTER
    curves = {lab: read_curve(d, args.metric) for lab, d in args.runs.items()}
    summaries = {lab: summarise(c, lower) for lab, c in curves.items()}
    md = render(curves, summaries, args.metric)
    print(md)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(md + "\n")
        out.with_suffix(".json").write_text(json.dumps(
            {"metric": args.metric, "runs": {lab: {"dir": str(args.runs[lab]), "curve": curves[lab],
                                                   "summary": summaries[lab]} for lab in curves}},
            indent=1) + "\n")
    if args.plot:
        plot(curves, args.metric, Path(args.plot))
    if args.doc:
        spec = importlib.util.spec_from_file_location("eval_default", HERE.parent / "release" / "eval_default.py")
        ev = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ev)
        cmd = sys.argv[1:] if argv is None else list(argv)
        ev.write_doc(Path(args.doc), md, "python scripts/research/validation_curves.py " + shlex.join(cmd),
                     DOC_BEGIN, DOC_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
