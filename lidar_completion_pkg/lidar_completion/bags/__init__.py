"""rosbag2 tools: reading / writing bags (``rosbags``), KITTI -> bag, offline and live benchmarks.

Submodules: ``io`` (BagReader / BagWriter, message helpers), ``kitti`` (bag_from_kitti), ``bench``
(offline benchmark), ``report`` (report.json / report.md / plots, also of the live benchmark, which the
ROS 2 layer provides through the ``lidar_completion.live_bench`` entry point group), ``memory`` (RSS
sampling). Nothing here imports rclpy.
"""
from .io import (
    CLOUD_TYPE, DEFAULT_FRAME, DEFAULT_TOPIC, STORAGES, TF_TYPE, BagReader, BagWriter, CloudMessage,
    RawMessage, TopicInfo, decode_cloud, deserialize, make_cloud, make_header, make_tf, msg_class,
    ns_to_stamp, read_clouds, serialize, stamp_to_ns, tf_to_matrix, typestore, write_clouds,
)

__all__ = [
    "CLOUD_TYPE", "DEFAULT_FRAME", "DEFAULT_TOPIC", "STORAGES", "TF_TYPE", "BagReader", "BagWriter",
    "CloudMessage", "RawMessage", "TopicInfo", "decode_cloud", "deserialize", "make_cloud",
    "make_header", "make_tf", "msg_class", "ns_to_stamp", "read_clouds", "serialize", "stamp_to_ns",
    "tf_to_matrix", "typestore", "write_clouds",
]
