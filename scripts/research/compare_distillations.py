#!/usr/bin/env python3
"""Compare distillation objectives over several training seeds: is one ahead of the other by more
than the spread between runs that differ only in their seed?

Each group is a label and the students of that group's runs (one checkpoint per distillation seed):

    python scripts/research/compare_distillations.py --data runs/eval/data --sequence 08,09 \\
        --group dpo=runs/dpo_s0/distill.pt,runs/dpo_s1/distill.pt,runs/dpo_s2/distill.pt \\
        --group vsd=runs/vsd_s0/distill.pt,runs/vsd_s1/distill.pt,runs/vsd_s2/distill.pt \\
        --rows student8w2 --out runs/compare

Every student is evaluated with `scripts/release/eval_default.py` (resumable) into
OUT/<label>/<i>/seed<S>/<sequence>/<row>/, on the same frames with the same sampling seeds. Per
student, the figure is the frame-weighted mean over the drives, averaged over the sampling seeds;
per group, the mean over its students and their standard deviation - the training spread, which is
what a comparison of objectives has to beat (the sampling spread over a dozen frames is far smaller).
Each further group is compared with the first: the difference of the means, the larger of the two
groups' spreads, Welch's t-test, and how many students per group a difference that large would need
to be shown (two-sided 5 %, power 80 %). OUT/compare.md and OUT/compare.json hold the result; `--doc FILE`
writes it, with the command, between the markers DOC_BEGIN and DOC_END of that file (`--doc-block
NAME` for the markers `<!-- NAME: begin ... -->` / `<!-- NAME: end -->`, several comparisons in one
page); `--table-only` only rebuilds it from the runs in OUT.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DOC_BLOCK = "distillation-seeds"


def doc_markers(block: str = DOC_BLOCK):
    """The begin and end markers of a --doc block."""
    return (f"<!-- {block}: begin (scripts/research/compare_distillations.py --doc) -->",
            f"<!-- {block}: end -->")


DOC_BEGIN, DOC_END = doc_markers()
METRICS = (("cd", "CD [m]", 1.0, 3), ("jsd_bev", "JSD-BEV", 1.0, 3), ("iou0.5", "IoU@0.5 [%]", 100.0, 1))


def _eval_default():
    spec = importlib.util.spec_from_file_location("eval_default", HERE.parent / "release" / "eval_default.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parse_group(text: str):
    """'dpo=a.pt,b.pt' -> ('dpo', ['a.pt', 'b.pt'])."""
    label, sep, paths = text.partition("=")
    label = label.strip()
    files = [p.strip() for p in paths.split(",") if p.strip()]
    if not sep or not label or not files:
        raise argparse.ArgumentTypeError(f"--group {text!r}: expected LABEL=CKPT[,CKPT...]")
    if "/" in label or label.startswith("."):
        raise argparse.ArgumentTypeError(f"--group {text!r}: the label names a folder; no '/' or leading '.'")
    return label, files


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group", action="append", type=parse_group, default=[], metavar="LABEL=CKPT,CKPT,...",
                    help="a group of students (one per distillation seed); give two or more groups")
    ap.add_argument("--data", help="SemanticKITTI-layout root with a built gt_cache (not needed with --table-only)")
    ap.add_argument("--sequence", default="08,09", help="held-out sequences (default 08,09)")
    ap.add_argument("--every", type=int, default=10, help="every K-th frame (default 10)")
    ap.add_argument("--limit", type=int, default=6, help="at most N frames per sequence (default 6)")
    ap.add_argument("--rows", default="student8", help="eval_default rows of each student (default student8)")
    ap.add_argument("--seeds", default="0", metavar="S1,S2,...", help="sampling seeds (default 0)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", required=True)
    ap.add_argument("--doc", default=None, metavar="MARKDOWN", help="also write the result into this file's block")
    ap.add_argument("--doc-block", default=DOC_BLOCK, metavar="NAME",
                    help=f"the --doc block's name (default {DOC_BLOCK}): markers <!-- NAME: begin ... --> "
                         "and <!-- NAME: end -->")
    ap.add_argument("--table-only", action="store_true", help="only rebuild the result from the runs in OUT")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    labels = [g[0] for g in args.group]
    if len(labels) < 2:
        ap.error("give at least two --group")
    if len(set(labels)) != len(labels):
        ap.error(f"group labels must differ: {labels}")
    if not args.table_only:
        if not args.data:
            ap.error("--data is required unless --table-only")
        missing = [f for _, files in args.group for f in files if not Path(f).is_file()]
        if missing:
            ap.error(f"no such checkpoint: {', '.join(missing)}")
    return args


def evaluate(args, ev) -> None:
    for label, files in args.group:
        for i, ckpt in enumerate(files):
            argv = ["--data", args.data, "--sequence", args.sequence, "--seeds", args.seeds,
                    "--every", str(args.every), "--limit", str(args.limit), "--student", ckpt,
                    "--rows", args.rows, "--out", str(Path(args.out) / label / str(i)), "--emd", "none"]
            if args.threads:
                argv += ["--threads", str(args.threads)]
            if args.no_progress:
                argv.append("--no-progress")
            print(f"== {label} [{i}] {ckpt}", flush=True)
            ev.main(argv)


def _stat(values):
    v = np.asarray([x for x in values if x is not None], dtype=float)
    return {"mean": float(v.mean()) if v.size else None,
            "std": float(v.std(ddof=1)) if v.size > 1 else None, "n": int(v.size)}


def collect(out: Path, groups, ev) -> dict:
    """{row key: {label: {"students": [...], metric: stats}}} from the evaluation runs under OUT."""
    table: dict = {}
    for label, files in groups:
        for i, ckpt in enumerate(files):
            where = out / label / str(i)
            if not where.is_dir():
                raise SystemExit(f"no evaluation of {label} [{i}] ({ckpt}) in {where}: run without --table-only")
            per_frame = frame_cds(where)
            for r in ev.aggregate(where):
                run = r["run"]
                if run.get("source") != "completer":
                    continue
                evaluated = (run.get("checkpoint") or {}).get("path")
                if evaluated != str(Path(ckpt).resolve()):   # e.g. --table-only with the groups reordered
                    raise SystemExit(f"{where} holds the evaluation of {evaluated}, not of {label} [{i}] ({ckpt})")
                key = run["label"]
                entry = table.setdefault(key, {"run": {k: run.get(k) for k in ("steps", "guidance", "process",
                                                                                   "refine", "label")},
                                               "groups": {}})
                g = entry["groups"].setdefault(label, {"students": []})
                entry.setdefault("frame_cds", []).append(per_frame.get(key, {}))
                g["students"].append({"index": i, "checkpoint": str(ckpt),
                                      "frames": r["per_seed"][0]["frames"],
                                      "sampling_seeds": [p["seed"] for p in r["per_seed"]],
                                      **{m: r["stats"][m]["mean"] for m, *_ in METRICS}})
    for entry in table.values():
        entry["consistency"] = consistency(entry.pop("frame_cds", []))
        for g in entry["groups"].values():
            for m, *_ in METRICS:
                g[m] = _stat([s[m] for s in g["students"]])
    return table


def frame_cds(where: Path) -> dict:
    """{row label: {(sampling seed, sequence, frame): CD}} of one student's evaluation folder."""
    out: dict = {}
    for summary in sorted(where.rglob("summary.json")):
        run = json.loads(summary.read_text())["run"]
        frames = summary.parent / "frames.jsonl"
        if not frames.is_file():
            continue
        row = out.setdefault(run.get("label"), {})
        for line in frames.read_text().splitlines():
            if line.strip():
                f = json.loads(line)
                row[(run.get("seed"), run.get("sequence"), f["frame"])] = float(f["cd"])
    return out


