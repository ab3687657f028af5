"""Console entry points of the node: `completion_node` / `lidar-completion-node` (plain node) and
`lifecycle_completion_node` (managed node).

    ros2 launch lidar_completion_pkg completion.launch.py device:=cpu           # `make setup` or colcon
    ros2 run lidar_completion_pkg completion_node --ros-args -p steps:=8
    lidar-completion-node --ros-args -p checkpoint:=student.pt -p device:=cuda

Before rclpy loads, the entry point points FASTDDS_DEFAULT_PROFILES_FILE at the shipped Fast DDS
profile unless the user set it (large clouds need it in the sending process), then imports the node
classes (:mod:`.node`, :mod:`.lifecycle_node`) and spins. Start-up errors are one FATAL line and exit
status 1; Ctrl-C stops cleanly (exit status 0) and logs the totals. This module imports no ROS library
at import time, so `--help` works without them.
"""
from __future__ import annotations

import gc
import logging
import os
import signal
import sys

from . import dds
from .parameters import NODE_NAME, PARAMETERS
from .pipeline import StartupError, busy_threads, default_completer_factory  # noqa: F401 - public API

LIFECYCLE_EXECUTABLE = "lifecycle_completion_node"


def usage(lifecycle: bool = False) -> str:
    exe = LIFECYCLE_EXECUTABLE if lifecycle else "completion_node"
    lines = [
        "usage: lidar-completion-node [--ros-args -p NAME:=VALUE ... ]" if not lifecycle else
        f"usage: {exe} [--ros-args -p NAME:=VALUE ... ]",
        f"       ros2 run lidar_completion_pkg {exe} [--ros-args -p NAME:=VALUE ...]",
        "",
        "Completes sensor_msgs/PointCloud2 scans (few-step diffusion) and publishes the completed",
        "cloud with the input's stamp in target_frame (default: the input's frame).",
    ]
    if lifecycle:
        lines += ["Managed node: `ros2 lifecycle set /lidar_completion configure` loads the checkpoint "
                  "and warms up,", "`... activate` subscribes."]
    lines += ["Parameters (* = changeable at run time with ros2 param set):"]
    for p in PARAMETERS:
        mark = "*" if p.dynamic else " "
        extra = f" [{p.constraints}]" if p.constraints else ""
        lines.append(f"  {mark} {p.name} ({p.type}, default {p.default!r}){extra}: {p.description}")
    lines += ["QoS of every topic can also be set with qos_overrides.<topic>.<publisher|subscription>."
              "<reliability|depth|history|durability>.",
              "", f"Unless {dds.PROFILE_ENV} is set, the shipped Fast DDS profile is used:",
              f"  {dds.profile_path()}",
              "Set the same variable in every other process that publishes large clouds."]
    return "\n".join(lines)


