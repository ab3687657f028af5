"""Time per training step: ``python -m training.bench [--sizes tiny full] [--kinds teacher refiner
distill] [--backends torch triton] [--precisions fp32 bf16] [--steps 3] [--device cuda]``.

Each measurement builds the trainer of a shipped config (``tiny_*.yaml`` for ``tiny``, the
published ``teacher.yaml`` / ``refiner.yaml`` / ``distill_dpo.yaml`` for ``full``) on synthetic
scenes in the SemanticKITTI layout (generated once into ``--data``), runs one warm-up step and then
``--steps`` timed steps, and prints one line per (size, kind, backend, precision) - wall seconds and
CPU seconds of the process per step (on a shared machine other jobs inflate the wall time, much less
the CPU time), samples per second, peak GPU memory - then, from the measured steps, how long the
published recipe would take (96k teacher steps, 239k refiner steps, 96k distillation steps at the
published per-GPU batch, on 1 and on 8 such GPUs, data-parallel at the measured per-step time), a
JSON summary, and last ``triton_vs_torch_train=<torch s / triton s per published-width teacher
step, bf16> teacher_published_bf16_s=<triton s per step>`` (``nan`` where a side did not run).
Point counts are those of the configs (full: 18,000 x 10 = 180,000 points per sample) unless
``--points`` says otherwise.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .config import load_config

CONFIGS = Path(__file__).resolve().parent / "configs"
NAMES = {("tiny", "teacher"): "tiny_teacher", ("tiny", "refiner"): "tiny_refiner",
         ("tiny", "distill"): "tiny_distill_dpo", ("full", "teacher"): "teacher",
         ("full", "refiner"): "refiner", ("full", "distill"): "distill_dpo"}


# the published recipe (docs/method.md): optimiser steps of each stage at its per-GPU batch
RECIPE_STEPS = {"teacher": 96_000, "refiner": 239_000, "distill": 96_000}


def measure(size: str, kind: str, data_root: Path, steps: int, device: str, threads: int, batch: int | None,
            backend: str = "torch", points: int | None = None, precision: str = "fp32"):
    from .__main__ import trainer_class
    over = [f"device={device}", f"backend={backend}", f"threads={threads}", f"train.precision={precision}",
            "data.kind=synthetic", f"data.root={data_root}",
            "data.sequences=['00']", "data.num_workers=0", "log.tensorboard=false", "log.progress=false",
            "log.render_every_steps=0", "checkpoint.every_steps=0", "checkpoint.export=false",
            "train.max_steps=null", "data.build_gt=true"]
    if batch:
        over.append(f"train.batch_size={batch}")
    if points:  # points per sample: scan_points x tile = target = refiner input; refiner target 2x
        over += [f"data.scan_points={points // 10}", "data.tile=10", f"data.target_points={points}"]
        if kind == "refiner":
            over += [f"refiner.input_points={points}", f"refiner.target_points={2 * points}"]
    if kind == "distill":
        over += ["distill.teacher=null", "distill.refiner=null", "distill.aux_warmup_steps=0"]
    cfg = load_config(CONFIGS / f"{NAMES[(size, kind)]}.yaml", kind=kind, overrides=over)
    out = Path(tempfile.mkdtemp(prefix=f"bench_{size}_{kind}_"))
    try:
        tr = trainer_class(kind)(cfg, out, max_steps=steps + 1)
        times, cpu = [], []
        orig = tr.train_step

        def timed(batch_):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            r = orig(batch_)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            return r

        tr.train_step = timed
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        tr.run()
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith("cuda") else None
        per = sum(times[1:]) / max(1, len(times) - 1)
        per_cpu = sum(cpu[1:]) / max(1, len(cpu) - 1)
        return {"size": size, "kind": kind, "backend": backend, "precision": precision,
                "batch": int(cfg["train"]["batch_size"]), "steps": len(times) - 1,
                "s_per_step": round(per, 4), "cpu_s_per_step": round(per_cpu, 3),
                "samples_per_s": round(int(cfg["train"]["batch_size"]) / per, 2) if per > 0 else None,
                "first_step_s": round(times[0], 3),
                "points_per_sample": int(cfg["data"]["scan_points"]) * int(cfg["data"]["tile"])
                if kind != "refiner" else int(cfg["refiner"]["input_points"]),
                "peak_gpu_gib": round(peak, 2) if peak is not None else None}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "full"], choices=["tiny", "full"])
    p.add_argument("--kinds", nargs="+", default=["teacher", "refiner", "distill"],
                   choices=["teacher", "refiner", "distill"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--points", type=int, default=None,
                   help="points per sample instead of the configs' (full: 180,000; tiny: 40,000)")
    p.add_argument("--backends", nargs="+", default=["torch"], choices=["torch", "triton", "minkowski", "auto"],
                   help="sparse backends to compare (triton on the CPU needs TRITON_INTERPRET=1)")
    p.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"],
                   help="train.precision values to compare")
    p.add_argument("--batch", type=int, default=None, help="override the configs' per-process batch size")
    p.add_argument("--data", default=None, help="synthetic dataset folder (default: a temporary one)")
    p.add_argument("--scans", type=int, default=4)
    a = p.parse_args(argv)
    data = Path(a.data) if a.data else Path(tempfile.mkdtemp(prefix="bench_data_"))
    if not (data / "sequences" / "00" / "poses.txt").exists():
        from lidar_completion.data import generate_dataset
        generate_dataset(data, sequences=["00"], scans=a.scans, seed=0)
    rows = []
    for size in a.sizes:
        for kind in a.kinds:
            for backend in a.backends:
                for precision in a.precisions:
                    r = measure(size, kind, data, a.steps, a.device, a.threads, a.batch, backend, a.points,
                                precision)
                    rows.append(r)
                    print(f"{size:5s} {kind:8s} {backend:7s} {precision} batch {r['batch']}  "
                          f"{r['s_per_step']:8.3f} s/step  {r['cpu_s_per_step']:8.3f} CPU-s/step  "
                          f"{r['samples_per_s']} samples/s  "
                          f"(first {r['first_step_s']:.2f} s, {r['points_per_sample']} points/sample"
                          + (f", peak {r['peak_gpu_gib']} GiB" if r["peak_gpu_gib"] is not None else "") + ")",
                          flush=True)
    for r in rows:
        if r["size"] == "full" and r["kind"] in RECIPE_STEPS:
            hours = RECIPE_STEPS[r["kind"]] * r["s_per_step"] / 3600
            print(f"recipe {r['kind']:8s} {r['backend']:7s} {r['precision']}: {RECIPE_STEPS[r['kind']]} steps "
                  f"= {hours:.1f} h on 1 device, {hours / 8:.1f} h on 8 (data-parallel: the same samples in an eighth of the steps; communication not counted)")
    print(json.dumps({"device": a.device, "points": a.points, "threads": a.threads, "torch": torch.__version__,
                      "results": rows}))

    def step_s(backend):
        hit = [r["s_per_step"] for r in rows if r["size"] == "full" and r["kind"] == "teacher"
               and r["backend"] == backend and r["precision"] == "bf16"]
        return hit[0] if hit else float("nan")
    print(f"triton_vs_torch_train={step_s('torch') / step_s('triton'):.3f} "
          f"teacher_published_bf16_s={step_s('triton'):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
