"""The completion node (rclpy Node): warms up, then subscribes and completes.

    ros2 run lidar_completion_pkg completion_node --ros-args -p steps:=8     # colcon or `make setup`
    lidar-completion-node --ros-args -p checkpoint:=student.pt -p device:=cuda

Start-up: parameters are declared and checked, the checkpoint is loaded, one synthetic scan is completed
(``warmup``; /diagnostics says ``warming up`` until then), the TF listener (when a frame parameter is set)
and the publishers are created, and only then the input subscription: the first real scan costs what
every other does. /diagnostics then reports ``ready: true``. The work itself: :mod:`.pipeline`.
Import this module after the Fast DDS environment is set (the console entry point does).
"""
from __future__ import annotations

from typing import Callable, Optional

from rclpy.clock import Clock, ClockType
from rclpy.node import Node
from sensor_msgs.msg import PointCloud2

from .parameters import NODE_NAME, ROS_OWN
from .pipeline import CompletionPipeline, declare_parameters
from .qos import cloud_qos, describe, overridable
from .stats import ACTIVE, WARMING_UP


def create_outputs(node, pipeline: CompletionPipeline, make_publisher: Callable) -> None:
    """The completed-cloud publishers (``make_publisher``: create_publisher or create_lifecycle_publisher)."""
    c = pipeline.config
    qos = cloud_qos(c["output_qos_reliability"], c["output_qos_depth"])
    pipeline.pub = make_publisher(PointCloud2, c["output_topic"], qos,
                                  qos_overriding_options=overridable())
    pipeline.raw_pub = (make_publisher(PointCloud2, c["raw_output_topic"], qos,
                                       qos_overriding_options=overridable())
                        if c["publish_raw"] else None)


def create_input(node, pipeline: CompletionPipeline):
    c = pipeline.config
    return node.create_subscription(PointCloud2, c["input_topic"], pipeline.on_cloud,
                                    cloud_qos(c["input_qos_reliability"], c["input_qos_depth"]),
                                    qos_overriding_options=overridable())


def warn_unknown_parameters(node) -> None:
    """A warning naming each parameter given at start (-p, a params file) that the node does not
    have (a typo: ``-p step:=4``); rclpy ignores them without a word."""
    given = getattr(node, "_parameter_overrides", None) or {}
    unknown = sorted(n for n in given if not node.has_parameter(n) and not n.startswith(ROS_OWN))
    if unknown:
        node.get_logger().warning(
            f"ignored {len(unknown)} parameter(s) this node does not have: {', '.join(unknown)} "
            "(a typo? `lidar-completion-node --help` lists its parameters)")


def wall_clock() -> Clock:
    """The clock of the diagnostics timer: steady wall time. On the node's clock, use_sim_time
    without a /clock publisher (or a paused bag) stops the timer, and whatever watches /diagnostics
    for the node's health would take it for dead."""
    return Clock(clock_type=ClockType.STEADY_TIME)


def qos_summary(pipeline: CompletionPipeline, sub) -> str:
    return f"QoS in {describe(sub.qos_profile)}, out {describe(pipeline.pub.qos_profile)}"


class CompletionNode(Node):
    """sensor_msgs/PointCloud2 in, completed PointCloud2 (float32 x, y, z) out.

    ``completer_factory(config) -> completer`` replaces the checkpoint loader (tests); a completer needs
    ``complete(points)`` (and, optionally, ``complete_detailed`` returning ``.points`` / ``.raw``,
    ``steps`` and ``guidance``). Raises pipeline.StartupError when it cannot start.
    """

    def __init__(self, completer_factory: Optional[Callable] = None, **node_kwargs):
        super().__init__(node_kwargs.pop("node_name", NODE_NAME), **node_kwargs)
        self.config = declare_parameters(self)
        self.pipeline = CompletionPipeline(self, self.config, state=WARMING_UP)
        warn_unknown_parameters(self)
        self.pipeline.check_frames()
        with self.pipeline.heartbeat():      # "warming up" on /diagnostics all along
            self.pipeline.load(completer_factory)
            self.pipeline.warm_up()
        self.pipeline.open_frames()
        create_outputs(self, self.pipeline, self.create_publisher)
        self.pipeline.start()
        self.sub = create_input(self, self.pipeline)
        self.pipeline.state = ACTIVE
        self.diag_timer = self.create_timer(self.config["diagnostics_period"],
                                            self.pipeline.publish_diagnostics, clock=wall_clock())
        self.add_pre_set_parameters_callback(self.pipeline.pre_set_parameters)
        self.add_on_set_parameters_callback(self.pipeline.on_set_parameters)
        self.pipeline.publish_diagnostics()
        self.get_logger().info(f"ready: completing {self.pipeline.describe(self.sub.topic_name)}, "
                               f"{qos_summary(self.pipeline, self.sub)}")
