"""How many exchanges exact farthest-point sampling needs when the programs that share a cloud
trade K candidates each instead of one (the device kernel ``fps_rounds_kernel``), counted on the CPU.

On a GPU the device sampler splits a cloud over every SM; each exchange of keys through global
memory costs a few microseconds whatever it carries, so the one-sample-per-exchange kernel spends
18,000 of them on the published budget. This script runs a NumPy model of the K-candidate kernel's
rounds (the same keys, bound and loop as the kernel) on a scan and prints, per K, the exchanges
and the samples each takes on average; ``--check`` also compares the samples with the textbook
loop's (float32, no fused multiply-adds, ties to the smallest index), which the kernel must equal.
The time of an exchange and of a sample are GPU figures: ``benchmarks/backends.py --device cuda
--fps-only`` measures them.

    python benchmarks/fps_rounds.py                      # a synthetic 120,000-point scan, 18,000 and 4,000 samples
    python benchmarks/fps_rounds.py --samples 2000 --points 20000 --check
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

MASK24 = 0xFFFFFF


def _sq(points: np.ndarray, q: np.ndarray) -> np.ndarray:
    # the kernels' float32 expression, left to right, each product rounded (no fused multiply-add)
    dx = points[:, 0] - q[0]
    dy = points[:, 1] - q[1]
    dz = points[:, 2] - q[2]
    return dx * dx + dy * dy + dz * dz


def _keys(dist: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The kernel's 56-bit keys: float bits of the distance above the complement of the index, so
    that the largest key is the farthest point with ties to the smallest index (0 for no point)."""
    bits = dist.astype(np.float32).view(np.int32).astype(np.int64)
    return np.where(dist >= 0, (bits << 24) | (MASK24 - index.astype(np.int64)), 0)


def textbook(points: np.ndarray, n_samples: int) -> np.ndarray:
    """The textbook loop from point 0 in float32: each sample the point farthest from those before
    it (ties to the smallest index)."""
    p = np.ascontiguousarray(points, dtype=np.float32)
    dist = np.full(len(p), np.inf, dtype=np.float32)
    out = np.zeros(n_samples, dtype=np.int64)
    for s in range(1, n_samples):
        dist = np.minimum(dist, _sq(p, p[out[s - 1]]))
        out[s] = int(np.argmax(dist))
    return out


def rounds_model(points: np.ndarray, n_samples: int, programs: int, candidates: int):
    """The K-candidate kernel's samples and rounds: the cloud dealt out to ``programs`` programs
    (program j holds points j, j + programs, j + 2 programs, ...); per round each chunk offers its ``candidates`` largest keys and the bound
    is the largest of the chunks' next keys; the textbook loop then runs on the offered points while
    its largest key exceeds the bound. Returns (indices, samples taken per round)."""
    p = np.ascontiguousarray(points, dtype=np.float32)
    n = len(p)
    if not 1 <= n_samples <= n or n >= MASK24:
        raise ValueError(f"need 1 <= samples <= points < 2**24, got {n_samples} of {n}")
    chunk = -(-n // programs)
    width = chunk * programs
    index = np.arange(width)
    dist = np.full(width, -1.0, dtype=np.float32)
    dist[:n] = _sq(p, p[0])
    out = [0]
    per_round = []
    k = candidates
    while len(out) < n_samples:
        keys = _keys(dist, index).reshape(chunk, programs).T     # row j: program j's points
        if chunk > k:
            top = -np.sort(-np.partition(keys, chunk - k - 1, axis=1)[:, chunk - k - 1:], axis=1)
            bound = int(top[:, k].max())
            offered = top[:, :k].ravel()
        else:
            bound, offered = 0, keys.ravel()
        live = offered[offered > bound]
        ci = MASK24 - (live & MASK24)
        cd = (live >> 24).astype(np.int32).view(np.float32).copy()
        ck = live.copy()
        taken = 0
        while len(out) < n_samples and len(ck) and ck.max() > bound:
            at = int(MASK24 - (ck.max() & MASK24))
            out.append(at)
            taken += 1
            dist[:n] = np.minimum(dist[:n], _sq(p, p[at]))
            cd = np.minimum(cd, _sq(p[ci], p[at]))
            ck = (cd.view(np.int32).astype(np.int64) << 24) | (ck & MASK24)
        if not taken:
            raise AssertionError("a round took no sample")
        per_round.append(taken)
    return np.asarray(out, dtype=np.int64), per_round


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scan", help="a KITTI .bin scan (default: the synthetic scan of benchmarks/backends.py)")
    ap.add_argument("--points", type=int, default=120_000, help="points of the synthetic scan (default 120,000)")
    ap.add_argument("--samples", type=int, nargs="+", default=[18_000, 4_000],
                    help="sample budgets (default: the published 18,000 and the shipped student's 4,000)")
    ap.add_argument("--programs", type=int, default=132, help="programs sharing the cloud (default 132: an H100/H200's SMs)")
    ap.add_argument("--candidates", type=int, nargs="+", choices=(1, 2, 4, 8), default=[1, 2, 4, 8],
                    help="K values, as the kernel takes them (default 1 2 4 8)")
    ap.add_argument("--order", choices=("given", "azimuth"), default="given",
                    help="the points' order: as given (the synthetic scan's is random) or sorted by azimuth, "
                         "as a spinning sensor delivers them")
    ap.add_argument("--check", action="store_true", help="also compare with the textbook loop (slow on large budgets)")
    args = ap.parse_args(argv)
    if args.scan:
        pts = np.fromfile(args.scan, dtype=np.float32).reshape(-1, 4)[:, :3]
    else:
        from backends import synthetic_scan
        pts = synthetic_scan(args.points)
    if args.order == "azimuth":
        pts = pts[np.argsort(np.arctan2(pts[:, 1], pts[:, 0]), kind="stable")]
    bad = 0
    for s in args.samples:
        ref = textbook(pts, s) if args.check else None
        for k in args.candidates:
            idx, per = rounds_model(pts, s, args.programs, k)
            same = "" if ref is None else f" same_as_textbook={bool(np.array_equal(idx, ref))}"
            bad += ref is not None and not np.array_equal(idx, ref)
            print(f"points={len(pts)} samples={s} programs={args.programs} candidates={k} order={args.order}: "
                  f"exchanges={len(per)} (one sample each: {s - 1}) samples_per_exchange={np.mean(per):.1f}{same}",
                  flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
