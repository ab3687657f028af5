"""Live bag benchmark (`lidar-completion bag-bench --live`): the player in a child process, the report.

The core CLI finds :func:`bench_live` through the ``lidar_completion.live_bench`` entry point group (it
never names this package). The player (:mod:`.replay`) starts the node, replays the bag over DDS and
records every publish / receipt / memory sample / diagnostics message into an events JSON, whose format
:func:`report_from_events` reads; this module itself never imports rclpy. The child gets an isolated
DDS setup: a random ``ROS_DOMAIN_ID`` (unless one is given) and ``ROS_AUTOMATIC_DISCOVERY_RANGE=
LOCALHOST``; the player adds the Fast DDS profile.

Every input is classified: ``completed`` when an output with its header stamp arrived, otherwise
``dropped`` with a reason (unreadable in the bag, or no output - skipped by the node's latest-only
worker or lost in transport). The node's own counters from /diagnostics are reported next to it, with
their age when the last message received predates the last scans; the steps, guidance and warm-up
time in the report are the node's, from the same messages.
"""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

from lidar_completion.bags import report as rep
from lidar_completion.errors import BagError, LidarCompletionError

REPLAY_MODULE = __package__ + ".replay"


class LiveBenchError(LidarCompletionError):
    """The live benchmark could not run (player or node failed)."""


def live_environment(domain_id: int | None = None, base: dict | None = None) -> dict:
    """Environment for the player and the node: isolated domain, localhost discovery."""
    env = dict(os.environ if base is None else base)
    if domain_id is None:
        domain_id = random.Random().randint(1, 100)  # own generator: no global RNG state touched
    env["ROS_DOMAIN_ID"] = str(int(domain_id))
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _check_node_params(node_params, default_node: bool) -> None:
    """NAME:=VALUE each (or rcl's NODE:NAME:=VALUE), and for our node names it has: the node ignores
    an unknown name with a warning that only node.log would show, and the run would measure the
    default instead of what was asked."""
    from .parameters import unknown_parameter

    for given in node_params or ():
        name, sep, _value = str(given).partition(":=")
        name = name.strip().rpartition(":")[2]         # rcl's optional node-name prefix
        if not sep or not name:
            raise BagError(f"--node-param expects NAME:=VALUE, found {given!r}")
        problem = unknown_parameter(name) if default_node else None
        if problem is not None:
            raise BagError(f"--node-param {given}: {problem}")


