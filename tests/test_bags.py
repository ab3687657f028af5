"""rosbag2 tools: round trips in both storages, KITTI -> bag, damaged bags, the offline bench (the live
bench, which runs through the ROS 2 layer, is in test_bags_live.py)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from lidar_completion.bags import (
    CLOUD_TYPE, STORAGES, BagReader, BagWriter, deserialize, make_cloud, make_tf, read_clouds,
    serialize, tf_to_matrix, write_clouds,
)
from lidar_completion.bags.bench import bench_offline
from lidar_completion.bags.report import summary_line, write_report
from lidar_completion.errors import BagError

FIELDS4 = ("x", "y", "z", "intensity")
START = 1_600_000_000 * 10**9
SUMMARY_RE = re.compile(r"^p50_ms=(\d+\.\d+|nan) p95_ms=(\d+\.\d+|nan) dropped=(\d+)/(\d+)$")


def _clouds(n, points, seed=0):
    rng = np.random.default_rng(seed)
    return [(START + i * 100_000_000, (rng.standard_normal((points, 4)) * 10).astype(np.float32))
            for i in range(n)]


def _storage_file(bag: Path) -> Path:
    return next(p for p in bag.iterdir() if p.suffix in (".mcap", ".db3"))


# --------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("storage", STORAGES)
def test_round_trip_arrays_equal(tmp_path, storage):
    clouds = _clouds(4, 1000 + 7)
    clouds[2][1][5] = np.nan  # a NaN point is skipped on reading, like the node does
    bag = write_clouds(tmp_path / "bag", clouds, storage=storage, field_names=FIELDS4)
    assert (bag / "metadata.yaml").exists() and _storage_file(bag).suffix == \
        (".mcap" if storage == "mcap" else ".db3")
    read = read_clouds(bag, field_names=FIELDS4)
    assert [c.stamp_ns for c in read] == [s for s, _ in clouds]
    assert [c.log_time_ns for c in read] == [s for s, _ in clouds]
    assert all(c.frame_id == "velodyne" for c in read)
    for (_, arr), c in zip(clouds, read):
        finite = np.isfinite(arr).all(axis=1)
        assert c.points.dtype == np.float32
        np.testing.assert_array_equal(c.points, arr[finite])
    with BagReader(bag) as reader:
        assert reader.topics["/velodyne_points"].msgtype == CLOUD_TYPE
        assert reader.expected_count("/velodyne_points") == 4


@pytest.mark.parametrize("storage", STORAGES)
def test_round_trip_mixed_topics_and_tf(tmp_path, storage):
    rng = np.random.default_rng(1)
    rot = np.linalg.qr(rng.standard_normal((3, 3)))[0]
    rot *= np.sign(np.linalg.det(rot))
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = rot, [1.5, -2.0, 0.25]
    pts = rng.standard_normal((50, 3)).astype(np.float32)
    with BagWriter(tmp_path / "bag", storage) as w:
        w.write("/velodyne_points", make_cloud(pts, START), START)
        w.write("/tf", make_tf(START, "odom", "velodyne", pose), START)
    with BagReader(tmp_path / "bag") as reader:
        msgs = list(reader.messages())
    assert [m.topic for m in msgs] == ["/velodyne_points", "/tf"]
    tf = deserialize(msgs[1].data, msgs[1].msgtype).transforms[0]
    assert (tf.header.frame_id, tf.child_frame_id) == ("odom", "velodyne")
    np.testing.assert_allclose(tf_to_matrix(tf.transform), pose, atol=1e-12)
    cloud = deserialize(msgs[0].data, CLOUD_TYPE)
    assert serialize(cloud) == msgs[0].data


# ------------------------------------------------------------------------------------------- errors
def test_missing_bag_topic_and_wrong_type_are_clear(tmp_path):
    with pytest.raises(BagError, match="bag not found"):
        BagReader(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(BagError, match="not a rosbag2 bag"):
        BagReader(tmp_path / "notes.txt")
    with BagWriter(tmp_path / "bag", "mcap") as w:
        w.write("/velodyne_points", make_cloud(np.zeros((3, 3), np.float32), START), START)
        w.write("/tf", make_tf(START, "odom", "velodyne", np.eye(4)), START)
    with BagReader(tmp_path / "bag") as reader:
        with pytest.raises(BagError, match=r"'/points' is not in bag .*topics present: /tf "
                                           r"\(tf2_msgs/msg/TFMessage, 1 msgs\); /velodyne_points"):
            reader.require_topic("/points")
        with pytest.raises(BagError, match="carries tf2_msgs/msg/TFMessage, expected "
                                           "sensor_msgs/msg/PointCloud2"):
            list(reader.clouds("/tf"))
    with pytest.raises(BagError, match="exists already"):
        BagWriter(tmp_path / "bag")
    with pytest.raises(BagError, match="unknown bag storage"):
        BagWriter(tmp_path / "other", storage="rosbag1")


def test_ros1_bag_is_named_and_the_suggested_conversion_reads(tmp_path):
    # a ROS 1 bag (many public LiDAR datasets) is refused with the command that converts it; running
    # that command (rosbags' converter, a dependency) gives a bag whose clouds read unchanged
    from rosbags.rosbag1 import Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS1_NOETIC)
    msg_t = ts.types[CLOUD_TYPE]
    field_t, header_t, time_t = (ts.types[n] for n in ("sensor_msgs/msg/PointField", "std_msgs/msg/Header",
                                                       "builtin_interfaces/msg/Time"))
    clouds = _clouds(3, 50)
    ros1 = tmp_path / "drive.bag"
    with Writer(ros1) as w:
        conn = w.add_connection("/velodyne_points", CLOUD_TYPE, typestore=ts)
        for i, (t, pts) in enumerate(clouds):
            msg = msg_t(header=header_t(seq=i, stamp=time_t(sec=t // 10**9, nanosec=t % 10**9), frame_id="velodyne"),
                        height=1, width=len(pts), is_bigendian=False, point_step=16, row_step=16 * len(pts),
                        fields=[field_t(name=n, offset=4 * k, datatype=7, count=1) for k, n in enumerate(FIELDS4)],
                        data=np.frombuffer(pts.tobytes(), np.uint8), is_dense=True)
            w.write(conn, t, ts.serialize_ros1(msg, CLOUD_TYPE))
    with pytest.raises(BagError, match="is a ROS 1 bag") as err:
        BagReader(ros1)
    cmd = re.search(r"rosbags-convert (.*), then pass (\S+)$", str(err.value))
    assert cmd, err.value
    exe = Path(sys.executable).parent / "rosbags-convert"
    subprocess.run([str(exe)] + cmd.group(1).split(), check=True, capture_output=True)
    got = list(read_clouds(cmd.group(2), field_names=FIELDS4))
    assert [c.stamp_ns for c in got] == [t for t, _ in clouds]
    assert all(c.frame_id == "velodyne" and np.array_equal(c.points, p) for c, (_, p) in zip(got, clouds))
    renamed = tmp_path / "drive.mcap"                 # the suffix does not decide, the content does
    renamed.write_bytes(ros1.read_bytes())
    with pytest.raises(BagError, match="is a ROS 1 bag"):
        BagReader(renamed)

@pytest.mark.parametrize("storage", STORAGES)
def test_truncated_bag_reads_what_is_there_and_reports_the_rest(tmp_path, storage):
    # 70k points x 16 B > 1 MiB: each message is its own mcap chunk, so whole messages survive
    clouds = _clouds(5, 70_000, seed=2)
    bag = write_clouds(tmp_path / "bag", clouds, storage=storage, field_names=FIELDS4)
    f = _storage_file(bag)
    os.truncate(f, int(f.stat().st_size * 0.62))
    with BagReader(bag) as reader:
        assert reader.require_topic("/velodyne_points").count == 5
        got = list(reader.clouds("/velodyne_points", FIELDS4))
        problems = reader.problems
    assert 1 <= len(got) < 5
    for c in got:  # what was read is intact
        np.testing.assert_array_equal(c.points, dict(clouds)[c.stamp_ns])
    text = " | ".join(problems)
    assert "truncated or damaged" in text
    assert f"read {len(got)} of 5 messages; {5 - len(got)} could not be read" in text


def test_a_damaged_page_inside_a_sqlite3_bag_costs_only_its_message(tmp_path):
    """A page of zeros inside one cloud's data (a bad copy, a disk error) raised apsw.CorruptError,
    which rosbags reads sqlite3 bags with and which is no sqlite3.DatabaseError: bag-bench ended in a
    traceback without a report. Now the reader says where it stopped and salvages the rest row by
    row, so only the damaged message is lost."""
    clouds = _clouds(6, 2000, seed=4)                 # 32 kB a cloud: overflow pages of their own
    bag = write_clouds(tmp_path / "bag", clouds, storage="sqlite3", field_names=FIELDS4)
    f = _storage_file(bag)
    raw = bytearray(f.read_bytes())
    page = 4096
    at = raw.find(clouds[2][1][1000:1010].tobytes())          # inside the third cloud's data
    assert at > page
    raw[at // page * page:(at // page + 1) * page] = bytes(page)
    f.write_bytes(bytes(raw))
    with BagReader(bag) as reader:
        got = list(reader.clouds("/velodyne_points", FIELDS4))
        problems = " | ".join(reader.problems)
    assert [c.stamp_ns for c in got] == [t for i, (t, _) in enumerate(clouds) if i != 2]
    for c in got:
        np.testing.assert_array_equal(c.points, dict(clouds)[c.stamp_ns])
    assert "damaged storage" in problems and "read 5 of 6 messages; 1 could not be read" in problems


class _Picky:
    """Stand-in completer that refuses clouds of under 100 points (as the Completer refuses a scan
    with nothing in its limits) and is interrupted (Ctrl-C) on call ``stop_at``."""

    def __init__(self, stop_at=None):
        self.calls, self.stop_at = 0, stop_at

    def complete_detailed(self, points):
        from lidar_completion.errors import CloudFormatError

        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        if len(points) < 100:
            raise CloudFormatError("too few points to complete")
        return types.SimpleNamespace(points=np.asarray(points[:, :3]), timings={"solver": 0.001})


def test_the_warm_up_moves_past_scans_the_completer_refuses(tmp_path):
    """A bag that starts with a near-empty scan (a sensor spinning up, a garage) gave up the warm-up
    on it, and the first completed scan carried the one-time costs into the statistics."""
    clouds = _clouds(4, 500, seed=5)
    clouds[0] = (clouds[0][0], clouds[0][1][:20])
    bag = write_clouds(tmp_path / "bag", clouds, field_names=FIELDS4)
    report = bench_offline(bag, "/velodyne_points", _Picky(), progress=False)
    assert report["warmup"]["scan"] == 1 and report["warmup"]["seconds"] is not None
    assert report["warmup"]["error"] is None
    assert [s["status"] for s in report["scans"]] == ["dropped", "completed", "completed", "completed"]


def test_an_interrupted_offline_bench_reports_the_scans_it_measured(tmp_path, capsys):
    """Ctrl-C lost every figure of the run (no report at all, only "interrupted")."""
    bag = write_clouds(tmp_path / "bag", _clouds(6, 500, seed=6), field_names=FIELDS4)
    # calls: the warm-up (scan 0), then scans 0, 1 and 2, and Ctrl-C during scan 3
    try:
        report = bench_offline(bag, "/velodyne_points", _Picky(stop_at=5), progress=False)
    except KeyboardInterrupt:               # not let through: it would end the whole test session
        pytest.fail("the interrupt escaped bench_offline without a report")
    assert report["interrupted"] and report["total"] == report["completed"] == 3
    assert report["dropped"] == 0                   # the scans not reached are not called unreadable
    paths = write_report(report, tmp_path / "rep")
    assert "| interrupted | yes: stopped after 3 scan(s)" in paths["md"].read_text()


def test_bag_bench_refuses_what_it_cannot_do_before_loading_a_model(tmp_path, monkeypatch, capsys):
    """An existing --write-bag was refused only after the model load and the warm-up (18-23 s).
    (--domain-id beyond 232: test_bags_live.py)"""
    from lidar_completion.cli import main
    from lidar_completion.completer import Completer

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(Completer, "from_settings", no_model)
    bag = write_clouds(tmp_path / "bag", _clouds(2, 500), field_names=FIELDS4)
    (tmp_path / "taken").mkdir()
    assert main(["bag-bench", str(bag), "--write-bag", str(tmp_path / "taken"), "--no-progress"]) == 1
    assert "taken exists already" in capsys.readouterr().err


def test_a_file_compressed_bag_without_metadata_names_its_file(tmp_path):
    """A folder holding only x.mcap.zstd (rosbag2's file compression) was "no .mcap or .db3 storage
    file found": the file that is there, and what to do with it, were not named."""
    (tmp_path / "bag").mkdir()
    (tmp_path / "bag" / "drive_0.mcap.zstd").write_bytes(b"\x28\xb5\x2f\xfd" + bytes(64))
    with pytest.raises(BagError, match=r"drive_0\.mcap\.zstd is compressed as a whole file .*zstd -d"):
        BagReader(tmp_path / "bag")


def test_an_offline_report_leaves_no_files_of_a_live_run_beside_it(tmp_path):
    """A report folder reused for an offline run kept the live run's live_events.json and node.log."""
    bag = write_clouds(tmp_path / "bag", _clouds(2, 500), field_names=FIELDS4)
    out = tmp_path / "rep"
    out.mkdir()
    for name in ("live_events.json", "node.log"):
        (out / name).write_text("{}")
    write_report(bench_offline(bag, "/velodyne_points", _Picky(), progress=False), out)
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".png") == ["report.json", "report.md"]


