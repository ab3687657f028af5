"""QoS profiles of the node: sensor-data QoS (best effort, keep last, volatile) with configurable
reliability and depth, as LiDAR drivers publish."""
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

RELIABILITIES = {"best_effort": ReliabilityPolicy.BEST_EFFORT, "reliable": ReliabilityPolicy.RELIABLE}


def cloud_qos(reliability: str = "best_effort", depth: int = 5) -> QoSProfile:
    """Sensor-data QoS (like rclpy.qos.qos_profile_sensor_data) with the given reliability and depth."""
    try:
        policy = RELIABILITIES[reliability]
    except KeyError:
        raise ValueError(f"qos_reliability must be one of {sorted(RELIABILITIES)}, "
                         f"found {reliability!r}") from None
    if int(depth) < 1:
        raise ValueError(f"qos_depth must be >= 1, found {depth}")
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=int(depth), reliability=policy,
                      durability=DurabilityPolicy.VOLATILE)
