"""The live bag benchmark (`bag-bench --live`, provided by the ROS 2 layer): the report's accounting -
every input scan is either completed or dropped, none unaccounted - and the replay over DDS with the
node (or a stand-in) as a separate process: pacing, transforms, recording, exit status."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import ros_support as rs
from lidar_completion.bags import BagReader
from lidar_completion.bags.report import summary_line, write_report
from lidar_completion.cli import main
from lidar_completion_pkg.live_bench import report_from_events
from test_bags import START, SMALL, SUMMARY_RE, synthetic_bag, synthetic_root, tiny_checkpoint  # noqa: F401

ECHO_NODE = Path(__file__).parent / "fixtures" / "bags" / "echo_node.py"


def test_live_report_accounts_for_every_input(tmp_path):
    ms = 1_000_000
    inputs = [{"index": i, "stamp_ns": START + i * 100 * ms, "log_time_ns": START + i * 100 * ms,
               "t_pub_ns": 10_000 * ms + i * 100 * ms, "points_in": 1000 + i} for i in range(6)]
    outputs = [  # scan 0 and 3 completed; 3 twice (only the first counts); one stray output
        {"stamp_ns": START, "t_recv_ns": 10_000 * ms + 40 * ms, "points_out": 500},
        {"stamp_ns": START + 300 * ms, "t_recv_ns": 10_300 * ms + 80 * ms, "points_out": 600},
        {"stamp_ns": START + 300 * ms, "t_recv_ns": 10_300 * ms + 95 * ms, "points_out": 600},
        {"stamp_ns": 5, "t_recv_ns": 10_900 * ms, "points_out": 1},
    ]
    events = {"inputs": inputs, "outputs": outputs, "expected_total": 8,
              "unusable_inputs": [{"index": 6, "error": "cannot deserialize"}],
              "diagnostics": [{"values": {"dropped": "2", "received": "6", "processed": "3",
                                          "rejected": "0", "failed": "1"}}],
              # 20 s of node memory: flat warm-up plateau, then +1 MB/s in the second half
              "memory": [[10_000 * ms + k * 1000 * ms, (100 + max(0, k - 10)) * 2**20] for k in range(21)],
              "t_first_pub_ns": 10_000 * ms, "t_last_pub_ns": 10_500 * ms,
              "t_node_start_ns": 8_000 * ms, "t_ready_ns": 9_500 * ms, "node": {"returncode": 0}}
    rep = report_from_events(events, bag="b", topic="/velodyne_points", rate=2.0)
    assert [s["index"] for s in rep["scans"]] == list(range(8))
    assert (rep["total"], rep["completed"], rep["dropped"]) == (8, 2, 6)
    assert [s["status"] for s in rep["scans"]][:4] == ["completed", "dropped", "dropped", "completed"]
    assert [s["latency_ms"] for s in rep["scans"] if s["status"] == "completed"] == \
        pytest.approx([40.0, 80.0])
    assert rep["drop_reasons"] == {"no output received (skipped by the node or lost)": 4,
                                   "unusable message in the bag: cannot deserialize": 1,
                                   "unreadable (damaged or truncated bag)": 1}
    live = rep["live"]
    assert live["node_dropped"] == 2 and live["unmatched_outputs"] == 2 and not live["keeps_up"]
    assert live["unexplained_missing"] == 1  # 4 without output, the node accounts for 2 + 1
    assert live["ready_s"] == pytest.approx(1.5)
    assert rep["memory"]["growth_mb_per_min"] == pytest.approx(60.0)
    assert (rep["memory"]["peak_rss_mb"], rep["memory"]["end_rss_mb"]) == (110.0, 110.0)
    assert summary_line(rep) == "p50_ms=60.0 p95_ms=78.0 dropped=6/8"
    paths = write_report(rep, tmp_path)
    assert all(p.exists() for p in paths["plots"])
    assert "node keeps up | no" in paths["md"].read_text()


def _one_scan_events(diagnostics: list[dict]) -> dict:
    """A paced run of one scan: published at 1 s, completed at 2 s, the player done at 2.003 s."""
    ms = 1_000_000
    return {"inputs": [{"index": 0, "stamp_ns": START, "t_pub_ns": 1000 * ms, "points_in": 1000}],
            "outputs": [{"stamp_ns": START, "t_recv_ns": 2000 * ms, "points_out": 600}],
            "expected_total": 1, "diagnostics": diagnostics, "memory": [],
            "t_first_pub_ns": 1000 * ms, "t_last_pub_ns": 1000 * ms, "t_end_ns": 2003 * ms,
            "node": {"returncode": 0}}


def _diag(t_ms: float, received: int, processed: int, **extra) -> dict:
    values = {"received": str(received), "processed": str(processed), "dropped": "0", "rejected": "0",
              "failed": "0", "no_transform": "0", **extra}
    return {"t_ns": int(t_ms * 1_000_000), "values": values}


def test_live_report_dates_node_counters_that_miss_the_last_scans(tmp_path):
    """The node's last /diagnostics came before its last completion (received 1, processed 0 next to
    completed 1): the report gives their age instead of presenting them as the final counts."""
    stale = report_from_events(_one_scan_events([_diag(600, 0, 0), _diag(1600, 1, 0)]), bag="b",
                               topic="/velodyne_points", rate=1.0, paced=True)
    live = stale["live"]
    assert stale["completed"] == 1 and live["node_counters"]["processed"] == 0
    assert not live["node_counters_current"] and live["node_counters_age_s"] == pytest.approx(0.403)
    md = write_report(stale, tmp_path / "stale")["md"].read_text()
    assert "received 1, processed 0, dropped 0, rejected 0, failed 0, no_transform 0, cancelled 0 (as of 0.4 s " \
           "before the end" in md

    # a later message (or one that counts every completion) is current, and shown as it is
    for diags in ([_diag(1600, 1, 0), _diag(2001, 1, 1)], [_diag(1600, 1, 1)]):
        fresh = report_from_events(_one_scan_events(diags), bag="b", topic="/velodyne_points", rate=1.0)
        assert fresh["live"]["node_counters_current"] and fresh["live"]["node_counters_age_s"] is None
        md = write_report(fresh, tmp_path / "fresh")["md"].read_text()
        assert "processed 1, dropped 0, rejected 0, failed 0, no_transform 0, cancelled 0 |" in md


def test_live_report_shows_the_steps_and_guidance_the_node_ran_with(tmp_path):
    """Without --steps the node resolves them from its checkpoint and says so in /diagnostics; a node
    that does not leaves the report saying "the checkpoint's" rather than None."""
    said = _one_scan_events([_diag(2001, 1, 1, steps="8", guidance="2.0", warmup_s="52.881")])
    meta = {"steps": None, "guidance": None, "device": "cpu"}  # what the CLI gives without --steps
    rep = report_from_events(said, bag="b", topic="/velodyne_points", rate=1.0, meta=meta)
    assert (rep["steps"], rep["guidance"]) == (8, 2.0)
    md = write_report(rep, tmp_path / "said")["md"].read_text()
    assert "| steps | 8 |" in md and "| guidance | 2 |" in md and "None" not in md
    assert "| warm-up | 52.88 s (the node's: one synthetic scan before it subscribed" in md

    silent = report_from_events(_one_scan_events([_diag(2001, 1, 1, warmup_s="n/a")]), bag="b",
                                topic="/velodyne_points", rate=1.0, meta=meta)
    assert (silent["steps"], silent["guidance"]) == ("the checkpoint's", "the checkpoint's")
    md = write_report(silent, tmp_path / "silent")["md"].read_text()
    assert "| steps | the checkpoint's |" in md and "| warm-up | none reported by the node" in md


def test_no_warmup_reaches_the_node_before_node_params(synthetic_bag, tmp_path, monkeypatch, capsys):
    """--no-warmup live is the node's warmup parameter (a --node-param still has the last word)."""
    import lidar_completion.commands.bags as bags_cmd

    seen = {}

    def fake_bench_live(bag, topic, out, **kwargs):
        seen.update(kwargs)
        return report_from_events(_one_scan_events([_diag(2001, 1, 1, steps="8", guidance="2.0")]),
                                  bag=str(bag), topic=topic, rate=1.0, meta=kwargs["meta"])

    monkeypatch.setattr(bags_cmd, "live_runner", lambda: fake_bench_live)
    assert main(["bag-bench", str(synthetic_bag), "--live", "--no-warmup", "--n-fps", "500",
                 "--node-param", "warmup:=true", "--out", str(tmp_path), "--no-progress"]) == 0
    assert seen["node_params"] == ["n_fps:=500", "warmup:=false", "warmup:=true"]
    out = capsys.readouterr().out
    assert "warm-up: none reported by the node" in out
    assert "| steps | 8 |" in (tmp_path / "report.md").read_text()