def consistency(per_student: list) -> dict | None:
    """Is the spread between students a property of the models or noise of the frames? From a
    student x frame matrix of CDs (the frames all students share): the share of (student pair,
    frame) on which the pair is ordered as by its mean CD; and the two-way decomposition of the
    matrix into a student effect (standard deviation of the students' means) and the frame-by-frame
    residual (what is left after the student and the frame effects)."""
    if len(per_student) < 2:
        return None
    common = sorted(set.intersection(*(set(d) for d in per_student)), key=str)
    if len(common) < 2:
        return None
    M = np.array([[d[k] for k in common] for d in per_student])
    means = M.mean(1)
    agree = [np.mean(np.sign(M[a] - M[b]) == np.sign(means[a] - means[b]))
             for a in range(len(M)) for b in range(a + 1, len(M)) if means[a] != means[b]]
    resid = M - M.mean(0, keepdims=True) - M.mean(1, keepdims=True) + M.mean()
    dof = (M.shape[0] - 1) * (M.shape[1] - 1)
    return {"frames": len(common), "students": int(M.shape[0]),
            "order_agreement": float(np.mean(agree)) if agree else None,
            "student_sd": float(means.std(ddof=1)),
            "residual_sd": float(np.sqrt((resid ** 2).sum() / dof)) if dof else None}


