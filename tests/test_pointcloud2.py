"""PointCloud2 <-> numpy conversion against hand-built byte buffers (struct.pack, not numpy)."""
import array
import math
import struct
from types import SimpleNamespace as NS

import numpy as np
import pytest

from lidar_completion import pointcloud2 as pc
from lidar_completion.errors import CloudFormatError

F32, F64 = pc.FLOAT32, pc.FLOAT64
PTS = [(1.0, 2.0, 3.0), (-4.5, 0.25, 7.0), (100.0, -200.0, 0.125), (0.0, 1e-3, -9.5)]


def field(name, offset, datatype=F32, count=1):
    return NS(name=name, offset=offset, datatype=datatype, count=count)


def cloud(fields, data, width, height=1, point_step=12, row_step=None, big=False):
    return NS(header=NS(frame_id="velodyne"), height=height, width=width, fields=fields,
              is_bigendian=big, point_step=point_step,
              row_step=width * point_step if row_step is None else row_step, data=data, is_dense=False)


def pack_xyz32(points, endian="<"):
    return b"".join(struct.pack(endian + "3f", *p) for p in points)


def test_packed_xyz32_is_zero_copy():
    data = pack_xyz32(PTS)
    msg = cloud([field("x", 0), field("y", 4), field("z", 8)], data, len(PTS))
    out = pc.read_points_numpy(msg)
    assert out.dtype == np.float32 and out.shape == (4, 3)
    np.testing.assert_array_equal(out, np.array(PTS, np.float32))
    assert np.shares_memory(out, np.frombuffer(data, np.uint8))
    assert not out.flags.writeable


def test_any_field_order_offsets_and_padding():
    # point_step 32: intensity@0 (f32), pad, z@8, ring@12 (u16), pad, y@16 (f32), x@24 (f32), pad.
    fields = [field("intensity", 0), field("z", 8), field("ring", 12, pc.UINT16), field("y", 16),
              field("x", 24)]
    data = b""
    for i, (x, y, z) in enumerate(PTS):
        rec = bytearray(32)
        struct.pack_into("<f", rec, 0, 10.0 * i)
        struct.pack_into("<f", rec, 8, z)
        struct.pack_into("<H", rec, 12, i + 1)
        struct.pack_into("<f", rec, 16, y)
        struct.pack_into("<f", rec, 24, x)
        data += bytes(rec)
    msg = cloud(fields, data, len(PTS), point_step=32)
    np.testing.assert_array_equal(pc.read_points_numpy(msg), np.array(PTS, np.float32))
    xyzi = pc.read_points_numpy(msg, ("x", "y", "z", "intensity"))
    np.testing.assert_array_equal(xyzi[:, 3], [0.0, 10.0, 20.0, 30.0])
    ring = pc.read_points(msg, ["ring"])
    np.testing.assert_array_equal(ring["ring"], [1, 2, 3, 4])


def test_float64_xyz():
    data = b"".join(struct.pack("<3d", *p) + b"\0" * 8 for p in PTS)  # 24 bytes + 8 padding
    msg = cloud([field("x", 0, F64), field("y", 8, F64), field("z", 16, F64)], data, len(PTS),
                point_step=32)
    out = pc.read_points_numpy(msg)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.array(PTS, np.float32))


def test_float64_beyond_float32_range_is_dropped_without_a_numpy_warning():
    import warnings
    pts = PTS + [(1e300, 0.0, 0.0), (0.0, -1e39, 0.0)]
    data = b"".join(struct.pack("<3d", *p) for p in pts)
    msg = cloud([field("x", 0, F64), field("y", 8, F64), field("z", 16, F64)], data, len(pts), point_step=24)
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # numpy's RuntimeWarning would go to stderr
        out = pc.read_points_numpy(msg)
    np.testing.assert_array_equal(out, np.array(PTS, np.float32))


