"""Point-cloud files (.bin/.npy/.ply/.pcd) and renders."""
import numpy as np
import pytest

from lidar_completion.errors import CloudFormatError
from lidar_completion.io import read_cloud, render_bev_png, render_comparison_png, write_cloud


@pytest.fixture
def cloud():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(1234, 4)) * np.array([20, 20, 1.5, 0.3])).astype(np.float32)


@pytest.mark.parametrize("ext", [".bin", ".npy", ".ply", ".pcd"])
@pytest.mark.parametrize("binary", [True, False])
def test_round_trip_is_exact(tmp_path, cloud, ext, binary):
    path = write_cloud(tmp_path / f"c{ext}", cloud, binary=binary)
    back = read_cloud(path, xyz_only=False)
    assert back.dtype == np.float32 and back.shape == cloud.shape
    assert np.array_equal(back, cloud)
    xyz = read_cloud(path)
    assert np.array_equal(xyz, cloud[:, :3])


def test_bin_is_kitti_layout_and_pads_intensity(tmp_path, cloud):
    p = write_cloud(tmp_path / "a.bin", cloud[:, :3])
    raw = np.fromfile(p, dtype="<f4").reshape(-1, 4)
    assert np.array_equal(raw[:, :3], cloud[:, :3]) and not raw[:, 3].any()
    assert p.stat().st_size == 16 * len(cloud)


def test_empty_cloud_round_trips(tmp_path):
    for ext in (".bin", ".npy", ".ply", ".pcd"):
        p = write_cloud(tmp_path / f"e{ext}", np.zeros((0, 3), np.float32))
        assert read_cloud(p).shape == (0, 3)


def test_foreign_ply_big_endian_double_with_leading_element(tmp_path):
    pts = np.array([[1.5, -2.0, 0.25], [3.0, 4.0, -1.0]])
    dtype = np.dtype([("red", ">u1"), ("x", ">f8"), ("y", ">f8"), ("z", ">f8")])
    arr = np.zeros(2, dtype=dtype)
    arr["x"], arr["y"], arr["z"], arr["red"] = pts[:, 0], pts[:, 1], pts[:, 2], 200
    header = ("ply\nformat binary_big_endian 1.0\ncomment made by hand\nelement camera 1\n"
              "property float fx\nproperty float fy\nelement vertex 2\nproperty uchar red\n"
              "property double x\nproperty double y\nproperty double z\nelement face 0\n"
              "property list uchar int vertex_indices\nend_header\n")
    p = tmp_path / "foreign.ply"
    p.write_bytes(header.encode() + np.zeros(2, ">f4").tobytes() + arr.tobytes())
    assert np.allclose(read_cloud(p), pts)
    assert np.allclose(read_cloud(p, xyz_only=False)[:, 3], 200)


def test_foreign_pcd_with_padding_and_rgb(tmp_path):
    dtype = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("_", "<u1", (4,)), ("rgb", "<u4")])
    arr = np.zeros(3, dtype=dtype)
    arr["x"], arr["y"], arr["z"] = [1, 2, 3], [4, 5, 6], [7, 8, 9]
    header = ("# .PCD v.7\nVERSION .7\nFIELDS x y z _ rgb\nSIZE 4 4 4 1 4\nTYPE F F F U U\n"
              "COUNT 1 1 1 4 1\nWIDTH 3\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS 3\nDATA binary\n")
    p = tmp_path / "foreign.pcd"
    p.write_bytes(header.encode() + arr.tobytes())
    assert read_cloud(p).tolist() == [[1, 4, 7], [2, 5, 8], [3, 6, 9]]
    ascii_p = tmp_path / "foreign_ascii.pcd"
    ascii_p.write_text(header.replace("DATA binary", "DATA ascii")
                       + "1 4 7 0 0 0 0 5\n2 5 8 0 0 0 0 5\n3 6 9 0 0 0 0 5\n")
    assert read_cloud(ascii_p).tolist() == [[1, 4, 7], [2, 5, 8], [3, 6, 9]]


