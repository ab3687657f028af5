"""lidar_completion: few-step diffusion LiDAR scene completion (LiDiff networks, Distillation-DPO).

The core library. It never imports rclpy; the ROS 2 node lives in `lidar_completion_pkg`.
"""
__version__ = "0.2.0"

from .errors import (  # noqa: F401
    LidarCompletionError, CloudFormatError, CheckpointError, DatasetError, BagError, ConfigError,
)