def test_offline_bench_counts_truncated_messages_as_dropped(tmp_path):
    clouds = _clouds(5, 70_000, seed=3)
    bag = write_clouds(tmp_path / "bag", clouds, field_names=FIELDS4)
    f = _storage_file(bag)
    os.truncate(f, int(f.stat().st_size * 0.5))

    class Halver:  # stand-in completer: the bench's accounting, not the model, is tested here
        def complete_detailed(self, points):
            return types.SimpleNamespace(points=np.asarray(points[::2, :3]), timings={"solver": 0.001})

    report = bench_offline(bag, "/velodyne_points", Halver(), progress=False)
    assert report["total"] == 5 and report["completed"] + report["dropped"] == 5
    assert 1 <= report["completed"] < 5
    assert report["drop_reasons"] == {"unreadable (damaged or truncated bag)": report["dropped"]}
    assert any("could not be read" in p for p in report["bag_problems"])
    done = [s for s in report["scans"] if s["status"] == "completed"]
    assert all(s["points_out"] == (70_000 + 1) // 2 for s in done)
    assert SUMMARY_RE.match(summary_line(report)).group(3, 4) == (str(report["dropped"]), "5")


class FirstCallSlow:
    """Stand-in completer whose first call reports a huge completer total (its one-time costs), the
    later ones 2 ms; ``fail_first`` makes the first call fail in the networks instead (a refused
    input moves the warm-up on to the next scan: test_the_warm_up_moves_past_scans_the_completer_refuses)."""

    def __init__(self, fail_first=False):
        self.calls, self.fail_first = 0, fail_first

    def complete_detailed(self, points):
        from lidar_completion.errors import ModelOutputError

        self.calls += 1
        if self.calls == 1 and self.fail_first:
            raise ModelOutputError("not today")
        total = 1000.0 if self.calls == 1 else 0.002
        return types.SimpleNamespace(points=np.asarray(points[::2, :3]), timings={"total": total})


def test_offline_bench_warm_up_is_reported_apart_from_the_statistics(tmp_path):
    """One completion of the first scan before timing: its cost is in ``warmup``, never in the
    statistics, and its output is not written; --no-warmup (warmup=False) times the first call."""
    bag = write_clouds(tmp_path / "bag", _clouds(3, 200))
    slow = FirstCallSlow()
    report = bench_offline(bag, "/velodyne_points", slow, progress=False, write_bag=tmp_path / "out")
    assert slow.calls == 4 and report["completed"] == report["total"] == 3
    warm = report["warmup"]
    assert warm["enabled"] and warm["scan"] == 0 and warm["seconds"] >= 0 and warm["error"] is None
    assert report["stages_ms"]["completer total"]["max"] == pytest.approx(2.0)
    with BagReader(tmp_path / "out") as reader:
        assert reader.topics["/completed_points"].count == 3

    cold = bench_offline(bag, "/velodyne_points", FirstCallSlow(), progress=False, warmup=False)
    assert cold["warmup"] == {"enabled": False, "scan": None, "seconds": None, "error": None}
    assert cold["stages_ms"]["completer total"]["max"] == pytest.approx(1e6)

    # a failed warm-up is reported and the scan is still benchmarked
    failed = bench_offline(bag, "/velodyne_points", FirstCallSlow(fail_first=True), progress=False)
    assert failed["warmup"]["error"] == "not today" and failed["warmup"]["seconds"] is None
    assert failed["completed"] == 3


def test_report_tables_name_each_row_once(tmp_path):
    """The end-to-end total and the completer's own total are two rows with two names; the warm-up
    and the guidance have rows of their own."""
    from lidar_completion.bags.report import markdown

    bag = write_clouds(tmp_path / "bag", _clouds(2, 200))
    report = bench_offline(bag, "/velodyne_points", FirstCallSlow(), progress=False,
                           meta={"steps": 8, "guidance": 3.5})
    md = markdown(report)
    names = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ")]
    names = [n for n in names if n]  # not the tables' headers
    assert len(names) == len(set(names)), names
    assert {"total", "completer total", "warm-up", "guidance"} <= set(names)
    assert "| guidance | 3.5 |" in md and "| steps | 8 |" in md
    assert re.search(r"\| warm-up \| \d+\.\d\d s \(scan 0 completed once before timing; not in the "
                     r"statistics\) \|", md), md
    report["warmup"] = {"enabled": False, "scan": None, "seconds": None, "error": None}
    assert "| warm-up | off (--no-warmup)" in markdown(report)


# ------------------------------------------------------------------------------------- KITTI -> bag
@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    from lidar_completion.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(root, sequences=["00"], scans=5, seed=0)
    return root


@pytest.fixture(scope="module")
def synthetic_bag(synthetic_root, tmp_path_factory):
    from lidar_completion.bags.kitti import bag_from_kitti

    out = tmp_path_factory.mktemp("bags") / "seq00"
    bag_from_kitti(synthetic_root, "00", out, progress=False)
    return out


@pytest.mark.parametrize("storage", STORAGES)
def test_bag_from_kitti_cli(synthetic_root, tmp_path, storage, capsys):
    from lidar_completion.cli import main
    from lidar_completion.data.kitti import SemanticKittiSequence

    out = tmp_path / "bag"
    assert main(["bag-from-kitti", str(synthetic_root), "--sequence", "00", "--out", str(out),
                 "--storage", storage, "--limit", "3", "--start-time", "1000.5", "--no-progress"]) == 0
    assert "wrote 3 scans" in capsys.readouterr().out
    seq = SemanticKittiSequence(synthetic_root, "00")
    with BagReader(out) as reader:
        assert {t: i.msgtype for t, i in reader.topics.items()} == {
            "/velodyne_points": CLOUD_TYPE, "/tf": "tf2_msgs/msg/TFMessage",
            "/tf_static": "tf2_msgs/msg/TFMessage"}
        msgs = list(reader.messages())
    clouds = [m for m in msgs if m.topic == "/velodyne_points"]
    tfs = [deserialize(m.data, m.msgtype).transforms[0] for m in msgs if m.topic == "/tf"]
    statics = [deserialize(m.data, m.msgtype).transforms for m in msgs if m.topic == "/tf_static"]
    assert len(clouds) == len(tfs) == 3 and len(statics) == 1
    # base_link -> velodyne: the LiDAR 1.73 m above the ground, level (KITTI's mounting)
    mount, = statics[0]
    assert (mount.header.frame_id, mount.child_frame_id) == ("base_link", "velodyne")
    base_velo = tf_to_matrix(mount.transform)
    np.testing.assert_allclose(base_velo, [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1.73], [0, 0, 0, 1]],
                               atol=1e-12)
    for i, raw in enumerate(clouds):
        msg = deserialize(raw.data, CLOUD_TYPE)
        assert [f.name for f in msg.fields] == list(FIELDS4)
        assert msg.header.frame_id == "velodyne"
        stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
        assert stamp == 1000_500_000_000 + round(seq.times[i] * 1e9) == raw.log_time_ns
        from lidar_completion.pointcloud2 import read_points_numpy
        np.testing.assert_array_equal(read_points_numpy(msg, FIELDS4, skip_nans=False), seq.scan(i))
        assert (tfs[i].header.frame_id, tfs[i].child_frame_id) == ("odom", "base_link")
        assert tfs[i].header.stamp == msg.header.stamp
        # odom <- velodyne through the chain is the LiDAR pose of poses.txt, seen from base_link at
        # the first scan (odom)
        odom_velo = tf_to_matrix(tfs[i].transform) @ base_velo
        np.testing.assert_allclose(odom_velo, base_velo @ seq.poses[i], atol=1e-9)
    np.testing.assert_allclose(tf_to_matrix(tfs[0].transform), np.eye(4), atol=1e-9)