def _lzf_literals(data: bytes) -> bytes:
    """An LZF stream written by hand from the format, not by the decoder's library: literal runs,
    each a control byte L - 1 (< 32) and then L bytes."""
    return b"".join(bytes([len(data[i:i + 32]) - 1]) + data[i:i + 32] for i in range(0, len(data), 32))


_PCD_HEAD = ("# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\nFIELDS {fields}\nSIZE {sizes}\n"
             "TYPE {types}\nCOUNT {counts}\nWIDTH {n}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {n}\n"
             "DATA binary_compressed\n")


def test_pcd_binary_compressed_as_pcl_writes_it(tmp_path):
    # PCL stores the fields one after another (all x, all y, ...), padding fields left out
    x, y, z = [1.5, -2.0, 3.25], [4.0, 5.5, -6.0], [7.0, 8.0, 9.75]
    ring = np.array([3, 1, 2], "<u2")
    normals = np.arange(9, dtype="<f4").reshape(3, 3)
    body = (np.array(x, "<f4").tobytes() + np.array(y, "<f4").tobytes() + np.array(z, "<f4").tobytes()
            + normals.tobytes() + ring.tobytes())
    head = _PCD_HEAD.format(fields="x y z normal _ ring", sizes="4 4 4 4 1 2", types="F F F F U U",
                            counts="1 1 1 3 4 1", n=3)
    stream = _lzf_literals(body)
    p = tmp_path / "pcl.pcd"
    p.write_bytes(head.encode() + np.array([len(stream), len(body)], "<u4").tobytes() + stream)
    back = read_cloud(p, xyz_only=False)
    assert back[:, :3].tolist() == [[1.5, 4.0, 7.0], [-2.0, 5.5, 8.0], [3.25, -6.0, 9.75]]
    assert back[:, 3].tolist() == [3, 1, 2]       # ring (scalar extra column); normal has COUNT 3
    # a stream with back references (control byte (len - 2) << 5 | (offset - 1) >> 8, then the low
    # byte of offset - 1: copy len bytes from offset bytes back): 4 literal bytes of 2.5, then 5 copies
    # of 8 bytes and one of 4 from 4 bytes back = x, y and z of 4 points at (2.5, 2.5, 2.5)
    four = np.float32(2.5).tobytes()
    stream = b"\x03" + four + bytes([(8 - 2) << 5, 3]) * 5 + bytes([(4 - 2) << 5, 3])
    head = _PCD_HEAD.format(fields="x y z", sizes="4 4 4", types="F F F", counts="1 1 1", n=4)
    p.write_bytes(head.encode() + np.array([len(stream), 48], "<u4").tobytes() + stream)
    assert np.array_equal(read_cloud(p), np.full((4, 3), 2.5, np.float32))


def test_pcd_binary_compressed_round_trip_of_a_scan(tmp_path, cloud):
    import lzf
    soa = b"".join(np.ascontiguousarray(cloud[:, i]).tobytes() for i in range(4))
    stream = lzf.compress(soa, 2 * len(soa) + 64)      # random floats do not shrink
    head = _PCD_HEAD.format(fields="x y z intensity", sizes="4 4 4 4", types="F F F F",
                            counts="1 1 1 1", n=len(cloud))
    p = tmp_path / "scan.pcd"
    p.write_bytes(head.encode() + np.array([len(stream), len(soa)], "<u4").tobytes() + stream)
    assert np.array_equal(read_cloud(p, xyz_only=False), cloud)
    # an empty compressed cloud
    p.write_bytes(_PCD_HEAD.format(fields="x y z", sizes="4 4 4", types="F F F", counts="1 1 1", n=0).encode()
                  + np.zeros(2, "<u4").tobytes())
    assert read_cloud(p).shape == (0, 3)