def bench_live(bag_path, topic: str, out_dir, *, checkpoint=None, steps: int | None = None,
               rate: float = 1.0, output_topic: str = "/completed_points", node_params=(),
               node_cmd: str | None = None, ready_timeout: float = 120.0, drain_timeout: float = 30.0,
               domain_id: int | None = None, write_bag=None, write_storage: str = "mcap",
               limit: int | None = None, progress: bool = True, timeout: float | None = None,
               threads: int | None = None, meta: dict | None = None, pace: bool = False,
               busy_timeout: float = 600.0) -> dict:
    """Run the live replay and return the report dict (``events`` kept in out_dir/live_events.json).

    ``pace``: publish each scan only once the node has answered the previous one (at most at
    ``rate``); ``busy_timeout``: the longest the player waits for a scan the node has in hand.
    """
    if rate <= 0:
        raise BagError(f"--rate must be > 0, found {rate}")
    _check_node_params(node_params, default_node=not node_cmd)
    bag_path = Path(bag_path)
    if not bag_path.exists():
        raise BagError(f"bag not found: {bag_path} (expected a rosbag2 directory with metadata.yaml, "
                       "or a .mcap / .db3 file)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    events_path = out_dir / rep.LIVE_EVENTS
    if events_path.exists():
        events_path.unlink()
    cmd = [sys.executable, "-m", REPLAY_MODULE, str(bag_path), "--topic", topic,
           "--output-topic", output_topic, "--events", str(events_path), "--rate", str(rate),
           "--ready-timeout", str(ready_timeout), "--drain-timeout", str(drain_timeout),
           "--busy-timeout", str(busy_timeout), "--errors-in-events-only"]
    if pace:
        cmd.append("--pace")
    if checkpoint:
        cmd += ["--checkpoint", str(checkpoint)]
    if steps is not None:
        cmd += ["--steps", str(int(steps))]
    for p in node_params or ():
        cmd += ["--node-param", str(p)]
    if node_cmd:
        cmd += ["--node-cmd", node_cmd]
    if write_bag:
        cmd += ["--write-bag", str(write_bag), "--write-storage", write_storage]
    if limit is not None:
        cmd += ["--limit", str(int(limit))]
    if not progress:
        cmd.append("--no-progress")
    env = live_environment(domain_id)
    if threads is not None:  # read by torch when the node starts
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(int(threads))
    try:
        child_out = sys.stderr.fileno()  # the player's chatter goes to stderr: stdout ends in the summary
    except (AttributeError, OSError, ValueError):
        child_out = None
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout, stdout=child_out)
    except subprocess.TimeoutExpired:
        raise LiveBenchError(f"the live replay did not finish within {timeout:.0f} s") from None
    if not events_path.exists():
        raise LiveBenchError(f"the live replay ({' '.join(cmd[:3])}) exited with status "
                             f"{proc.returncode} without writing {events_path}; is the ROS 2 layer "
                             "installed (make setup)?")
    events = json.loads(events_path.read_text())
    if events.get("error"):
        raise LiveBenchError(events["error"])
    if proc.returncode != 0:
        raise LiveBenchError(f"the live replay exited with status {proc.returncode}")
    report = report_from_events(events, bag=str(bag_path), topic=topic, rate=rate, meta=meta,
                                paced=pace)
    report["events_file"] = str(events_path)
    if write_bag:
        report["written_bag"] = str(write_bag)
    return report


NO_OUTPUT = "no output received (skipped by the node or lost)"
#: The completion node's counters in /diagnostics; OPTIONAL_COUNTERS may be absent (older nodes).
NODE_COUNTERS = ("received", "processed", "dropped", "rejected", "failed")
OPTIONAL_COUNTERS = ("no_transform", "cancelled")


def counters_of(values: dict) -> dict | None:
    """The node's counters from one diagnostics status's values, or None when it has none."""
    try:
        out = {k: int(float(values[k])) for k in NODE_COUNTERS}
        out.update({k: int(float(values.get(k, 0))) for k in OPTIONAL_COUNTERS})
    except (KeyError, ValueError):
        return None
    return out


def unfinished(counters: dict) -> int:
    """Scans the node received and has not finished with (completed, dropped or refused) yet."""
    handled = sum(counters.get(k, 0) for k in ("processed", "dropped", "rejected", "failed",
                                               "no_transform", "cancelled"))
    return max(0, counters["received"] - handled)


def last_counters(diagnostics: list[dict]) -> tuple[int | None, dict] | None:
    """(receipt time in ns or None, counters) of the last /diagnostics status with the node's
    counters; None when none had them."""
    last = None
    for d in diagnostics:
        counters = counters_of(d.get("values") or {})
        if counters is not None:
            last = (d.get("t_ns"), counters)
    return last


#: What the report says for steps / guidance the node did not report (0 / -1 were given to it).
CHECKPOINTS = "the checkpoint's"


def node_value(diagnostics: list[dict], key: str, cast):
    """The last value of ``key`` in the node's /diagnostics, cast; None when absent or not a number
    (the node reports "n/a" for what it does not know)."""
    for d in reversed(diagnostics):
        value = (d.get("values") or {}).get(key)
        if value is not None:
            try:
                return cast(float(value)) if cast is int else cast(value)
            except (TypeError, ValueError):
                return None
    return None


