"""Ground-truth build time per scan for 100, 200 and 400 synthetic scans (linearity check).

One synthetic sequence of max(--scans) sweeps is generated once; the shorter runs use its first N
scans (same town, same trajectory). Each run builds the map and every frame's target from scratch
into a fresh cache and reports seconds per scan for the map pass, the target pass and in total (wall clock and process CPU time), and the
target pass per output point (the crop cost follows the size of the targets it writes).
The last line is ``growth_ratio=<time per scan at the largest N / at the smallest N>``: near 1 means
the cost grows linearly with the number of scans.

By default the sweeps use 1024 azimuth steps (about 60k points per scan instead of 120k) so that the
benchmark's data generation stays short; pass --azimuth-steps 2048 for full-resolution scans.

    .venv/bin/python benchmarks/gt_build.py [--scans 100 200 400] [--azimuth-steps 1024]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lidar_completion.data import gt, kitti, synthetic


def prefix_dataset(full_root: Path, out_root: Path, n: int) -> None:
    """A dataset whose sequence 00 is the first ``n`` scans of ``full_root``'s (symlinked)."""
    src = full_root / "sequences" / "00"
    dst = out_root / "sequences" / "00"
    (dst / "velodyne").mkdir(parents=True)
    (dst / "labels").mkdir()
    for i in range(n):
        os.symlink(src / "velodyne" / f"{i:06d}.bin", dst / "velodyne" / f"{i:06d}.bin")
        os.symlink(src / "labels" / f"{i:06d}.label", dst / "labels" / f"{i:06d}.label")
    shutil.copy(src / "calib.txt", dst / "calib.txt")
    for name in ("poses.txt", "times.txt"):
        lines = (src / name).read_text().splitlines()[:n]
        (dst / name).write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", type=int, nargs="+", default=[100, 200, 400])
    ap.add_argument("--azimuth-steps", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="keep data here (default: a temporary folder)")
    args = ap.parse_args(argv)
    sizes = sorted(args.scans)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gt_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        full = work / "full"
        cfg = synthetic.SyntheticConfig(azimuth_steps=args.azimuth_steps)
        t0 = time.perf_counter()
        if not (full / "sequences" / "00" / "poses.txt").is_file():
            synthetic.generate_dataset(full, 1, sizes[-1], seed=args.seed, config=cfg)
        gen = time.perf_counter() - t0
        seq_full = kitti.SemanticKittiSequence(full, "00")
        npts = np.mean([seq_full.scan_path(i).stat().st_size / 16 for i in range(len(seq_full))])
        print(f"data: synthetic sequence of {sizes[-1]} scans, {args.azimuth_steps} azimuth steps "
              f"(full HDL-64E resolution is 2048), {npts:.0f} points per scan on average; "
              f"generated in {gen:.1f} s")
        print(f"{'scans':>6} {'map s/scan':>11} {'targets s/scan':>15} {'wall s/scan':>12} "
              f"{'cpu s/scan':>11} {'map points':>11} {'target pts':>11} {'us/target pt':>13}")
        per_scan, wall_per_scan = {}, {}
        for n in sizes:
            root = work / f"n{n}"
            if root.exists():
                shutil.rmtree(root)
            prefix_dataset(full, root, n)
            seq = kitti.SemanticKittiSequence(root, "00", require_labels=True)
            stats = gt.BuildStats("00")
            t0, c0 = time.perf_counter(), time.process_time()
            gt.build_sequence(seq, root / "gt_cache", force=True, stats=stats)
            total, cpu = time.perf_counter() - t0, time.process_time() - c0
            per_scan[n] = cpu / n
            wall_per_scan[n] = total / n
            us_pt = stats.targets_seconds / n / max(stats.target_points_mean, 1) * 1e6
            print(f"{n:>6} {stats.map_seconds / n:>11.4f} {stats.targets_seconds / n:>15.4f} "
                  f"{total / n:>12.4f} {cpu / n:>11.4f} {stats.map_points:>11d} "
                  f"{stats.target_points_mean:>11.0f} {us_pt:>13.3f}")
            sys.stdout.flush()
        print(f"wall-clock growth ratio {wall_per_scan[sizes[-1]] / wall_per_scan[sizes[0]]:.3f} "
              "(sensitive to other load on the machine); growth_ratio below uses process CPU time")
        print(f"growth_ratio={per_scan[sizes[-1]] / per_scan[sizes[0]]:.3f}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
