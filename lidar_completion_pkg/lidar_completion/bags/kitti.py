"""SemanticKITTI sequence -> rosbag2: PointCloud2 scans (x, y, z, intensity) and their transforms.

The transform tree is the usual one of a vehicle (REP 105):

    odom --(/tf, per scan, from poses.txt)--> base_link --(/tf_static)--> velodyne

``base_link`` lies on the ground under the LiDAR (``sensor_height`` below it, KITTI's 1.73 m; axes as
the LiDAR's, which KITTI mounts level), ``odom`` is ``base_link`` at the first scan. A completion node
can then take ``velodyne`` as its model frame (the frame the networks were trained in) and publish into
``odom`` (accumulating scans) or ``base_link``.
"""
from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import numpy as np

from ..constants import MAX_STAMP_S
from ..errors import DatasetError, LidarCompletionError
from .io import DEFAULT_FRAME, DEFAULT_TOPIC, TF_STATIC_TOPIC, BagWriter, make_cloud, make_tf

# KITTI's times.txt counts seconds from the start of a drive. Bag stamps are offset by a fixed start
# time (2011-10-03 00:00:00 UTC, the week the odometry drives were recorded) so that no stamp is 0,
# which tf and many tools treat as "unset".
DEFAULT_START_NS = 1_317_600_000 * 1_000_000_000
SCAN_FIELDS = ("x", "y", "z", "intensity")
#: Height of KITTI's Velodyne above the ground (the KITTI recording platform; also the synthetic drives').
KITTI_SENSOR_HEIGHT = 1.73


def base_transforms(poses_velo: np.ndarray, sensor_height: float) -> tuple[np.ndarray, np.ndarray]:
    """(base_link <- LiDAR (4, 4), odom <- base_link per scan (F, 4, 4)) from LiDAR poses relative to
    the first scan (``odom`` = base_link at the first scan)."""
    base_from_velo = np.eye(4)
    base_from_velo[2, 3] = float(sensor_height)
    odom_from_base = base_from_velo @ np.asarray(poses_velo, dtype=np.float64) @ np.linalg.inv(base_from_velo)
    return base_from_velo, odom_from_base


_TOPIC = re.compile(r"(/[A-Za-z_][A-Za-z0-9_]*)+")


def bag_from_kitti(root, sequence, out, storage: str = "mcap", limit: int | None = None,
                   start_time_ns: int = DEFAULT_START_NS, topic: str = DEFAULT_TOPIC,
                   frame_id: str = DEFAULT_FRAME, odom_frame: str = "odom",
                   base_frame: str = "base_link", sensor_height: float = KITTI_SENSOR_HEIGHT,
                   progress: bool = True) -> dict:
    """Write the scans of a SemanticKITTI-layout sequence (real or synthetic) into a new bag.

    Each scan becomes a PointCloud2 (float32 x, y, z, intensity; ``frame_id``) stamped
    ``start_time_ns`` + times.txt, with the same log time, and a tf2_msgs/TFMessage on /tf with
    ``odom_frame`` -> ``base_frame`` from poses.txt (brought into the LiDAR frame with calib.txt's Tr);
    /tf_static carries ``base_frame`` -> ``frame_id`` once, at the first stamp. Returns a summary dict.
    """
    from ..progress import progress_bar

    from ..data.kitti import SemanticKittiSequence

    seq = SemanticKittiSequence(root, sequence, validate=False)
    n = len(seq)
    if limit is not None:
        if int(limit) < 1:
            raise DatasetError(f"--limit must be >= 1, found {limit}")
        n = min(n, int(limit))
    if int(start_time_ns) < 0:
        raise DatasetError(f"the start time must be >= 0, found {start_time_ns} ns")
    if not _TOPIC.fullmatch(topic) or "__" in topic:
        raise DatasetError(f"topic {topic!r} is not a valid ROS 2 topic name: absolute, slash-separated "
                           f"tokens of letters, digits and underscores, not starting with a digit "
                           f"(e.g. /velodyne_points)")
    for name, frame in (("frame id", frame_id), ("odometry frame", odom_frame), ("base frame", base_frame)):
        if not frame or frame.startswith("/") or any(c.isspace() for c in frame):
            raise DatasetError(f"{name} {frame!r} is not a valid tf2 frame: non-empty, no leading "
                               f"slash, no spaces")
    if not math.isfinite(float(sensor_height)):
        raise DatasetError(f"the sensor height must be a finite number of metres, found {sensor_height}")
    if seq.times is None:
        raise DatasetError(f"{seq.path / 'times.txt'} does not exist: a bag needs each scan's time "
                           "(one line of seconds per scan, as KITTI ships it)")
    stamps = [int(start_time_ns) + int(round(float(t) * 1e9)) for t in seq.times[:n]]
    if stamps and not 0 <= min(stamps) <= max(stamps) < (MAX_STAMP_S + 1) * 10**9:
        # found here, not as a serialisation error mid-bag
        raise DatasetError(f"the stamps would run from {min(stamps) / 1e9:.0f} to {max(stamps) / 1e9:.0f} s "
                           f"(start time + times.txt), outside a ROS stamp's 0..{MAX_STAMP_S} s: give an "
                           "earlier start time")
    base_from_velo, odom_from_base = base_transforms(seq.poses[:n], sensor_height)
    n_points = 0
    bag = BagWriter(out, storage)     # refuses an existing path: whatever is at `out` now is ours
    try:
        with bag:
            bag.write(TF_STATIC_TOPIC, make_tf(stamps[0], base_frame, frame_id, base_from_velo), stamps[0])
            for i in progress_bar(range(n), desc=f"bag-from-kitti {Path(out).name}", unit="scan",
                                  disable=not progress):
                points = seq.scan(i)
                if points.ndim != 2 or points.shape[1] < 4:
                    raise DatasetError(f"{seq.scan_path(i)}: expected (N, 4) x, y, z, intensity, "
                                       f"found {points.shape}")
                bag.write(topic, make_cloud(points, stamps[i], frame_id, SCAN_FIELDS), stamps[i])
                bag.write("/tf", make_tf(stamps[i], odom_frame, base_frame, odom_from_base[i]), stamps[i])
                n_points += int(points.shape[0])
    except BaseException as exc:
        # a bag of the first scans would look like the sequence's and block the rerun (bags are
        # never overwritten): remove it, and say so
        shutil.rmtree(out, ignore_errors=True)
        if isinstance(exc, LidarCompletionError):
            raise type(exc)(f"{exc} (the unfinished bag {out} was removed)") from exc
        raise
    return {"bag": str(out), "storage": storage, "sequence": seq.sequence, "scans": n,
            "points": n_points, "topic": topic, "frame_id": frame_id,
            "frames": f"{odom_frame} -> {base_frame} (/tf) -> {frame_id} (/tf_static)",
            "start_ns": stamps[0], "duration_s": (stamps[-1] - stamps[0]) / 1e9}