def test_big_endian():
    fields = [field("x", 0), field("y", 4), field("z", 8), field("t", 12, F64)]
    data = b"".join(struct.pack(">3fd", *p, 0.5) for p in PTS)
    msg = cloud(fields, data, len(PTS), point_step=20, big=True)
    np.testing.assert_array_equal(pc.read_points_numpy(msg), np.array(PTS, np.float32))
    np.testing.assert_array_equal(pc.read_points_numpy(msg, ["t"])[:, 0], [0.5] * 4)


def test_organised_cloud_and_row_padding():
    height, width, point_step, row_step = 3, 4, 16, 4 * 16 + 8  # 8 spare bytes per row
    rows = []
    expected = []
    for r in range(height):
        row = b""
        for c in range(width):
            p = (float(r), float(c), float(r * 10 + c))
            expected.append(p)
            row += struct.pack("<3f", *p) + b"\xff" * 4
        rows.append(row + b"\xab" * 8)
    msg = cloud([field("x", 0), field("y", 4), field("z", 8)], b"".join(rows), width, height,
                point_step, row_step)
    out = pc.read_points_numpy(msg)
    np.testing.assert_array_equal(out, np.array(expected, np.float32))
    grid = pc.read_points(msg, reshape_organized_cloud=True)
    assert grid.shape == (height, width)
    assert grid["z"][2, 3] == 23.0
    # Without row padding an organised cloud is still a zero-copy view.
    data = b"".join(pack_xyz32([(r, c, 1.0) for c in range(width)]) for r in range(height))
    msg = cloud([field("x", 0), field("y", 4), field("z", 8)], data, width, height, 12)
    out = pc.read_points_numpy(msg)
    assert out.shape == (12, 3) and np.shares_memory(out, np.frombuffer(data, np.uint8))


def test_nan_and_inf_points_dropped():
    pts = PTS[:2] + [(math.nan, 1.0, 1.0), (1.0, math.inf, 2.0)] + PTS[2:]
    msg = cloud([field("x", 0), field("y", 4), field("z", 8)], pack_xyz32(pts), len(pts))
    np.testing.assert_array_equal(pc.read_points_numpy(msg), np.array(PTS, np.float32))
    assert pc.read_points_numpy(msg, skip_nans=False).shape == (6, 3)
    assert len(pc.read_points(msg, skip_nans=True)) == 4


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "array", "ndarray", "list", "memoryview"])
def test_data_container_types(kind):
    raw = pack_xyz32(PTS)
    data = {"bytes": raw, "bytearray": bytearray(raw), "array": array.array("B", raw),
            "ndarray": np.frombuffer(raw, np.uint8).copy(), "list": list(raw),
            "memoryview": memoryview(raw)}[kind]
    msg = cloud([field("x", 0), field("y", 4), field("z", 8)], data, len(PTS))
    np.testing.assert_array_equal(pc.read_points_numpy(msg), np.array(PTS, np.float32))


XYZ = [field("x", 0), field("y", 4), field("z", 8)]


