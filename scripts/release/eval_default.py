#!/usr/bin/env python3
"""Evaluate the default models on a held-out synthetic sequence and write the results table of
docs/results.md.

Rows: the input scan alone; "x_init", the diffusion's starting cloud (the farthest-point-sampled scan
tiled) with no denoising at all, an ablation that shows what the refiner alone does; the teacher at
50 and 8 steps; the student at 8, 4 and 1 steps; every model row with and without the refinement
network. One completion per frame and model gives both
variants (the refiner runs on the unrefined cloud, so the "without" row is that same cloud), and
"time per scan" of a "without" row leaves the refinement stage out.

    python scripts/release/eval_default.py --data runs/eval/data --sequence 08 --every 10 --limit 6 \\
        --teacher runs/default/teacher/teacher.pt --refiner runs/default/refiner/refiner.pt \\
        --student runs/default/distill/distill.pt --out runs/eval/table

Each row is a resumable `lidar_completion.evaluation` run in OUT/<row>/ (frames.jsonl,
summary.json, summary.md); OUT/table.md and OUT/table.json collect them. Frame i is completed with
seed SEED + i, so the numbers are reproducible on the same machine and backend.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

from lidar_completion.metrics import EMD_MODES
from lidar_completion.settings import CompletionSettings, add_arguments

ROWS = ("input", "xinit", "teacher50", "teacher8", "student8", "student4", "student1")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="SemanticKITTI-layout root with a built gt_cache")
    ap.add_argument("--sequence", default="08")
    ap.add_argument("--every", type=int, default=10, help="evaluate every K-th frame (default 10)")
    ap.add_argument("--limit", type=int, default=6, help="at most N frames (default 6)")
    ap.add_argument("--teacher", help="teacher checkpoint (rows teacher50, teacher8)")
    ap.add_argument("--refiner", help="refiner checkpoint used with the teacher")
    ap.add_argument("--student", help="student checkpoint with its refiner (rows student8/4/1)")
    ap.add_argument("--rows", default=",".join(ROWS),
                    help=f"comma-separated rows (default {','.join(ROWS)}); teacherNwW / studentNwW "
                         "override the guidance weight")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0, help="frame i uses seed + i (default 0)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--emd", default="ot", choices=EMD_MODES)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--table-only", action="store_true", help="only rebuild table.md from OUT/")
    # the rows set checkpoint, steps, guidance, process and refinement; these apply to all of them
    add_arguments(ap, only=("device", "backend", "precision", "min_range", "max_range", "min_z"))
    ap.set_defaults(backend="torch")   # the results table is measured on the pure-PyTorch backend
    return ap.parse_args(argv)


ROW_RE = re.compile(r"^(teacher|student)(\d+)(?:w([0-9.]+))?(vp|local)?$")


def _row_spec(row: str, args):
    """'teacher8' -> ("teacher", 8, None, None, path); 'teacher8w3.5': guidance 3.5 instead of the
    checkpoint's (an ablation: the teacher at the student's guidance weight); a 'vp' or 'local'
    suffix ('student8vp') picks the solver's process instead of the checkpoint's."""
    m = ROW_RE.match(row)
    if not m:
        raise SystemExit(f"unknown row {row!r}: expected input, xinit, teacherN, studentN or "
                         "teacherNwW / studentNwW, optionally followed by vp or local")
    kind, steps, w = m.group(1), int(m.group(2)), (float(m.group(3)) if m.group(3) else None)
    process = m.group(4)
    ckpt = args.teacher if kind == "teacher" else args.student
    if not ckpt:
        raise SystemExit(f"row {row}: pass --{kind}")
    return kind, steps, w, process, ckpt


def evaluate_row(row: str, args, src):
    """One row (or its two variants) over the frames of ``src`` (an evaluation SequenceSource)."""
    from lidar_completion.evaluation import EvalOptions, run_evaluation
    from lidar_completion.fileutil import sha256_file

    keys, frames, load = src.keys, src.indices, src.load
    base = src.run_info(args.seed, args.every, args.limit)
    options = EvalOptions(emd=args.emd, plots=False, progress=not args.no_progress)
    settings = CompletionSettings.from_args(args, refine=True)
    if row == "input":
        run = dict(base, source="input scan (no model)", label="input scan alone", steps=None,
                   identity_keys=["dataset", "sequence", "seed", "source"],
                   title=f"sequence {args.sequence}, input scan alone",
                   description="The filtered input scan itself.")
        return {"input": run_evaluation(keys, load, lambda k, i, inp: (inp, {}), Path(args.out) / row,
                                        run, options, indices=frames)}
    from lidar_completion.completer import Completer

    def both_variants(name, label, run_extra, identity, complete):
        """Rows OUT/<name>_refine and OUT/<name>_raw from one completion per frame:
        ``complete(key, index, inp) -> (refined, timings, raw, raw_timings)``."""
        raw = {}

        def predict_refined(key, index, inp):
            refined, t, unrefined, t_raw = complete(key, index, inp)
            raw[key] = (unrefined, t_raw)
            return refined, t

        def predict_raw(key, index, inp):
            if key not in raw:    # resumed run: the refined row was already complete for this frame
                predict_refined(key, index, inp)
            return raw[key]

        res = {}
        for refine, fn in ((True, predict_refined), (False, predict_raw)):
            lab = f"{label}{' + refine' if refine else ''}"
            run = dict(base, **run_extra, label=lab, refine=refine, identity_keys=identity + ["refine"],
                       title=f"sequence {args.sequence}, {lab}")
            res[lab] = run_evaluation(keys, load, fn, Path(args.out) / f"{name}_{'refine' if refine else 'raw'}",
                                      run, options, indices=frames)
        return res

    if row == "xinit":
        # no denoiser: the cloud the solver starts from (before noise), and the refiner applied to it
        import torch
        ckpt = args.student or args.teacher      # both carry the same refiner
        if not ckpt:
            raise SystemExit("row xinit: pass --student or --teacher (for their refiner)")
        comp = Completer.from_settings(settings.replace(
            checkpoint=ckpt, refiner_checkpoint=None if args.student else args.refiner))

        def complete_xinit(key, index, inp):
            t0 = time.perf_counter()
            _, _, x_init, _ = comp.prepare(inp)
            t1 = time.perf_counter()
            with torch.inference_mode():
                pts = comp.refine_points(torch.as_tensor(x_init, device=comp.device)).cpu().numpy()
            t2 = time.perf_counter()
            return (pts, {"total": t2 - t0, "preprocess": t1 - t0, "refinement": t2 - t1},
                    x_init, {"total": t1 - t0, "preprocess": t1 - t0})

        return both_variants("xinit", "x_init (no denoiser)",
                             dict(source="x_init", steps=0, description="The farthest-point-sampled scan "
                                  "tiled (the solver's start before noise)"),
                             ["dataset", "sequence", "seed", "source"], complete_xinit)

    kind, steps, w, process, ckpt = _row_spec(row, args)
    refiner = args.refiner if kind == "teacher" else None
    comp = Completer.from_settings(settings.replace(checkpoint=ckpt, steps=steps, guidance=w,
                                                    process=process, refiner_checkpoint=refiner))

    def complete_model(key, index, inp):
        res = comp.complete_detailed(inp, seed=args.seed + int(index))
        t = dict(res.timings)
        return res.points, t, res.raw, dict(t, total=t["total"] - t.get("refinement", 0.0), refinement=0.0)

    return both_variants(row, f"{kind} {steps} steps, w={comp.guidance:g}, {comp.process} solver",
                         dict(source="completer", steps=steps, guidance=comp.guidance, process=comp.process,
                              checkpoint={"path": str(Path(ckpt).resolve()), "sha256": sha256_file(ckpt)},
                              refiner=refiner, backend=args.backend, device=args.device,
                              description=f"{steps} steps, w={comp.guidance:g}, {comp.process} solver, "
                                          f"seed {args.seed} + frame"),
                         ["dataset", "sequence", "seed", "checkpoint", "steps", "guidance", "process"],
                         complete_model)


def table(out_dir: Path):
    def order(s: dict):
        run = s["run"]
        src = run.get("source")
        if src == "input scan (no model)":
            return (0,)
        if src == "x_init":
            return (1, bool(run.get("refine")))
        kind = 2 if run.get("label", "").startswith("teacher") else 3
        return (kind, -int(run.get("steps") or 0), run.get("process") == "vp",
                float(run.get("guidance") or 0), bool(run.get("refine")))

    rows = sorted((json.loads(p.read_text()) for p in out_dir.glob("*/summary.json")), key=order)
    lines = ["| model | steps | solver | guidance | refine | CD [m] | JSD-BEV | EMD [m] | IoU@0.5 [%] | IoU@0.2 [%] | time per scan [s] |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v, d=3, s=1.0):
        return "-" if v is None else f"{v * s:.{d}f}"

    for s in rows:
        run = s["run"]
        iou = s["iou"]["full"]
        t = s.get("time_per_scan") or {}
        label = run.get("label", "")
        if run.get("source") == "completer":
            name = label.split(" ")[0]
        elif run.get("source") == "x_init":
            name = "x_init, no denoiser"
        else:
            name = label
        lines.append(" | ".join([
            f"| {name}", str(run.get("steps") if run.get("steps") is not None else "-"),
            run.get("process") or ("vp" if run.get("source") == "completer" else "-"),
            f"{run['guidance']:g}" if run.get("guidance") is not None else "-",
            "-" if run.get("source") == "input scan (no model)" else ("yes" if run.get("refine") else "no"),
            f((s.get("cd") or {}).get("mean")), f((s.get("jsd_bev") or {}).get("mean")),
            f((s.get("emd") or {}).get("mean"), 2), f(iou["0.5"]["iou"], 1, 100),
            f(iou["0.2"]["iou"], 1, 100), f(t.get("mean"), 2)]) + " |")
    frames = rows[0]["frames"] if rows else 0
    md = "\n".join(lines) + "\n"
    (out_dir / "table.md").write_text(md)
    (out_dir / "table.json").write_text(json.dumps(
        {"frames": frames, "rows": [{"run": s["run"], "cd": s.get("cd"), "jsd_bev": s.get("jsd_bev"),
                                     "emd": s.get("emd"), "iou": s["iou"]["full"],
                                     "time_per_scan": s.get("time_per_scan")} for s in rows],
         "machine": {"python": platform.python_version(), "processor": platform.processor(),
                     "cpus": os.cpu_count()}}, indent=1))
    return md


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        import torch
        from lidar_completion.evaluation import SequenceSource

        if args.threads:
            torch.set_num_threads(args.threads)
        rows = [r.strip() for r in args.rows.split(",") if r.strip()]
        for r in rows:
            if r not in ("input", "xinit"):
                _row_spec(r, args)
        src = SequenceSource(args.data, args.sequence, every=args.every, limit=args.limit)
        for row in rows:
            t0 = time.perf_counter()
            res = evaluate_row(row, args, src)
            for label, s in res.items():
                print(f"{label}: CD {s['cd']['mean']:.4f} m ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(table(out))


if __name__ == "__main__":
    sys.exit(main())
