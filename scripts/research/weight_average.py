#!/usr/bin/env python3
"""Weight averages of distilled students: seed soups and steps along the distillation direction.

Every student of a distillation starts as a copy of its teacher's denoiser and moves by a small
displacement (about 0.07 % of the weights' norm in the tiny recipe). This script measures those
displacements and writes checkpoints made from them:

- the *soup* of the students given: the mean of their denoisers (encoder and refiner must be the
  same in all of them: the distillation does not train them);
- for each ``--scale a``: teacher + a * (soup - teacher) - a = 0 is the teacher's denoiser, a = 1
  the soup, a = 2 twice the mean displacement (a crude stand-in for a longer run along the same
  direction).

It also reports, in ``OUT/weight_average.json``, each student's displacement norm, the cosine
between every two students' displacements, the soup's norm (the shared part of the moves) and
each student's distance from the soup (its own part).
Complete the written checkpoints with ``compare_distillations.py`` like any student::

    python scripts/research/weight_average.py --teacher lidar_completion_pkg/lidar_completion/weights/teacher.pt \\
        --student runs/shared/reg2_s0/distill.pt --student runs/shared/reg2_s1/distill.pt \\
        --scale 0,0.5,1,2,3 --out runs/soup/dpo

Writes ``OUT/scale_<a>.pt`` per scale (the soup itself is ``scale_1.pt``). With one student, the
scales step along that student's own displacement.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROLE = "denoiser"


def _load(path: str) -> dict:
    """{kind, state_dicts, config, sampling, meta} of a checkpoint (read and hash-checked by the
    library's reader, so a damaged file is named); it must hold a denoiser."""
    from lidar_completion.checkpoints import read_state_dicts
    from lidar_completion.errors import CheckpointError

    try:
        kind, sds, config, sampling, meta, _ = read_state_dicts(path)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}")
    if ROLE not in sds:
        raise SystemExit(f"error: {path} holds no {ROLE} (it holds: {', '.join(sorted(sds))})")
    return {"kind": kind, "state_dicts": sds, "config": config, "sampling": sampling, "meta": meta}


def _check_same(name: str, ref: dict, other: dict, where: str, any_float: bool = False) -> None:
    """Same tensor names, shapes and dtypes (``any_float``: any floating dtype for a floating tensor -
    the shipped teacher is a float16 file that training loads as float32)."""
    if set(ref) != set(other):
        extra = sorted(set(other) ^ set(ref))[:5]
        raise SystemExit(f"error: {where}: the {name} has other tensors than the first student's ({', '.join(extra)} ...)")
    for k, v in ref.items():
        same_kind = any_float and v.is_floating_point() and other[k].is_floating_point()
        if other[k].shape != v.shape or (other[k].dtype != v.dtype and not same_kind):
            raise SystemExit(f"error: {where}: {name} tensor {k} is {tuple(other[k].shape)} {other[k].dtype}, "
                             f"the first student's {tuple(v.shape)} {v.dtype}")


def displacement(student: dict, teacher: dict) -> torch.Tensor:
    """The floating tensors of ``student`` minus ``teacher``'s, in float64, flattened in name order."""
    return torch.cat([(student[k].double() - teacher[k].double()).reshape(-1)
                      for k in sorted(student) if student[k].is_floating_point()])


def average(students: list[dict], paths: list[str]) -> dict:
    """The mean of the students' denoisers ({name: tensor}, floating tensors in float64); their configs,
    network sets and other networks must agree (checked, named on failure)."""
    base = students[0]
    for obj, path in zip(students[1:], paths[1:]):
        if obj["config"] != base["config"]:
            raise SystemExit(f"error: {path}: its network config differs from {paths[0]}'s")
        if set(obj["state_dicts"]) != set(base["state_dicts"]):
            raise SystemExit(f"error: {path}: holds networks {sorted(obj['state_dicts'])}, "
                             f"{paths[0]} holds {sorted(base['state_dicts'])}")
        for role, sd in base["state_dicts"].items():
            _check_same(role, sd, obj["state_dicts"][role], path)
            if role != ROLE and any(not torch.equal(sd[k], obj["state_dicts"][role][k]) for k in sd):
                raise SystemExit(f"error: {path}: its {role} differs from {paths[0]}'s - students of one "
                                 f"distillation share everything but the {ROLE}")
    soup = {}
    for k, v in base["state_dicts"][ROLE].items():
        if v.is_floating_point():
            soup[k] = torch.stack([s["state_dicts"][ROLE][k].double() for s in students]).mean(0)
        else:
            if any(not torch.equal(s["state_dicts"][ROLE][k], v) for s in students):
                raise SystemExit(f"error: the students' {ROLE} tensor {k} ({v.dtype}) differs and cannot be averaged")
            soup[k] = v
    return soup