@pytest.mark.parametrize("msg, words", [
    (cloud(XYZ, b"", 0), "empty"),
    (cloud(XYZ, b"", 0, height=0), "empty"),
    (cloud([field("x", 0), field("y", 4)], pack_xyz32(PTS), 4), "lacks field"),
    (cloud([], pack_xyz32(PTS), 4), "no fields"),
    (cloud(XYZ, pack_xyz32(PTS)[:-5], 4), "truncated"),
    (cloud(XYZ, pack_xyz32(PTS), 4, point_step=0, row_step=48), "point_step is 0"),
    (cloud(XYZ, pack_xyz32(PTS), 4, point_step=8, row_step=32), "does not fit in point_step"),
    (cloud(XYZ, pack_xyz32(PTS), 4, row_step=40), "row_step 40 < width"),
    (cloud(XYZ, pack_xyz32(PTS) * 2, 4, height=2, row_step=40), "row_step 40 < width"),
    (cloud([field("x", 0), field("y", 4), field("z", 8, 9)], pack_xyz32(PTS), 4), "unsupported datatype"),
    (cloud([field("x", 0), field("y", 4), field("z", 8, 0)], pack_xyz32(PTS), 4), "unsupported datatype"),
    (cloud([field("x", 0), field("y", 4), field("z", 8, F32, 3)], pack_xyz32(PTS), 4), "count 3"),
    (cloud(XYZ, pack_xyz32([(math.nan,) * 3, (math.inf, 0, 0)]), 2), "no finite points"),
    (NS(height=1, width=1), "no 'point_step'"),
    (cloud(XYZ, pack_xyz32(PTS), -1), ">= 0"),
    (cloud(XYZ, 3.5, 4), "byte buffer"),
    # the last 'x' won silently and z was read as x (sensor_msgs_py refuses duplicate names too)
    (cloud(XYZ + [field("x", 8)], pack_xyz32(PTS), 4), r"more than one field named \['x'\]"),
    (cloud([field("x", 0), field("y", 0), field("z", 8)], pack_xyz32(PTS), 4), "'x' .* and 'y' .* overlap"),
    (cloud([field("x", 0, F64), field("y", 4), field("z", 8)], pack_xyz32(PTS) * 2, 4, point_step=24),
     "overlap"),
    # width 2 for 4 points of data: half the scan was completed, or "too few points" misled
    (cloud(XYZ, pack_xyz32(PTS), 2), r"data has 48 bytes, the header \(height 1 x row_step 24\) declares 24"),
])
def test_malformed_clouds_raise_named_errors(msg, words):
    with pytest.raises(CloudFormatError, match=words):
        pc.read_points_numpy(msg)


def test_create_cloud_roundtrip_layout_is_standard():
    pts = np.array(PTS, np.float32)
    msg = pc.create_cloud_xyz32(NS(frame_id="a"), pts, msg_factory=NS)
    assert (msg.height, msg.width, msg.point_step, msg.row_step) == (1, 4, 12, 48)
    assert [(f.name, f.offset, f.datatype, f.count) for f in msg.fields] == \
        [("x", 0, F32, 1), ("y", 4, F32, 1), ("z", 8, F32, 1)]
    assert isinstance(msg.data, array.array) and msg.data.typecode == "B"
    assert bytes(msg.data) == pack_xyz32(PTS)  # independent encoding of the same bytes
    assert msg.is_dense and msg.header.frame_id == "a"


def test_create_cloud_with_extra_fields_and_offsets():
    fields = [pc.make_field("intensity", 0, F32, field_factory=NS), pc.make_field("x", 4, F64, field_factory=NS),
              pc.make_field("y", 12, F32, field_factory=NS), pc.make_field("z", 16, F32, field_factory=NS)]
    pts = np.array([[0.5, *p] for p in PTS])
    msg = pc.create_cloud(NS(), fields, pts, msg_factory=NS, point_step=24)
    assert msg.point_step == 24 and len(msg.data) == 24 * 4
    assert struct.unpack_from("<fdff", bytes(msg.data), 24) == (0.5, *PTS[1])
    np.testing.assert_array_equal(pc.read_points_numpy(msg), np.array(PTS, np.float32))
    # structured input
    structured = pc.read_points(msg)
    again = pc.create_cloud(NS(), fields, structured, msg_factory=NS, point_step=24)
    assert bytes(again.data) == bytes(msg.data)


def test_create_cloud_rejects_bad_shapes_and_empty_is_valid():
    with pytest.raises(CloudFormatError, match=r"\(N, 3\)"):
        pc.create_cloud_xyz32(NS(), np.zeros((4, 2)), msg_factory=NS)
    with pytest.raises(CloudFormatError, match=r"\(N, 3\)"):
        pc.create_cloud(NS(), pc.make_fields_xyz32(NS), np.zeros((4, 4)), msg_factory=NS)
    empty = pc.create_cloud_xyz32(NS(), np.zeros((0, 3)), msg_factory=NS)
    assert empty.width == 0 and len(empty.data) == 0
    with pytest.raises(CloudFormatError, match="empty"):
        pc.read_points_numpy(empty)


