"""rosbag2 tools: reading / writing bags (``rosbags``), KITTI -> bag, offline and live benchmarks."""
from .io import (  # noqa: F401
    CLOUD_TYPE, TF_TYPE, STORAGES, DEFAULT_TOPIC, DEFAULT_FRAME, BagReader, BagWriter, CloudMessage,
    RawMessage, TopicInfo, decode_cloud, deserialize, make_cloud, make_header, make_tf, msg_class,
    ns_to_stamp, read_clouds, serialize, stamp_to_ns, tf_to_matrix, typestore, write_clouds,
)
