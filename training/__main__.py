"""``lidar-completion-train {teacher,refiner,distill,teacher-dpo} --config CONFIG.yaml [--out DIR] [--resume [PATH]]
[--max-steps N] [--set key=value ...]`` (also ``python -m training ...``).

Several processes / GPUs: ``torchrun --nproc_per_node N -m training distill --config ...``.
Exit codes: 0 finished, 1 error (message on stderr), 130/143 interrupted by SIGINT/SIGTERM after
writing a checkpoint (resume with ``--resume``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from lidar_completion.errors import ConfigError, LidarCompletionError

from .config import KINDS, load_config

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def trainer_class(kind: str):
    if kind == "teacher":
        from .teacher import TeacherTrainer
        return TeacherTrainer
    if kind == "refiner":
        from .refiner import RefinerTrainer
        return RefinerTrainer
    if kind == "teacher-dpo":
        from .teacher_dpo import TeacherDPOTrainer
        return TeacherDPOTrainer
    from .distill import DistillTrainer
    return DistillTrainer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lidar-completion-train",
        description="Train the LiDiff teacher, the refiner, or distil a one-step student (Distillation-DPO "
                    "or score distillation). Several GPUs/processes: torchrun --nproc_per_node N -m training ...",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="configs shipped in training/configs/: " + ", ".join(sorted(x.name for x in CONFIG_DIR.glob("*.yaml"))),
    )
    sub = p.add_subparsers(dest="kind", required=True, metavar="{" + ",".join(KINDS) + "}")
    helps = {"teacher": "LiDiff denoiser + condition encoder (denoising loss, condition dropout 0.1)",
             "refiner": "refinement network (x6 points, Chamfer loss)",
             "distill": "one-step student from a teacher: distill.mode dpo (Distillation-DPO) or vsd",
             "teacher-dpo": "Diffusion-DPO fine-tuning of a teacher against a frozen copy of itself "
                            "(pairs of its samples ranked against the ground truth)"}
    for kind in KINDS:
        s = sub.add_parser(kind, help=helps[kind], description=helps[kind])
        s.add_argument("--config", required=True,
                       help="YAML config (a name like tiny_teacher.yaml is looked up in training/configs/)")
        s.add_argument("--out", default=None,
                       help="run folder (default runs/<config name>; with --resume and a run's own "
                            "<run>/config.yaml as --config: that run folder)")
        s.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                       help="continue from the latest checkpoint of --out (or from PATH: a checkpoint file "
                            "or run folder); without a checkpoint there it starts fresh")
        s.add_argument("--max-steps", type=int, default=None,
                       help="run this many optimiser steps in total, in place of train.epochs (fewer "
                            "or more than the epochs give)")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.optimizer.lr=1e-5 (repeatable)")
        s.add_argument("--device", default=None,
                       help="override `device`: auto, cpu, cuda or cuda:N (default: the config's, auto in "
                            "the shipped ones: the GPU when there is one)")
    return p


def resolve_config_path(name: str) -> Path:
    p = Path(name)
    if p.exists() or p.is_absolute() or len(p.parts) > 1:
        return p
    cand = CONFIG_DIR / name
    if cand.exists():
        return cand
    if not name.endswith(".yaml") and (CONFIG_DIR / f"{name}.yaml").exists():
        return CONFIG_DIR / f"{name}.yaml"
    return p


def default_out(config: Path, resume) -> Path:
    """The run folder when --out is not given: runs/<config stem>, except for a --resume whose
    config is the config.yaml a run wrote into its folder (next to its checkpoints/): that run's
    folder, which the resume continues (runs/config/ would be a fresh run)."""
    if resume and config.name == "config.yaml" and (config.parent / "checkpoints").is_dir():
        return config.parent
    return Path("runs") / config.stem


def run(args) -> int:
    path = resolve_config_path(args.config)
    overrides = list(args.set)
    if args.device:
        overrides.append(f"device={args.device}")
    if args.max_steps is not None and args.max_steps < 0:
        raise ConfigError(f"--max-steps must be >= 0 (0: export the starting weights), got {args.max_steps}")
    if not path.exists():
        shipped = ", ".join(sorted(x.stem for x in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"config {args.config} not found (looked for it as a path and in "
                          f"training/configs/); the shipped configs are: {shipped}")
    cfg = load_config(path, kind=args.kind, overrides=overrides)
    out = Path(args.out) if args.out else default_out(path, args.resume)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; the run folder must be a folder (or not exist yet)")
    # before the networks and data are built: the first folder on the way that exists must be one
    # this process can write into
    existing = next(q for q in (out, *out.absolute().parents) if q.exists())
    if not existing.is_dir():
        raise ConfigError(f"--out {out}: {existing} is a file, so the run folder cannot be made there")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {existing} is not writable by this user")
    trainer = trainer_class(args.kind)(cfg, out, resume=args.resume, max_steps=args.max_steps)
    summary = trainer.run()
    if trainer.dist.is_main:
        print(json.dumps({k: summary.get(k) for k in ("kind", "status", "step", "seconds", "mean_step_s",
                                                      "checkpoint", "export")}))
    return 0


def report_error(exc: LidarCompletionError) -> None:
    """``error: <message>`` on stderr; an error that every rank of a multi-rank run raised alike (a
    divergence, whose message names the ranks that saw it) only from rank 0."""
    from . import distributed as D
    if getattr(exc, "same_on_every_rank", False) and D.rank() != 0:
        return
    print(f"error: {exc}", file=sys.stderr)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from . import distributed as D
    from .engine import TrainingAborted, TrainingInterrupted
    try:
        code = run(args)
    except TrainingInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        code = 128 + exc.signum
    except TrainingAborted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        code = 130
    except KeyboardInterrupt:
        # Ctrl-C outside the training steps, where the trainer's handler is not installed (the data,
        # its caches or the networks being prepared, or the run's summary being written after
        # them): one line, not a traceback
        print("interrupted: Ctrl-C outside the training steps; the run's checkpoints, if it wrote "
              "any, are in its checkpoints/ folder (--resume continues from the latest)", file=sys.stderr)
        code = 130
    except LidarCompletionError as exc:
        report_error(exc)
        code = 1
    except OSError as exc:     # a full disk, a folder that vanished: one line, not a traceback
        logging.getLogger(__name__).debug("the run failed", exc_info=True)
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        code = 1
    finally:
        several_ranks = D.active()
        D.shutdown()
    if several_ranks:
        # a rank of a torchrun job: leave without interpreter finalization (see the function)
        D.exit_without_finalizing(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
