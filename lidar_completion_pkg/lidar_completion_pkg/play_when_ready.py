"""Start a bag player once the completion node listens (what the launch file's ``bag:=`` runs).

    play_when_ready --node lidar_completion --bag BAG -- ros2 bag play BAG --clock

The completion node loads its checkpoint and completes a warm-up scan before it subscribes to its
input (seconds on a CPU; a lifecycle node subscribes when it is activated). A ``ros2 bag play``
started beside it publishes the bag's first scans to nobody, and a replay meant to show or measure
every scan silently starts late. This waits on the ROS graph until a node named ``--node`` (in any
namespace) has a sensor_msgs/PointCloud2 subscription, says which topic, warns when the bag holds
no messages on that topic (naming the cloud topics it does hold), and then replaces itself with the
command after ``--`` (an argument ``{input_topic}`` replaced by that topic): the player gets the
launch's signals directly, and its exit status is this process's.

Interrupted while waiting (Ctrl-C, the launch shutting down), it exits with status 0 and plays
nothing. ``--timeout`` bounds the wait (exit status 1, the bag not played); by default it waits as
long as the node takes. Imports no torch: it starts in a fraction of a second.

``--settle S`` (the launch's ``exit_after_bag:=true``): the command runs as a child instead (SIGINT /
SIGTERM are passed on to it, and it gets SIGTERM if this process dies), and when it has ended this
waits, at most S seconds, until the node has dealt with every cloud it received - its /diagnostics
count as many completed, dropped, rejected, untransformable or failed clouds as received, twice in a
row - so that the launch, which ends with this process, does not abandon the bag's last scans.
Exit status: the command's.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from typing import Callable, Optional, Sequence

from .live_bench import counters_of, unfinished

CLOUD_TYPE = "sensor_msgs/msg/PointCloud2"
#: an argument of the command equal to this becomes the node's input topic (the launch file's
#: fallback player, which must publish where the node listens, whatever its params file says)
INPUT_TOPIC = "{input_topic}"
DEFAULT_NODE = "lidar_completion"
REPORT_EVERY_S = 15.0
POLL_S = 0.2


def log(message: str) -> None:
    print(f"[play_when_ready] {message}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    argv = list(argv)
    if "--" not in argv:
        command = []
    else:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(
        prog="play_when_ready",
        description="Wait until the completion node subscribes to a PointCloud2 topic, then run the "
                    "command given after `--` (the bag player): in place of this process, or as its "
                    "child with --settle.",
        epilog="example: play_when_ready --node lidar_completion --bag drive.mcap -- "
               "ros2 bag play drive.mcap --clock")
    parser.add_argument("--node", default=DEFAULT_NODE,
                        help="name of the node to wait for, in any namespace, or its full name "
                             "(/front/lidar_completion) (default: %(default)s)")
    parser.add_argument("--bag", default="",
                        help="the bag the command plays: checked for messages on the node's input "
                             "topic (a warning when there are none); empty: no check")
    parser.add_argument("--timeout", type=float, default=0.0,
                        help="seconds to wait at most, then exit 1 without playing; 0 (default): "
                             "as long as the node takes")
    parser.add_argument("--settle", type=float, default=0.0,
                        help="run the command as a child and, once it has ended, wait at most this "
                             "many seconds until the node has dealt with every cloud it received "
                             "(its /diagnostics); 0 (default): replace this process by the command")
    args = parser.parse_args(argv)
    if not command:
        parser.error("no command to run: give it after `--` (e.g. -- ros2 bag play BAG --clock)")
    for name in ("timeout", "settle"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be 0 or positive, got {getattr(args, name)}")
    args.command = command
    return args


def _same_node(reported: str, name: str) -> bool:
    """A diagnostics status name's node part (``front/lidar_completion``) is node ``name``: a plain
    name in any namespace, a full name (``/front/lidar_completion``) exactly."""
    if name.startswith("/"):
        return "/" + reported.strip("/") == name.rstrip("/")
    return reported.rsplit("/", 1)[-1] == name


def cloud_subscriptions(graph, name: str) -> list[str]:
    """Topics of the PointCloud2 subscriptions of every node called ``name`` that ``graph`` (an rclpy
    Node) has discovered: in any namespace for a plain name, in that one for a full name
    (``/front/lidar_completion``)."""
    topics = []
    for node_name, namespace in graph.get_node_names_and_namespaces():
        if not _same_node(f"{namespace.rstrip('/')}/{node_name}", name):
            continue
        try:
            subs = graph.get_subscriber_names_and_types_by_node(node_name, namespace)
        except Exception:  # the node left between the two queries (rclpy's NodeNameNonExistentError)
            continue
        topics += [topic for topic, types in subs if CLOUD_TYPE in types]
    return sorted(set(topics))


def wait_for_subscription(graph, name: str, timeout: float = 0.0,
                          clock: Callable[[], float] = time.monotonic,
                          sleep: Callable[[float], None] = time.sleep) -> Optional[list[str]]:
    """The node's PointCloud2 topics once it has one; None when ``timeout`` (> 0) passed first."""
    start = last_report = clock()
    while True:
        topics = cloud_subscriptions(graph, name)
        if topics:
            return topics
        now = clock()
        if timeout > 0 and now - start >= timeout:
            return None
        if now - last_report >= REPORT_EVERY_S:
            last_report = now
            log(f"still waiting for node '{name}' to subscribe to its input ({now - start:.0f} s; it "
                "loads its checkpoint and completes a warm-up scan first; a lifecycle node subscribes "
                "when activated)")
        sleep(POLL_S)


