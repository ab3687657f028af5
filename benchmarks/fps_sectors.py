"""What approximate farthest-point sampling in azimuth sectors (``fps_parts``) does to the samples.

    python benchmarks/fps_sectors.py --data runs/eval/data --sequence 08,09 --every 10
    python benchmarks/fps_sectors.py                       # one synthetic scan (no data needed)

For every scan (filtered as the Completer filters it) and budget (``--samples``, default the
shipped student's 4,000 and the published 18,000), exact sampling (P = 1) against P sectors
(``--parts``), on the CPU path (fpsample per sector; the device kernel samples the same sectors):

* ``cover``: mean distance from a scan point to its nearest sample (how well the samples stand
  for the scan); ``cover_max``: the largest such distance (what farthest-point sampling minimises);
* ``crowded``: the share of samples whose nearest other sample is closer than half the median
  spacing of exact sampling - the samples doubled up along the sectors' seams, where each sector's
  sampling starts from its own extremes;
* ``steps``: sequential steps of the device kernel (the largest sector's share): what the
  sectors save on a GPU, where every step is one exchange between the programs of a cloud.

Means over the scans. What the sectors do to completions is measured end to end with
``lidar-completion evaluate --fps-parts P`` (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree

from lidar_completion.preprocess import farthest_point_sample, filter_scan, sector_split


def scans(args) -> list:
    if args.data is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from backends import synthetic_scan
        return [("synthetic", filter_scan(synthetic_scan(120_000)))]
    from lidar_completion.data.kitti import read_scan
    out = []
    for seq in args.sequence.split(","):
        files = sorted(Path(args.data, "sequences", seq, "velodyne").glob("*.bin"))[:: args.every]
        if not files:
            raise SystemExit(f"no scans in {Path(args.data, 'sequences', seq, 'velodyne')}")
        out += [(f"{seq}/{f.stem}", filter_scan(read_scan(f)[:, :3])) for f in files]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="a SemanticKITTI-layout folder (default: one synthetic scan)")
    p.add_argument("--sequence", default="08", help="sequences, comma-separated (default 08)")
    p.add_argument("--every", type=int, default=10, help="every K-th scan (default 10)")
    p.add_argument("--samples", type=int, nargs="+", default=[4000, 18000], help="budgets (default 4000 18000)")
    p.add_argument("--parts", type=int, nargs="+", default=[1, 8, 16, 32, 64], help="sector counts (default 1 8 16 32 64)")
    args = p.parse_args(argv)
    parts = sorted(set(args.parts) | {1})   # exact sampling is the reference of every row
    clouds = scans(args)
    print(f"{len(clouds)} scans, {np.mean([len(c) for _, c in clouds]):.0f} points each after the filters")
    print("| samples | parts | cover [m] | cover_max [m] | crowded [%] | steps | CPU time [ms] |")
    print("|---|---|---|---|---|---|---|")
    for k in args.samples:
        stats = {P: [] for P in parts}
        for _, pts in clouds:
            exact_spacing = None
            for P in parts:
                t = time.perf_counter()
                idx = farthest_point_sample(pts, k, P)
                dt = time.perf_counter() - t
                s = pts[idx]
                d = cKDTree(s).query(pts)[0]
                nn = cKDTree(s).query(s, k=2)[0][:, 1]
                if exact_spacing is None:   # P = 1 comes first
                    exact_spacing = float(np.median(nn))
                steps = k if P == 1 else max(sector_split(torch.from_numpy(pts), k, P)[2])
                stats[P].append((d.mean(), d.max(), (nn < 0.5 * exact_spacing).mean() * 100, steps, dt * 1000))
        for P in parts:
            m = np.mean(stats[P], axis=0)
            print(f"| {k} | {P} | {m[0]:.4f} | {m[1]:.3f} | {m[2]:.1f} | {m[3]:.0f} | {m[4]:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
