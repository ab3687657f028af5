"""`bag-from-kitti` and `bag-bench`: rosbag2 conversion and replay benchmarks (no ROS needed offline).

`bag-bench --live` runs through the ROS 2 layer, which registers its runner in the
``lidar_completion.live_bench`` entry point group: the core never imports or names the ROS package.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from importlib import metadata
from pathlib import Path

from ..cli import apply_threads, pacing_problem
from ..constants import MAX_STAMP_S
from ..errors import ConfigError
from ..settings import CompletionSettings, add_arguments

LIVE_BENCH_GROUP = "lidar_completion.live_bench"
#: The largest ROS_DOMAIN_ID with which DDS (Fast DDS's port formula) still has ports.
MAX_DOMAIN_ID = 232

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bag-from-kitti", help="write a SemanticKITTI-layout sequence into a rosbag2 bag",
        description="Write the scans of a SemanticKITTI-layout sequence (real or synthetic) into a "
                    "rosbag2 bag: sensor_msgs/PointCloud2 (float32 x, y, z, intensity; frame "
                    "'velodyne') stamped from times.txt, /tf odom -> base_link from poses.txt (in "
                    "the LiDAR frame through calib.txt) and /tf_static base_link -> velodyne (the "
                    "LiDAR --sensor-height above the ground). Written with rosbags: no ROS needed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("dataset_root", help="dataset root holding sequences/SS/velodyne/*.bin")
    # required options and the switch below: no "(default: ...)" from the formatter
    p.add_argument("--sequence", required=True, default=argparse.SUPPRESS, help="sequence id, e.g. 08")
    p.add_argument("--out", required=True, default=argparse.SUPPRESS, help="output bag directory (must not exist)")
    p.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap", help="rosbag2 storage")
    p.add_argument("--limit", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="write only the first N scans (default: all)")
    p.add_argument("--topic", default="/velodyne_points", help="PointCloud2 topic")
    p.add_argument("--frame-id", default="velodyne", help="frame of the clouds (tf child frame)")
    p.add_argument("--base-frame", default="base_link",
                   help="vehicle frame on the ground under the LiDAR (odom -> it on /tf)")
    p.add_argument("--sensor-height", type=float, default=1.73,
                   help="height of the LiDAR above --base-frame in metres (KITTI: 1.73)")
    p.add_argument("--start-time", type=float, default=1_317_600_000.0,   # bags.kitti.DEFAULT_START_NS
                   metavar="SECONDS",
                   help=f"seconds since the epoch added to times.txt so that no stamp is 0; "
                        f"0..{MAX_STAMP_S} (default: %(default).0f, 2011-10-03 00:00 UTC)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                   help="no progress bar")
    p.set_defaults(func=run_from_kitti)

    b = subparsers.add_parser(
        "bag-bench", help="benchmark completion on a bag (offline, or live through the ROS 2 node)",
        description="Benchmark scene completion on the PointCloud2 messages of a bag.\n\n"
                    "Offline (default): complete every message in this process; per-stage and "
                    "end-to-end latency, throughput, peak RSS (and GPU memory on CUDA). --write-bag "
                    "writes input clouds, completed clouds (/completed_points) and /tf into a new "
                    "bag for rviz.\n\n"
                    "--live: start the node (lidar-completion-node) as a separate process, replay the "
                    "bag over DDS in real time (or --rate R times faster) with our own player, and "
                    "measure publish-to-receipt latency, drops, whether the node keeps up and its "
                    "memory over time (needs the ROS 2 wheels: pip install -e "
                    "'lidar_completion_pkg[ros]').\n\n"
                    "Writes report.json, report.md and PNG plots into --out; the last line printed "
                    "is 'p50_ms=<x> p95_ms=<y> dropped=<n>/<total>'. Exit status 1 (with the "
                    "reason) when no scan was completed.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("bag", help="rosbag2 directory (or a .mcap / .db3 file)")
    b.add_argument("--topic", default="/velodyne_points", help="PointCloud2 input topic (default %(default)s)")
    b.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (offline: this process; live: the node, through "
                        "OMP_NUM_THREADS); default: torch's choice")
    b.add_argument("--limit", type=int, default=None, help="use only the first N scans")
    b.add_argument("--out", default=None,
                   help="report directory (default runs/bag-bench/<bag name>-<offline|live>)")
    b.add_argument("--write-bag", default=None, metavar="OUT_BAG",
                   help="also write input clouds, completed clouds and /tf into this new bag")
    b.add_argument("--write-storage", choices=("mcap", "sqlite3"), default="mcap",
                   help="storage of --write-bag (default %(default)s)")
    b.add_argument("--output-topic", default="/completed_points",
                   help="topic of the completed clouds (default %(default)s)")
    b.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="time the first completion like the others (offline: the first usable scan is "
                        "otherwise completed once before timing, reported as the warm-up and left out "
                        "of the statistics; live: the node's warmup parameter false)")
    b.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    live = b.add_argument_group("live mode")
    live.add_argument("--live", action="store_true", help="replay through the ROS 2 node over DDS")
    live.add_argument("--rate", type=float, default=1.0,
                      help="replay speed: 1 = real time, R = R times faster (default %(default)s)")
    live.add_argument("--pace", action="store_true",
                      help="publish each scan only once the node has answered the previous one (at "
                           "most at --rate): every scan is completed on a node slower than the bag, "
                           "and its latency is the node's own, without queueing")
    live.add_argument("--node-param", action="append", default=[], metavar="NAME:=VALUE",
                      help="extra ROS parameter for the node (repeatable)")
    live.add_argument("--node-cmd", default=None, help="command that starts the node instead of "
                      "lidar-completion-node (--ros-args and parameters are appended)")
    live.add_argument("--ready-timeout", type=float, default=120.0,
                      help="seconds to wait for the node to start and match (default %(default)s)")
    live.add_argument("--drain-timeout", type=float, default=30.0,
                      help="seconds without output after the replay before stopping, while the node "
                           "has no scan in hand (default %(default)s)")
    live.add_argument("--busy-timeout", type=float, default=600.0,
                      help="longest wait for a scan the node is completing (default %(default)s)")
    live.add_argument("--domain-id", type=int, default=None,
                      help="ROS_DOMAIN_ID for the player and the node (default: a random one)")
    add_arguments(b)
    b.set_defaults(func=run_bench)


def run_from_kitti(args) -> int:
    from ..bags.kitti import bag_from_kitti

    start = args.start_time
    if not (math.isfinite(start) and 0 <= start <= MAX_STAMP_S):
        # a stamp's seconds are an int32: beyond them the first message fails to serialize
        raise ConfigError(f"--start-time must be a number of seconds in 0..{MAX_STAMP_S} (a ROS "
                          f"stamp's int32 seconds), found {start:.15g}; leave it out for the default "
                          "(2011-10-03 00:00 UTC)")
    summary = bag_from_kitti(args.dataset_root, args.sequence, args.out, storage=args.storage,
                             limit=getattr(args, "limit", None), start_time_ns=int(round(start * 1e9)),
                             topic=args.topic,
                             frame_id=args.frame_id, base_frame=args.base_frame,
                             sensor_height=args.sensor_height, progress=getattr(args, "progress", True))
    print(f"wrote {summary['scans']} scans ({summary['points']} points, {summary['duration_s']:.1f} s) "
          f"of sequence {summary['sequence']} to {summary['bag']} ({summary['storage']}): "
          f"{summary['topic']}, /tf and /tf_static ({summary['frames']})")
    return 0


def _check_args(args) -> None:
    for name in ("limit", "threads"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, found {value}")
    problem = pacing_problem(args, ("ready_timeout", "drain_timeout", "busy_timeout"))
    if problem is not None:
        raise ConfigError(problem)
    if args.domain_id is not None and not 0 <= args.domain_id <= MAX_DOMAIN_ID:
        # beyond it Fast DDS cannot compute its ports, and the node dies with an RTPS error
        raise ConfigError(f"--domain-id must be 0..{MAX_DOMAIN_ID} (ROS 2 recommends 0..101), found "
                          f"{args.domain_id}")
    if args.write_bag:
        from ..bags.io import check_new_bag

        check_new_bag(args.write_bag)     # before a model load and a warm-up, not after
    if not args.live:
        # the live-mode options mean nothing offline (scans are completed one after another)
        given = [flag for flag, on in (("--rate", args.rate != 1.0), ("--pace", args.pace),
                                       ("--node-param", bool(args.node_param)),
                                       ("--node-cmd", args.node_cmd is not None)) if on]
        if given:
            raise ConfigError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for the live "
                              "mode: add --live, or leave them out")


def _check_out(out: Path) -> None:
    """ConfigError when the report cannot be written into ``out``: found before the model loads (or
    the node starts), not after every scan was completed, which lost the results. A report of an
    earlier run there is replaced, as the demo and scripts rerunning into one folder expect, but
    said so on stderr."""
    from ..bags.report import REPORT_JSON, REPORT_MD
    from ..cli import unwritable_folder

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder; give a folder for the report")
    problem = unwritable_folder(out)
    if problem is not None:
        raise ConfigError(f"--out {out}: {problem}; give a report folder you can write to")
    earlier = [name for name in (REPORT_JSON, REPORT_MD) if (out / name).exists()]
    if earlier:
        print(f"note: {out} holds the report of an earlier run ({', '.join(earlier)}): this run "
              "replaces it", file=sys.stderr)


def _check_bag(bag, topic) -> None:
    from ..bags.io import CLOUD_TYPE, BagReader, log as bag_log

    # quietly: the benchmark opens the bag again and gives its warnings (no metadata.yaml, damage)
    # then; here they would come twice
    level = bag_log.level
    bag_log.setLevel(logging.ERROR)
    try:
        with BagReader(bag) as reader:
            reader.require_topic(topic, CLOUD_TYPE)
    finally:
        bag_log.setLevel(level)


def _meta(settings: CompletionSettings, args) -> dict:
    meta = {k: v for k, v in settings.as_dict().items()
            if k in ("checkpoint", "steps", "guidance", "refine", "n_fps", "tile", "seed", "backend")}
    meta["threads"] = args.threads
    return meta


def run_bench(args) -> int:
    from ..bags.report import summary_line, warmup_text, write_report

    _check_args(args)
    settings = CompletionSettings.from_args(args)
    _check_bag(args.bag, args.topic)  # before loading a model or starting a node
    mode = "live" if args.live else "offline"
    # the bag's own name, also for a bag given as "." or "drive/" (an empty name otherwise)
    name = Path(args.bag).resolve().name
    out = Path(args.out) if args.out else Path("runs") / "bag-bench" / f"{name}-{mode}"
    _check_out(out)
    if args.live:
        report = _run_live(args, settings, out)
    else:
        report = _run_offline(args, settings)
    paths = write_report(report, out)
    for problem in report.get("bag_problems") or []:
        print(f"warning: {problem}")
    print(f"report: {paths['json']} {paths['md']}")
    print("plots: " + " ".join(str(p) for p in paths["plots"]))
    if report.get("written_bag"):
        print(f"bag with input and completed clouds: {report['written_bag']}")
    if warmup_text(report) is not None:
        print(f"warm-up: {warmup_text(report)}")
    if mode == "live":
        live = report["live"]
        pace = ""
        if live.get("paced"):   # nothing is dropped when paced: say what rate it sustains
            pace = (f" with the drive ({report['throughput_hz']:.2f} scans/s sustained against the "
                    f"drive's {live.get('drive_hz', float('nan')):.1f} Hz)")
        if report["completed"] == 0:
            pace = ""                       # no rate to compare: the error below says why
        verdict = "keeps up" if live["keeps_up"] else "does not keep up"
        print(f"live x{live['rate']}: {report['completed']}/{report['total']} completed, node "
              f"{verdict if report['completed'] else 'completed nothing'}{pace}"
              f" (node-reported drops: {live['node_dropped'] if live['node_dropped'] is not None else 'n/a'})")
        if live.get("duplicate_input_stamps"):
            print(f"warning: {live['duplicate_input_stamps']} input scan(s) share their header stamp with "
                  "an earlier one (unset stamps?): outputs, which carry only the stamp, were matched "
                  "to them in order, so a latency may belong to a neighbour")
    else:
        print(f"offline: {report['completed']}/{report['total']} completed, "
              f"{report['throughput_hz']:.2f} scans/s, peak RSS {report['memory']['peak_rss_mb']:.0f} MB")
        for reason, n in (report.get("drop_reasons") or {}).items():
            print(f"dropped {n}: {reason}")
    print(summary_line(report))
    if report.get("interrupted"):
        print(f"interrupted: the report covers the {report['total']} scan(s) done", file=sys.stderr)
        return 130
    if report["completed"] == 0:
        print(f"error: {no_completion_reason(report)}", file=sys.stderr)
        return 1
    return 0


def no_completion_reason(report: dict) -> str:
    """Why a benchmark completed nothing, from its drop reasons (and the node's counters, live)."""
    reasons = "; ".join(f"{n} x {r}" for r, n in (report.get("drop_reasons") or {}).items())
    text = f"no scan was completed ({report['completed']}/{report['total']}: {reasons or 'no scans'})"
    live = report.get("live")
    if live is not None:
        counters = live.get("node_counters") or {}
        if counters:
            from ..bags.report import node_counters_text
            text += "; the node reported " + node_counters_text(live)
        causes = {"no_transform": "the transforms to model_frame / target_frame were missing or stale "
                                  "(check the frames and that the bag has /tf and /tf_static)",
                  "rejected": "it refused the clouds as input",
                  "failed": "its completions failed"}
        received = counters.get("received") or 0
        found = [why for key, why in causes.items() if received and counters.get(key, 0) >= received]
        if found:
            # the node's counters explain every scan: not a matter of speed
            text += f". Every scan it received was lost the same way: {found[0]}"
        else:
            slower = ("replay with a lower --rate or give the node smaller budgets (--n-fps, --steps)"
                      if live.get("paced") else "replay with --pace or a lower --rate, or give the "
                      "node smaller budgets (--n-fps, --steps)")
            text += (". A node slower than the replay completes nothing when the replay ends first: "
                     + slower)
        text += "; its log: " + str(live.get("node_log"))
    return text


def _run_offline(args, settings: CompletionSettings) -> dict:
    from ..bags.bench import bench_offline
    from ..completer import Completer

    apply_threads(args.threads)
    completer = Completer.from_settings(settings)
    meta = _meta(settings, args)
    meta.update(steps=completer.steps, guidance=completer.guidance, refine=completer.refine,
                device=str(completer.device))
    return bench_offline(args.bag, args.topic, completer, write_bag=args.write_bag,
                         write_storage=args.write_storage, output_topic=args.output_topic,
                         limit=args.limit, progress=args.progress, meta=meta, warmup=args.warmup)


def live_runner():
    """The ROS 2 layer's live benchmark (entry point group ``lidar_completion.live_bench``)."""
    import importlib.util

    if importlib.util.find_spec("rclpy") is None:
        # the entry point is registered by the same install as the core, with or without the ROS 2
        # libraries: without them the replay died in a traceback of its `import rclpy`
        raise ConfigError("--live replays the bag to the ROS 2 node, and the ROS 2 Python libraries "
                          "(rclpy) are not importable here: install them (`make setup`, or pip "
                          "install 'lidar_completion_pkg[ros]' from a checkout) or source a ROS 2 "
                          "installation; without --live, bag-bench completes the bag in-process")
    found = list(metadata.entry_points(group=LIVE_BENCH_GROUP))
    if not found:
        raise ConfigError("--live needs the ROS 2 layer, and no installed package registers a "
                          f"'{LIVE_BENCH_GROUP}' entry point: run `make setup` (or pip install "
                          "-e 'lidar_completion_pkg[ros]')")
    return found[0].load()


def _run_live(args, settings: CompletionSettings, out: Path) -> dict:
    bench_live = live_runner()

    # the node's parameters are the same settings (checkpoint and steps have options of their own)
    params = list(settings.ros_overrides(exclude=("checkpoint", "steps")))
    if not args.warmup:
        params.append("warmup:=false")
    params += list(args.node_param)  # last: the node takes the last value given for a parameter
    meta = _meta(settings, args)
    meta["device"] = settings.device
    return bench_live(args.bag, args.topic, out, checkpoint=settings.checkpoint, steps=settings.steps,
                      rate=args.rate, output_topic=args.output_topic, node_params=params,
                      node_cmd=args.node_cmd, ready_timeout=args.ready_timeout,
                      drain_timeout=args.drain_timeout, domain_id=args.domain_id,
                      write_bag=args.write_bag, write_storage=args.write_storage, limit=args.limit,
                      progress=args.progress, threads=args.threads, meta=meta, pace=args.pace,
                      busy_timeout=args.busy_timeout)
