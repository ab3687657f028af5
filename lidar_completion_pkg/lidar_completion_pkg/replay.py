"""Live bag replay over DDS: our own player (no `ros2 bag play` needed), a receiver and a memory probe.

    python -m lidar_completion_pkg.replay BAG --topic /velodyne_points --events events.json \
        [--rate R] [--pace] [--checkpoint P] [--steps N] [--node-param key:=value ...] [--no-node]

What it does, in this order:
  1. points FASTDDS_DEFAULT_PROFILES_FILE at the shipped Fast DDS profile (unless set) before rclpy
     starts - the sending process is the one that needs it - and the node inherits the environment;
  2. starts the completion node as a separate process (``lidar-completion-node --ros-args -p ...``),
     its output in ``node.log`` next to the events file, and samples its RSS (psutil);
  3. waits (bounded) until the node's input subscription and output publisher are matched with ours;
  4. publishes the bag's serialized PointCloud2 bytes unchanged (so the header stamps are the bag's) on
     the bag's own schedule, in real time or ``--rate`` times faster, and the bag's /tf and /tf_static
     (transient local, as tf2's static broadcaster) so that the node can look its frames up; with
     ``--pace`` each scan waits until the node has answered the previous one (completed it, or counted
     it as dropped in /diagnostics), so a node slower than the bag still completes every scan;
  5. receives the node's output (the node keeps the input's stamp, so the stamp identifies the input),
     and reads /diagnostics;
  6. drains: stops when every input has an output, or ``--drain-timeout`` seconds after the last
     publish or receipt while the node has no scan in hand (at most ``--busy-timeout`` s while it
     has: the scan in hand is finished, however slow the node);
  7. stops the node and writes every event (publish / receipt times, point counts, memory samples,
     diagnostics) to the events JSON, which ``lidar-completion bag-bench --live`` turns into a report.

With ``--no-node`` it only plays the bag (and still records whatever arrives on --output-topic).
Exit status: 0 on success, 1 with an ``error`` entry in the events file (and on stderr) otherwise.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from lidar_completion.bags.io import (
    CLOUD_TYPE, DEFAULT_TOPIC, BagReader, BagWriter, deserialize, stamp_to_ns,
)
from lidar_completion.bags.memory import MemorySampler
from lidar_completion.bags.report import NODE_LOG
from lidar_completion.errors import LidarCompletionError

from .live_bench import counters_of, unfinished

OUTPUT_TOPIC = "/completed_points"
TF_TOPICS = ("/tf", "/tf_static")


class ReplayError(LidarCompletionError):
    """The live replay could not run (node did not start, never matched, bag unusable...)."""


def default_node_command() -> list[str]:
    """The node's console script next to this interpreter, else the module through this interpreter."""
    exe = Path(sys.executable).with_name("lidar-completion-node")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c",
            "import sys; from lidar_completion_pkg.completion_node import main; sys.exit(main())"]


def node_command(args) -> list[str]:
    base = shlex.split(args.node_cmd) if args.node_cmd else default_node_command()
    params = []
    if args.checkpoint:
        params.append(f"checkpoint:={args.checkpoint}")
    params += [f"input_topic:={args.topic}", f"output_topic:={args.output_topic}"]
    if args.steps is not None:
        params.append(f"steps:={args.steps}")
    params += list(args.node_param or [])
    cmd = base + ["--ros-args"]
    for p in params:
        cmd += ["-p", p]
    return cmd


def _cloud_problem(msg) -> str | None:
    """Why the node will reject this cloud (its own decode, after the message went out: the report
    then names the reason of a scan that got no answer), or None."""
    from lidar_completion.errors import CloudFormatError
    from lidar_completion.pointcloud2 import read_points_numpy
    try:
        read_points_numpy(msg, ("x", "y", "z"), skip_nans=True)
    except CloudFormatError as exc:
        return str(exc)
    return None


def _tail(path: Path, n: int = 25) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def _stop_process(proc: subprocess.Popen, grace: float = 10.0) -> int | None:
    if proc.poll() is not None:
        return proc.returncode
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            break
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.poll()