def test_the_core_finds_the_live_bench_through_its_entry_point():
    from lidar_completion.commands.bags import live_runner
    from lidar_completion_pkg.live_bench import bench_live

    assert live_runner() is bench_live


# ------------------------------------------------------------------------- the replay over DDS
def _ros():
    rs.require("rclpy", "tf2_msgs")


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


@pytest.mark.ros
def test_live_bench_paced_completes_every_scan_in_the_target_frame(synthetic_bag, tiny_checkpoint,
                                                                    tmp_path, capfd):
    """--pace: every scan is completed, however slow the node; the node finds the bag's transforms
    (replayed on /tf and /tf_static) and publishes into odom."""
    _ros()
    out = tmp_path / "live"
    rc = main(["bag-bench", str(synthetic_bag), "--live", "--pace", "--rate", "1", "--checkpoint",
               str(tiny_checkpoint), *SMALL, "--node-param", "model_frame:=velodyne",
               "--node-param", "target_frame:=odom", "--out", str(out), "--ready-timeout", "120",
               "--drain-timeout", "15", "--no-progress"])
    captured = capfd.readouterr()
    assert rc == 0, captured.err[-3000:]
    rep = _check_accounting(out, captured.out.strip().splitlines())
    assert rep["completed"] == 5, (out / "report.md").read_text()
    assert rep["live"]["paced"] and rep["live"]["node_counters"]["no_transform"] == 0
    done = [s for s in rep["scans"] if s["status"] == "completed"]
    assert all(0 < s["latency_ms"] < 60_000 and s["points_out"] > 0 for s in done)
    events = json.loads((out / "live_events.json").read_text())
    assert {o["frame_id"] for o in events["outputs"]} == {"odom"}
    assert rep["live"]["node_returncode"] == 0
    assert "paced" in (out / "report.md").read_text()