def test_pcd_binary_compressed_errors(tmp_path, cloud):
    import lzf
    soa = b"".join(np.ascontiguousarray(cloud[:, i]).tobytes() for i in range(3))
    stream = lzf.compress(soa, 2 * len(soa) + 64)      # random floats do not shrink
    head = _PCD_HEAD.format(fields="x y z", sizes="4 4 4", types="F F F", counts="1 1 1", n=len(cloud)).encode()
    sizes = np.array([len(stream), len(soa)], "<u4").tobytes()
    cases = {
        "no_sizes.pcd": (head + sizes[:5], "8-byte size header"),
        "short.pcd": (head + sizes + stream[:-20], "compressed block is"),
        "count.pcd": (head.replace(b"POINTS 1234", b"POINTS 1000") + sizes + stream, "1000 points"),
        "corrupt.pcd": (head + sizes + b"\xff" * len(stream), "corrupt compressed PCD data"),
        "long.pcd": (head + np.array([len(stream) + 6], "<u4").tobytes() + sizes[4:] + stream
                     + _lzf_literals(b"extra!"), "corrupt compressed PCD data"),
    }
    for name, (raw, pattern) in cases.items():
        (tmp_path / name).write_bytes(raw)
        _expect_error(tmp_path / name, pattern)


def _expect_error(path, pattern):
    with pytest.raises(CloudFormatError, match=pattern):
        read_cloud(path)


def test_read_error_paths(tmp_path, cloud):
    _expect_error(tmp_path / "missing.bin", "no such file")
    _expect_error(tmp_path / "missing", "no such file")     # a typo is not an extension problem
    (tmp_path / "scan.xyz").write_text("0 0 0\n")
    _expect_error(tmp_path / "scan.xyz", "unsupported point-cloud extension")
    (tmp_path / "dir.npy").mkdir()
    _expect_error(tmp_path / "dir.npy", "is a directory")
    # truncated KITTI scan
    (tmp_path / "t.bin").write_bytes(b"\0" * 30)
    _expect_error(tmp_path / "t.bin", "not a multiple of 16")
    # .npy of the wrong shape, of strings, pickled objects
    np.save(tmp_path / "w.npy", np.zeros((10, 2), np.float32))
    _expect_error(tmp_path / "w.npy", r"shape \(N, 3\+\), found \(10, 2\)")
    np.save(tmp_path / "s.npy", np.array([["a", "b", "c"]]))
    _expect_error(tmp_path / "s.npy", "numeric array")
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _expect_error(tmp_path / "o.npy", "npy")
    (tmp_path / "garbage.npy").write_bytes(b"not numpy at all")
    _expect_error(tmp_path / "garbage.npy", "garbage.npy")
    # PLY: not a PLY, truncated binary, ascii count mismatch, missing field, unknown format
    (tmp_path / "n.ply").write_text("hello\n")
    _expect_error(tmp_path / "n.ply", "not a PLY")
    p = write_cloud(tmp_path / "tb.ply", cloud)
    p.write_bytes(p.read_bytes()[:-10])
    _expect_error(p, "truncated")
    p = write_cloud(tmp_path / "ta.ply", cloud, binary=False)
    p.write_bytes(p.read_bytes()[:-30])
    _expect_error(p, "1234 vertices")
    (tmp_path / "nx.ply").write_text("ply\nformat ascii 1.0\nelement vertex 1\nproperty float a\n"
                                     "property float y\nproperty float z\nend_header\n1 2 3\n")
    _expect_error(tmp_path / "nx.ply", "missing x")
    (tmp_path / "fmt.ply").write_text("ply\nformat weird 1.0\nelement vertex 0\nend_header\n")
    _expect_error(tmp_path / "fmt.ply", "unknown PLY format")
    (tmp_path / "hdr.ply").write_text("ply\nformat ascii 1.0\nelement vertex 1\n")
    _expect_error(tmp_path / "hdr.ply", "truncated")
    # PCD: truncated binary, compressed, missing header line, ascii count mismatch
    p = write_cloud(tmp_path / "tb.pcd", cloud)
    p.write_bytes(p.read_bytes()[:-4])
    _expect_error(p, "truncated")
    comp = (tmp_path / "tb.pcd").read_bytes().replace(b"DATA binary", b"DATA binary_compressed")
    (tmp_path / "c.pcd").write_bytes(comp)      # binary data under a compressed header
    _expect_error(tmp_path / "c.pcd", "compressed block")
    (tmp_path / "h.pcd").write_text("VERSION .7\nFIELDS x y z\nPOINTS 1\nDATA ascii\n1 2 3\n")
    _expect_error(tmp_path / "h.pcd", "SIZE")
    p = write_cloud(tmp_path / "ta.pcd", cloud, binary=False)
    p.write_text(p.read_text().rsplit("\n", 3)[0] + "\n")
    _expect_error(p, "1234 points")


