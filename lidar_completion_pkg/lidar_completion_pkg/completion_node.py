"""ROS 2 node: sensor_msgs/PointCloud2 in, completed PointCloud2 (float32 x, y, z) out.

    ros2 run lidar_completion_pkg completion_node --ros-args -p steps:=8        # colcon + system ROS 2
    lidar-completion-node --ros-args -p checkpoint:=student.pt -p device:=cuda  # PyPI wheels only

* The subscription callback converts the cloud (zero-copy), checks it, applies the range / z limits
  and the max_points budget, and leaves it in a one-slot mailbox; a worker thread completes only the
  newest cloud (older ones are dropped and counted) and publishes the result with the input's header.
* Bad input never crashes the node and is never published: each problem gets a throttled warning
  naming it and is counted in /diagnostics (1 Hz: latency p50/p95, processed, dropped, rejected,
  failed, input rate).
* ``steps`` and ``guidance`` can be changed at run time (ros2 param set); the others are read-only.
* Before rclpy starts, the console entry point points FASTDDS_DEFAULT_PROFILES_FILE at the shipped
  Fast DDS profile unless the user set it (large best-effort clouds need it in the sending process).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable, Optional

import numpy as np

from lidar_completion.errors import CloudFormatError, LidarCompletionError
from lidar_completion.pointcloud2 import create_cloud_xyz32, read_points_numpy

from . import dds
from .parameters import (BUILTIN, BY_NAME, DYNAMIC, NODE_NAME, PARAMETERS, STARTUP_ONLY,
                         check_value, completion_settings)
from .stats import Mailbox, Stats, Throttle, diagnostic_summary

# rclpy is imported inside the functions below so that `--help` and the parameter table work (and the
# Fast DDS environment is set) before any ROS library loads.


class StartupError(LidarCompletionError):
    """The node cannot start (bad parameter, unloadable checkpoint): a one-line fatal message."""


def default_completer_factory(config: dict):
    """The real Completer from the node's Completer parameters (``checkpoint`` '' = the shipped
    default student; see lidar_completion.settings)."""
    from lidar_completion.completer import Completer

    return Completer.from_settings(completion_settings(config))


def _make_node_class():
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
    from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                    ParameterType, SetParametersResult)
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import PointCloud2

    from .qos import cloud_qos

    ptypes = {"string": ParameterType.PARAMETER_STRING, "integer": ParameterType.PARAMETER_INTEGER,
              "double": ParameterType.PARAMETER_DOUBLE, "bool": ParameterType.PARAMETER_BOOL}

    def descriptor(p) -> ParameterDescriptor:
        d = ParameterDescriptor(name=p.name, type=ptypes[p.type], description=p.description,
                                additional_constraints=p.constraints, read_only=not p.dynamic)
        if p.range is not None and p.type == "integer":
            d.integer_range = [IntegerRange(from_value=int(p.range[0]), to_value=int(p.range[1]),
                                            step=1)]
        elif p.range is not None and p.type == "double":
            d.floating_point_range = [FloatingPointRange(from_value=float(p.range[0]),
                                                         to_value=float(p.range[1]), step=0.0)]
        return d

    class CompletionNode(Node):
        """The completion node. ``completer_factory(config) -> completer`` replaces the checkpoint
        loader (tests); the completer needs ``complete(points)`` (and, optionally,
        ``complete_detailed`` returning ``.points`` / ``.raw``, ``steps`` and ``guidance``)."""

        def __init__(self, completer_factory: Optional[Callable] = None, **node_kwargs):
            super().__init__(node_kwargs.pop("node_name", NODE_NAME), **node_kwargs)
            self.config = self._declare_parameters()
            self.stats = Stats()
            self.throttle = Throttle(5.0)
            self.mailbox = Mailbox()
            self._pending: dict = {}
            self._pending_lock = threading.Lock()
            self._stop = threading.Event()
            factory = completer_factory or default_completer_factory
            try:
                self.completer = factory(self.config)
            except Exception as exc:  # noqa: BLE001 - every load failure becomes one fatal line
                what = self.config["checkpoint"] or "the shipped default checkpoint"
                hint = "" if self.config["checkpoint"] else \
                    " (node parameter: --ros-args -p checkpoint:=/path/model.pt)"
                raise StartupError(f"cannot load {what}: {exc}{hint}") from exc
            resolved = []  # 0 / -1 meant "the checkpoint's default": show the values in use
            for name, cast in (("steps", int), ("guidance", float)):
                value = getattr(self.completer, name, None)
                if self.config[name] == STARTUP_ONLY[name] and isinstance(value, (int, float)) \
                        and not isinstance(value, bool):
                    self.config[name] = cast(value)
                    resolved.append(Parameter(name, value=cast(value)))
            if resolved:
                self.set_parameters(resolved)
            qos = cloud_qos(self.config["qos_reliability"], self.config["qos_depth"])
            self.pub = self.create_publisher(PointCloud2, self.config["output_topic"], qos)
            self.raw_pub = (self.create_publisher(PointCloud2, self.config["raw_output_topic"], qos)
                            if self.config["publish_raw"] else None)
            self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
            self.sub = self.create_subscription(PointCloud2, self.config["input_topic"],
                                                self._on_cloud, qos)
            self.diag_timer = self.create_timer(self.config["diagnostics_period"],
                                                self._publish_diagnostics)
            self.add_on_set_parameters_callback(self._on_set_parameters)
            self.worker = threading.Thread(target=self._work, name="completion-worker", daemon=True)
            self.worker.start()
            self.get_logger().info(
                f"completing {self.config['input_topic']} -> {self.config['output_topic']} with "
                f"{self.config['checkpoint'] or 'the default checkpoint'} ({self._settings()}, "
                f"device {self.config['device']}, QoS {self.config['qos_reliability']}/"
                f"{self.config['qos_depth']}, Fast DDS profile "
                f"{os.environ.get(dds.PROFILE_ENV) or 'none'})")

        # -- parameters ---------------------------------------------------------------------
        def _declare_parameters(self) -> dict:
            config = {}
            overrides = getattr(self, "_parameter_overrides", None)
            for p in PARAMETERS:
                override = overrides.get(p.name) if isinstance(overrides, dict) else None
                if p.type == "double" and override is not None and \
                        override.type_ == Parameter.Type.INTEGER:
                    # `-p guidance:=4` / `guidance: 4` in YAML mean 4.0
                    overrides[p.name] = Parameter(p.name, Parameter.Type.DOUBLE, float(override.value))
                try:
                    value = self.declare_parameter(p.name, p.default, descriptor(p)).value
                except Exception as exc:  # noqa: BLE001 - wrong type / out of range overrides
                    raise StartupError(f"invalid parameter {p.name}: {exc}") from None
                problem = check_value(p.name, value)
                if problem:
                    raise StartupError(f"invalid parameter: {problem}")
                config[p.name] = value
            if config["min_range"] >= config["max_range"]:
                raise StartupError(f"min_range ({config['min_range']}) must be < max_range "
                                   f"({config['max_range']})")
            if config["min_z"] >= config["max_z"]:
                raise StartupError(f"min_z ({config['min_z']}) must be < max_z ({config['max_z']})")
            return config

        def _on_set_parameters(self, params) -> "SetParametersResult":
            updates = {}
            for param in params:
                if param.name in BUILTIN:
                    continue
                if param.name not in BY_NAME:
                    continue  # undeclared names are refused by rclpy itself
                if param.name not in DYNAMIC:
                    return SetParametersResult(successful=False, reason=(
                        f"{param.name} is read-only while the node runs; only {', '.join(DYNAMIC)} "
                        "can change (restart the node for the others)"))
                problem = check_value(param.name, param.value, runtime=True)
                if problem:
                    return SetParametersResult(successful=False, reason=problem)
                updates[param.name] = param.value
            if updates:
                with self._pending_lock:
                    self._pending.update(updates)
                self.config.update(updates)
                self.get_logger().info(f"parameters changed: {updates} (from the next cloud on)")
            return SetParametersResult(successful=True)

        def _apply_pending(self) -> None:
            with self._pending_lock:
                pending, self._pending = self._pending, {}
            for name, value in pending.items():
                try:
                    setattr(self.completer, name, int(value) if name == "steps" else float(value))
                except Exception as exc:  # noqa: BLE001
                    self._warn("settings", f"cannot apply {name}={value}: {exc}")

        def _settings(self) -> str:
            steps = getattr(self.completer, "steps", self.config["steps"])
            guidance = getattr(self.completer, "guidance", self.config["guidance"])
            return f"steps {steps}, guidance {guidance}"

        # -- input ----------------------------------------------------------------------------
        def _warn(self, key: str, message: str) -> None:
            suppressed = self.throttle(key)
            if suppressed is not None:
                extra = f" ({suppressed} similar suppressed)" if suppressed else ""
                self.get_logger().warning(message + extra)

        def _reject(self, reason: str, message: str, frame: str = "") -> None:
            self.stats.note_rejected(reason, message)
            where = f" (frame '{frame}')" if frame else ""
            self._warn("reject." + reason, f"rejected input cloud{where}: {message}")

        def _on_cloud(self, msg) -> None:
            t_received = self.stats.note_input()
            frame = ""
            try:
                frame = str(msg.header.frame_id)
                points = read_points_numpy(msg, ("x", "y", "z"), skip_nans=True)
                points = self._limit(points)
                if points is None:
                    return
                if self.mailbox.put((msg.header, points, t_received)):
                    self.stats.note_dropped()
            except CloudFormatError as exc:
                self._reject(getattr(exc, "reason", "malformed"), str(exc), frame)
            except Exception as exc:  # noqa: BLE001 - never die on a message
                self._reject("unreadable", f"{type(exc).__name__}: {exc}", frame)

        def _limit(self, points: np.ndarray) -> Optional[np.ndarray]:
            c = self.config
            r2 = np.einsum("ij,ij->i", points, points)  # squared range, no temporary (N, 3)
            z = points[:, 2]
            keep = (r2 > c["min_range"] ** 2) & (r2 < c["max_range"] ** 2) & (z > c["min_z"]) & \
                (z < c["max_z"])
            n_finite = len(points)
            points = points[keep]
            if len(points) == 0:
                self._reject("out_of_limits", f"none of its {n_finite} finite points lies within "
                             f"{c['min_range']} m < range < {c['max_range']} m and "
                             f"{c['min_z']} m < z < {c['max_z']} m")
                return None
            if len(points) > c["max_points"]:
                self.stats.note_subsampled()
                self._warn("subsampled", f"cloud has {len(points)} points within the limits, more "
                           f"than max_points={c['max_points']}: subsampled evenly to "
                           f"{c['max_points']}")
                index = np.linspace(0, len(points) - 1, c["max_points"]).astype(np.int64)
                points = points[index]
            return np.ascontiguousarray(points, dtype=np.float32)

        # -- worker ---------------------------------------------------------------------------
        def _work(self) -> None:
            while not self._stop.is_set():
                item = self.mailbox.get(timeout=0.2)
                if item is None or self._stop.is_set():
                    continue
                try:
                    self._complete_one(*item)
                except Exception as exc:  # noqa: BLE001 - the worker must survive anything
                    if self._stop.is_set():
                        return
                    self.stats.note_failed("worker", f"{type(exc).__name__}: {exc}")
                    self._warn("worker", f"completion failed unexpectedly: {type(exc).__name__}: "
                               f"{exc}")

        def _complete_one(self, header, points: np.ndarray, t_received: float) -> None:
            self._apply_pending()
            t0 = time.monotonic()
            try:
                if hasattr(self.completer, "complete_detailed"):
                    result = self.completer.complete_detailed(points)
                    out, raw = result.points, getattr(result, "raw", None)
                else:
                    out, raw = self.completer.complete(points), None
            except CloudFormatError as exc:
                self._reject(getattr(exc, "reason", "unusable"), str(exc), str(header.frame_id))
                return
            except Exception as exc:  # noqa: BLE001
                self.stats.note_failed("completion", f"{type(exc).__name__}: {exc}")
                self._warn("completion", f"completion failed: {type(exc).__name__}: {exc}")
                return
            compute_s = time.monotonic() - t0
            out = self._checked_output(out, "completion")
            if out is None or self._stop.is_set():
                return
            msg = create_cloud_xyz32(header, out)
            raw_msg = None
            if self.raw_pub is not None and raw is not None:
                raw = self._checked_output(raw, "raw completion", count=False)
                if raw is not None:
                    raw_msg = create_cloud_xyz32(header, raw)
            self.pub.publish(msg)
            if raw_msg is not None:
                self.raw_pub.publish(raw_msg)
            self.stats.note_published(t_received, compute_s)

        def _checked_output(self, out, what: str, count: bool = True) -> Optional[np.ndarray]:
            try:
                arr = np.asarray(out, dtype=np.float32)
                if arr.ndim != 2 or arr.shape[1] < 3:
                    raise ValueError(f"shape {arr.shape}, expected (M, 3)")
                arr = arr[:, :3]
                finite = np.isfinite(arr).all(axis=1)
                if not finite.all():
                    self._warn("nonfinite_output", f"{what} had {int((~finite).sum())} non-finite "
                               "points; they are not published")
                    arr = arr[finite]
                if len(arr) == 0:
                    raise ValueError("no points")
                return arr
            except (TypeError, ValueError) as exc:
                if count:
                    self.stats.note_failed("bad_output", f"unusable {what}: {exc}")
                self._warn("bad_output", f"unusable {what} not published: {exc}")
                return None

        # -- diagnostics ----------------------------------------------------------------------
        def _publish_diagnostics(self) -> None:
            try:
                level, message, values = diagnostic_summary(self.stats.snapshot(),
                                                             self.worker.is_alive())
                values = values + [("steps", str(getattr(self.completer, "steps", "?"))),
                                   ("guidance", str(getattr(self.completer, "guidance", "?"))),
                                   ("device", str(self.config["device"])),
                                   ("checkpoint", self.config["checkpoint"] or "default")]
                status = DiagnosticStatus(level=bytes([level]), name=f"{self.get_name()}: completion",
                                          message=message, hardware_id=str(self.config["device"]),
                                          values=[KeyValue(key=k, value=v) for k, v in values])
                array = DiagnosticArray(status=[status])
                array.header.stamp = self.get_clock().now().to_msg()
                self.diag_pub.publish(array)
            except Exception as exc:  # noqa: BLE001 - diagnostics must not take the node down
                self._warn("diagnostics", f"cannot publish diagnostics: {exc}")

        # -- shutdown -------------------------------------------------------------------------
        def stop(self, timeout: float = 5.0) -> bool:
            """Stop the worker; True when it finished within ``timeout`` seconds."""
            self._stop.set()
            self.mailbox.close()
            self.worker.join(timeout)
            return not self.worker.is_alive()

    return CompletionNode


_NODE_CLASS = None


def node_class():
    """The CompletionNode class (built on first use, so importing this module loads no ROS)."""
    global _NODE_CLASS
    if _NODE_CLASS is None:
        _NODE_CLASS = _make_node_class()
    return _NODE_CLASS


def __getattr__(name):  # `from lidar_completion_pkg.completion_node import CompletionNode`
    if name == "CompletionNode":
        return node_class()
    raise AttributeError(name)


def usage() -> str:
    lines = [
        "usage: lidar-completion-node [--ros-args -p NAME:=VALUE ... ]",
        "       ros2 run lidar_completion_pkg completion_node [--ros-args -p NAME:=VALUE ...]",
        "",
        "Completes sensor_msgs/PointCloud2 scans (few-step diffusion) and publishes the completed",
        "cloud with the input header. Parameters (* = changeable at run time with ros2 param set):",
    ]
    for p in PARAMETERS:
        mark = "*" if p.dynamic else " "
        extra = f" [{p.constraints}]" if p.constraints else ""
        lines.append(f"  {mark} {p.name} ({p.type}, default {p.default!r}){extra}: {p.description}")
    lines += ["", f"Unless {dds.PROFILE_ENV} is set, the shipped Fast DDS profile is used:",
              f"  {dds.profile_path()}",
              "Set the same variable in every other process that publishes large clouds."]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Console entry point (`lidar-completion-node`, `completion_node`)."""
    argv = list(sys.argv if argv is None else argv)
    user_args = argv[1:argv.index("--ros-args")] if "--ros-args" in argv else argv[1:]
    if any(a in ("-h", "--help") for a in user_args):
        try:
            print(usage(), flush=True)
        except BrokenPipeError:  # `--help | head`
            sys.stdout = None
        return 0
    dds.configure_environment(os.environ, warn=lambda m: print(f"[WARN] [{NODE_NAME}]: {m}",
                                                               file=sys.stderr, flush=True))
    try:
        import rclpy
        from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    except ImportError as exc:
        print(f"error: the ROS 2 Python libraries are not importable ({exc}). Install them with "
              "`pip install 'lidar-completion[ros]'` or source a ROS 2 installation.", file=sys.stderr)
        return 1
    try:
        rclpy.init(args=argv)
    except Exception as exc:  # noqa: BLE001 - e.g. malformed --ros-args
        print(f"error: cannot start ROS 2: {exc}", file=sys.stderr)
        return 1
    node = None
    rc = 0
    try:
        try:
            node = node_class()()
        except StartupError as exc:
            rclpy.logging.get_logger(NODE_NAME).fatal(str(exc))
            return 1
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        try:
            executor.spin()
        except (KeyboardInterrupt, ExternalShutdownException):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if node is not None:
            finished = node.stop(timeout=5.0)
            s = node.stats
            node.destroy_node()  # before logging: the context may already be shut down (Ctrl-C)
            log = rclpy.logging.get_logger(NODE_NAME)
            if not finished:
                log.warning("the completion in progress did not finish within 5 s; exiting without it")
            log.info(f"shut down: processed {s.processed}, dropped {s.dropped}, rejected "
                     f"{s.rejected}, failed {s.failed}")
        rclpy.try_shutdown()
    return rc


if __name__ == "__main__":
    sys.exit(main())
