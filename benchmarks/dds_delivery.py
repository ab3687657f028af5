"""Delivery of large PointCloud2 messages between processes, with and without the shipped Fast DDS profile.

    .venv/bin/python benchmarks/dds_delivery.py            # 50 clouds of 120k points per case
    .venv/bin/python benchmarks/dds_delivery.py --quick    # 20 clouds, fewer cases

Each case starts a listener process and a publisher process (lidar_completion_pkg.probe) on a fresh
ROS_DOMAIN_ID with localhost discovery, and sets FASTDDS_DEFAULT_PROFILES_FILE (the shipped profile)
in the publisher, the listener, both or neither. It prints one row per case (received / sent, median
and p95 latency from the publisher's stamp to receipt) and, last, the key figures on one line.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

from lidar_completion_pkg import dds

PROBE = [sys.executable, "-m", "lidar_completion_pkg.probe"]


#: Clouds per case by default.
COUNT = 50

def run_case(points: int, count: int, rate: float, qos: str, pub_profile: bool, sub_profile: bool,
             timeout: float) -> dict:
    base = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
                ROS_DOMAIN_ID=str(random.SystemRandom().randrange(1, 200)))
    base.pop(dds.PROFILE_ENV, None)
    with_profile = dict(base, **{dds.PROFILE_ENV: dds.profile_path()})
    listener = subprocess.Popen(PROBE + ["listen", "--count", str(count), "--qos", qos,
                                         "--timeout", str(timeout), "--idle", "4"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=with_profile if sub_profile else base)
    try:
        listener.stdout.readline()
        pub = subprocess.run(PROBE + ["publish", "--count", str(count), "--points", str(points),
                                      "--rate", str(rate), "--qos", qos],
                             capture_output=True, text=True, timeout=timeout + 30,
                             env=with_profile if pub_profile else base)
        out, err = listener.communicate(timeout=timeout + 30)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait(5)
    if pub.returncode != 0:
        raise RuntimeError(f"publisher failed: {pub.stderr[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    lat = sorted(result["latency_ms"])
    return {"received": result["received"], "sent": count,
            "median_ms": statistics.median(lat) if lat else float("nan"),
            "p95_ms": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else float("nan")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=None,
                    help=f"clouds per case (default {COUNT}; 20 with --quick)")
    ap.add_argument("--points", type=int, default=120_000, help="points per cloud (xyz float32)")
    ap.add_argument("--rate", type=float, default=10.0, help="publish rate, Hz")
    ap.add_argument("--large-points", type=int, default=1_080_000,
                    help="points of the 'refined completion' case (18k x 10 x 6)")
    ap.add_argument("--quick", action="store_true",
                    help="20 clouds (unless --count is given); skip the one-sided cases")
    args = ap.parse_args(argv)
    count = args.count if args.count is not None else 20 if args.quick else COUNT
    timeout = count / args.rate + 30
    mb = args.points * 12 / 1e6
    cases = [("sensor QoS, no profile", args.points, "sensor", False, False),
             ("sensor QoS, profile in both", args.points, "sensor", True, True)]
    if not args.quick:
        cases += [("sensor QoS, profile in publisher only", args.points, "sensor", True, False),
                  ("sensor QoS, profile in listener only", args.points, "sensor", False, True),
                  ("reliable QoS, no profile", args.points, "reliable", False, False),
                  ("reliable QoS, profile in both", args.points, "reliable", True, True)]
    cases.append((f"sensor QoS, profile in both, {args.large_points} points", args.large_points,
                  "sensor", True, True))
    print(f"Fast DDS profile: {dds.profile_path()} (segment {dds.segment_size_bytes() / 2**20:.0f} MiB); "
          f"{count} clouds per case at {args.rate:g} Hz; {args.points} points = {mb:.2f} MB")
    print(f"{'case':58s} {'received':>9s} {'median ms':>10s} {'p95 ms':>8s}")
    results = {}
    for name, points, qos, pub_p, sub_p in cases:
        t0 = time.monotonic()
        r = run_case(points, count, args.rate, qos, pub_p, sub_p, timeout)
        results[name] = r
        print(f"{name:58s} {r['received']:>4d}/{r['sent']:<4d} {r['median_ms']:10.1f} {r['p95_ms']:8.1f}"
              f"   ({time.monotonic() - t0:.0f} s)", flush=True)
    without = results["sensor QoS, no profile"]
    with_ = results["sensor QoS, profile in both"]
    print(f"delivered_without_profile={without['received']}/{without['sent']} "
          f"delivered_with_profile={with_['received']}/{with_['sent']} "
          f"median_ms_with_profile={with_['median_ms']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
