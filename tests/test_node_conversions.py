"""The project's PointCloud2 converter (lidar_completion.pointcloud2, which the node and the bag tools
share) held against sensor_msgs_py, the ROS 2 reference implementation, on every field layout the suite
uses: real sensor_msgs/PointCloud2 messages, built and read both ways.

sensor_msgs_py reads ``row_step == width * point_step`` clouds only (it views ``data`` as one array of
points): rows padded beyond that are checked against the hand-packed bytes in test_pointcloud2.py.
"""
import struct

import numpy as np
import pytest

import ros_support as rs

rs.require("rclpy", "sensor_msgs_py")

from sensor_msgs.msg import PointCloud2, PointField  # noqa: E402
from sensor_msgs_py import point_cloud2 as ref  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from lidar_completion import pointcloud2 as pc  # noqa: E402

F32, F64, U16, U8, I32 = PointField.FLOAT32, PointField.FLOAT64, PointField.UINT16, PointField.UINT8, \
    PointField.INT32


def fields(*spec):
    return [PointField(name=n, offset=o, datatype=d, count=1) for n, o, d in spec]


def points_for(layout, n, seed=0, point_step=None):
    """A structured array of ``n`` points for ``layout`` (fields), finite values."""
    rng = np.random.default_rng(seed)
    dtype = ref.dtype_from_fields(layout, point_step)
    arr = np.zeros(n, dtype=dtype)
    for name in dtype.names:
        kind = dtype[name]
        arr[name] = (rng.integers(0, 200, n) if kind.kind in "iu" else rng.uniform(-60, 60, n)).astype(kind)
    return arr


# Every layout the suite builds or reads: the node's output (packed xyz32), KITTI bags (x, y, z,
# intensity), a driver-like cloud with padding, a ring channel and its own field order, float64 x/y/z,
# 8-bit and 32-bit integer channels next to them.
LAYOUTS = {
    "xyz32": fields(("x", 0, F32), ("y", 4, F32), ("z", 8, F32)),
    "xyzi32": fields(("x", 0, F32), ("y", 4, F32), ("z", 8, F32), ("intensity", 12, F32)),
    "driver_order_padding_ring": fields(("intensity", 0, F32), ("z", 8, F32), ("ring", 12, U16),
                                        ("y", 16, F32), ("x", 24, F32)),
    "xyz64": fields(("x", 0, F64), ("y", 8, F64), ("z", 16, F64)),
    "mixed_int_channels": fields(("x", 0, F32), ("y", 4, F32), ("z", 8, F32), ("label", 12, U8),
                                 ("t", 16, I32), ("w", 20, F64)),
}
POINT_STEPS = {"driver_order_padding_ring": 32}


def header():
    h = Header(frame_id="velodyne")
    h.stamp.sec, h.stamp.nanosec = 12, 345
    return h


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("organised", [False, True])
def test_reading_matches_sensor_msgs_py(name, organised):
    layout = LAYOUTS[name]
    pts = points_for(layout, 60, seed=len(name), point_step=POINT_STEPS.get(name))
    msg = ref.create_cloud(header(), layout, pts, point_step=POINT_STEPS.get(name))
    if organised:  # 6 rows of 10, as a driver publishes an organised scan
        msg.height, msg.width, msg.row_step = 6, 10, 10 * msg.point_step
    xyz_ours = pc.read_points_numpy(msg, ("x", "y", "z"), skip_nans=False)
    xyz_ref = np.stack([ref.read_points(msg, ["x", "y", "z"])[k] for k in "xyz"], 1)
    np.testing.assert_array_equal(xyz_ours, xyz_ref.astype(np.float32))
    ours, theirs = pc.read_points(msg), ref.read_points(msg)
    assert ours.dtype.names == theirs.dtype.names
    for field_name in theirs.dtype.names:
        np.testing.assert_array_equal(np.asarray(ours[field_name]).reshape(-1), theirs[field_name])


def test_reading_big_endian_and_nans_matches_sensor_msgs_py():
    layout = fields(("x", 0, F32), ("y", 4, F32), ("z", 8, F32), ("t", 12, F64))
    rows = [(1.0, 2.0, 3.0, 0.5), (float("nan"), 1.0, 1.0, 0.25), (-4.5, 0.25, 7.0, 1.0)]
    msg = PointCloud2(header=header(), height=1, width=3, fields=layout, is_bigendian=True,
                      point_step=20, row_step=60, is_dense=False)
    msg.data = b"".join(struct.pack(">3fd", *r) for r in rows)
    ours = pc.read_points_numpy(msg, ("x", "y", "z"), skip_nans=True)
    theirs = ref.read_points_numpy(msg, ["x", "y", "z"], skip_nans=True)
    np.testing.assert_array_equal(ours, theirs)
    assert ours.shape == (2, 3)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_writing_matches_sensor_msgs_py(name):
    layout = LAYOUTS[name]
    pts = points_for(layout, 50, seed=3, point_step=POINT_STEPS.get(name))
    theirs = ref.create_cloud(header(), layout, pts, point_step=POINT_STEPS.get(name))
    ours = pc.create_cloud(header(), layout, pts, point_step=POINT_STEPS.get(name))
    assert isinstance(ours, PointCloud2)
    for attr in ("height", "width", "point_step", "row_step", "is_bigendian"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    # sensor_msgs_py always writes is_dense=False; ours says whether every point is finite
    assert ours.is_dense and not theirs.is_dense
    assert [(f.name, f.offset, f.datatype, f.count) for f in ours.fields] == \
        [(f.name, f.offset, f.datatype, f.count) for f in theirs.fields]
    # padding bytes are unspecified: compare every field's values as the reference reads them
    a, b = ref.read_points(ours), ref.read_points(theirs)
    for field_name in b.dtype.names:
        np.testing.assert_array_equal(a[field_name], b[field_name])


def test_node_output_layout_equals_create_cloud_xyz32():
    xyz = np.random.default_rng(5).uniform(-50, 50, (1000, 3)).astype(np.float32)
    ours, theirs = pc.create_cloud_xyz32(header(), xyz), ref.create_cloud_xyz32(header(), xyz)
    assert bytes(ours.data) == bytes(theirs.data) and ours.is_dense
    assert (ours.point_step, ours.row_step, ours.width, ours.height) == \
        (theirs.point_step, theirs.row_step, theirs.width, theirs.height)
    assert [(f.name, f.offset, f.datatype) for f in ours.fields] == \
        [(f.name, f.offset, f.datatype) for f in theirs.fields]
    np.testing.assert_array_equal(ref.read_points_numpy(ours), xyz)
