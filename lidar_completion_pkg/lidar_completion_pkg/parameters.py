"""The node's parameters as a plain data table (no rclpy import).

The node declares exactly these (with descriptors built from the table), and the tests check the launch
file and launch/params/completion.yaml against the same table, so the three cannot drift apart.
Only ``DYNAMIC`` parameters may change while the node runs; the others are read-only after start-up.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

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


PARAMETERS: tuple[Param, ...] = (
    # model and sampling
    Param("checkpoint", "string", "",
          "Checkpoint file (ours or a published LiDiff / ScoreLiDAR / Distillation-DPO layout); "
          "empty = the shipped default student"),
    Param("steps", "integer", 0,
          "Solver steps per scan; 0 = the checkpoint's default (8 for the student, 50 for LiDiff). "
          "At run time 1..200", dynamic=True, range=(0, 200)),
    Param("guidance", "double", -1.0,
          "Classifier-free guidance weight w (published: 3.5 student, 6 teacher; the shipped student: 2; "
          "1 = conditional only); -1 = the checkpoint's default. At run time 0..20", dynamic=True, range=(-1.0, 20.0)),
    Param("process", "string", "",
          "Forward process the solver assumes: 'local' (what our networks are trained on) or 'vp' (the "
          "published LiDiff sampler); empty = the checkpoint's (local for ours, vp for published files)",
          choices=("", "local", "vp")),
    Param("refine", "bool", True, "Run the refinement network (x6 points) when the checkpoint has one"),
    Param("device", "string", "cpu", "Torch device: cpu, cuda, cuda:N or auto"),
    Param("backend", "string", "auto", "Sparse backend: auto, torch or minkowski",
          choices=("auto", "torch", "minkowski")),
    Param("precision", "string", "fp32", "Inference precision on CUDA (fp32 elsewhere)",
          choices=("fp32", "bf16", "fp16")),
    Param("seed", "integer", -1,
          "Noise seed; -1 = fresh randomness for every scan, >= 0 = the same output for the same scan",
          range=(-1, 2**31 - 1)),
    # input limits
    Param("min_range", "double", 3.5, "Input points closer than this (m) are ignored",
          range=(0.0, 1000.0)),
    Param("max_range", "double", 50.0, "Input points farther than this (m) are ignored",
          range=(0.1, 1000.0)),
    Param("min_z", "double", -4.0, "Input points below this height (m, sensor frame) are ignored",
          range=(-1000.0, 1000.0)),
    Param("max_z", "double", 100.0, "Input points above this height (m, sensor frame) are ignored",
          range=(-1000.0, 1000.0)),
    Param("max_points", "integer", 300_000,
          "Clouds with more points (finite, within the range / z limits) are evenly subsampled to "
          "this many, with a warning",
          range=(100, 10_000_000)),
    Param("n_fps", "integer", 0,
          "Farthest-point-sampled input points per scan; 0 = the checkpoint's budget (18000, the "
          "published one, when it records none); smaller = faster",
          range=(0, 100_000)),
    Param("tile", "integer", 0, "x_init = the sampled scan tiled this many times; 0 = the "
          "checkpoint's (published: 10)",
          range=(0, 100)),
    # (the node's own parameters - topics, frames, QoS, start-up, diagnostics - follow in ROS_PARAMETERS)
)

#: ROS-only parameters: topics, TF frames, per-topic QoS, warm-up and diagnostics.
ROS_PARAMETERS: tuple[Param, ...] = (
    # topics
    Param("input_topic", "string", "/velodyne_points", "Input sensor_msgs/PointCloud2 topic"),
    Param("output_topic", "string", "/completed_points", "Completed cloud (float32 x, y, z)"),
    Param("publish_raw", "bool", False, "Also publish the unrefined completion on raw_output_topic"),
    Param("raw_output_topic", "string", "/completed_points_raw", "Unrefined completion topic"),
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
)
PARAMETERS = PARAMETERS + ROS_PARAMETERS

BY_NAME = {p.name: p for p in PARAMETERS}
DYNAMIC = tuple(p.name for p in PARAMETERS if p.dynamic)
#: Parameters every rclpy node has without declaring them (the launch file may set them).
BUILTIN = ("use_sim_time",)


def default_values() -> dict:
    return {p.name: p.default for p in PARAMETERS}


#: Values allowed at start-up only (they mean "the checkpoint's default").
STARTUP_ONLY = {"steps": 0, "guidance": -1.0}


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
    if runtime and name == "steps" and value < 1:
        return f"steps must be >= 1 at run time, got {value}"
    if runtime and name == "guidance" and value < 0:
        return f"guidance must be >= 0 at run time, got {value}"
    return None
