"""The node's parameters as a plain data table (no rclpy import).

The Completer's options are generated from :class:`lidar_completion.settings.CompletionSettings`
(:data:`COMPLETER_PARAMETERS`; :func:`completion_settings` turns the node's values back into
settings); the node's own parameters (topics, QoS, diagnostics, message limits) are plain entries.
The node declares exactly these (with descriptors built from the table), and the tests check the
launch file and launch/params/completion.yaml against the same table, so they cannot drift apart.
Only ``DYNAMIC`` parameters may change while the node runs; the others are read-only after start-up.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from lidar_completion.errors import LidarCompletionError
from lidar_completion.settings import BY_NAME as OPTION_BY_NAME
from lidar_completion.settings import OPTIONS, CompletionSettings, Option

NODE_NAME = "lidar_completion"


@dataclass(frozen=True)
class Param:
    name: str
    type: str                      # "string" | "integer" | "double" | "bool"
    default: Any
    description: str
    dynamic: bool = False          # may be changed at run time (ros2 param set)
    range: Optional[tuple] = None  # inclusive (min, max) for integer / double
    choices: Optional[Sequence[str]] = None  # allowed values of a string

    @property
    def constraints(self) -> str:
        if self.range is not None:
            return f"{self.range[0]} <= {self.name} <= {self.range[1]}"
        if self.choices is not None:
            return "one of: " + ", ".join(self.choices)
        return ""


_ROS_TYPES = {str: "string", int: "integer", float: "double", bool: "bool"}


def completer_param(opt: Option) -> Param:
    """The node parameter of one Completer option (:mod:`lidar_completion.settings`): same name,
    type, default, description and allowed values; ``None`` becomes the option's ``ros_unset``."""
    description = opt.help[0].upper() + opt.help[1:]
    value_range = opt.range
    if opt.default is None:
        description += f"; {_show(opt.ros_unset)} = {opt.none_text()}"
        if value_range is not None:
            value_range = (min(opt.ros_unset, value_range[0]), value_range[1])
    if opt.runtime:
        description += ". Can change while the node runs"
        if opt.range is not None:
            description += f" ({opt.range[0]:g}..{opt.range[1]:g})"
    choices = opt.choices
    if choices is not None and opt.default is None:
        choices = (opt.ros_unset,) + tuple(choices)
    default = opt.ros_unset if opt.default is None else opt.default
    return Param(opt.name, _ROS_TYPES[opt.type], default, description, dynamic=opt.runtime,
                 range=value_range, choices=choices)


def _show(value) -> str:
    return "empty" if value == "" else f"{value:g}" if isinstance(value, float) else str(value)


#: The Completer's options, one parameter each (generated: change them in lidar_completion.settings).
COMPLETER_PARAMETERS: tuple[Param, ...] = tuple(completer_param(opt) for opt in OPTIONS)

PARAMETERS: tuple[Param, ...] = COMPLETER_PARAMETERS + (
    # input limits of the node itself (before the Completer's own range / z filters)
    Param("max_z", "double", 100.0,
          "Input points above this height (m, in model_frame; empty: the input cloud's frame) are "
          "ignored", range=(-1000.0, 1000.0)),
    Param("max_points", "integer", 300_000,
          "Clouds with more points (finite, within the range / z limits) are evenly subsampled to "
          "this many, with a warning",
          range=(100, 10_000_000)),
    # (the node's own parameters - topics, frames, QoS, start-up, diagnostics - follow in ROS_PARAMETERS)
)

