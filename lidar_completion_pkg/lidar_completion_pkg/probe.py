"""Small DDS tools for checks, tests and benchmarks: publish synthetic clouds, or count received ones.

    python -m lidar_completion_pkg.probe publish --count 20 --points 120000 --rate 10
    python -m lidar_completion_pkg.probe listen --topic /completed_points --count 20 --timeout 30

``listen`` prints a ready line ({"ready": true, "matched": n}; with --wait-publishers only once its
publishers are matched, or that many seconds have passed), then one JSON line ({"received": n,
"latency_ms": [...], "points": [...]}) where latency is receipt time minus the header stamp (wall clock of the publisher, same host). ``publish`` waits for
a subscriber before sending. Neither touches FASTDDS_DEFAULT_PROFILES_FILE: set it (or not) in the
environment, which is the point of the delivery benchmark.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def synthetic_cloud(n: int, seed: int = 0) -> np.ndarray:
    """(n, 3) float32 points on a ring of 'walls' around the sensor with a ground plane."""
    rng = np.random.default_rng(seed)
    angle = rng.uniform(-np.pi, np.pi, n)
    radius = rng.uniform(5.0, 40.0, n)
    z = np.where(rng.random(n) < 0.5, -1.7, rng.uniform(-1.7, 2.0, n))
    return np.stack([radius * np.cos(angle), radius * np.sin(angle), z], 1).astype(np.float32)


def _qos(name: str, depth: int):
    from .qos import cloud_qos
    return cloud_qos("best_effort" if name == "sensor" else "reliable", depth)


def _stamp_now(msg) -> None:
    t = time.time()
    msg.header.stamp.sec = int(t)
    msg.header.stamp.nanosec = int((t - int(t)) * 1e9)


def _wait_matched(node, count, wanted: int, seconds: float) -> int:
    """Spin ``node`` until ``count()`` (matched endpoints) reaches ``wanted`` or ``seconds`` pass."""
    import rclpy
    deadline = time.monotonic() + seconds
    while count() < wanted and time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.05)
    return count()


def publish(args) -> int:
    import rclpy
    from sensor_msgs.msg import PointCloud2
    from std_msgs.msg import Header

    from lidar_completion.pointcloud2 import create_cloud_xyz32

    rclpy.init(domain_id=args.domain_id)
    try:
        node = rclpy.create_node("lidar_completion_probe_publisher")
        pub = node.create_publisher(PointCloud2,
                                    args.topic, _qos(args.qos, args.depth))
        matched = _wait_matched(node, pub.get_subscription_count, args.subscribers, args.wait_subscribers)
        time.sleep(args.settle)
        msgs = [create_cloud_xyz32(Header(frame_id=args.frame_id), synthetic_cloud(args.points, i))
                for i in range(min(args.count, 4))]
        period = 1.0 / args.rate if args.rate > 0 else 0.0
        start = time.monotonic()
        for i in range(args.count):
            msg = msgs[i % len(msgs)]
            _stamp_now(msg)
            pub.publish(msg)
            if period:
                time.sleep(max(0.0, start + (i + 1) * period - time.monotonic()))
        time.sleep(args.linger)
        print(json.dumps({"published": args.count, "matched": matched}), flush=True)
        node.destroy_node()
    finally:
        rclpy.try_shutdown()
    return 0


def listen(args) -> int:
    import rclpy
    from sensor_msgs.msg import PointCloud2

    rclpy.init(domain_id=args.domain_id)
    latencies, points = [], []
    try:
        node = rclpy.create_node("lidar_completion_probe_listener")

        def on_cloud(msg):
            now = time.time()
            stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
            latencies.append((now - stamp) * 1e3)
            points.append(msg.width * msg.height)

        sub = node.create_subscription(PointCloud2, args.topic, on_cloud, _qos(args.qos, args.depth))
        # A message sent before the subscription is matched to its writer is lost (volatile
        # durability), so a caller that starts the traffic on "ready" can ask for the match first.
        matched = _wait_matched(node, sub.get_publisher_count, args.publishers, args.wait_publishers)
        print(json.dumps({"ready": True, "matched": matched}), flush=True)
        deadline = time.monotonic() + args.timeout
        idle_deadline = None
        while time.monotonic() < deadline and len(latencies) < args.count:
            before = len(latencies)
            rclpy.spin_once(node, timeout_sec=0.05)
            if len(latencies) != before:
                idle_deadline = time.monotonic() + args.idle
            elif idle_deadline is not None and time.monotonic() > idle_deadline:
                break
        node.destroy_node()
    finally:
        rclpy.try_shutdown()
    print(json.dumps({"received": len(latencies), "latency_ms": [round(x, 3) for x in latencies],
                      "points": points}), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lidar_completion_pkg.probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("publish", "listen"):
        s = sub.add_parser(name)
        s.add_argument("--topic", default="/velodyne_points")
        s.add_argument("--qos", choices=["sensor", "reliable"], default="sensor",
                       help="sensor: best effort (sensor-data QoS); reliable: reliable, keep last")
        s.add_argument("--depth", type=int, default=5)
        s.add_argument("--count", type=int, default=20)
        s.add_argument("--domain-id", type=int, default=None,
                       help="ROS domain id (default: ROS_DOMAIN_ID or 0)")
    pub = sub.choices["publish"]
    pub.add_argument("--points", type=int, default=120_000)
    pub.add_argument("--rate", type=float, default=10.0, help="Hz; 0 = as fast as possible")
    pub.add_argument("--frame-id", default="velodyne")
    pub.add_argument("--subscribers", type=int, default=1, help="wait for this many subscribers")
    pub.add_argument("--wait-subscribers", type=float, default=10.0, help="seconds")
    pub.add_argument("--settle", type=float, default=0.5, help="seconds after matching")
    pub.add_argument("--linger", type=float, default=1.0, help="seconds after the last message")
    pub.set_defaults(func=publish)
    lis = sub.choices["listen"]
    lis.add_argument("--timeout", type=float, default=30.0, help="overall seconds")
    lis.add_argument("--idle", type=float, default=3.0, help="stop this long after the last message")
    lis.add_argument("--publishers", type=int, default=1,
                     help="with --wait-publishers: the number of matched publishers to wait for")
    lis.add_argument("--wait-publishers", type=float, default=0.0,
                     help="seconds to wait for the topic's publishers to be matched before printing "
                          "the ready line (0: print it at once)")
    lis.set_defaults(func=listen)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
