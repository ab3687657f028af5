"""SemanticKITTI sequence -> rosbag2: PointCloud2 scans (x, y, z, intensity) and /tf odom -> velodyne."""
from __future__ import annotations

from pathlib import Path

from ..errors import DatasetError
from .io import DEFAULT_FRAME, DEFAULT_TOPIC, BagWriter, make_cloud, make_tf

# KITTI's times.txt counts seconds from the start of a drive. Bag stamps are offset by a fixed start
# time (2011-10-03 00:00:00 UTC, the week the odometry drives were recorded) so that no stamp is 0,
# which tf and many tools treat as "unset".
DEFAULT_START_NS = 1_317_600_000 * 1_000_000_000
SCAN_FIELDS = ("x", "y", "z", "intensity")


def bag_from_kitti(root, sequence, out, storage: str = "mcap", limit: int | None = None,
                   start_time_ns: int = DEFAULT_START_NS, topic: str = DEFAULT_TOPIC,
                   frame_id: str = DEFAULT_FRAME, odom_frame: str = "odom",
                   progress: bool = True) -> dict:
    """Write the scans of a SemanticKITTI-layout sequence (real or synthetic) into a new bag.

    Each scan becomes a PointCloud2 (float32 x, y, z, intensity; ``frame_id``) stamped
    ``start_time_ns`` + times.txt, with the same log time, and a tf2_msgs/TFMessage on /tf with
    ``odom_frame`` -> ``frame_id`` from poses.txt brought into the LiDAR frame with calib.txt's Tr
    (odom is the LiDAR frame of the first scan). Returns a summary dict.
    """
    from tqdm import tqdm

    from ..data.kitti import SemanticKittiSequence

    seq = SemanticKittiSequence(root, sequence, validate=False)
    n = len(seq)
    if limit is not None:
        if int(limit) < 1:
            raise DatasetError(f"--limit must be >= 1, found {limit}")
        n = min(n, int(limit))
    if int(start_time_ns) < 0:
        raise DatasetError(f"the start time must be >= 0, found {start_time_ns} ns")
    stamps = [int(start_time_ns) + int(round(float(t) * 1e9)) for t in seq.times[:n]]
    n_points = 0
    with BagWriter(out, storage) as bag:
        for i in tqdm(range(n), desc=f"bag-from-kitti {Path(out).name}", unit="scan",
                      disable=not progress):
            points = seq.scan(i)
            if points.ndim != 2 or points.shape[1] < 4:
                raise DatasetError(f"{seq.scan_path(i)}: expected (N, 4) x, y, z, intensity, "
                                   f"found {points.shape}")
            bag.write(topic, make_cloud(points, stamps[i], frame_id, SCAN_FIELDS), stamps[i])
            bag.write("/tf", make_tf(stamps[i], odom_frame, frame_id, seq.poses[i]), stamps[i])
            n_points += int(points.shape[0])
    return {"bag": str(out), "storage": storage, "sequence": seq.sequence, "scans": n,
            "points": n_points, "topic": topic, "frame_id": frame_id,
            "start_ns": stamps[0], "duration_s": (stamps[-1] - stamps[0]) / 1e9}