#: ROS-only parameters: topics, TF frames, per-topic QoS, warm-up and diagnostics.
ROS_PARAMETERS: tuple[Param, ...] = (
    # topics
    # relative names: /velodyne_points etc. for a node at the root, /front/velodyne_points for a node
    # in namespace front (two sensors, two nodes: each its own topics without a params file each)
    Param("input_topic", "string", "velodyne_points",
          "Input sensor_msgs/PointCloud2 topic (a relative name resolves in the node's namespace)"),
    Param("output_topic", "string", "completed_points",
          "Completed cloud (float32 x, y, z; float64 with output_float64)"),
    Param("publish_raw", "bool", False, "Also publish the unrefined completion on raw_output_topic"),
    Param("raw_output_topic", "string", "completed_points_raw", "Unrefined completion topic"),
    Param("output_float64", "bool", False,
          "Publish float64 x, y, z instead of float32: for a target_frame far from its origin (a "
          "UTM-sized map frame, where float32 steps by up to 1 m); float32 completions that reach "
          "131 km from the origin are warned about"),
    # frames
    Param("model_frame", "string", "",
          "TF frame the networks see: gravity-aligned, origin at the LiDAR (the frame the training "
          "scans were in). The input is transformed into it at the cloud's stamp; the range / z "
          "limits apply in it. Empty = the input cloud's own frame"),
    Param("target_frame", "string", "",
          "Frame the completion is published in (transformed at the input's stamp); empty = the "
          "input cloud's frame"),
    Param("tf_timeout", "double", 0.2,
          "Seconds to wait for a transform at the cloud's stamp; a scan whose transform is missing "
          "or stale after that is dropped and counted", range=(0.0, 10.0)),
    # QoS (each also overridable with rclpy's qos_overrides.<topic>.<publisher|subscription>.*)
    Param("input_qos_reliability", "string", "best_effort",
          "Reliability of the input subscription (best_effort also receives from reliable "
          "publishers)", choices=("best_effort", "reliable")),
    Param("input_qos_depth", "integer", 5, "History depth of the input subscription",
          range=(1, 1000)),
    Param("output_qos_reliability", "string", "reliable",
          "Reliability of the completed-cloud publishers (reliable: rviz's default subscription "
          "receives it)", choices=("best_effort", "reliable")),
    Param("output_qos_depth", "integer", 5, "History depth of the completed-cloud publishers",
          range=(1, 1000)),
    # start-up and diagnostics
    Param("warmup", "bool", True,
          "Complete one synthetic scan before subscribing (lifecycle node: in configure), so that "
          "the first real scan does not pay for graph capture and kernel tuning"),
    Param("diagnostics_period", "double", 1.0, "Seconds between /diagnostics messages",
          range=(0.1, 60.0)),
    Param("exit_with_parent", "bool", False,
          "Shut down when the process that started the node ends (the launch file sets it true "
          "over the params file, exit_with_parent:=false there turns it off: `ros2 launch` stopped "
          "by SIGTERM exits without stopping its nodes)"),
)
PARAMETERS = PARAMETERS + ROS_PARAMETERS

BY_NAME = {p.name: p for p in PARAMETERS}
DYNAMIC = tuple(p.name for p in PARAMETERS if p.dynamic)
#: Parameters every rclpy node has without declaring them (the launch file may set them).
BUILTIN = ("use_sim_time",)
#: Names rclpy itself takes at start (not the node's parameters, never reported as unknown).
ROS_OWN = ("use_sim_time", "start_type_description_service", "qos_overrides.")


def unknown_parameter(name: str):
    """None for a parameter the node has (or rclpy takes), else a message naming the closest one."""
    import difflib

    if name in BY_NAME or name.startswith(ROS_OWN):
        return None
    close = difflib.get_close_matches(name, list(BY_NAME), n=1)
    return (f"the node has no parameter '{name}'" + (f" (did you mean {close[0]}?)" if close else "")
            + "; `lidar-completion-node --help` lists them")


def default_values() -> dict:
    return {p.name: p.default for p in PARAMETERS}


#: Values allowed at start-up only (they mean "the checkpoint's default").
STARTUP_ONLY = {opt.name: opt.ros_unset for opt in OPTIONS if opt.runtime and opt.default is None}


def yaml_entry(p: Param, width: int = 100, indent: str = "    ") -> str:
    """``p`` as launch/params/completion.yaml writes it: its description (and constraints) as
    comment lines, then ``name: default``."""
    import json
    import textwrap

    text = p.description + (f" [{p.constraints}]" if p.constraints else "")
    comment = textwrap.wrap(text, width - len(indent) - 2)
    value = str(p.default).lower() if p.type == "bool" else json.dumps(p.default)
    return "".join(f"{indent}# {line}\n" for line in comment) + f"{indent}{p.name}: {value}\n"


def completion_settings(config: dict) -> CompletionSettings:
    """The Completer settings of the node's parameter values (sentinels back to None)."""
    return CompletionSettings.from_ros(config)


def check_value(name: str, value, runtime: bool = False) -> Optional[str]:
    """None when ``value`` is acceptable for parameter ``name``, else the reason it is not.

    ``runtime``: a change while the node runs, where "the checkpoint's default" sentinels are refused.
    """
    p = BY_NAME.get(name)
    if p is None:
        return f"unknown parameter '{name}'"
    if p.type == "bool":
        ok = isinstance(value, bool)
    elif p.type == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif p.type == "double":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:
        return f"{name} must be of type {p.type}, got {value!r}"
    if p.range is not None and not (p.range[0] <= value <= p.range[1]):
        return f"{name} must satisfy {p.constraints}, got {value!r}"
    if p.choices is not None and value not in p.choices:
        return f"{name} must be {p.constraints}, got {value!r}"
    opt = OPTION_BY_NAME.get(name)
    if opt is None:
        return None
    if opt.default is None and value == opt.ros_unset:   # "the checkpoint's" / "none"
        if runtime and name in STARTUP_ONLY:
            return f"{name} must be in {opt.allowed_text()} at run time, got {value!r}"
        return None
    try:
        opt.check(value)
    except LidarCompletionError as exc:
        return str(exc)
    return None


if __name__ == "__main__":   # the Completer section of launch/params/completion.yaml
    print("".join(yaml_entry(p) for p in COMPLETER_PARAMETERS), end="")