def test_bag_from_kitti_errors(synthetic_root, tmp_path):
    from lidar_completion.cli import main

    assert main(["bag-from-kitti", str(synthetic_root), "--sequence", "07", "--out",
                 str(tmp_path / "b")]) == 1
    assert not (tmp_path / "b").exists()


def test_bag_from_kitti_refuses_a_start_time_its_last_scan_cannot_hold(synthetic_root, tmp_path):
    """A start time a stamp holds, but the drive's own times (0.4 s here) take the last scans past
    a stamp's int32 seconds: refused before the bag is begun (a serialisation error midway)."""
    from lidar_completion.bags.kitti import bag_from_kitti
    from lidar_completion.errors import DatasetError

    start_ns = (2**31 - 1) * 10**9 + 7 * 10**8           # the last scan at 2**31 + 0.1 s
    with pytest.raises(DatasetError, match=r"outside a ROS stamp's 0\.\.2147483647 s: give an earlier"):
        bag_from_kitti(synthetic_root, "00", tmp_path / "b", start_time_ns=start_ns, progress=False)
    assert not (tmp_path / "b").exists()
    bag_from_kitti(synthetic_root, "00", tmp_path / "c", start_time_ns=start_ns - 2 * 10**8,
                   progress=False)                        # ends at 2**31 - 0.1 s: written