def seeds_needed(diff: float, sd_a: float, sd_b: float, alpha: float = 0.05, power: float = 0.8) -> int | None:
    """Students per group that a two-sided two-sample t-test at level ``alpha`` needs to show a
    difference of means ``diff`` with probability ``power``, when the groups' spreads are ``sd_a``
    and ``sd_b`` (pooled): the smallest n >= 2 whose power, from the noncentral t distribution,
    reaches ``power``, searched from the normal approximation 2 (z_(1-alpha/2) + z_power)^2
    (s / diff)^2. None when ``diff`` is 0 or the spreads are."""
    from scipy.stats import nct, norm, t
    s = float(np.sqrt((sd_a ** 2 + sd_b ** 2) / 2))
    if diff == 0 or s == 0:
        return None
    d = abs(diff) / s

    def achieved(n: int) -> float:
        df, ncp = 2 * n - 2, d * np.sqrt(n / 2)
        tc = t.ppf(1 - alpha / 2, df)
        return float(nct.sf(tc, df, ncp) + nct.cdf(-tc, df, ncp))

    n = max(2, int(2 * (norm.ppf(1 - alpha / 2) + norm.ppf(power)) ** 2 / d ** 2) - 1)
    while n > 2 and achieved(n - 1) >= power:
        n -= 1
    while achieved(n) < power:
        n += 1
    return n


def compare(a: list, b: list) -> dict:
    """Group b against group a (lists of per-student values): difference of means, the larger
    spread, Welch's t-test and the students per group a difference this large would need
    (:func:`seeds_needed`; None with fewer than two students in a group)."""
    a, b = [x for x in a if x is not None], [x for x in b if x is not None]
    sa, sb = _stat(a), _stat(b)
    out = {"diff": sb["mean"] - sa["mean"], "spread": None, "ratio": None, "p_welch": None, "seeds_needed": None}
    spreads = [s for s in (sa["std"], sb["std"]) if s is not None]
    if spreads:
        out["spread"] = max(spreads)
        out["ratio"] = abs(out["diff"]) / out["spread"] if out["spread"] > 0 else float("inf")
    if sa["n"] > 1 and sb["n"] > 1:
        from scipy.stats import ttest_ind
        out["p_welch"] = float(ttest_ind(b, a, equal_var=False).pvalue)
        out["seeds_needed"] = seeds_needed(out["diff"], sa["std"], sb["std"])
    return out


def compare_groups(table: dict, labels: list) -> dict:
    """{row key: {label: compare(first group's CDs, this group's CDs)}} for every group after the first."""
    out: dict = {}
    for key, entry in table.items():
        base = entry["groups"].get(labels[0])
        for label in labels[1:]:
            other = entry["groups"].get(label)
            if base is not None and other is not None:
                out.setdefault(key, {})[label] = compare([s["cd"] for s in base["students"]],
                                                         [s["cd"] for s in other["students"]])
    return out