def test_write_error_paths(tmp_path):
    with pytest.raises(CloudFormatError, match="unsupported"):
        write_cloud(tmp_path / "x.txt", np.zeros((3, 3)))
    with pytest.raises(CloudFormatError, match=r"\(N, 3\+\)"):
        write_cloud(tmp_path / "x.ply", np.zeros((3, 2)))
    p = write_cloud(tmp_path / "deep" / "er" / "x.npy", np.ones((2, 3)))
    assert p.exists()


def test_render_writes_png(tmp_path, cloud):
    p = render_comparison_png(tmp_path / "cmp.png", {"input": cloud, "completion": cloud * 1.1},
                              size=2.5, dpi=60, title="test")
    data = p.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    p2 = render_bev_png(tmp_path / "one.png", cloud, size=2.5, dpi=60)
    assert p2.read_bytes()[:4] == b"\x89PNG"
    p3 = render_bev_png(tmp_path / "empty.png", np.zeros((0, 3)), completion=cloud, size=2, dpi=50)
    assert p3.exists()
    with pytest.raises(CloudFormatError):
        render_bev_png(tmp_path / "bad.png", np.zeros((5, 2)))


# ------------------------------------------------------------------------ rows, fields, headers
@pytest.mark.parametrize("ext", [".ply", ".pcd"])
def test_an_ascii_row_with_too_few_or_too_many_values_is_named(tmp_path, cloud, ext):
    """Row 0 short of a value and row 1 with one too many hold the right number of values in all:
    read as one flat list, every value between them would shift a column without an error."""
    p = write_cloud(tmp_path / f"rows{ext}", cloud[:5, :3], binary=False)
    lines = p.read_bytes().split(b"\n")
    first = next(i for i, line in enumerate(lines) if line.startswith((b"end_header", b"DATA"))) + 1
    lines[first] = b" ".join(lines[first].split()[:2])
    lines[first + 1] += b" 7"
    p.write_bytes(b"\n".join(lines))
    with pytest.raises(CloudFormatError) as info:
        read_cloud(p)
    msg = str(info.value)
    assert f"line {first + 1} " in msg and "has 2 values, the header declares 3" in msg, msg
    # a file that ends inside a row is truncated, and says so
    p = write_cloud(tmp_path / f"cut{ext}", cloud[:5, :3], binary=False)
    p.write_bytes(p.read_bytes().rstrip(b"\n").rsplit(b" ", 1)[0])
    _expect_error(p, "truncated: the header announces 5 (vertices|points), the file ends inside")


@pytest.mark.parametrize("layout", ["kitti", "xyz"])
def test_bin_format_reads_12_byte_xyz_records(tmp_path, cloud, layout):
    """4 x, y, z points are 48 bytes, 3 KITTI points too: only the caller can say which it is."""
    xyz = cloud[:1232, :3]                                  # 1232 % 4 == 0: divides into 16 bytes
    p = tmp_path / "xyz.bin"
    xyz.astype("<f4").tofile(p)
    if layout == "xyz":
        assert np.array_equal(read_cloud(p, bin_format="xyz"), xyz)
        assert np.array_equal(read_cloud(p, xyz_only=False, bin_format="xyz"), xyz)
    else:
        assert read_cloud(p).shape == (924, 3)              # the default reads KITTI, as before
    k = write_cloud(tmp_path / "k.bin", cloud[:5])          # 80 bytes: not a multiple of 12
    with pytest.raises(CloudFormatError, match="not a multiple of 12"):
        read_cloud(k, bin_format="xyz")
    with pytest.raises(CloudFormatError, match="bin_format"):
        read_cloud(k, bin_format="auto")