def test_bag_from_kitti_leaves_no_partial_bag(synthetic_root, tmp_path, capsys):
    """A scan that cannot be read midway: no bag of the first scans is left behind (it would look
    like the sequence's and block the rerun, as bags are never overwritten)."""
    import shutil

    from lidar_completion.cli import main

    root = tmp_path / "root"
    shutil.copytree(synthetic_root, root)
    scan = root / "sequences" / "00" / "velodyne" / "000003.bin"
    scan.write_bytes(scan.read_bytes()[:1001])
    out = tmp_path / "bag"
    assert main(["bag-from-kitti", str(root), "--sequence", "00", "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "000003.bin" in err and f"the unfinished bag {out} was removed" in err
    assert not out.exists()
    assert main(["bag-from-kitti", str(synthetic_root), "--sequence", "00", "--out", str(out),
                 "--sensor-height", "nan", "--no-progress"]) == 1
    assert "sensor height must be a finite number" in capsys.readouterr().err and not out.exists()
    for option, bad, message in (("--topic", "bad topic", "not a valid ROS 2 topic name"),
                                 ("--topic", "", "not a valid ROS 2 topic name"),
                                 ("--topic", "/9points", "not a valid ROS 2 topic name"),
                                 ("--frame-id", "", "not a valid tf2 frame"),
                                 ("--frame-id", "/velodyne", "not a valid tf2 frame")):
        assert main(["bag-from-kitti", str(synthetic_root), "--sequence", "00", "--out", str(out),
                     option, bad, "--no-progress"]) == 1
        assert message in capsys.readouterr().err and not out.exists()


# ------------------------------------------------------------------------------------ offline bench
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from lidar_completion.checkpoints import make_random_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    make_random_checkpoint(path, seed=0)
    return path


# small preprocessing budgets keep a CPU completion of a synthetic scan well under a second
SMALL = ["--steps", "2", "--n-fps", "256", "--tile", "2", "--seed", "0", "--threads", "1"]

# Tiny networks gain nothing from intra-op threads, and on a busy 2-core machine OpenMP spinning
# (torch's and MinkowskiEngine's own runtime, which only reads OMP_NUM_THREADS when it loads) costs
# seconds per scan: the bench runs in a fresh process with one thread.
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

def test_offline_bench_report(synthetic_bag, tiny_checkpoint, tmp_path):
    out, wb = tmp_path / "report", tmp_path / "completed_bag"
    proc = subprocess.run([sys.executable, "-m", "lidar_completion", "bag-bench", str(synthetic_bag),
                           "--checkpoint", str(tiny_checkpoint), *SMALL, "--out", str(out),
                           "--write-bag", str(wb), "--no-progress"],
                          env=ONE_THREAD_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    m = SUMMARY_RE.match(last)
    assert m, last
    for name in ("report.json", "report.md", "latency_hist.png", "latency_memory_over_time.png",
                 "points_in_out.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "latency_hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rep = json.loads((out / "report.json").read_text())
    assert (rep["mode"], rep["total"], rep["completed"], rep["dropped"]) == ("offline", 5, 5, 0)
    lat = rep["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p95"] <= lat["max"] < 60_000
    assert m.group(3, 4) == ("0", "5") and float(m.group(1)) == pytest.approx(lat["p50"], abs=0.06)
    assert 0 < rep["throughput_hz"] < 1e4
    assert 30 < rep["memory"]["peak_rss_mb"] < 24_000
    assert rep["memory"]["gpu_peak_mb"] is None
    stages = rep["stages_ms"]
    assert {"decode", "complete", "encode", "solver", "completer total"} <= set(stages)
    assert "total" not in stages  # the completer's own total is named apart from the end-to-end one
    assert rep["warmup"]["scan"] == 0 and rep["warmup"]["seconds"] > 0
    assert [s["latency_ms"] is not None for s in rep["scans"]].count(True) == 5  # scan 0 timed too
    assert re.search(r"^warm-up: \d+\.\d\d s \(scan 0 completed once", proc.stdout, re.M), proc.stdout
    assert all(stages[k]["p50"] <= lat["p50"] for k in ("decode", "complete", "encode"))
    for s in rep["scans"]:
        assert s["status"] == "completed" and s["points_in"] > 0 and s["points_out"] > 0
    assert rep["steps"] == 2 and rep["checkpoint"] == str(tiny_checkpoint)
    md = (out / "report.md").read_text()
    assert "Latency" in md and last in md
    assert md.count("| total |") == 1 and md.count("| completer total |") == 1
    assert "| warm-up |" in md
    with BagReader(wb) as reader:
        counts = {t: i.count for t, i in reader.topics.items()}
        assert counts == {"/velodyne_points": 5, "/completed_points": 5, "/tf": 5, "/tf_static": 1}
        outs = list(reader.clouds("/completed_points"))
    assert [c.n_points for c in outs] == [s["points_out"] for s in rep["scans"]]
    assert [c.stamp_ns for c in outs] == [s["stamp_ns"] for s in rep["scans"]]


def test_bag_bench_cli_errors(synthetic_bag, tmp_path, capsys):
    from lidar_completion.cli import main

    assert main(["bag-bench", str(synthetic_bag), "--topic", "/points", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "'/points' is not in bag" in err and "/velodyne_points (sensor_msgs/msg/PointCloud2" in err
    assert main(["bag-bench", str(synthetic_bag), "--topic", "/tf", "--out", str(tmp_path)]) == 1
    assert "carries tf2_msgs/msg/TFMessage" in capsys.readouterr().err
    assert main(["bag-bench", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 1
    assert "bag not found" in capsys.readouterr().err
    # live-mode options offline were silently ignored
    assert main(["bag-bench", str(synthetic_bag), "--rate", "2", "--pace", "--out", str(tmp_path)]) == 1
    assert "--rate, --pace are for the live mode: add --live" in capsys.readouterr().err
    assert main(["bag-bench", str(synthetic_bag), "--node-param", "steps:=2", "--out", str(tmp_path)]) == 1
    assert "--node-param is for the live mode" in capsys.readouterr().err


def test_bag_bench_fails_when_no_scan_is_completed(tiny_checkpoint, tmp_path, capsys):
    """Every scan unusable (too few points to complete): exit status 1 with the reason, after the
    report is written."""
    from lidar_completion.cli import main

    bag = write_clouds(tmp_path / "bag", _clouds(2, 10))
    out = tmp_path / "report"
    assert main(["bag-bench", str(bag), "--checkpoint", str(tiny_checkpoint), *SMALL, "--out",
                 str(out), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "error: no scan was completed (0/2: 1 x completion failed: too few points" in captured.err
    assert captured.err.count("too few points") == 2, captured.err
    assert captured.out.strip().splitlines()[-1] == "p50_ms=nan p95_ms=nan dropped=2/2"
    assert (out / "report.json").exists()


def test_the_cli_start_time_default_is_the_library_default():
    """`bag-from-kitti --help` said "(default 2011-10-03 00:00 UTC) ... (default: None)"."""
    from lidar_completion.bags.kitti import DEFAULT_START_NS
    from lidar_completion.cli import build_parser

    args = build_parser().parse_args(["bag-from-kitti", "root", "--sequence", "00", "--out", "out"])
    assert int(round(args.start_time * 1e9)) == DEFAULT_START_NS


# ------------------------------------------------------------ bags without metadata, as users have them
def _split_without_metadata(tmp_path, n=11, storage="mcap"):
    """What `ros2 bag record --max-bag-size` leaves while it records: bag_0 ... bag_<n-1>, one
    message each, no metadata.yaml."""
    clouds = _clouds(n, 50, seed=5)
    split = tmp_path / "split"
    split.mkdir()
    for i, (stamp, pts) in enumerate(clouds):
        one = write_clouds(tmp_path / f"one{i}", [(stamp, pts)], storage=storage, field_names=FIELDS4)
        f = _storage_file(one)
        f.rename(split / f"split_{i}{f.suffix}")
    return split, clouds


@pytest.mark.parametrize("storage", STORAGES)
def test_a_split_bag_without_metadata_reads_in_its_split_order_and_is_not_called_damaged(
        tmp_path, storage, caplog):
    """Its files were read in text order (split_10 before split_2: scans out of order, --limit took
    the wrong ones), and a healthy bag without metadata.yaml was reported as truncated or damaged."""
    import logging
    split, clouds = _split_without_metadata(tmp_path, storage=storage)
    with caplog.at_level(logging.WARNING):
        with BagReader(split) as reader:
            got = list(reader.clouds("/velodyne_points", FIELDS4))
            problems = reader.problems
    assert [c.stamp_ns for c in got] == [s for s, _ in clouds]
    assert not problems and "has no metadata.yaml" in caplog.text and "damaged" not in caplog.text


def test_a_bag_with_nothing_readable_says_so_not_that_the_topic_is_missing(tmp_path):
    """A recording cut inside its first chunk was reported as a topic typo ('not in bag ...; the bag
    has no topics')."""
    bag = write_clouds(tmp_path / "bag", _clouds(2, 70_000, seed=6), field_names=FIELDS4)
    (bag / "metadata.yaml").unlink()
    f = _storage_file(bag)
    os.truncate(f, 600)
    with BagReader(bag) as reader:
        with pytest.raises(BagError, match=r"no message of bag .* can be read \(so neither can "
                                           r"'/velodyne_points'\): bag\.mcap: .*truncated or damaged "
                                           r"record after 0 readable message"):
            reader.require_topic("/velodyne_points")


def test_messages_compressed_one_by_one_read_without_metadata(tmp_path):
    """rosbag2's per-message zstd compression is announced only by metadata.yaml: without it, each
    message failed with 'Invalid or unsupported CDR encapsulation'."""
    import zstandard
    clouds = _clouds(3, 200, seed=7)
    bag = tmp_path / "bag"
    with BagWriter(bag, "mcap") as w:
        for stamp, pts in clouds:
            data = serialize(make_cloud(pts, stamp, "velodyne", FIELDS4))
            w.write_raw("/velodyne_points", CLOUD_TYPE, zstandard.ZstdCompressor().compress(bytes(data)), stamp)
    (bag / "metadata.yaml").unlink()
    got = read_clouds(bag, field_names=FIELDS4)
    assert [c.error for c in got] == [None] * 3
    for (_, pts), c in zip(clouds, got):
        np.testing.assert_array_equal(c.points, pts)


def test_offline_bench_copies_no_undecodable_input_and_keeps_an_empty_frame(tmp_path):
    """--write-bag copied a message that is no PointCloud2 at all into the new bag (other tools then
    failed on it: 'Invalid string length'), and a completion of a cloud with an empty frame_id was
    published in 'velodyne'."""
    clouds = _clouds(3, 500, seed=8)
    bag = tmp_path / "bag"
    with BagWriter(bag, "mcap") as w:
        for i, (stamp, pts) in enumerate(clouds):
            data = bytes(serialize(make_cloud(pts, stamp, "", FIELDS4)))
            w.write_raw("/velodyne_points", CLOUD_TYPE, data if i != 1 else b"\x00\x01\x00\x00" + b"\xff" * 40, stamp)

    class Halver:
        def complete_detailed(self, points):
            return types.SimpleNamespace(points=np.asarray(points[::2, :3]), timings={"solver": 0.001})

    report = bench_offline(bag, "/velodyne_points", Halver(), write_bag=tmp_path / "out", progress=False)
    assert report["completed"] == 2 and report["dropped"] == 1
    with BagReader(tmp_path / "out") as out:
        inputs = list(out.clouds("/velodyne_points"))
        completed = list(out.clouds("/completed_points"))
    assert [c.error for c in inputs] == [None, None] and len(completed) == 2
    assert [c.frame_id for c in completed] == ["", ""]


def test_a_bag_without_metadata_is_warned_about_once(tiny_checkpoint, tmp_path, caplog):
    """The bag is opened twice (checked before the model loads, then benchmarked): its "no
    metadata.yaml" warning came twice."""
    from lidar_completion.cli import main

    bag = write_clouds(tmp_path / "bag", _clouds(1, 3000))
    (bag / "metadata.yaml").unlink()
    with caplog.at_level("WARNING", logger="lidar_completion.bags.io"):
        assert main(["bag-bench", str(bag), "--checkpoint", str(tiny_checkpoint), *SMALL, "--out",
                     str(tmp_path / "report"), "--no-progress", "--no-warmup"]) == 0
    assert sum("has no metadata.yaml" in r.getMessage() for r in caplog.records) == 1, caplog.text