def render(table: dict, labels: list, comparisons: dict) -> str:
    lines = ["| row | group | students | " + " | ".join(f"{name} per student" if m == "cd" else name
                                                       for m, name, *_ in METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for key, entry in table.items():
        run = entry["run"]
        row = (f"{run['steps']} steps, w = {run['guidance']:g}, {'refined' if run['refine'] else 'unrefined'}")
        for label in labels:
            g = entry["groups"].get(label)
            if g is None:
                continue
            cells = []
            for m, _, scale, d in METRICS:
                st = g[m]
                txt = "-" if st["mean"] is None else f"{st['mean'] * scale:.{d}f}"
                if st["std"] is not None:
                    txt += f" ± {st['std'] * scale:.{d}f}"
                if m == "cd":
                    txt = ", ".join(f"{s['cd']:.3f}" for s in g["students"]) + f" (mean {txt})"
                cells.append(txt)
            lines.append(f"| {row} | {label} | {len(g['students'])} | " + " | ".join(cells) + " |")
    notes = []
    for key, per in comparisons.items():
        run = table[key]["run"]
        if not run["refine"]:
            continue
        for label, c in per.items():
            verdict = ("within the training spread" if c["ratio"] is not None and c["ratio"] <= 1
                       else "beyond the training spread" if c["ratio"] is not None else "no spread (one student each)")
            ahead = labels[0] if c["diff"] > 0 else label
            p = f", Welch's t-test p = {c['p_welch']:.3f}" if c["p_welch"] is not None else ""
            need = (f"; a difference this large would need about {c['seeds_needed']} students per group to "
                    f"show (5 %, power 80 %)") if c.get("seeds_needed") is not None else ""
            spread = f"{c['spread']:.4f}" if c["spread"] is not None else "-"
            notes.append(f"- {run['steps']} steps, w = {run['guidance']:g}, refined: {label} - {labels[0]} = "
                         f"{c['diff']:+.4f} m of CD; the larger spread {spread} m; {ahead} ahead, {verdict}{p}{need}.")
    for key, entry in table.items():
        run, c = entry["run"], entry.get("consistency")
        if not run["refine"] or not c or c["order_agreement"] is None:
            continue
        resid = f"{c['residual_sd']:.4f}" if c["residual_sd"] is not None else "-"
        notes.append(f"- {run['steps']} steps, w = {run['guidance']:g}, refined, frame by frame: on "
                     f"{100 * c['order_agreement']:.0f} % of (frame, pair of students) the pair is ordered as by "
                     f"its mean CD ({c['students']} students, {c['frames']} frames); the students' effect "
                     f"{c['student_sd']:.4f} m against a frame-by-frame residual of {resid} m.")
    md = "\n".join(lines) + "\n\nCD per student: one distillation seed each, in the order given; a ± b: mean ± " \
         "standard deviation over the group's students (the training spread).\n\n" + "\n".join(notes) + "\n"
    return md


def main(argv=None):
    args = parse_args(argv)
    ev = _eval_default()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        evaluate(args, ev)
    table = collect(out, args.group, ev)
    labels = [g[0] for g in args.group]
    comparisons = compare_groups(table, labels)
    md = render(table, labels, comparisons)
    (out / "compare.md").write_text(md)
    (out / "compare.json").write_text(json.dumps({"rows": table, "comparisons": comparisons,
                                                  "groups": [[l, f] for l, f in args.group]}, indent=1))
    print(md)
    if args.doc:
        cmd = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--table-only"]
        ev.write_doc(Path(args.doc), md, "python scripts/research/compare_distillations.py " + shlex.join(cmd),
                     *doc_markers(args.doc_block))
    return 0


if __name__ == "__main__":
    sys.exit(main())