def bag_check(bag: str, topics: Sequence[str]) -> Optional[str]:
    """A warning when the bag has no messages on any of ``topics``; None when it has, or when the bag
    cannot be inspected here (no rosbags: the player will say what it thinks of the bag)."""
    try:
        from lidar_completion.bags.io import BagReader
        from lidar_completion.errors import BagError
    except ImportError:
        return None
    try:
        with BagReader(bag) as reader:
            present = reader.topics
    except BagError as exc:
        return f"cannot inspect the bag: {exc}"
    # (a count of None: the bag's index does not say; taken as present)
    if any(t in present and present[t].count != 0 for t in topics):
        return None
    clouds = sorted(t for t, info in present.items() if info.msgtype == CLOUD_TYPE)
    where = ", ".join(topics)
    if clouds:
        return (f"{bag} has no messages on {where}, the node's input; its PointCloud2 topics: "
                f"{', '.join(clouds)} (launch with input_topic:={clouds[0]})")
    return f"{bag} has no messages on {where}, the node's input, and no PointCloud2 topic at all"


def unsettled(values: dict) -> Optional[int]:
    """Clouds the node received but has not yet dealt with, from one of its diagnostics' key/values
    (None when they do not carry the counts)."""
    counters = counters_of(values)
    return None if counters is None else unfinished(counters)


def wait_until_settled(graph, name: str, timeout: float) -> str:
    """Spin ``graph`` (an rclpy Node) on /diagnostics until two reports of node ``name`` in a row
    show nothing left to deal with, or ``timeout`` seconds pass; a line that says which."""
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray

    reports: list = []

    def on_diagnostics(msg) -> None:
        for status in msg.status:
            if _same_node(status.name.split(":")[0], name):
                reports.append({kv.key: kv.value for kv in status.values})

    graph.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 10)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        rclpy.spin_once(graph, timeout_sec=0.1)
        if len(reports) >= 2 and unsettled(reports[-1]) == 0 and unsettled(reports[-2]) == 0:
            last = counters_of(reports[-1])
            return (f"node '{name}' has dealt with all {last['received']} clouds it received "
                    f"({', '.join(f'{k} {v}' for k, v in last.items() if k != 'received')})")
    left = unsettled(reports[-1]) if reports else None
    return (f"node '{name}' still had {left} cloud(s) to deal with after {timeout:g} s" if left
            else f"no /diagnostics of node '{name}' within {timeout:g} s")


def run_then_settle(command: Sequence[str], name: str, settle: float) -> int:
    """The command as a child (signals passed on), then :func:`wait_until_settled`; its exit status."""
    import subprocess

    def parent_death_signal():  # the child gets SIGTERM if this process dies (Linux)
        try:
            import ctypes
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    try:
        child = subprocess.Popen(list(command), preexec_fn=parent_death_signal)
    except OSError as exc:
        log(f"cannot run {command[0]!r}: {exc}")
        return 127
    interrupted = []

    def forward(signum, _frame):
        interrupted.append(signum)
        if child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    rc = child.wait()
    if interrupted:
        return rc
    log(f"{' '.join(command[:3])} ended (exit status {rc}); waiting at most {settle:g} s for node '{name}' to "
        "finish the clouds it received")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with graph_node("play_when_ready_settle") as graph:
            log(wait_until_settled(graph, name, settle))
    except KeyboardInterrupt:
        log("interrupted while waiting for the node to settle")
    return rc


@contextlib.contextmanager
def graph_node(node_name: str):
    """A bare rclpy node (no parameter services, no /rosout) in a context of its own. rclpy's own
    SIGINT handler is left out: it shuts the context down at once, so a graph query running at that
    moment failed with "rcl node's context is invalid" (a traceback, exit status 1) instead of the
    KeyboardInterrupt the callers handle; the context is shut down on the way out instead."""
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    rclpy.init(args=[], signal_handler_options=SignalHandlerOptions.NO)
    graph = None
    try:
        graph = rclpy.create_node(node_name, start_parameter_services=False, enable_rosout=False)
        yield graph
    finally:
        if graph is not None:
            graph.destroy_node()
        rclpy.try_shutdown()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # SIGINT (the launch's shutdown, Ctrl-C) interrupts the wait even where it was inherited as
    # ignored (a background job of a shell), and SIGTERM (the launch escalating) does the same
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with graph_node("play_when_ready") as graph:
            shown = ["<its input topic>" if arg == INPUT_TOPIC else arg for arg in args.command]
            log(f"waiting for node '{args.node}' to subscribe to its input before running: {' '.join(shown)}")
            start = time.monotonic()
            topics = wait_for_subscription(graph, args.node, args.timeout)
    except KeyboardInterrupt:
        log("interrupted before the node subscribed: nothing played")
        return 0
    if topics is None:
        log(f"node '{args.node}' did not subscribe to a PointCloud2 topic within {args.timeout:g} s: "
            "nothing played (did it fail to start? see its output)")
        return 1
    log(f"node '{args.node}' subscribes to {', '.join(topics)} (after {time.monotonic() - start:.1f} s)")
    if args.bag:
        warning = bag_check(args.bag, topics)
        if warning:
            log(f"WARNING: {warning}")
    command = [topics[0] if arg == INPUT_TOPIC else arg for arg in args.command]
    if command != args.command:
        log(f"running: {' '.join(command)}")
    if args.settle > 0:
        return run_then_settle(command, args.node, args.settle)
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        log(f"cannot run {command[0]!r}: {exc}")
        return 127
    return 0  # (not reached: execvp replaced this process)


if __name__ == "__main__":
    sys.exit(main())
