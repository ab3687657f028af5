"""Time per training step: ``python -m training.bench [--sizes tiny full] [--kinds teacher refiner
distill] [--backends torch triton] [--precisions fp32 bf16] [--steps 3] [--device cuda]``.

Each measurement builds the trainer of a shipped config (``tiny_*.yaml`` for ``tiny``, the
published ``teacher.yaml`` / ``refiner.yaml`` / ``distill_dpo.yaml`` for ``full``) on synthetic
scenes in the SemanticKITTI layout (generated once into ``--data``), runs one warm-up step and then
``--steps`` timed steps, and prints one line per (size, kind, backend, precision) - wall seconds and
CPU seconds of the process per step (on a shared machine other jobs inflate the wall time, much less
the CPU time), samples per second, peak GPU memory, and what comes before each step: the host's data
loading (``data.num_workers=0``) with the loop's bookkeeping, and ``prepare_batch`` (farthest-point
sampling on the device where ``data.sample_on`` puts it there) - then, from the measured steps, how long the
published recipe would take (96k teacher steps, 239k refiner steps, 96k distillation steps at the
published per-GPU batch, on 1 and on 8 such GPUs, data-parallel at the measured per-step time), a
JSON summary, and last ``triton_vs_torch_train=<torch s / triton s per published-width teacher
step, bf16> teacher_published_bf16_s=<triton s per step>`` (``nan`` where a side did not run).
Point counts are those of the configs (full: 18,000 x 10 = 180,000 points per sample) unless
``--points`` says otherwise. ``--profile`` adds, per row, the torch profiler's view of one more step
(named regions, the top operators and kernels, kernel launches) and, on CUDA, the host-device
synchronisations of another; ``--trace DIR`` writes that step's Chrome trace.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
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


def _training_regions() -> list:
    from .engine import Trainer
    return [(Trainer, "backward", "train.backward"), (Trainer, "clip_and_step", "train.optimizer"),
            (Trainer, "guard", "train.guard")]


def measure(size: str, kind: str, data_root: Path, steps: int, device: str, threads: int, batch: int | None,
            backend: str = "torch", points: int | None = None, precision: str = "fp32",
            profile: bool = False, top: int = 25, trace: Path | None = None):
    """One row: the trainer of ``(size, kind)`` run for a warm-up step and ``steps`` timed steps
    (then, with ``profile``, one step under the torch profiler and on CUDA one under torch's sync
    debug mode; neither is in the timings)."""
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
        over += ["distill.teacher=random", "distill.refiner=null", "distill.aux_warmup_steps=0"]
    cfg = load_config(CONFIGS / f"{NAMES[(size, kind)]}.yaml", kind=kind, overrides=over)
    out = Path(tempfile.mkdtemp(prefix=f"bench_{size}_{kind}_"))
    cuda = device.startswith("cuda")
    extra = (1 + int(cuda)) if profile else 0      # the profiled step, the sync-counted step
    state = {"call": 0, "end": None, "stack": None, "open": None, "prof": None, "syncs": None, "names": set()}
    try:
        tr = trainer_class(kind)(cfg, out, max_steps=steps + 1 + extra)
        times, cpu, loads, prepares = [], [], [], []
        step_fn, prepare_fn = tr.train_step, tr.prepare_batch

        def sync():
            if cuda:
                torch.cuda.synchronize()

        def timed_prepare(batch_):
            # everything between the end of the last step and here is the loader's (num_workers=0)
            t0 = time.perf_counter()
            if state["end"] is not None:
                loads.append(t0 - state["end"])
            i = state["call"]
            sync()
            if i > steps:                   # past the timed steps: profile, then count syncs
                # opened after the benchmark's own synchronisation; it covers prepare_batch and
                # train_step, and is closed at the end of the step (or in measure's finally)
                stack = state["stack"] = contextlib.ExitStack()
                state["open"] = "profile" if i == steps + 1 else "syncs"
                if i == steps + 1:
                    from torch.profiler import ProfilerActivity, profile as torch_profile
                    from lidar_completion.profiling import named_regions
                    state["names"] = stack.enter_context(named_regions(_training_regions()))
                    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                    state["prof"] = stack.enter_context(torch_profile(activities=acts, record_shapes=False))
                else:
                    from lidar_completion.profiling import sync_counter
                    state["syncs"] = stack.enter_context(sync_counter())
                return prepare_fn(batch_)
            t1 = time.perf_counter()
            r = prepare_fn(batch_)
            sync()
            prepares.append(time.perf_counter() - t1)
            return r

        def timed(batch_):
            if state["stack"] is not None:  # the profiled or sync-counted step: no timing
                r = step_fn(batch_)
                if state["open"] == "syncs":
                    state["stack"].close()  # count the step's own synchronisations only
                    sync()
                else:
                    sync()                  # the profiler sees the step's kernels finish
                    state["stack"].close()
                state["stack"] = None
            else:
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                r = step_fn(batch_)
                sync()
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            state["call"] += 1
            state["end"] = time.perf_counter()
            return r

        tr.train_step, tr.prepare_batch = timed, timed_prepare
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        tr.run()
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
        per = sum(times[1:]) / max(1, len(times) - 1)
        per_cpu = sum(cpu[1:]) / max(1, len(cpu) - 1)
        n = len(times)
        # before each timed step: the host's data loading (num_workers=0) and the loop's bookkeeping,
        # then prepare_batch (farthest-point sampling on the device with data.sample_on auto / device)
        load = sum(loads[:n - 1]) / max(1, n - 1)
        prep = sum(prepares[1:n]) / max(1, n - 1)
        bs = int(cfg["train"]["batch_size"])
        row = {"size": size, "kind": kind, "backend": backend, "precision": precision,
               "batch": bs, "steps": n - 1,
               "s_per_step": round(per, 4), "cpu_s_per_step": round(per_cpu, 3),
               "samples_per_s": round(bs / per, 2) if per > 0 else None,
               "data_s_per_step": round(load, 4), "prepare_s_per_step": round(prep, 4),
               "loop_samples_per_s": round(bs / (per + load + prep), 2) if per > 0 else None,
               "first_step_s": round(times[0], 3),
               "points_per_sample": int(cfg["data"]["scan_points"]) * int(cfg["data"]["tile"])
               if kind != "refiner" else int(cfg["refiner"]["input_points"]),
               "peak_gpu_gib": round(peak, 2) if peak is not None else None}
        if state["prof"] is not None:
            from lidar_completion.profiling import summary
            prof = state["prof"]
            got = summary(prof, sorted(state["names"]), "cuda" if cuda else "cpu", top=top)
            row["profile"] = {k: got[k] for k in ("regions", "top", "launches", "syncs", "total_ms")}
            row["profile_text"] = got["text"]
            if trace is not None:
                trace.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
                    prof.export_chrome_trace(tmp.name)
                    with open(tmp.name, "rb") as src, gzip.open(trace, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                row["trace"] = str(trace)
        if state["syncs"] is not None:
            row["host_syncs_per_step"] = state["syncs"]["count"]
            row["sync_sites"] = dict(sorted(state["syncs"]["sites"].items(), key=lambda kv: -kv[1])[:10])
        return row
    finally:
        if state["stack"] is not None:      # a step failed while profiled: profiler and ranges off
            state["stack"].close()
        shutil.rmtree(out, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "full"], choices=["tiny", "full"],
                   help="model widths and point budgets: tiny (a quarter of LiDiff's widths) and full "
                        "(LiDiff's; on a CPU about 2.5 min and 14 GB a step) (default: both)")
    p.add_argument("--kinds", nargs="+", default=["teacher", "refiner", "distill"],
                   choices=["teacher", "refiner", "distill"], help="trainers to time (default: all)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per row, after one untimed (default 3)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or auto: the GPU where there is one (default auto)")
    p.add_argument("--threads", type=int, default=2, help="intra-op CPU threads (default 2)")
    p.add_argument("--points", type=int, default=None,
                   help="points per sample instead of the configs' (full: 180,000; tiny: 40,000)")
    p.add_argument("--backends", nargs="+", default=["torch"], choices=["torch", "triton", "minkowski", "auto"],
                   help="sparse backends to compare (triton on the CPU needs TRITON_INTERPRET=1)")
    p.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"],
                   help="train.precision values to compare")
    p.add_argument("--batch", type=int, default=None, help="override the configs' per-process batch size")
    p.add_argument("--data", default=None, help="synthetic dataset folder (default: a temporary one)")
    p.add_argument("--scans", type=int, default=4, help="synthetic scans generated for the data (default 4)")
    p.add_argument("--profile", action="store_true",
                   help="after the timed steps, profile one more step (named regions: kernel maps, convolutions, "
                        "batch norm, backward, optimiser; the top operators and kernels; kernel launches) and, on "
                        "CUDA, count the host-device synchronisations of another")
    p.add_argument("--top", type=int, default=25, help="rows of the profile's operator table")
    p.add_argument("--trace", default=None,
                   help="with --profile: folder for a gzipped Chrome trace of each row's profiled step")
    a = p.parse_args(argv)
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.trace and not a.profile:
        p.error("--trace needs --profile")
    data = Path(a.data) if a.data else Path(tempfile.mkdtemp(prefix="bench_data_"))
    if not (data / "sequences" / "00" / "poses.txt").exists():
        from lidar_completion.data import generate_dataset
        generate_dataset(data, sequences=["00"], scans=a.scans, seed=0)
    rows = []
    for size in a.sizes:
        for kind in a.kinds:
            for backend in a.backends:
                for precision in a.precisions:
                    trace = (Path(a.trace) / f"train_{size}_{kind}_{backend}_{precision}.json.gz"
                             if a.trace else None)
                    r = measure(size, kind, data, a.steps, a.device, a.threads, a.batch, backend, a.points,
                                precision, profile=a.profile, top=a.top, trace=trace)
                    text = r.pop("profile_text", None)
                    rows.append(r)
                    print(f"{size:5s} {kind:8s} {backend:7s} {precision} batch {r['batch']}  "
                          f"{r['s_per_step']:8.3f} s/step  {r['cpu_s_per_step']:8.3f} CPU-s/step  "
                          f"{r['samples_per_s']} samples/s  "
                          f"(first {r['first_step_s']:.2f} s, {r['points_per_sample']} points/sample"
                          + (f", peak {r['peak_gpu_gib']} GiB" if r["peak_gpu_gib"] is not None else "") + "; "
                          f"before each step: data {r['data_s_per_step']:.3f} s, prepare_batch "
                          f"{r['prepare_s_per_step']:.3f} s; {r['loop_samples_per_s']} samples/s with them)",
                          flush=True)
                    if text is not None:
                        print(f"# profile of one step, prepare_batch and train_step ({size} {kind} {backend} "
                              f"{precision})\n{text}", flush=True)
                        if a.device.startswith("cuda"):
                            print("  (the sync/memcpy calls include the benchmark's one synchronisation that ends "
                                  "the profiled step)", flush=True)
                    if "host_syncs_per_step" in r:
                        print(f"host syncs in one step: {r['host_syncs_per_step']}", flush=True)
                        for msg, k in r["sync_sites"].items():
                            print(f"  {k:4d} x {msg}", flush=True)
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