def test_fields_named_like_xyz_are_kept(tmp_path):
    """Extra fields called xy, yz or xyz are columns of their own (not parts of "xyz")."""
    names = ["x", "y", "z", "xy", "yz", "xyz"]
    pts = np.arange(18, dtype=np.float32).reshape(3, 6)
    for ext in (".ply", ".pcd"):
        p = write_cloud(tmp_path / f"f{ext}", pts, field_names=names)
        assert np.array_equal(read_cloud(p, xyz_only=False), pts)


@pytest.mark.parametrize("count", ["0", "-1", "two"])
def test_a_pcd_count_below_one_is_named(tmp_path, count):
    p = write_cloud(tmp_path / "c.pcd", np.ones((4, 3), np.float32))
    p.write_bytes(p.read_bytes().replace(b"COUNT 1 1 1\n", f"COUNT 1 1 {count}\n".encode()))
    _expect_error(p, f"field 'z' has COUNT '{count}', expected an integer >= 1")


def test_a_pcd_viewpoint_away_from_the_origin_is_warned_about(tmp_path, caplog):
    pts = np.ones((4, 3), np.float32)
    p = write_cloud(tmp_path / "v.pcd", pts)
    with caplog.at_level("WARNING", logger="lidar_completion.io"):
        read_cloud(p)                                   # identity: nothing to say
    assert "VIEWPOINT" not in caplog.text
    p.write_bytes(p.read_bytes().replace(b"VIEWPOINT 0 0 0 1 0 0 0", b"VIEWPOINT 12.5 -3 0 1 0 0 0"))
    with caplog.at_level("WARNING", logger="lidar_completion.io"):
        assert np.array_equal(read_cloud(p), pts)       # read as stored
    assert "VIEWPOINT 12.5 -3 0 1 0 0 0" in caplog.text and "sensor" in caplog.text


@pytest.mark.parametrize("ext", [".ply", ".pcd"])
def test_an_ascii_integer_field_out_of_its_range_is_refused(tmp_path, ext):
    """An ascii value of 300 in a uchar field wrapped to 44 without a word."""
    p = tmp_path / f"c{ext}"
    if ext == ".ply":
        p.write_text("ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\nproperty float y\n"
                     "property float z\nproperty uchar intensity\nend_header\n1 2 3 10\n4 5 6 300\n")
    else:
        p.write_text("VERSION .7\nFIELDS x y z intensity\nSIZE 4 4 4 1\nTYPE F F F U\nCOUNT 1 1 1 1\n"
                     "WIDTH 2\nHEIGHT 1\nPOINTS 2\nDATA ascii\n1 2 3 10\n4 5 6 300\n")
    with pytest.raises(CloudFormatError, match="'intensity' is declared uint8 .0..255. but holds values "
                                               "from 10 to 300"):
        read_cloud(p, xyz_only=False)


def test_a_pcd_header_with_tabs_reads_as_pcl_reads_it(tmp_path, cloud):
    """PCL splits header words on tabs as on spaces: a tab-separated header was refused with "no
    'DATA' line", although it has one."""
    pts = cloud[:50, :3]
    head = "\n".join(["# .PCD v0.7", "VERSION\t0.7", "FIELDS\tx\ty\tz", "SIZE\t4\t4\t4", "TYPE\tF\tF\tF",
                      "COUNT 1\t1 1", "WIDTH\t50", "HEIGHT\t1", "VIEWPOINT 0 0 0 1 0 0 0", "POINTS\t50",
                      "DATA\tascii"]) + "\n"
    body = "".join(f"{x!r}\t{y!r}\t{z!r}\n" for x, y, z in pts.tolist())
    (tmp_path / "tabs.pcd").write_text(head + body)
    assert np.array_equal(read_cloud(tmp_path / "tabs.pcd"), pts)