def _interrupt_once(signum, frame):
    """SIGINT and SIGTERM: KeyboardInterrupt the first time (also while loading or warming up), then
    ignored. A terminal's Ctrl-C reaches the whole process group and `ros2 launch` forwards its own
    SIGINT right after: the second must not interrupt the clean shutdown the first started. SIGTERM
    (`docker stop`, systemd, `ros2 launch` escalating) gets the same: without it rclpy's own handler
    only shut the context down, which a load or a warm-up in progress did not notice (tens of
    seconds, past the 10 s grace before SIGKILL)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _exit_past_running_completions(code: int) -> int:
    """``code``, or the process ends here with it when a completer thread is still inside torch (a
    load, or a scan of a completer that cannot be cancelled): finalising the interpreter under a
    running torch thread aborts the process ("terminate called without an active exception", exit
    status 134). Everything worth keeping is flushed first; the ROS context is already shut down."""
    if not busy_threads():
        return code
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _run(argv, lifecycle: bool) -> int:
    # the process that started this one, read first: a launch stopped during the load and warm-up
    # (a minute on a CPU) has already left it adopted by then, and its parent would seem unchanged
    started_by = os.getppid()
    argv = list(sys.argv if argv is None else argv)
    user_args = argv[1:argv.index("--ros-args")] if "--ros-args" in argv else argv[1:]
    if any(a in ("-h", "--help") for a in user_args):
        try:
            print(usage(lifecycle), flush=True)
        except BrokenPipeError:  # `--help | head`
            sys.stdout = None
        return 0
    if "--version" in user_args:
        from lidar_completion import __version__
        prog = os.path.basename(argv[0]).removesuffix(".py") if argv else ""
        print(f"{prog or 'lidar-completion-node'} {__version__}")
        return 0
    if user_args:
        # `-p steps:=4` without --ros-args was ignored: the node started (a minute's load and
        # warm-up on a CPU) with other settings than asked
        print(f"error: unknown argument(s) {' '.join(user_args)}: node parameters go after --ros-args "
              "(`lidar-completion-node --ros-args -p steps:=4`); --help lists them", file=sys.stderr)
        return 2
    dds.configure_environment(os.environ, warn=lambda m: print(f"[WARN] [{NODE_NAME}]: {m}",
                                                               file=sys.stderr, flush=True))
    try:
        import rclpy
        from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor

        if lifecycle:
            from .lifecycle_node import LifecycleCompletionNode as node_cls
        else:
            from .node import CompletionNode as node_cls
    except ImportError as exc:
        print(f"error: the ROS 2 Python libraries are not importable ({exc}). Install them with "
              "`make setup` (or `pip install 'lidar-completion[ros]'`) or source a ROS 2 installation.",
              file=sys.stderr)
        return 1
    signal.signal(signal.SIGINT, _interrupt_once)  # rclpy's own handlers chain to them
    signal.signal(signal.SIGTERM, _interrupt_once)
    try:
        rclpy.init(args=argv)
    except Exception as exc:  # noqa: BLE001 - e.g. malformed --ros-args
        print(f"error: cannot start ROS 2: {exc}", file=sys.stderr)
        return 1
    node = executor = None
    interrupted_start = False
    try:
        try:
            node = node_cls()
        except StartupError as exc:
            rclpy.logging.get_logger(NODE_NAME).fatal(str(exc))
            return 1
        except Exception:
            if rclpy.ok():
                raise
            return 0  # interrupted while starting: the context is gone
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        parent = started_by if node.pipeline.config.get("exit_with_parent") else None
        try:
            # until Ctrl-C / SIGTERM, or a lifecycle node's shutdown transition (finalized), or with
            # exit_with_parent the end of the process that started the node (it is then adopted)
            while executor.context.ok() and not getattr(node, "finished", False):
                executor.spin_once(timeout_sec=0.25)
                if parent is not None and os.getppid() != parent:
                    node.get_logger().warning(f"the process that started this node (pid {parent}) "
                                              "has ended: shutting down (exit_with_parent)")
                    break
        except (KeyboardInterrupt, ExternalShutdownException):
            pass
    except KeyboardInterrupt:
        # said below, once the half-built node (and its /rosout publisher, whose context the signal
        # invalidated) is collected: logging now printed "Failed to publish log message to rosout"
        interrupted_start = node is None
    finally:
        if node is not None:
            finished = node.pipeline.stop(timeout=5.0)
            s = node.pipeline.stats
            if executor is not None:
                executor.remove_node(node)
            node.destroy_node()  # before logging: the context may already be shut down (Ctrl-C)
            # A lifecycle node's state machine keeps its handle, and with it its /rosout publisher,
            # until the node object is collected: logging before that would try the publisher, whose
            # context Ctrl-C has invalidated ("Failed to publish log message to rosout").
            node = executor = None
            gc.collect()
            log = rclpy.logging.get_logger(NODE_NAME)
            if not finished:
                log.warning("the completion in progress did not end within 5 s; exiting without it")
            log.info(f"shut down: processed {s.processed}, dropped {s.dropped}, rejected "
                     f"{s.rejected}, no transform {s.no_transform}, failed {s.failed}, "
                     f"cancelled {s.cancelled}, of {s.received} received")
        if interrupted_start:
            gc.collect()
            rclpy.logging.get_logger(NODE_NAME).info("interrupted while starting; exiting")
        rclpy.try_shutdown()
    return 0


def main(argv=None) -> int:
    """`completion_node`, `lidar-completion-node`: the plain node."""
    return _exit_past_running_completions(_run(argv, lifecycle=False))


def main_lifecycle(argv=None) -> int:
    """`lifecycle_completion_node`: the managed node."""
    return _exit_past_running_completions(_run(argv, lifecycle=True))


if __name__ == "__main__":
    sys.exit(main())
