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

Several held-out drives and sampling seeds (`--sequence 08,09 --seeds 0,1000,2000`): the runs go to
OUT/seed<S>/<sequence>/<row>/, and the table gives per row the mean over the seeds of the
frame-weighted means over the drives, with the standard deviation over the seeds (the run-to-run
spread). `--doc docs/results.md` writes the table, and the command that made it, into that file's
results block; `--table-only` rebuilds the table (and the block) from the runs already in OUT.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from lidar_completion.metrics import EMD_MODES
from lidar_completion.settings import CompletionSettings, add_arguments

ROWS = ("input", "xinit", "teacher50", "teacher8", "student8", "student4", "student1")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="SemanticKITTI-layout root with a built gt_cache")
    ap.add_argument("--sequence", default="08", help="the held-out sequence, or several: 08,09")
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
    ap.add_argument("--seeds", default=None, metavar="S1,S2,...",
                    help="evaluate every row once per seed (OUT/seed<S>/<sequence>/<row>/); the table "
                         "shows the mean over the seeds and their standard deviation")
    ap.add_argument("--doc", default=None, metavar="MARKDOWN",
                    help="also write the table into this file's results block (docs/results.md)")
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
    if not Path(ckpt).is_file():   # before any row runs, not when this row's turn comes
        raise SystemExit(f"error: row {row}: --{kind} checkpoint not found: {ckpt}")
    return kind, steps, w, process, ckpt


# what a row's frames depend on besides the model: the data (and its ground-truth cache's content)
DATA_IDENTITY = ["dataset", "sequence", "seed", "source", "gt_cache"]


def evaluate_row(row: str, args, src):
    """One row (or its two variants) over the frames of ``src`` (an evaluation SequenceSource)."""
    from lidar_completion.evaluation import EvalOptions, run_evaluation
    from lidar_completion.evaluation.sources import (COMPLETER_IDENTITY, REFINED_CUT, completer_record,
                                                     refined_cut_record)
    from lidar_completion.fileutil import sha256_file

    keys, frames, load = src.keys, src.indices, src.load
    base = src.run_info(args.seed, args.every, args.limit)
    options = EvalOptions(emd=args.emd, plots=False, progress=not args.no_progress)
    settings = CompletionSettings.from_args(args, refine=True)
    if row == "input":
        run = dict(base, source="input scan (no model)", label="input scan alone", steps=None,
                   identity_keys=DATA_IDENTITY,
                   title=f"sequence {args.sequence}, input scan alone",
                   description="The filtered input scan itself.")
        return {"input": run_evaluation(keys, load, lambda k, i, inp: (inp, {}), Path(args.out) / row,
                                        run, options, indices=frames)}
    from lidar_completion.completer import Completer

    def both_variants(name, label, run_extra, complete, comp):
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
            # the identity of a resumed row: the data's and the completer's settings and weights
            # (evaluation.sources.COMPLETER_IDENTITY; one completer makes both variants)
            run = {**base, **completer_record(comp), **run_extra, "label": lab, "refine": refine,
                   "identity_keys": DATA_IDENTITY + COMPLETER_IDENTITY,
                   "title": f"sequence {args.sequence}, {lab}"}
            if refine:    # rows of refined frames from before the refined cut are not resumed
                run.update(refined_cut_record(comp))
                run["identity_keys"] = run["identity_keys"] + [REFINED_CUT]
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
                             dict(source="x_init", steps=0, process=None, guidance=None, description="The farthest-point-sampled scan "
                                  "tiled (the solver's start before noise)"),
                             complete_xinit, comp)

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
                         complete_model, comp)


def _row_order(run: dict):
    src = run.get("source")
    if src == "input scan (no model)":
        return (0,)
    if src == "x_init":
        return (1, bool(run.get("refine")))
    kind = 2 if run.get("label", "").startswith("teacher") else 3
    return (kind, -int(run.get("steps") or 0), run.get("process") == "vp",
            float(run.get("guidance") or 0), bool(run.get("refine")))


def _weighted(parts: list, key: str):
    """Frame-weighted mean of a summary metric over the parts (sequences) of one seed."""
    vals = [(p[key]["mean"], p["frames"]) for p in parts if (p.get(key) or {}).get("mean") is not None]
    n = sum(f for _, f in vals)
    return sum(v * f for v, f in vals) / n if n else None


