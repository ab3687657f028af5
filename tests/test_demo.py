"""`make demo`'s script end to end in its quick mode (2 scans, no EMD): every artefact is made."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("rclpy", reason="the demo replays through the ROS 2 node (PyPI wheels: make setup)")


@pytest.mark.ros
def test_demo_quick(tmp_path):
    out = tmp_path / "demo_out"
    env = dict(os.environ, DEMO_QUICK="1", DEMO_OUT=str(out), DEMO_RATE="1", OMP_NUM_THREADS="1",
               PYTHON=sys.executable, LIDAR_COMPLETION=str(Path(sys.executable).parent / "lidar-completion"),
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    r = subprocess.run(["bash", str(ROOT / "scripts" / "demo" / "demo.sh")], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for rel in ("input_bag/metadata.yaml", "completed_bag/metadata.yaml", "latency/report.md",
                "latency/report.json", "completed_000000.ply", "input_vs_completion_vs_gt.png",
                "metrics/summary.md", "metrics_input_scan/summary.md"):
        assert (out / rel).exists(), rel
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("p50_ms=") and "dropped=" in last
    assert (out / "input_vs_completion_vs_gt.png").stat().st_size > 10_000
