#!/usr/bin/env python3
"""Copy the models of a `scripts/release/train_default.sh` run into the package as the shipped defaults.

    python scripts/release/ship_default.py runs/default [--dest lidar_completion_pkg/lidar_completion/weights]
    python scripts/release/ship_default.py runs/default --student runs/default/distill_x/distill.pt \\
        --student-guidance 2 --command "..."      # another distillation of the run, its own guidance
    python scripts/release/ship_default.py --student-only runs/x/distill.pt --student-guidance 2 \\
        --command "..."      # a new distillation of the teacher already shipped: only student.pt and
                             # the manifest's student entry and distill stage change

Writes, with float16 tensors (loaded back as float32; docs/results.md's table is measured on these
files, not on the float32 originals):

Each stage's export is its best by validation, RUN/<stage>/best/<kind>.pt, when the stage validated
(training/validation.py; the manifest records the step and the validation metrics), else its last.
When RUN/distill links the seed train_default.sh chose among DISTILL_SEEDS, the manifest also
records every seed's validation (training.stages.distill.chosen_from).

  student.pt     the distilled student (RUN/distill/distill.pt, or --student), the teacher's
                 condition encoder and the refiner: the default checkpoint of the CLI, the Python
                 API and the node; --student-guidance W replaces the guidance weight it samples with
                 (choose it on data the table does not use)
  teacher.pt     the teacher it was distilled from (named in the student's training config; else
                 RUN/teacher/teacher.pt), with the same refiner
  teacher_calibrated.pt  RUN/calibrate/teacher.pt, when the run has the calibration stage and the
                 student was not distilled from it
  manifest.json  {"default": "student.pt", "files": {name: {sha256, content_hash, bytes, ...}},
                 "training": what made them (steps, seconds, hardware, command)}

With --student-only the student must have been distilled from DEST's teacher.pt, byte for byte (the
sha256 its export records, or else the file its config names); the other files stay as they are.

A file over the size budget (25 MB for everything) is refused. Checkpoints named in the previous
manifest of DEST that this shipping does not write are deleted, so the folder holds exactly what the
new manifest lists.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

BUDGET_BYTES = 25 * 1000 * 1000
DESCRIPTION = ("Small (ModelConfig.tiny) LiDiff teacher, refiner and a student distilled from the teacher "
               "(its objective: files.student.pt.trained_by), trained on synthetic SemanticKITTI-layout "
               "street scenes by scripts/release/train_default.sh (training.command; a student shipped "
               "on its own: training.stages.distill.command)")


def _last_status(log: Path) -> dict:
    """The trainer's final JSON status line (step, seconds, mean_step_s) from RUN/<stage>.log."""
    if not log.exists():
        return {}
    for line in reversed(log.read_text(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("{") and '"status"' in line:
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return {}


def _stage_info(out: Path, log: Path) -> dict:
    """Steps and wall-clock seconds of a stage (its output folder OUT and log file LOG), summed over
    its metrics.jsonl (a resumed run logs the time since it started, so the largest time per
    contiguous segment is added up)."""
    info = {}
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        steps, seconds, last_t = 0, 0.0, 0.0
        for line in metrics.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "step" not in r or "time" not in r:
                continue
            if r["time"] < last_t:       # a new segment (resume) began
                seconds += last_t
            last_t = float(r["time"])
            steps = max(steps, int(r["step"]))
        info.update(steps=steps, seconds=round(seconds + last_t, 1))
    status = _last_status(log)
    if status.get("step") is not None:
        info["steps"] = int(status["step"])
    return info


def _best(path: Path) -> Path:
    """A stage export's best-by-validation twin (STAGE/best/NAME) when there is one."""
    best = path.parent / "best" / path.name
    return best if best.is_file() else path


def _stage_dir(export: Path) -> Path:
    return export.parent.parent if export.parent.name == "best" else export.parent


def _validation(export: Path) -> dict | None:
    """best/validation.json beside a best export (the step and metrics it was chosen by)."""
    path = export.parent / "validation.json"
    if export.parent.name != "best" or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def _student_teacher(meta: dict):
    """The teacher checkpoint named in a distillation export's training config, or None."""
    import yaml
    try:
        cfg = yaml.safe_load(meta.get("training_config") or "") or {}
    except yaml.YAMLError:
        return None
    path = (cfg.get("distill") or {}).get("teacher")
    return Path(path) if path else None


def _ship_file(name: str, src: Path, dest: Path, refiner_src: Path | None, guidance: float | None,
               loaded=None):
    """Write DEST/NAME, a float16 copy of checkpoint SRC (with REFINER_SRC's refiner when given, and
    GUIDANCE as its sampling guidance when given; LOADED: SRC already loaded, without another
    refiner) -> its manifest entry, or None after an error."""
    from lidar_completion.checkpoints import load_checkpoint, save_checkpoint
    from lidar_completion.fileutil import sha256_file

    ld = loaded if loaded is not None else load_checkpoint(src, refiner_path=refiner_src)
    if ld.refiner is None:
        print(f"error: {src} has no refiner", file=sys.stderr)
        return None
    meta = dict(ld.meta, shipped_from=str(src), source_sha256=sha256_file(src))
    # our networks are trained on the local process x_t = x_0 + sigma_t eps: sample with the
    # matching solver (exports made before the solver had the option do not say so)
    ld.sampling.setdefault("process", "local")
    override = None
    if guidance is not None:
        override = {"guidance": {"export": ld.sampling.get("guidance"), "shipped": guidance}}
        ld.sampling["guidance"] = float(guidance)
        meta["sampling_override"] = override
    digest = save_checkpoint(dest / name, {"encoder": ld.encoder, "denoiser": ld.denoiser,
                                           "refiner": ld.refiner}, ld.config, sampling=ld.sampling,
                             kind=ld.kind, meta=meta, half=True)
    entry = {"sha256": sha256_file(dest / name), "content_hash": digest,
             "bytes": (dest / name).stat().st_size, "kind": ld.kind,
             "sampling": ld.sampling, "trained_by": ld.meta.get("trained_by"),
             "training_step": ld.meta.get("step")}
    if override:
        entry["sampling_override"] = override
    validation = _validation(src)
    if validation:
        entry["validation"] = validation
    return entry


def _ship_student_only(src: Path, dest: Path, guidance: float | None, command: str | None) -> int:
    """--student-only: replace DEST/student.pt by export SRC, distilled from DEST/teacher.pt."""
    from lidar_completion.checkpoints import CheckpointError, load_checkpoint
    from lidar_completion.fileutil import sha256_file

    try:
        manifest = json.loads((dest / "manifest.json").read_text())
        teacher_sha = manifest["files"]["teacher.pt"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"error: {dest / 'manifest.json'} names no shipped teacher.pt ({exc}); ship a whole run "
              "(RUN_DIR) first", file=sys.stderr)
        return 2
    if not src.is_file():
        print(f"error: {src} is missing", file=sys.stderr)
        return 2
    try:
        ld = load_checkpoint(src)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # the teacher the student was distilled from: the sha256 its export recorded, else the file its
    # config names as it is now
    recorded = ld.meta.get("teacher_sha256")
    if recorded is None:
        named = _student_teacher(ld.meta)
        recorded = sha256_file(named) if named is not None and named.is_file() else None
    if recorded != teacher_sha:
        print(f"error: {src} was not distilled from the shipped teacher ({dest / 'teacher.pt'}, sha256 "
              f"{teacher_sha[:16]}...; the student's teacher: {recorded[:16] + '...' if recorded else 'unknown'}); "
              "ship its whole run instead", file=sys.stderr)
        return 2
    old = dest / "student.pt"
    backup = old.read_bytes() if old.is_file() else None
    entry = _ship_file("student.pt", src, dest, None, guidance, loaded=ld)
    if entry is None:
        return 2
    files = dict(manifest.get("files") or {}, **{"student.pt": entry})
    total = sum(f["bytes"] for f in files.values())
    if total > BUDGET_BYTES:
        if backup is not None:                # keep the shipped student
            old.write_bytes(backup)
        else:
            old.unlink()
        print(f"error: {total / 1e6:.1f} MB exceeds the {BUDGET_BYTES / 1e6:.0f} MB budget", file=sys.stderr)
        return 2
    training = dict(manifest.get("training") or {})
    stages = dict(training.get("stages") or {})
    folder = _stage_dir(src)
    stages["distill"] = dict(_stage_info(folder, folder.with_suffix(".log")), export=str(src))
    if command:
        stages["distill"]["command"] = command
    training["stages"] = stages
    manifest.update(default="student.pt", description=DESCRIPTION, files=files, training=training)
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{old}: {entry['bytes'] / 1e6:.2f} MB sha256 {entry['sha256'][:16]}...")
    print(f"{dest / 'manifest.json'}: default = student.pt ({total / 1e6:.2f} MB in all)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", help="RUN_DIR of scripts/release/train_default.sh")
    ap.add_argument("--dest", default=None, help="weights folder (default: the package's)")
    ap.add_argument("--command", default=None, help="the training command to record in the manifest")
    ap.add_argument("--student", default=None,
                    help="the distillation export to ship as the student (default RUN/distill/distill.pt); "
                         "its stage figures come from its folder and the log beside it (FOLDER.log)")
    ap.add_argument("--student-guidance", type=float, default=None, metavar="W",
                    help="the classifier-free guidance weight the shipped student samples with (default: "
                         "the export's, 3.5); the manifest records the export's value beside it")
    ap.add_argument("--student-only", metavar="EXPORT", default=None,
                    help="replace only DEST's student.pt by this distillation export, which must have been "
                         "distilled from DEST's teacher.pt; the other shipped files and their manifest "
                         "entries stay (no RUN_DIR needed)")
    ap.add_argument("--teacher-only", action="store_true",
                    help="ship the teacher alone (while the student is still training); the manifest "
                         "then names no default")
    args = ap.parse_args(argv)

    from lidar_completion.checkpoints import WEIGHTS_DIR, load_checkpoint
    from lidar_completion.errors import ConfigError
    from lidar_completion.settings import BY_NAME

    GUIDANCE = BY_NAME["guidance"]

    dest = Path(args.dest) if args.dest else WEIGHTS_DIR
    if args.student_only:
        if args.run or args.student or args.teacher_only:
            print("error: --student-only takes no RUN_DIR, --student or --teacher-only", file=sys.stderr)
            return 2
        try:
            GUIDANCE.check(args.student_guidance)
        except ConfigError as exc:
            print(f"error: --student-guidance: {exc}", file=sys.stderr)
            return 2
        return _ship_student_only(Path(args.student_only), dest, args.student_guidance, args.command)
    if not args.run:
        print("error: give RUN_DIR (or --student-only EXPORT)", file=sys.stderr)
        return 2
    run = Path(args.run)
    calibrated = _best(run / "calibrate" / "teacher.pt")
    student_src = Path(args.student) if args.student else _best(run / "distill" / "distill.pt")
    try:   # the same range as --guidance and the node's guidance parameter
        GUIDANCE.check(args.student_guidance)
    except ConfigError as exc:
        print(f"error: --student-guidance: {exc}", file=sys.stderr)
        return 2
    teacher_src = _best(run / "teacher" / "teacher.pt")
    if student_src.exists() and not args.teacher_only:
        named = _student_teacher(load_checkpoint(student_src).meta)
        if named is not None:
            teacher_src = named
    sources = {"student.pt": student_src, "teacher.pt": teacher_src}
    if calibrated.exists() and calibrated.resolve() != teacher_src.resolve():
        sources["teacher_calibrated.pt"] = calibrated
    refiner_src = _best(run / "refiner" / "refiner.pt")
    if args.teacher_only:
        sources.pop("student.pt")
    for p in list(sources.values()) + [refiner_src]:
        if not p.exists():
            print(f"error: {p} is missing; run scripts/release/train_default.sh {run} first", file=sys.stderr)
            return 2
    dest.mkdir(parents=True, exist_ok=True)
    try:
        previous = set(json.loads((dest / "manifest.json").read_text()).get("files", {}))
    except (OSError, ValueError, AttributeError):
        previous = set()
    files = {}
    for name, src in sources.items():
        entry = _ship_file(name, src, dest, refiner_src if name.startswith("teacher") else None,
                           args.student_guidance if name == "student.pt" else None)
        if entry is None:
            return 2
        files[name] = entry
    total = sum(f["bytes"] for f in files.values())
    if total > BUDGET_BYTES:
        for name in files:
            (dest / name).unlink()
        print(f"error: {total / 1e6:.1f} MB exceeds the {BUDGET_BYTES / 1e6:.0f} MB budget", file=sys.stderr)
        return 2
    stages = {s: _stage_info(run / s, run / f"{s}.log") for s in ("teacher", "refiner", "calibrate")
              if s != "calibrate" or calibrated.exists()}
    if "student.pt" in files:
        folder = _stage_dir(student_src)
        stages["distill"] = _stage_info(folder, folder.with_suffix(".log"))
        stages["distill"]["export"] = str(student_src)
        choice = folder.parent / "distill_choice.json"   # train_default.sh DISTILL_SEEDS: RUN/distill links the chosen seed
        if folder.name == "distill" and folder.is_symlink() and choice.is_file():
            try:
                stages["distill"]["chosen_from"] = json.loads(choice.read_text())
            except ValueError:
                print(f"warning: {choice} is unreadable; the manifest does not record the seed choice",
                      file=sys.stderr)
    manifest = {
        "default": "student.pt" if "student.pt" in files else None,
        "description": DESCRIPTION,
        "files": files,
        "training": {"stages": stages,
                     "command": args.command,
                     "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                 "processor": platform.processor() or platform.machine()}},
    }
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for stale in sorted(previous - set(files)):
        if Path(stale).name == stale and stale.endswith(".pt") and (dest / stale).is_file():
            (dest / stale).unlink()
            print(f"{dest / stale}: removed (shipped before, not by this run)")
    for name, f in files.items():
        print(f"{dest / name}: {f['bytes'] / 1e6:.2f} MB sha256 {f['sha256'][:16]}...")
    print(f"{dest / 'manifest.json'}: default = {manifest['default']} ({total / 1e6:.2f} MB in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