def scaled(soup: dict, teacher: dict, a: float, like: dict) -> dict:
    """teacher + a * (soup - teacher) for floating tensors, in the dtypes of ``like``."""
    return {k: ((teacher[k].double() + a * (v - teacher[k].double())).to(like[k].dtype) if like[k].is_floating_point()
                else like[k].clone()) for k, v in soup.items()}


def parse_scales(text: str) -> list[float]:
    try:
        scales = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--scale {text!r}: expected numbers separated by commas")
    if not scales:
        raise argparse.ArgumentTypeError("--scale: give at least one number")
    return scales


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="the checkpoint the students were distilled from")
    ap.add_argument("--student", action="append", required=True, help="a distilled student (repeat for a soup)")
    ap.add_argument("--scale", type=parse_scales, default=[1.0], metavar="A1,A2,...",
                    help="steps along the mean displacement to write (default 1: the soup)")
    ap.add_argument("--out", required=True, help="folder for scale_<a>.pt and weight_average.json")
    args = ap.parse_args(argv)

    from lidar_completion.checkpoints import save_checkpoint

    students = [_load(p) for p in args.student]
    teacher_obj = _load(args.teacher)
    if teacher_obj["config"] != students[0]["config"]:
        raise SystemExit(f"error: {args.teacher}: its network config differs from the students'")
    teacher = teacher_obj["state_dicts"][ROLE]
    like = students[0]["state_dicts"][ROLE]
    _check_same(ROLE, like, teacher, args.teacher, any_float=True)
    soup = average(students, args.student)

    disp = [displacement(s["state_dicts"][ROLE], teacher) for s in students]
    norms = [float(d.norm()) for d in disp]
    cos = [[float(a @ b / (a.norm() * b.norm())) if a.norm() > 0 and b.norm() > 0 else None for b in disp] for a in disp]
    soup_disp = displacement(soup, teacher)
    residuals = [float((d - soup_disp).norm()) for d in disp]     # each student's distance from the soup
    report = {"teacher": args.teacher, "students": args.student,
              "teacher_norm": float(torch.cat([v.double().reshape(-1) for k, v in sorted(teacher.items())
                                               if v.is_floating_point()]).norm()),
              "displacement_norms": norms, "cosines": cos, "soup_displacement_norm": float(soup_disp.norm()),
              "distances_from_soup": residuals,
              "written": {}}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = students[0]
    for a in args.scale:
        sds = dict(base["state_dicts"], **{ROLE: scaled(soup, teacher, a, like)})
        meta = dict(base["meta"], weight_average={"students": args.student, "teacher": args.teacher, "scale": a})
        path = out / f"scale_{a:g}.pt"
        save_checkpoint(path, sds, base["config"], sampling=base["sampling"], kind=base["kind"], meta=meta)
        report["written"][f"{a:g}"] = str(path)
        print(f"scale {a:g}: {path}")
    (out / "weight_average.json").write_text(json.dumps(report, indent=1))
    print(f"displacement norms {', '.join(f'{n:.4f}' for n in norms)}; soup {report['soup_displacement_norm']:.4f}; "
          f"teacher {report['teacher_norm']:.2f}")
    if len(disp) > 1:
        print(f"distances from the soup {', '.join(f'{r:.4f}' for r in residuals)}")
        off = [c for i, row in enumerate(cos) for j, c in enumerate(row) if i < j and c is not None]
        if off:
            print(f"cosines between students' displacements: {min(off):.3f} to {max(off):.3f} (mean {sum(off) / len(off):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
