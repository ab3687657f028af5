#!/usr/bin/env python3
"""How well does a validation drive choose among distillation seeds, and what is choosing worth?

Reads two kinds of `scripts/research/compare_distillations.py` output folders holding the same
students (matched by checkpoint path): VAL, the students completed on a validation drive, and one
or more HELD folders, the same students on the held-out frames. For each frame subset of the
validation drive (`--frames 0,10,20`; several `--frames` to compare; default: all of its frames):

- Spearman's rank correlation between the students' validation CD on those frames and their
  held-out CD;
- per group and over all students, the held-out CD of the student the validation drive chooses,
  against the group's best held out;
- choosing among k seeds: over every subset of k students of a group (a random sample of 20,000
  subsets where there are more), the mean held-out CD of the subset's choice by validation.

    python scripts/research/seed_choice.py --val runs/shared/compare_val \\
        --held runs/shared/compare runs/reg/compare --frames 0,10,20 --frames all --k 1,3,4

Frames are the validation drive's frame numbers (the `frame` of its frames.jsonl), over every
sampling seed and sequence the validation folder holds. Only students in both are used.
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
from scipy import stats

HERE = Path(__file__).resolve().parent
ROW = "student 8 steps, w=2, local solver + refine"
MAX_SUBSETS = 20000


def _compare():
    spec = importlib.util.spec_from_file_location("compare_distillations", HERE / "compare_distillations.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def students(folder: Path, row: str) -> list[dict]:
    """[{label, index, checkpoint, cd}] of one compare_distillations folder's row ``row``."""
    path = folder / "compare.json"
    try:
        rows = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"{path}: not a compare_distillations result ({e})")
    if row not in rows:
        raise SystemExit(f"{path} has no row {row!r}; it has: {', '.join(rows)}")
    return [dict(label=label, index=s["index"], checkpoint=s["checkpoint"], cd=float(s["cd"]))
            for label, g in rows[row]["groups"].items() for s in g["students"]]


def frame_values(val: Path, student: dict, row: str, cmp) -> dict[int, list[float]]:
    """{frame number: [CD per sampling seed and sequence]} of one student on the validation drive."""
    per = cmp.frame_cds(val / student["label"] / str(student["index"])).get(row, {})
    out: dict[int, list[float]] = {}
    for (_seed, _seq, frame), cd in per.items():
        out.setdefault(int(frame), []).append(cd)
    return out


def best_of_k(val_cd: dict, held: dict, members: list, k: int, rng) -> float | None:
    """Mean held-out CD of the validation choice over the k-subsets of ``members``."""
    if k > len(members):
        return None
    subsets = (itertools.combinations(members, k) if math.comb(len(members), k) <= MAX_SUBSETS
               else (rng.choice(members, size=k, replace=False) for _ in range(MAX_SUBSETS)))
    return float(np.mean([held[min(sub, key=lambda c: val_cd[c])] for sub in subsets]))


def analyse(val: Path, held_folders: list[Path], frame_sets: list, ks: list[int], row: str = ROW,
            seed: int = 0) -> list[dict]:
    cmp = _compare()
    held = {}
    for folder in held_folders:
        held.update({s["checkpoint"]: s["cd"] for s in students(folder, row)})
    vstud = [s for s in students(val, row) if s["checkpoint"] in held]
    if len(vstud) < 2:
        raise SystemExit(f"fewer than two students of {val} have held-out figures in {', '.join(map(str, held_folders))}")
    frames = {s["checkpoint"]: frame_values(val, s, row, cmp) for s in vstud}
    group = {s["checkpoint"]: s["label"] for s in vstud}
    results = []
    common = sorted(set.intersection(*(set(f) for f in frames.values())))
    if not common:
        empty = [c for c, f in frames.items() if not f]
        raise SystemExit(f"no validation frame is shared by every student (row {row!r}; without frames.jsonl: "
                         f"{', '.join(empty) or 'none'})")
    for fs in frame_sets:
        chosen = common if fs is None else [f for f in fs if f in common]
        missing = [] if fs is None else [f for f in fs if f not in common]
        if missing:
            raise SystemExit(f"frames {missing} are not in every student's validation run (they share {common})")
        vcd = {c: float(np.mean([v for f in chosen for v in frames[c][f]])) for c in frames}
        cks = list(vcd)
        rho = float(stats.spearmanr([vcd[c] for c in cks], [held[c] for c in cks])[0])
        rng = np.random.default_rng(seed)
        groups = []
        for label in dict.fromkeys(group[c] for c in cks):
            members = [c for c in cks if group[c] == label]
            pick = min(members, key=vcd.get)
            groups.append({"label": label, "n": len(members), "chosen": pick, "chosen_held": held[pick],
                           "best_held": min(held[c] for c in members),
                           "best_of_k": {k: best_of_k(vcd, held, members, k, rng) for k in ks}})
        pick = min(cks, key=vcd.get)
        results.append({"frames": chosen, "spearman": rho, "students": len(cks), "groups": groups,
                        "chosen": pick, "chosen_group": group[pick], "chosen_held": held[pick],
                        "best_held": min(held[c] for c in cks)})
    return results


def render(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines.append(f"validation frames {','.join(map(str, r['frames']))}: {r['students']} students, "
                     f"Spearman {r['spearman']:.2f} against held-out CD; overall choice {r['chosen']} "
                     f"({r['chosen_group']}): held out {r['chosen_held']:.4f} m (best {r['best_held']:.4f} m)")
        for g in r["groups"]:
            bk = ", ".join(f"k={k} {v:.4f}" for k, v in g["best_of_k"].items() if v is not None)
            lines.append(f"  {g['label']} ({g['n']}): choice {g['chosen_held']:.4f} m held out, group best "
                         f"{g['best_held']:.4f} m; mean held-out CD of the choice among k seeds: {bk}")
    return "\n".join(lines)


def _frames(text: str):
    if text == "all":
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--frames takes frame numbers like 0,10,20 or 'all', got {text!r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--val", type=Path, required=True, help="compare_distillations folder on the validation drive")
    ap.add_argument("--held", type=Path, nargs="+", required=True,
                    help="compare_distillations folder(s) with the same students on the held-out frames")
    ap.add_argument("--frames", type=_frames, action="append",
                    help="validation frames to use (0,10,20), or 'all'; repeat to compare (default: all)")
    ap.add_argument("--k", default="1,3,4", help="seeds to choose among (default 1,3,4)")
    ap.add_argument("--row", default=ROW, help=f"the evaluation row (default {ROW!r})")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    try:
        ks = [int(k) for k in args.k.split(",") if k.strip()]
    except ValueError:
        ap.error(f"--k takes integers like 1,3,4, got {args.k!r}")
    if not ks or min(ks) < 1:
        ap.error("--k needs at least one positive integer")
    results = analyse(args.val, args.held, args.frames or [None], ks, args.row)
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
