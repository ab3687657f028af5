"""Live bag replay over DDS (needs the ROS 2 wheels): the player, the node as a separate process, and
the report's accounting - every input scan is either completed or dropped, none unaccounted."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("rclpy", reason="live replay needs the ROS 2 wheels (pip install -e 'lidar_completion_pkg[ros]')")

from lidar_completion.bags import BagReader  # noqa: E402
from lidar_completion.cli import main  # noqa: E402
from test_bags import SMALL, SUMMARY_RE, synthetic_bag, synthetic_root, tiny_checkpoint  # noqa: E402,F401

pytestmark = pytest.mark.ros

ECHO_NODE = Path(__file__).parent / "fixtures" / "bags" / "echo_node.py"


def _check_accounting(out: Path, lines: list[str]) -> dict:
    m = SUMMARY_RE.match(lines[-1])
    assert m, lines[-1]
    rep = json.loads((out / "report.json").read_text())
    assert rep["mode"] == "live" and rep["total"] == 5
    statuses = [s["status"] for s in rep["scans"]]
    assert sorted(s["index"] for s in rep["scans"]) == list(range(5))
    assert set(statuses) <= {"completed", "dropped"}
    assert statuses.count("completed") == rep["completed"]
    assert rep["completed"] + rep["dropped"] == 5
    assert m.group(3, 4) == (str(rep["dropped"]), "5")
    for name in ("report.md", "latency_hist.png", "latency_memory_over_time.png", "points_in_out.png"):
        assert (out / name).stat().st_size > 0
    assert rep["memory"]["peak_rss_mb"] > 20  # the node's RSS was sampled
    assert rep["live"]["profile"], "the player must run with the Fast DDS profile"
    return rep


def test_live_bench_with_the_node(synthetic_bag, tiny_checkpoint, tmp_path, capfd):
    out = tmp_path / "live"
    rc = main(["bag-bench", str(synthetic_bag), "--live", "--rate", "1", "--checkpoint",
               str(tiny_checkpoint), *SMALL, "--out", str(out), "--ready-timeout", "120",
               "--drain-timeout", "15", "--no-progress"])
    captured = capfd.readouterr()
    assert rc == 0, captured.err[-3000:]
    rep = _check_accounting(out, captured.out.strip().splitlines())
    # the first scan reaches an idle node: at least it must come back, with a plausible latency
    assert rep["completed"] >= 1, (out / "report.md").read_text()
    done = [s for s in rep["scans"] if s["status"] == "completed"]
    assert all(0 < s["latency_ms"] < 60_000 and s["points_out"] > 0 for s in done)
    assert rep["live"]["node_returncode"] is not None


def test_live_replay_rate_and_recording_with_a_stand_in_node(synthetic_bag, tmp_path, capfd):
    out, rec = tmp_path / "live", tmp_path / "recorded"
    rc = main(["bag-bench", str(synthetic_bag), "--live", "--rate", "2", "--node-cmd",
               f"{sys.executable} {ECHO_NODE}", "--out", str(out), "--write-bag", str(rec),
               "--ready-timeout", "60", "--drain-timeout", "5", "--no-progress"])
    captured = capfd.readouterr()
    assert rc == 0, captured.err[-3000:]
    rep = _check_accounting(out, captured.out.strip().splitlines())
    # the bag's 10 Hz played twice as fast: 5 scans over about 0.2 s
    assert 12 < rep["live"]["input_hz"] < 28
    with BagReader(rec) as reader:
        counts = {t: i.count for t, i in reader.topics.items()}
    assert counts["/velodyne_points"] == 5 and counts["/tf"] == 5
    assert counts.get("/completed_points", 0) == rep["completed"]


def test_live_bench_reports_a_node_that_cannot_start(synthetic_bag, tmp_path, capfd):
    out = tmp_path / "live"
    rc = main(["bag-bench", str(synthetic_bag), "--live", "--checkpoint", str(tmp_path / "missing.pt"),
               "--threads", "1", "--out", str(out), "--ready-timeout", "60", "--no-progress"])
    err = capfd.readouterr().err
    assert rc == 1
    assert "error: the node exited with status 1 before it was ready" in err
    assert "missing.pt" in err and err.count("error:") == 1
    assert (out / "node.log").exists() and not (out / "report.json").exists()