@pytest.mark.ros
def test_live_bench_fails_when_no_scan_is_completed(synthetic_bag, tmp_path, capfd):
    """A node that never answers within the replay: exit status 1 and the reason, report written."""
    _ros()
    out = tmp_path / "live"
    rc = main(["bag-bench", str(synthetic_bag), "--live", "--rate", "5", "--node-cmd",
               f"{sys.executable} {ECHO_NODE}", "--node-param", "delay:=30.0", "--limit", "2",
               "--out", str(out), "--ready-timeout", "60", "--drain-timeout", "1", "--no-progress"])
    captured = capfd.readouterr()
    assert rc == 1
    assert "error: no scan was completed (0/2: 2 x no output received" in captured.err, captured.err
    assert "--pace" in captured.err
    assert (out / "report.json").exists()
    assert captured.out.strip().splitlines()[-1] == "p50_ms=nan p95_ms=nan dropped=2/2"


def test_a_domain_id_without_dds_ports_is_refused_before_the_node_starts(tmp_path, capsys):
    """--domain-id 300 started the node, which died with an RTPS error ("port number is too high")
    that the benchmark blamed on the ROS 2 install."""
    from lidar_completion.bags import write_clouds

    bag = write_clouds(tmp_path / "bag", [(START, np.zeros((10, 3), np.float32))])
    assert main(["bag-bench", str(bag), "--live", "--domain-id", "300", "--no-progress"]) == 1
    assert "--domain-id must be 0..232" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["--rate", "nan"], "--rate must be a finite number > 0, found nan"),
    (["--rate", "inf"], "--rate must be a finite number > 0, found inf"),
    (["--ready-timeout", "-1"], "--ready-timeout must be a finite number of seconds >= 0"),
    (["--drain-timeout", "nan"], "--drain-timeout must be a finite number of seconds >= 0"),
    (["--busy-timeout", "inf"], "--busy-timeout must be a finite number of seconds >= 0"),
])
def test_live_rates_and_timeouts_out_of_range_are_refused_before_the_node_starts(tmp_path, capsys,
                                                                                 argv, words):
    """--rate nan and --ready-timeout -1 were taken (nan slips through "rate <= 0")."""
    from lidar_completion.bags import write_clouds

    bag = write_clouds(tmp_path / "bag", [(START, np.zeros((10, 3), np.float32))])
    assert main(["bag-bench", str(bag), "--live", *argv, "--out", str(tmp_path / "rep"),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and words in err, err


def test_no_completion_reason_follows_the_node_counters():
    """Six scans lost to a missing transform (the node's counters said so) were blamed on speed, with
    the advice to add --pace, which the run already had."""
    from lidar_completion.commands.bags import no_completion_reason

    def report(paced, **counters):
        values = {"received": 6, "processed": 0, "dropped": 0, "rejected": 0, "failed": 0,
                  "no_transform": 0, "cancelled": 0, **counters}
        return {"completed": 0, "total": 6, "drop_reasons": {"no output received": 6},
                "live": {"paced": paced, "node_counters": values, "node_counters_current": True,
                         "node_log": "rep/node.log"}}

    text = no_completion_reason(report(True, no_transform=6))
    assert "transforms to model_frame / target_frame were missing or stale" in text
    assert "slower" not in text and "--pace" not in text and text.endswith("its log: rep/node.log")
    assert "refused the clouds" in no_completion_reason(report(False, rejected=6))
    slow = no_completion_reason(report(True, dropped=0))
    assert "A node slower than the replay" in slow and "--pace" not in slow
    assert "replay with --pace" in no_completion_reason(report(False, dropped=5))


@pytest.mark.ros
def test_live_replay_rate_and_recording_with_a_stand_in_node(synthetic_bag, tmp_path, capfd):
    _ros()
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
    assert counts["/velodyne_points"] == 5 and counts["/tf"] == 5 and counts["/tf_static"] == 1
    assert counts.get("/completed_points", 0) == rep["completed"]


@pytest.mark.ros
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_replay_stops_its_node_and_says_so(synthetic_bag, tmp_path, sig):
    """Ctrl-C or SIGTERM (a launch escalating, a supervisor) while the replay plays: exit status 130,
    the events say "interrupted", and the node it started is stopped, not left running."""
    _ros()
    events = tmp_path / "events.json"
    cmd = [sys.executable, "-m", "lidar_completion_pkg.replay", str(synthetic_bag), "--node-cmd",
           f"{sys.executable} {ECHO_NODE}", "--events", str(events), "--rate", "0.02", "--no-progress",
           "--ready-timeout", "60"]
    proc = subprocess.Popen(cmd, start_new_session=True, env=rs.ros_env(rs.random_domain()),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(6.0)                      # the stand-in node is up; one scan every 5 s of the drive
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        os.kill(proc.pid, sig)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    ev = json.loads(events.read_text())
    assert ev["error"] == "interrupted" and ev["node"]["returncode"] is not None, ev.get("node")
    with pytest.raises(ProcessLookupError):
        os.kill(ev["node"]["pid"], 0)        # the node is gone


@pytest.mark.ros
def test_live_bench_reports_a_node_that_cannot_start(synthetic_bag, tmp_path, capfd):
    _ros()
    out = tmp_path / "live"
    rc = main(["bag-bench", str(synthetic_bag), "--live", "--checkpoint", str(tmp_path / "missing.pt"),
               "--threads", "1", "--out", str(out), "--ready-timeout", "60", "--no-progress"])
    err = capfd.readouterr().err
    assert rc == 1
    assert "error: the node exited with status 1 before it was ready" in err
    assert "missing.pt" in err and err.count("error:") == 1
    assert (out / "node.log").exists() and not (out / "report.json").exists()


def test_a_paced_replay_keeps_up_only_at_the_drives_rate(tmp_path):
    """Paced, each scan is published after the previous answer, so nothing is ever dropped and "node
    keeps up" was always yes, even for a node at 0.5 Hz on a 10 Hz drive. Now a paced replay keeps
    up when its sustained rate reaches the drive's (from the scans' stamps)."""
    ms, s = 10**6, 10**9

    def paced_events(seconds_per_scan):
        inputs, outputs, t = [], [], 10 * s
        for i in range(5):     # a 10 Hz drive: stamps 0.1 s apart
            stamp = 1_000 * s + i * s // 10
            inputs.append({"index": i, "stamp_ns": stamp, "t_pub_ns": t, "points_in": 100})
            t += int(seconds_per_scan * s)
            outputs.append({"stamp_ns": stamp, "t_recv_ns": t - 1 * ms, "points_out": 10})
        return {"inputs": inputs, "outputs": outputs, "expected_total": 5,
                "t_first_pub_ns": inputs[0]["t_pub_ns"], "t_last_pub_ns": inputs[-1]["t_pub_ns"],
                "node": {"returncode": 0}}

    slow = report_from_events(paced_events(2.0), bag="b", topic="/t", rate=1.0, paced=True)
    assert slow["dropped"] == 0 and slow["live"]["drive_hz"] == pytest.approx(10.0)
    assert not slow["live"]["keeps_up"]
    assert "node keeps up | no (0.50 scans/s sustained against the drive's 10.0 Hz)" in \
        write_report(slow, tmp_path / "slow")["md"].read_text()
    fast = report_from_events(paced_events(0.05), bag="b", topic="/t", rate=1.0, paced=True)
    assert fast["live"]["keeps_up"]


def test_unpaced_keeps_up_means_completions_as_fast_as_the_replay():
    """Unpaced, "keeps up" meant "no drops": a replay of two scans gives a node's one-slot mailbox
    nothing to drop, and a node at 0.2 scans/s on a 10 Hz drive was said to keep up."""
    ms = 10**6

    def unpaced(latency_ms):
        inputs = [{"index": i, "stamp_ns": START + i * 100 * ms, "log_time_ns": START + i * 100 * ms,
                   "t_pub_ns": 1000 * ms + i * 100 * ms, "points_in": 100} for i in range(2)]
        outputs = [{"stamp_ns": inp["stamp_ns"], "t_recv_ns": inp["t_pub_ns"] + (i + 1) * latency_ms * ms,
                    "points_out": 10} for i, inp in enumerate(inputs)]
        return {"inputs": inputs, "outputs": outputs, "expected_total": 2,
                "t_first_pub_ns": inputs[0]["t_pub_ns"], "t_last_pub_ns": inputs[-1]["t_pub_ns"],
                "node": {"returncode": 0}}

    slow = report_from_events(unpaced(5000), bag="b", topic="/t", rate=1.0)
    assert slow["dropped"] == 0 and not slow["live"]["keeps_up"]
    fast = report_from_events(unpaced(40), bag="b", topic="/t", rate=1.0)
    assert fast["dropped"] == 0 and fast["live"]["keeps_up"]


def test_inputs_that_share_a_stamp_are_matched_in_order():
    """Clouds with unset stamps (all 0, a converted bag): the outputs were matched by stamp once
    only, so 3 completed scans were reported as 1 completed and 2 dropped, and the drive's rate came
    from the stamps (nan); it comes from the bag's log times now."""
    ms = 10**6
    inputs = [{"index": i, "stamp_ns": 0, "log_time_ns": START + i * 100 * ms,
               "t_pub_ns": 1000 * ms + i * 100 * ms, "points_in": 100, "duplicate_stamp": i > 0}
              for i in range(3)]
    outputs = [{"stamp_ns": 0, "t_recv_ns": inp["t_pub_ns"] + 30 * ms, "points_out": 10} for inp in inputs]
    rep = report_from_events({"inputs": inputs, "outputs": outputs, "expected_total": 3,
                              "t_first_pub_ns": 1000 * ms, "t_last_pub_ns": 1200 * ms,
                              "node": {"returncode": 0}}, bag="b", topic="/t", rate=1.0)
    assert (rep["completed"], rep["dropped"]) == (3, 0)
    assert [s["latency_ms"] for s in rep["scans"]] == pytest.approx([30.0, 30.0, 30.0])
    assert rep["live"]["drive_hz"] == pytest.approx(10.0) and rep["live"]["keeps_up"]
    assert rep["live"]["duplicate_input_stamps"] == 2 and rep["live"]["unmatched_outputs"] == 0


def test_node_params_are_checked_before_the_node_starts(tmp_path):
    """A misspelt --node-param (n_fsp:=300) was ignored by the node, with a warning in node.log only:
    the benchmark ran with the default budget and said nothing."""
    from lidar_completion.errors import BagError
    from lidar_completion_pkg.live_bench import _check_node_params, bench_live

    with pytest.raises(BagError, match=r"no parameter 'n_fsp' \(did you mean n_fps\?\)"):
        bench_live(tmp_path / "no_bag", "/t", tmp_path / "out", node_params=["n_fsp:=300"])
    with pytest.raises(BagError, match="expects NAME:=VALUE, found 'n_fps'"):
        bench_live(tmp_path / "no_bag", "/t", tmp_path / "out", node_params=["n_fps"])
    _check_node_params(["n_fps:=300", "qos_overrides./x.subscription.depth:=3", "use_sim_time:=true"],
                       default_node=True)
    _check_node_params(["own_param:=1"], default_node=False)      # another node: its own names
    _check_node_params(["lidar_completion:n_fps:=300"], default_node=True)   # rcl's node prefix
    with pytest.raises(BagError, match="no parameter 'n_fsp'"):
        _check_node_params(["lidar_completion:n_fsp:=300"], default_node=True)


def test_completions_are_logged_in_the_order_they_came(monkeypatch):
    """The recorded bag logged each completion at its input's log time plus its latency. Paced, the
    inputs keep the drive's spacing while the answers come seconds apart, so a quick answer to a
    later scan was logged before a slow answer to an earlier one, and players showed them out of
    order. A completion is now never logged before the one written last."""
    from types import SimpleNamespace as NS

    from lidar_completion.bags.io import make_cloud, serialize
    from lidar_completion_pkg import replay

    r = replay.Replay(NS(output_topic="/completed_points"))
    written = []
    r._writer = NS(write_raw=lambda topic, msgtype, data, log_ns: written.append(log_ns))
    clock = iter([10_000, 12_000])        # the answers arrive 2 s apart, as monotonic_ns reads them
    monkeypatch.setattr(replay.time, "monotonic_ns", lambda: next(clock) * 10**6)
    for sec, log_ms, pub_ms in ((4, 400, 8_000), (5, 500, 11_900)):  # latency 2.0 s, then 0.1 s
        stamp = sec * 10**9
        r._stamps_published[stamp] = sec
        r._log_time_of[stamp] = (log_ms * 10**6, pub_ms * 10**6)
        r.on_output(serialize(make_cloud(np.zeros((3, 3), np.float32), stamp, "velodyne")))
    assert written[0] == 2_400 * 10**6 and written[1] > written[0]   # not 600 ms: before the first


def test_a_scan_the_node_rejected_is_reported_with_the_reason():
    """A cloud the node rejects (no z field, truncated data) was listed as 'no output received
    (skipped by the node or lost)', although the reason is known: the player decodes what it sent
    as the node does and the report names it."""
    from lidar_completion.bags import make_cloud
    from lidar_completion_pkg.replay import _cloud_problem
    ms = 1_000_000
    good = make_cloud(np.zeros((10, 3), np.float32), START)
    bad = make_cloud(np.zeros((10, 3), np.float32), START + 100 * ms)
    bad.data = bad.data[:-12]                              # one point short
    problems = [_cloud_problem(good), _cloud_problem(bad)]
    assert problems[0] is None and "truncated" in problems[1]
    events = {"inputs": [{"index": i, "stamp_ns": START + i * 100 * ms, "t_pub_ns": 1000 * ms + i * 100 * ms,
                          "points_in": 10, "problem": problems[i]} for i in range(2)],
              "outputs": [{"stamp_ns": START, "t_recv_ns": 1050 * ms, "points_out": 60}],
              "expected_total": 2, "diagnostics": [], "memory": [],
              "t_first_pub_ns": 1000 * ms, "t_last_pub_ns": 1100 * ms, "node": {"returncode": 0}}
    rep = report_from_events(events, bag="b", topic="/velodyne_points", rate=1.0)
    assert rep["scans"][1]["reason"] == f"rejected by the node: {problems[1]}"