def counters_age(events: dict, last: tuple[int | None, dict] | None, completed: int,
                 t_last_receipt: int | None) -> tuple[bool, float | None]:
    """(current, age): whether the node's last counters are current - received after the last publish
    and the last completed receipt, or accounting for every scan sent and every completion received -
    and, when they are not, how many seconds before the end of the run they were received (None when
    that is unknown).

    A node publishes /diagnostics every ``diagnostics_period`` seconds, and the player stops as soon as
    every input has come back: counters received before the last completion do not count it yet
    (e.g. "received 1, processed 0" next to "completed 1")."""
    if last is None:
        return False, None
    t_diag, c = last
    sent = len(events.get("inputs") or [])
    if c["received"] >= sent and unfinished(c) == 0 and c["processed"] >= completed:
        return True, None
    latest = max([t for t in (events.get("t_last_pub_ns"), t_last_receipt) if t is not None], default=None)
    if t_diag is not None and (latest is None or t_diag >= latest):
        return True, None
    t_end = events.get("t_end_ns") or latest
    if t_diag is None or t_end is None:
        return False, None
    return False, max(0.0, (t_end - t_diag) / 1e9)


def report_from_events(events: dict, *, bag: str, topic: str, rate: float, meta: dict | None = None,
                       paced: bool = False) -> dict:
    """Classify every input as completed / dropped and compute the live report."""
    inputs = events.get("inputs") or []
    outputs = [o for o in events.get("outputs") or [] if o.get("stamp_ns") is not None]
    t0 = events.get("t_first_pub_ns") or (inputs[0]["t_pub_ns"] if inputs else 0)
    # An output carries its input's stamp, the only key it has. Inputs that share a stamp (unset
    # stamps of a converted bag: all 0) take that stamp's outputs in the order they arrive, each
    # one received after the input was published: the counts are right, a latency may belong to
    # a neighbour when the node skipped one of them (the report says so).
    by_stamp: dict[int, list] = {}
    for o in sorted(outputs, key=lambda o: o["t_recv_ns"]):
        by_stamp.setdefault(int(o["stamp_ns"]), []).append(o)
    scans, matched = [], []
    for inp in inputs:
        stamp = int(inp["stamp_ns"])
        rec = {"index": inp["index"], "stamp_ns": stamp, "t_s": (inp["t_pub_ns"] - t0) / 1e9,
               "points_in": inp.get("points_in"), "points_out": None, "latency_ms": None}
        waiting = by_stamp.get(stamp) or []
        out = next((o for o in waiting if o["t_recv_ns"] >= inp["t_pub_ns"]), None)
        if out is not None:
            waiting.remove(out)
            matched.append(out)
            rec.update(status="completed", points_out=out.get("points_out"),
                       latency_ms=(out["t_recv_ns"] - inp["t_pub_ns"]) / 1e6)
        elif inp.get("problem"):      # the player's decode of what it sent: why the node refused it
            rec.update(status="dropped", reason=f"rejected by the node: {inp['problem']}")
        else:
            rec.update(status="dropped", reason=NO_OUTPUT)
        scans.append(rec)
    for bad in events.get("unusable_inputs") or []:
        scans.append({"index": bad["index"], "stamp_ns": None, "t_s": None, "points_in": None,
                      "points_out": None, "latency_ms": None, "status": "dropped",
                      "reason": f"unusable message in the bag: {bad.get('error')}"})
    expected = events.get("expected_total")
    seen = len(scans)
    if expected is not None and seen < expected:
        for i in range(seen, expected):
            scans.append({"index": i, "stamp_ns": None, "t_s": None, "points_in": None,
                          "points_out": None, "latency_ms": None, "status": "dropped",
                          "reason": "unreadable (damaged or truncated bag)"})
    scans.sort(key=lambda s: s["index"])
    report = {"mode": "live", "bag": bag, "topic": topic, **(meta or {}), "scans": scans,
              "bag_problems": events.get("bag_problems") or []}
    rep.finish(report)
    t_first, t_last = events.get("t_first_pub_ns"), events.get("t_last_pub_ns")
    recv = sorted(o["t_recv_ns"] for o in matched)
    span_in = (t_last - t_first) / 1e9 if t_first and t_last and t_last > t_first else 0.0
    span_out = (recv[-1] - t_first) / 1e9 if recv and t_first else 0.0
    report["throughput_hz"] = report["completed"] / span_out if span_out > 0 else float("nan")
    input_hz = (len(inputs) - 1) / span_in if span_in > 0 and len(inputs) > 1 else float("nan")
    stamps = sorted(int(i["stamp_ns"]) for i in inputs)
    if len(set(stamps)) < len(stamps) or (stamps and stamps[0] <= 0):
        # stamps that repeat or are unset say nothing of the drive's rate: the bag's log times do
        stamps = sorted(int(i.get("log_time_ns") or 0) for i in inputs)
    span_stamps = (stamps[-1] - stamps[0]) / 1e9 if len(stamps) > 1 else 0.0
    drive_hz = (len(stamps) - 1) / span_stamps if span_stamps > 0 else float("nan")
    # Paced, the replay waits for each answer, so nothing is ever dropped: keeping up means
    # completing scans as fast as the drive recorded them (its stamps), not "no drops"
    if paced:
        keeps_up = bool(report["total"] > 0 and report["dropped"] == 0 and
                        report["throughput_hz"] >= 0.95 * drive_hz)   # nan: False
    else:
        # no drops is not enough: a short replay (--limit) gives a slow node's one-slot mailbox
        # nothing to drop; completions must also come back as fast as the replay sent the scans
        # (with one worker, throughput >= input rate exactly when each latency fits a period)
        fast = not math.isfinite(input_hz) or report["throughput_hz"] >= 0.95 * input_hz
        keeps_up = bool(report["total"] > 0 and report["dropped"] == 0 and fast)
    no_output = sum(1 for s in scans if s.get("reason") == NO_OUTPUT)
    diagnostics = events.get("diagnostics") or []
    last = last_counters(diagnostics)
    counters = None if last is None else last[1]
    counters_current, counters_age_s = counters_age(events, last, report["completed"],
                                                    recv[-1] if recv else None)
    node_dropped = None if counters is None else counters["dropped"]
    # what the node ran with: its /diagnostics carry the resolved values (0 steps / -1 guidance given
    # to it mean the checkpoint's); the values given on the command line otherwise
    for key, cast in (("steps", int), ("guidance", float)):
        value = node_value(diagnostics, key, cast)
        if value is None:
            value = report.get(key)
        report[key] = CHECKPOINTS if value is None else value
    report["warmup"] = {"by": "node", "seconds": node_value(diagnostics, "warmup_s", float)}
    ready_s = None
    if events.get("t_ready_ns") and events.get("t_node_start_ns"):
        ready_s = (events["t_ready_ns"] - events["t_node_start_ns"]) / 1e9
    report["live"] = {
        "rate": rate, "paced": bool(paced), "input_hz": input_hz, "drive_hz": drive_hz,
        "ready_s": ready_s, "keeps_up": keeps_up,
        "node_dropped": node_dropped, "node_counters": counters,
        "node_counters_current": counters_current, "node_counters_age_s": counters_age_s,
        # scans with no output that the node does not account for (never arrived, or output lost)
        "unexplained_missing": (None if counters is None else max(0, no_output - (
            counters["dropped"] + counters["rejected"] + counters["failed"] +
            counters.get("no_transform", 0) + counters.get("cancelled", 0)))),
        "unmatched_outputs": len(outputs) - len(matched),
        "duplicate_input_stamps": sum(1 for i in inputs if i.get("duplicate_stamp")),
        "node_returncode": (events.get("node") or {}).get("returncode"),
        "node_log": (events.get("node") or {}).get("log"),
        "profile": events.get("profile"), "domain_id": events.get("domain_id"),
    }
    mem = [((t - t0) / 1e9, rss / 2**20) for t, rss in events.get("memory") or []]
    report["memory_samples"] = mem
    during = [m for m in mem if m[0] >= 0.0] or mem
    report["memory"] = {"process": "node", "peak_rss_mb": max((m[1] for m in mem), default=None),
                        "start_rss_mb": during[0][1] if during else None,
                        "end_rss_mb": during[-1][1] if during else None,
                        "growth_mb_per_min": rep.growth_per_min(during), "gpu_peak_mb": None}
    return report
