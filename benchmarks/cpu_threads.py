"""Which thread a CPU completion runs in, and which thread set the model up: the process's main
thread for everything (the CLI, the API in a script) against the ROS 2 node's arrangement, a
``completion-worker`` thread completing scans, with the checkpoint loaded and the warm-up scan
completed either in the main thread (the node before run_apart) or in passing threads of their own
(``lidar_completion_pkg.pipeline.run_apart``, the node now).

Every configuration runs in a fresh process (``--one``), so that no OpenMP pool of an earlier one
is alive; rounds alternate the configurations so that a machine that gets busier shows in every
row. Each process loads the shipped student (or ``--checkpoint``) on the torch backend (or
``--backend``), completes one warm-up scan and then ``--repeats`` timed ones of a synthetic
120,000-point scan.

    python benchmarks/cpu_threads.py --n-fps 1000 --rounds 3

Last line: ``apart_vs_main_setup=<worker seconds with the setup apart / with the setup in the main
thread>``.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: configuration -> (where the model is loaded and warmed up, where the timed completions run)
CONFIGS = {
    "main": ("main", "main"),
    "worker, setup in main": ("main", "worker"),
    "worker, setup apart": ("apart", "worker"),
}


def one(config: str, threads: int, n_fps: int, repeats: int, checkpoint, backend: str) -> list[float]:
    import torch

    from backends import synthetic_scan
    from lidar_completion.completer import Completer
    from lidar_completion.settings import CompletionSettings
    from lidar_completion_pkg.pipeline import run_apart   # what the node calls (no rclpy import)

    setup, where = CONFIGS[config]
    torch.set_num_threads(threads)
    scan = synthetic_scan(120_000)

    def load():
        return Completer.from_settings(CompletionSettings(backend=backend, n_fps=n_fps, seed=0,
                                                          checkpoint=checkpoint))

    comp = load() if setup == "main" else run_apart(load)
    if setup == "main":
        comp.complete(scan)
    else:
        run_apart(comp.complete, scan)

    def timed():
        out = []
        for _ in range(repeats):
            t = time.perf_counter()
            comp.complete(scan)
            out.append(time.perf_counter() - t)
        return out

    return timed() if where == "main" else run_apart(timed)   # a second thread, as the worker


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads [2]")
    p.add_argument("--n-fps", type=int, default=1000, help="point budget per scan [1000, as make demo]")
    p.add_argument("--repeats", type=int, default=3, help="timed completions per process [3]")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds over the configurations [3]")
    p.add_argument("--checkpoint", default=None, help="checkpoint [the shipped student]")
    p.add_argument("--backend", default="torch", help="sparse backend [torch]")
    p.add_argument("--one", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        times = one(args.one, args.threads, args.n_fps, args.repeats, args.checkpoint, args.backend)
        print(" ".join(f"{t:.4f}" for t in times))
        return 0

    medians: dict = {c: [] for c in CONFIGS}
    for r in range(args.rounds):
        for config in CONFIGS:
            cmd = [sys.executable, __file__, "--one", config, "--threads", str(args.threads),
                   "--n-fps", str(args.n_fps), "--repeats", str(args.repeats), "--backend", args.backend]
            if args.checkpoint:
                cmd += ["--checkpoint", args.checkpoint]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"{config}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
                return 1
            times = [float(x) for x in res.stdout.split()[-args.repeats:]]
            medians[config].append(statistics.median(times))
            print(f"round {r + 1}, {config}: median {medians[config][-1]:.2f} s "
                  f"({', '.join(f'{t:.2f}' for t in times)})", flush=True)
    print(f"\n| configuration | s per scan, median of each round ({args.threads} threads, "
          f"{args.n_fps} x 10 points) |")
    print("|---|---|")
    for config, ms in medians.items():
        print(f"| {config} | {' / '.join(f'{m:.2f}' for m in ms)} |")
    ratios = [a / b for a, b in zip(medians["worker, setup apart"], medians["worker, setup in main"])]
    print(f"apart_vs_main_setup={statistics.mean(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