@pytest.mark.parametrize("rows", [3, 4])
def test_a_transposed_npy_is_named_not_read_as_a_few_points(tmp_path, cloud, rows):
    """A (3, N) array read as 3 points of N coordinates: `complete` said "too few points" of a file of
    thousands, and evaluate-files scored 3 points."""
    np.save(tmp_path / "t.npy", cloud[:, :rows].T)
    with pytest.raises(CloudFormatError, match=r"shape \(%d, 1234\) holds a point per column.*array\.T" % rows):
        read_cloud(tmp_path / "t.npy")
    np.save(tmp_path / "few.npy", cloud[:4, :3])            # four real points stay four points
    assert read_cloud(tmp_path / "few.npy").shape == (4, 3)


def test_bin_written_as_xyz_records(tmp_path, cloud):
    p = write_cloud(tmp_path / "a.bin", cloud, bin_format="xyz")
    assert p.stat().st_size == 12 * len(cloud)
    assert np.array_equal(read_cloud(p, bin_format="xyz"), cloud[:, :3])
    with pytest.raises(CloudFormatError, match="bin_format"):
        write_cloud(tmp_path / "b.bin", cloud, bin_format="xyzi")


def test_an_organised_structured_npy_reads_point_by_point(tmp_path):
    """An (H, W) structured array - what read_points returns for an organised scan - was read with the
    fields of different points in one row (x of three points, then y and z mixed with intensity)."""
    a = np.zeros((2, 3), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("intensity", "<f4")])
    a["x"] = np.arange(6).reshape(2, 3)
    a["y"] = 10 + a["x"]
    a["z"] = 100 + a["x"]
    a["intensity"] = 7
    np.save(tmp_path / "organised.npy", a)
    got = read_cloud(tmp_path / "organised.npy")
    i = np.arange(6, dtype=np.float32)
    assert np.array_equal(got[:, :3], np.stack([i, 10 + i, 100 + i], axis=1))
    np.save(tmp_path / "flat.npy", a.reshape(-1))                   # the same scan, flat
    assert np.array_equal(got, read_cloud(tmp_path / "flat.npy"))


@pytest.mark.parametrize("name", ["far.npy", "far.ply", "far.pcd", "far_ascii.ply", "far_ascii.pcd"])
def test_float64_clouds_are_written_as_float64(tmp_path, name):
    """A completion moved into a UTM-sized map frame was written as float32, 0.25 m steps at 5,400 km;
    float64 arrays keep float64 in every format that has it (.bin stays KITTI's float32)."""
    rng = np.random.default_rng(3)
    far = rng.uniform(-40.0, 40.0, (200, 3)) + [452_317.25, 5_411_883.75, 1.8]
    path = write_cloud(tmp_path / name.replace("_ascii", ""), far, binary="ascii" not in name)
    if path.suffix == ".npy":
        back = np.load(path)
    else:
        head, _, body = path.read_bytes().partition(b"end_header\n" if path.suffix == ".ply" else b"DATA ")
        assert (b"property double x" if path.suffix == ".ply" else b"SIZE 8 8 8") in head
        if path.suffix == ".pcd":
            body = body.split(b"\n", 1)[1]
        back = (np.loadtxt(body.decode().splitlines()) if "ascii" in name
                else np.frombuffer(body, dtype="<f8").reshape(-1, 3))
    assert back.dtype == np.float64 and np.array_equal(back, far)
    assert read_cloud(path).dtype == np.float32            # reading stays float32, as documented
    np.testing.assert_allclose(read_cloud(path), far, atol=0.5)
