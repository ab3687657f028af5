"""`make demo`'s script end to end in its quick mode (2 scans, no EMD): every artefact is made, the live
replay through the ROS 2 node completes scans with real latencies, and the metrics have values."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ros_support as rs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ros
def test_demo_quick(tmp_path):
    # the node needs only the PyPI wheels; with the transform packages (not on PyPI) it publishes in
    # odom, without them in the scans' own frame, and the demo says which
    rs.require("rclpy", "sensor_msgs", "diagnostic_msgs")
    from lidar_completion_pkg.frames import missing_transform_packages
    frame = "velodyne" if missing_transform_packages() else "odom"
    out = tmp_path / "demo_out"
    env = dict(os.environ, DEMO_QUICK="1", DEMO_OUT=str(out), OMP_NUM_THREADS="1",
               PYTHON=sys.executable, LIDAR_COMPLETION=str(Path(sys.executable).parent / "lidar-completion"),
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    r = subprocess.run(["bash", str(ROOT / "scripts" / "demo" / "demo.sh")], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for rel in ("input_bag/metadata.yaml", "completed_bag/metadata.yaml", "latency/report.md",
                "latency/report.json", "completed_000000.ply", "input_vs_completion_vs_gt.png",
                "metrics/summary.md", "metrics_input_scan/summary.md"):
        assert (out / rel).exists(), rel
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("p50_ms=") and last.endswith("dropped=0/2"), last
    assert ("note: no transforms" in r.stdout) == (frame == "velodyne"), r.stdout[-3000:]
    # the node completed every scan of the paced replay, in that frame, with real latencies
    live = json.loads((out / "latency" / "report.json").read_text())
    assert live["completed"] == live["total"] == 2 and live["live"]["paced"], live["drop_reasons"]
    assert 0 < live["latency_ms"]["p50"] < 600_000
    events = json.loads((out / "latency" / "live_events.json").read_text())
    assert {o["frame_id"] for o in events["outputs"]} == {frame}
    for kind in ("metrics", "metrics_input_scan"):
        cd = json.loads((out / kind / "summary.json").read_text())["cd"]["mean"]
        assert math.isfinite(cd) and 0 < cd < 50, (kind, cd)
    assert (out / "input_vs_completion_vs_gt.png").stat().st_size > 10_000