def aggregate(out_dir: Path) -> list:
    """Every row's numbers from the evaluation runs under OUT (any depth: OUT/<row>/ for one seed and
    sequence, OUT/seed<S>/<sequence>/<row>/ for several): per seed, the frame-weighted means over the
    sequences (IoU from the summed TP/FP/FN); then the mean over seeds and their standard deviation
    (the run-to-run spread; None with one seed)."""
    groups: dict = {}
    for path in sorted(out_dir.rglob("summary.json")):
        s = json.loads(path.read_text())
        run = s["run"]
        key = (run.get("label"), bool(run.get("refine")))
        groups.setdefault(key, {}).setdefault(run.get("seed"), []).append(s)
    rows = []
    for key, by_seed in groups.items():
        per_seed = []
        for seed, parts in sorted(by_seed.items(), key=lambda kv: str(kv[0])):
            iou = {}
            for k in ("0.5", "0.2"):
                tp = sum(p["iou"]["full"][k]["tp"] for p in parts)
                union = tp + sum(p["iou"]["full"][k]["fp"] + p["iou"]["full"][k]["fn"] for p in parts)
                iou[k] = tp / union if union else None
            per_seed.append({"seed": seed, "frames": sum(p["frames"] for p in parts),
                             "sequences": sorted({p["run"].get("sequence") for p in parts}),
                             "cd": _weighted(parts, "cd"), "jsd_bev": _weighted(parts, "jsd_bev"),
                             "emd": _weighted(parts, "emd"), "time": _weighted(parts, "time_per_scan"),
                             "iou": iou})
        stats = {}
        for name in ("cd", "jsd_bev", "emd", "time", "iou0.5", "iou0.2"):
            v = [r["iou"][name[3:]] if name.startswith("iou") else r[name] for r in per_seed]
            v = np.array([x for x in v if x is not None], dtype=float)
            stats[name] = {"mean": float(v.mean()) if v.size else None,
                           "spread": float(v.std(ddof=1)) if v.size > 1 else None}
        first = next(iter(by_seed.values()))[0]
        rows.append({"run": first["run"], "per_seed": per_seed, "stats": stats})
    rows.sort(key=lambda r: _row_order(r["run"]))
    return rows


def table(out_dir: Path):
    """OUT/table.md and OUT/table.json from the runs under OUT; returns the Markdown."""
    rows = aggregate(out_dir)
    lines = ["| model | steps | solver | guidance | refine | CD [m] | JSD-BEV | EMD [m] | IoU@0.5 [%] | IoU@0.2 [%] | time per scan [s] |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(st, d=3, s=1.0, spread=False):
        if st["mean"] is None:
            return "-"
        txt = f"{st['mean'] * s:.{d}f}"
        if spread and st["spread"] is not None:
            txt += f" ± {st['spread'] * s:.{d}f}"
        return txt

    for r in rows:
        run, st = r["run"], r["stats"]
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
            f(st["cd"], spread=True), f(st["jsd_bev"], spread=True), f(st["emd"], 2),
            f(st["iou0.5"], 1, 100), f(st["iou0.2"], 1, 100), f(st["time"], 2)]) + " |")
    seeds = sorted({str(p["seed"]) for r in rows for p in r["per_seed"]})
    frames = rows[0]["per_seed"][0]["frames"] if rows else 0
    seqs = rows[0]["per_seed"][0]["sequences"] if rows else []
    note = (f"\n{frames} frames of sequence{'s' if len(seqs) > 1 else ''} {', '.join(map(str, seqs))} per seed; "
            f"seeds {', '.join(seeds)} (frame i completed with seed + i)")
    if len(seeds) > 1:
        note += "; a ± b: mean over the seeds ± their standard deviation (the run-to-run spread)"
    md = "\n".join(lines) + "\n" + note + ".\n"
    (out_dir / "table.md").write_text(md)
    (out_dir / "table.json").write_text(json.dumps(
        {"frames": frames, "seeds": seeds,
         "rows": [{"run": r["run"], "stats": r["stats"], "per_seed": r["per_seed"]} for r in rows],
         "machine": {"python": platform.python_version(), "processor": platform.processor(),
                     "cpus": os.cpu_count()}}, indent=1))
    return md


DOC_BEGIN = "<!-- results-table: begin (scripts/release/eval_default.py --doc) -->"
DOC_END = "<!-- results-table: end -->"


def write_doc(doc: Path, md: str, command: str, begin: str = DOC_BEGIN, end: str = DOC_END) -> None:
    """Replace the block between ``begin`` and ``end`` (default: the results block) in ``doc`` with
    the table and the command that made it."""
    text = doc.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{doc} has no block for this table ({begin} ... {end})")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{begin}\n{md}\nRegenerated by `{command}`.\n{end}{tail}")


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
        seqs = [q.strip() for q in args.sequence.split(",") if q.strip()]
        seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
        nested = len(seqs) > 1 or args.seeds is not None
        for seed in seeds:
            for seq in seqs:
                # one seed and sequence: OUT/<row>/; several: OUT/seed<S>/<sequence>/<row>/
                where = out / f"seed{seed}" / seq if nested else out
                a = argparse.Namespace(**dict(vars(args), seed=seed, sequence=seq, out=str(where)))
                src = SequenceSource(args.data, seq, every=args.every, limit=args.limit)
                for row in rows:
                    t0 = time.perf_counter()
                    res = evaluate_row(row, a, src)
                    for label, s in res.items():
                        print(f"seed {seed}, sequence {seq}, {label}: CD {s['cd']['mean']:.4f} m "
                              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    md = table(out)
    print(md)
    if args.doc:   # the command that makes the runs (resumable: it reuses those already in OUT)
        cmd = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--table-only"]
        write_doc(Path(args.doc), md, "python scripts/release/eval_default.py " + shlex.join(cmd))


if __name__ == "__main__":
    from lidar_completion.errors import LidarCompletionError

    try:
        sys.exit(main())
    except LidarCompletionError as e:   # a corrupt checkpoint, a malformed dataset: its message, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