def test_rosbags_message_roundtrip_through_cdr():
    typesys = pytest.importorskip("rosbags.typesys")
    store = typesys.get_typestore(typesys.Stores.ROS2_HUMBLE)
    PointCloud2 = store.types["sensor_msgs/msg/PointCloud2"]
    Header, Time = store.types["std_msgs/msg/Header"], store.types["builtin_interfaces/msg/Time"]
    pts = np.random.default_rng(0).normal(size=(1000, 3)).astype(np.float32)
    msg = pc.create_cloud_xyz32(Header(stamp=Time(sec=3, nanosec=4), frame_id="velodyne"), pts,
                                msg_factory=PointCloud2)
    assert type(msg.fields[0]).__name__.endswith("PointField")
    back = store.deserialize_cdr(store.serialize_cdr(msg, PointCloud2.__msgtype__), PointCloud2.__msgtype__)
    np.testing.assert_array_equal(pc.read_points_numpy(back), pts)
    assert back.header.frame_id == "velodyne" and back.header.stamp.sec == 3


@pytest.mark.ros
def test_rclpy_message_roundtrip_with_field_checks(monkeypatch):
    pytest.importorskip("sensor_msgs.msg", reason="needs the ROS 2 wheels (pip install .[ros])")
    from sensor_msgs.msg import PointCloud2
    from std_msgs.msg import Header
    pts = np.random.default_rng(1).normal(size=(120_000, 3)).astype(np.float32)
    msg = pc.create_cloud_xyz32(Header(frame_id="velodyne"), pts)
    assert isinstance(msg, PointCloud2) and isinstance(msg.data, array.array)
    out = pc.read_points_numpy(msg)
    np.testing.assert_array_equal(out, pts)
    assert np.shares_memory(out, np.frombuffer(msg.data, np.uint8))
    # ROS_PYTHON_CHECK_FIELDS-style validation accepts what we build (array.array fast path).
    checked = PointCloud2(check_fields=True, header=msg.header, height=msg.height, width=msg.width,
                          fields=msg.fields, is_bigendian=msg.is_bigendian, point_step=msg.point_step,
                          row_step=msg.row_step, data=msg.data, is_dense=msg.is_dense)
    np.testing.assert_array_equal(pc.read_points_numpy(checked), pts)


@pytest.mark.parametrize("msg, reason", [
    (cloud(XYZ, b"", 0), "empty"),
    (cloud(XYZ[:2], pack_xyz32(PTS), 4), "missing_field"),
    (cloud(XYZ, pack_xyz32(PTS)[:-1], 4), "truncated"),
    (cloud(XYZ, pack_xyz32(PTS), 4, row_step=40), "inconsistent_step"),
    (cloud(XYZ[:2] + [field("z", 8, 42)], pack_xyz32(PTS), 4), "unsupported_datatype"),
    (cloud(XYZ, pack_xyz32([(math.nan, 0, 0)]), 1), "no_finite_points"),
])
def test_errors_carry_a_reason_for_counting(msg, reason):
    with pytest.raises(CloudFormatError) as info:
        pc.read_points_numpy(msg)
    assert info.value.reason == reason


def test_a_repeated_field_the_reader_does_not_use_is_no_problem():
    """Padding fields may repeat a name (e.g. '_'): only a doubled field that is read is refused."""
    fields = XYZ + [field("_", 12, pc.UINT8), field("_", 13, pc.UINT8)]
    data = b"".join(struct.pack("<3f2B2x", *p, 0, 0) for p in PTS)
    out = pc.read_points_numpy(cloud(fields, data, 4, point_step=16))
    np.testing.assert_array_equal(out, np.array(PTS, np.float32))


def test_a_tail_shorter_than_a_point_is_accepted():
    msg = cloud(XYZ, pack_xyz32(PTS) + b"\0" * 11, 4)
    np.testing.assert_array_equal(pc.read_points_numpy(msg), np.array(PTS, np.float32))