def _diag_values(status) -> dict:
    out = {}
    for kv in status.values:
        out[str(kv.key)] = str(kv.value)
    return out


class Replay:
    def __init__(self, args):
        self.args = args
        self.events: dict = {"settings": {k: v for k, v in vars(args).items()}, "error": None,
                             "inputs": [], "outputs": [], "unusable_inputs": [], "diagnostics": [],
                             "memory": [], "bag_problems": [], "expected_total": None,
                             "node": None, "t_ready_ns": None, "t_node_start_ns": None,
                             "t_first_pub_ns": None, "t_last_pub_ns": None, "t_end_ns": None}
        self._lock = threading.Lock()
        self._stamps_published: dict[int, int] = {}  # stamp -> input index
        self._completed: set[int] = set()
        self._last_activity = time.monotonic()
        self._writer: BagWriter | None = None
        self._log_time_of: dict[int, tuple[int, int]] = {}  # stamp -> (log_time_ns, t_pub_ns)
        self._last_output_log_ns = 0
        self._node_counters: tuple[int, dict] | None = None  # (t_ns, counters) of the last diagnostics
        self.proc: subprocess.Popen | None = None
        self.sampler: MemorySampler | None = None

    # ------------------------------------------------------------------ callbacks (executor thread)
    def on_output(self, data: bytes) -> None:
        t = time.monotonic_ns()
        try:
            msg = deserialize(data, CLOUD_TYPE)
            stamp, n = stamp_to_ns(msg.header.stamp), int(msg.width) * int(msg.height)
            frame = str(msg.header.frame_id)
        except Exception as exc:  # a malformed output is recorded, not fatal
            self.events["outputs"].append({"t_recv_ns": t, "stamp_ns": None, "points_out": None,
                                           "error": f"cannot deserialize: {exc}"})
            return
        with self._lock:
            self.events["outputs"].append({"t_recv_ns": t, "stamp_ns": stamp, "points_out": n,
                                           "frame_id": frame})
            if stamp in self._stamps_published:
                self._completed.add(stamp)
            self._last_activity = time.monotonic()
            if self._writer is not None and stamp in self._log_time_of:
                log_time, t_pub = self._log_time_of[stamp]
                # its input's time in the bag + its latency, but never before the completion written
                # last: paced, inputs keep the drive's 0.1 s spacing while answers come seconds
                # apart, and a fast answer was logged before a slow earlier one (played out of order)
                out_log = max(log_time + (t - t_pub), self._last_output_log_ns + 1)
                self._last_output_log_ns = out_log
                self._writer.write_raw(self.args.output_topic, CLOUD_TYPE, data, out_log)

    def on_diagnostics(self, msg) -> None:
        t = time.monotonic_ns()
        diags = self.events["diagnostics"]
        for status in msg.status:
            diags.append({"t_ns": t, "name": str(status.name), "hardware_id": str(status.hardware_id),
                          "level": int.from_bytes(status.level, "little") if isinstance(status.level, bytes)
                          else int(status.level), "message": str(status.message),
                          "values": _diag_values(status)})
            counters = counters_of(diags[-1]["values"])
            if counters is not None:
                with self._lock:
                    self._node_counters = (t, counters)
        if len(diags) > 2000:
            del diags[:len(diags) - 2000]

    # ------------------------------------------------------------------------------------- phases
    def start_node(self) -> None:
        out_dir = Path(self.args.events).resolve().parent
        out_dir.mkdir(parents=True, exist_ok=True)
        log_path = out_dir / NODE_LOG
        cmd = node_command(self.args)
        self.events["node"] = {"cmd": cmd, "log": str(log_path), "pid": None, "returncode": None}
        logf = open(log_path, "wb")
        self.events["t_node_start_ns"] = time.monotonic_ns()
        try:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=os.environ.copy())
        except OSError as exc:
            raise ReplayError(f"cannot start the node ({shlex.join(cmd)}): {exc}") from None
        finally:
            logf.close()
        self.events["node"]["pid"] = self.proc.pid
        self.sampler = MemorySampler(self.proc.pid, interval=self.args.memory_interval).start()

    def wait_ready(self, pub, sub) -> None:
        deadline = time.monotonic() + self.args.ready_timeout
        need_sub = self.proc is not None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                log = self.events["node"]["log"]
                raise ReplayError(f"the node exited with status {self.proc.returncode} before it was "
                                  f"ready; last lines of {log}:\n{_tail(Path(log))}")
            matched_in = pub.get_subscription_count() >= 1
            matched_out = sub.get_publisher_count() >= 1 or not need_sub
            if matched_in and matched_out:
                time.sleep(self.args.settle)  # let the remaining endpoint handshakes finish
                self.events["t_ready_ns"] = time.monotonic_ns()
                return
            time.sleep(0.05)
        what = []
        if pub.get_subscription_count() < 1:
            what.append(f"nothing subscribed to {self.args.topic}")
        if need_sub and sub.get_publisher_count() < 1:
            what.append(f"nothing publishes {self.args.output_topic}")
        extra = ""
        if self.proc is not None:
            extra = f"; last lines of {self.events['node']['log']}:\n{_tail(Path(self.events['node']['log']))}"
        raise ReplayError(f"the node was not ready within {self.args.ready_timeout:.0f} s "
                          f"({', '.join(what)}){extra}")

    def _answered(self, stamp: int, t_pub: int) -> bool:
        """The node completed the scan published at t_pub, or its /diagnostics (sent after it) account
        for every scan it received."""
        if stamp in self._completed:
            return True
        if self._node_counters is None:
            return False
        t, c = self._node_counters
        if t <= t_pub or unfinished(c) > 0:
            return False
        if c["received"] >= len(self._stamps_published):
            return True
        # never arrived (lost in transport): give up after --drain-timeout
        return (time.monotonic_ns() - t_pub) / 1e9 > self.args.drain_timeout

    def wait_answer(self, stamp: int, t_pub: int) -> None:
        """--pace: wait until the node has answered the scan (at most --busy-timeout seconds)."""
        deadline = time.monotonic() + self.args.busy_timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._answered(stamp, t_pub):
                    return
            if self.proc is not None and self.proc.poll() is not None:
                return  # reported by the caller
            time.sleep(0.01)

    def play(self, pub, bag: BagReader, tf_pubs: dict | None = None) -> None:
        from lidar_completion.progress import progress_bar

        a = self.args
        tf_pubs = tf_pubs or {}
        topics = [a.topic] + [t for t in TF_TOPICS if t in bag.topics and (self._writer or t in tf_pubs)]
        bar = progress_bar(total=self.events["expected_total"], desc="replay", unit="scan",
                           disable=not a.progress, file=sys.stderr)
        t0_bag = None
        t0_wall = None
        index = 0
        previous = None  # (stamp, t_pub) of the last scan published
        try:
            for raw in bag.messages(topics):
                if raw.topic != a.topic:
                    if raw.topic in tf_pubs:
                        tf_pubs[raw.topic].publish(raw.data)
                    if self._writer is not None:
                        with self._lock:
                            self._writer.write_raw(raw.topic, raw.msgtype, raw.data, raw.log_time_ns)
                    continue
                if a.limit is not None and index >= a.limit:
                    break
                try:
                    msg = deserialize(raw.data, CLOUD_TYPE)
                    stamp, n = stamp_to_ns(msg.header.stamp), int(msg.width) * int(msg.height)
                except Exception as exc:
                    self.events["unusable_inputs"].append({"index": index, "log_time_ns": raw.log_time_ns,
                                                           "error": f"cannot deserialize: {exc}"})
                    index += 1
                    bar.update(1)
                    continue
                if a.pace and previous is not None:
                    self.wait_answer(*previous)
                if t0_bag is None:
                    t0_bag, t0_wall = raw.log_time_ns, time.monotonic_ns()
                target = t0_wall + (raw.log_time_ns - t0_bag) / a.rate
                delay = (target - time.monotonic_ns()) / 1e9
                if delay > 0:
                    time.sleep(delay)
                elif a.pace:  # the node set the pace: later scans keep the bag's spacing from here
                    t0_wall -= delay * 1e9
                if self.proc is not None and self.proc.poll() is not None:
                    raise ReplayError(f"the node exited with status {self.proc.returncode} during the "
                                      f"replay; last lines of {self.events['node']['log']}:\n"
                                      f"{_tail(Path(self.events['node']['log']))}")
                with self._lock:
                    t_pub = time.monotonic_ns()
                    duplicate = stamp in self._stamps_published
                    self._stamps_published.setdefault(stamp, index)
                    self._log_time_of.setdefault(stamp, (raw.log_time_ns, t_pub))
                    if self._writer is not None:
                        self._writer.write_raw(a.topic, CLOUD_TYPE, raw.data, raw.log_time_ns)
                pub.publish(raw.data)
                previous = (stamp, t_pub)
                self._last_activity = time.monotonic()
                self.events["inputs"].append({"index": index, "stamp_ns": stamp,
                                              "log_time_ns": raw.log_time_ns, "t_pub_ns": t_pub,
                                              "points_in": n, "duplicate_stamp": duplicate,
                                              "problem": _cloud_problem(msg)})
                if self.events["t_first_pub_ns"] is None:
                    self.events["t_first_pub_ns"] = t_pub
                self.events["t_last_pub_ns"] = t_pub
                index += 1
                bar.update(1)
        finally:
            bar.close()

    def _node_finished(self) -> bool:
        """The node's /diagnostics (sent after our last publish) account for every input we sent and
        every completion it counted has reached us."""
        if self._node_counters is None or self.events["t_last_pub_ns"] is None:
            return False
        t, c = self._node_counters
        if t <= self.events["t_last_pub_ns"]:
            return False
        return (c["received"] >= len(self._stamps_published) and unfinished(c) == 0
                and len(self._completed) >= c["processed"])

    def _node_busy(self) -> bool:
        """The node's last /diagnostics show a scan it received and has not finished with."""
        return self._node_counters is not None and unfinished(self._node_counters[1]) > 0

    def drain(self) -> None:
        a = self.args
        busy_deadline = time.monotonic() + a.busy_timeout
        while True:
            with self._lock:
                all_done = len(self._completed) >= len(self._stamps_published) or self._node_finished()
                busy = self._node_busy()
            if all_done:
                return
            if self.proc is not None and self.proc.poll() is not None:
                return
            if time.monotonic() > busy_deadline:
                return
            if time.monotonic() - self._last_activity > a.drain_timeout and not busy:
                return
            time.sleep(0.02)

    def _diagnostics_period(self) -> float:
        """The node's diagnostics_period as given with --node-param (the node's default otherwise)."""
        period = 1.0
        for p in self.args.node_param or []:
            name, _, value = str(p).partition(":=")
            if name.strip() == "diagnostics_period":
                try:
                    period = float(value)
                except ValueError:
                    pass
        return period

    def settle_diagnostics(self) -> None:
        """After the drain, wait up to one diagnostics period + 1 s for a /diagnostics message sent
        after the last publish and the last receipt: the drain ends as soon as every input has come
        back, and the node's last counters before that do not count its last completions yet."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with self._lock:
            latest = max([self.events["t_last_pub_ns"] or 0]
                         + [o["t_recv_ns"] for o in self.events["outputs"]])
        deadline = time.monotonic() + self._diagnostics_period() + 1.0
        while time.monotonic() < deadline:
            with self._lock:
                if self._node_counters is not None and self._node_counters[0] > latest:
                    return
            if self.proc.poll() is not None:
                return
            time.sleep(0.02)

    # ----------------------------------------------------------------------------------------- run
    def run(self) -> None:
        a = self.args
        with BagReader(a.bag) as bag:
            bag.require_topic(a.topic, CLOUD_TYPE)
            expected = bag.expected_count(a.topic)
            if a.limit is not None:
                expected = min(expected, a.limit) if expected is not None else None
            self.events["expected_total"] = expected
            if a.write_bag:
                self._writer = BagWriter(a.write_bag, a.write_storage)
            try:
                self._run_with_bag(bag)
            finally:
                if self._writer is not None:
                    with self._lock:
                        self._writer.close()
                        self._writer = None
            self.events["bag_problems"] = list(bag.problems)

    def _tf_publishers(self, node, bag: BagReader) -> dict:
        """Publishers for the bag's /tf (as tf2's broadcaster) and /tf_static (as its static one)."""
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

        present = [t for t in TF_TOPICS if t in bag.topics]
        if not present:
            return {}
        try:
            from tf2_msgs.msg import TFMessage
        except ImportError:
            print(f"warning: tf2_msgs is not installed: the bag's {' and '.join(present)} are not "
                  "replayed (it is not on PyPI: a system ROS 2 has it, or `make setup` with "
                  "ROS2_CLI_WHEELS, docs/ros2.md)", file=sys.stderr)
            return {}
        qos = {"/tf": QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE,
                                 durability=DurabilityPolicy.VOLATILE),
               "/tf_static": QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE,
                                        durability=DurabilityPolicy.TRANSIENT_LOCAL)}
        return {t: node.create_publisher(TFMessage, t, qos[t]) for t in present}

    def _run_with_bag(self, bag: BagReader) -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import PointCloud2

        a = self.args
        if not a.no_node:
            self.start_node()
        from rclpy.signals import SignalHandlerOptions

        context = rclpy.Context()
        # not sys.argv: no ROS args here. rclpy's signal handler is left out: it shuts the context
        # down at once, under whatever call is running (a graph query, a publish), which then fails
        # with an RCLError instead of the interruption main() reports (exit status 130)
        rclpy.init(args=["lidar_completion_replay"], context=context,
                   signal_handler_options=SignalHandlerOptions.NO)
        executor = None
        spin = None
        try:
            node = rclpy.create_node("lidar_completion_replay", context=context)
            # Reliable publisher + best-effort subscribers: compatible with either QoS on the node side.
            pub_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=a.depth,
                                 reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
            sub_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=max(50, a.depth),
                                 reliability=ReliabilityPolicy.BEST_EFFORT,
                                 durability=DurabilityPolicy.VOLATILE)
            pub = node.create_publisher(PointCloud2, a.topic, pub_qos)
            tf_pubs = self._tf_publishers(node, bag)
            sub = node.create_subscription(PointCloud2, a.output_topic, self.on_output, sub_qos, raw=True)
            try:
                from diagnostic_msgs.msg import DiagnosticArray
                node.create_subscription(DiagnosticArray, "/diagnostics", self.on_diagnostics, sub_qos)
            except ImportError:
                pass
            executor = SingleThreadedExecutor(context=context)
            executor.add_node(node)
            spin = threading.Thread(target=executor.spin, name="replay-executor", daemon=True)
            spin.start()
            self.wait_ready(pub, sub)
            self.play(pub, bag, tf_pubs)
            self.drain()
            self.settle_diagnostics()
            self.events["t_end_ns"] = time.monotonic_ns()
        finally:
            if self.sampler is not None:  # before stopping the node: its shutdown is not measured
                self.sampler.stop()
                self.events["memory"] = self.sampler.samples
            if self.proc is not None:
                rc = _stop_process(self.proc)
                self.events["node"]["returncode"] = rc
            if executor is not None:
                executor.shutdown(timeout_sec=2.0)
            if spin is not None:
                spin.join(timeout=5.0)
            try:
                rclpy.shutdown(context=context)
            except Exception:
                pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lidar_completion_pkg.replay",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bag", help="rosbag2 directory (or .mcap / .db3 file)")
    p.add_argument("--topic", default=DEFAULT_TOPIC, help="PointCloud2 topic to replay (default %(default)s)")
    p.add_argument("--output-topic", default=OUTPUT_TOPIC,
                   help="topic of the node's completed clouds (default %(default)s)")
    p.add_argument("--events", required=True, help="JSON file to write every event to")
    p.add_argument("--rate", type=float, default=1.0, help="replay speed factor (default 1 = real time)")
    p.add_argument("--pace", action="store_true",
                   help="publish each scan only once the node has answered the previous one")
    p.add_argument("--busy-timeout", type=float, default=600.0,
                   help="longest wait for a scan the node has in hand (default %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N scans")
    p.add_argument("--checkpoint", default=None, help="checkpoint for the node (default: the node's)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps for the node")
    p.add_argument("--node-param", action="append", metavar="NAME:=VALUE",
                   help="extra ROS parameter for the node (repeatable)")
    p.add_argument("--node-cmd", default=None,
                   help="command that starts the node (default: lidar-completion-node); --ros-args and "
                        "the parameters are appended")
    p.add_argument("--no-node", action="store_true", help="do not start a node, only play the bag")
    p.add_argument("--ready-timeout", type=float, default=120.0,
                   help="seconds to wait for the node to match (default %(default)s)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="after the last publish/receipt, seconds to wait for more output (default %(default)s)")
    p.add_argument("--settle", type=float, default=0.5,
                   help="seconds to wait after the node is matched, before the first scan (default "
                        "%(default)s; ros2 bag play's --delay)")
    p.add_argument("--depth", type=int, default=5, help="publisher history depth (default %(default)s)")
    p.add_argument("--memory-interval", type=float, default=0.1, help="RSS sampling period in seconds")
    p.add_argument("--write-bag", default=None, help="also record inputs, received outputs and /tf here")
    p.add_argument("--write-storage", default="mcap", choices=("mcap", "sqlite3"))
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--errors-in-events-only", action="store_true",
                   help="do not print an error, only record it in the events file (the caller reports it)")
    return p


def _check_args(args) -> str | None:
    """What is wrong with the command line, or None: found before the node starts and the bag plays
    (a value that makes no sense was taken and played nothing, or forever; an events path that
    cannot be written failed only after the whole replay, losing it)."""
    from lidar_completion.cli import pacing_problem, unwritable_folder

    problem = pacing_problem(args, ("ready_timeout", "drain_timeout", "busy_timeout", "settle"))
    if problem is not None:
        return problem
    if args.limit is not None and args.limit < 1:
        return f"--limit must be >= 1, found {args.limit}"
    if not (args.memory_interval > 0 and math.isfinite(args.memory_interval)):
        return f"--memory-interval must be a finite number of seconds > 0, found {args.memory_interval}"
    if args.depth < 1:
        return f"--depth must be >= 1, found {args.depth}"
    events = Path(args.events)
    if str(events) == os.devnull:      # the launch file's player keeps no record: nothing to check
        return None
    if events.is_dir():
        return f"--events {events}: is a folder; give the name of a JSON file"
    problem = unwritable_folder(events.parent)
    if problem is not None:
        return f"--events {events}: {problem}; give a file in a folder you can write to"
    if events.exists() and not os.access(events, os.W_OK):
        return f"--events {events}: the file is not writable; give another file name"
    return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    problem = _check_args(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from .dds import configure_environment

    # Ctrl-C, and SIGTERM (a launch escalating its shutdown, a supervisor), end the replay: the node
    # it started is stopped and the events are written. SIGINT is set too, as it may have been
    # inherited as ignored (a background job of a shell)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    configure_environment(os.environ, warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    replay = Replay(args)
    rc = 0
    try:
        replay.run()
    except LidarCompletionError as exc:
        replay.events["error"] = str(exc)
        if not args.errors_in_events_only:
            print(f"error: {exc}", file=sys.stderr)
        rc = 1
    except KeyboardInterrupt:
        replay.events["error"] = "interrupted"
        rc = 130
    finally:
        ev = replay.events
        ev["profile"] = os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE")
        ev["domain_id"] = os.environ.get("ROS_DOMAIN_ID")
        try:
            Path(args.events).parent.mkdir(parents=True, exist_ok=True)
            Path(args.events).write_text(json.dumps(ev, default=str) + "\n")
        except OSError as exc:      # the folder went away, or the disk filled up during the replay
            from lidar_completion.cli import describe_os_error
            print(f"error: cannot write the events (--events {args.events}): "
                  f"{describe_os_error(exc, args.events)}", file=sys.stderr)
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
