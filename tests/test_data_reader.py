"""SemanticKITTI reader: hand-written file set, generated data, and every error path."""
import shutil
from pathlib import Path

import numpy as np
import pytest

from lidar_completion.data import kitti, synthetic
from lidar_completion.errors import DatasetError

TINY = Path(__file__).parent / "fixtures" / "data" / "tiny_kitti"


@pytest.fixture
def tiny(tmp_path):
    """A writable copy of the hand-written dataset."""
    dst = tmp_path / "tiny"
    shutil.copytree(TINY, dst)
    return dst


def test_tiny_values_exact():
    seq = kitti.SemanticKittiSequence(TINY, "00", require_labels=True)
    assert len(seq) == 3 and seq.has_labels
    np.testing.assert_array_equal(seq.scan(0), np.array(
        [[1, 2, 3, 0.5], [4, 5, 6, 0.25], [-1, 0, 0.5, 1], [10, -10, -1.5, 0]], np.float32))
    assert seq.scan(1).dtype == np.float32 and seq.scan(2).shape == (5, 4)
    np.testing.assert_array_equal(seq.semantic(0), [40, 50, 10, 252])
    np.testing.assert_array_equal(kitti.instance_of(seq.labels(0)), [0, 0, 7, 3])
    np.testing.assert_array_equal(seq.semantic(2), [48, 48, 70, 71, 254])
    np.testing.assert_allclose(seq.times, [0.0, 0.1036, 0.2073])
    assert set(seq.calib) == {"P0", "P1", "Tr"}
    assert seq.calib["P1"][3] == pytest.approx(-386.1448)


def test_tiny_poses_in_lidar_frame():
    seq = kitti.SemanticKittiSequence(TINY, 0)
    np.testing.assert_allclose(seq.poses[0], np.eye(4), atol=1e-12)
    np.testing.assert_allclose(seq.poses[1][:3, 3], [2, 0, 0], atol=1e-12)
    np.testing.assert_allclose(seq.poses[1][:3, :3], np.eye(3), atol=1e-12)
    # camera yaw of +90 deg about its y axis (which points down) = -90 deg about LiDAR z
    yaw_m90 = np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]], float)
    np.testing.assert_allclose(seq.poses[2][:3, :3], yaw_m90, atol=1e-12)
    np.testing.assert_allclose(seq.poses[2][:3, 3], [3, -1, 0], atol=1e-12)
    # P_velo = inv(Tr) P_cam Tr and back
    np.testing.assert_allclose(kitti.velo_to_cam_poses(seq.poses, seq.tr), seq.poses_cam,
                               atol=1e-12)
    world = seq.scan_world(1)
    np.testing.assert_allclose(world[0], [2, 0, 1], atol=1e-6)


def test_dataset_root_forms(tiny):
    assert kitti.dataset_root(tiny) == tiny
    assert kitti.dataset_root(tiny / "sequences") == tiny
    assert kitti.list_sequences(tiny) == ["00"]
    assert kitti.sequence_id(8) == "08" and kitti.sequence_id("8") == "08"


def test_writers_round_trip(tmp_path):
    pts = np.random.default_rng(0).normal(size=(7, 4)).astype(np.float32)
    kitti.write_scan(tmp_path / "a.bin", pts)
    np.testing.assert_array_equal(kitti.read_scan(tmp_path / "a.bin"), pts)
    lab = np.array([1, 2, 252 | (5 << 16)], np.uint32)
    kitti.write_labels(tmp_path / "a.label", lab)
    np.testing.assert_array_equal(kitti.read_labels(tmp_path / "a.label", expected_points=3), lab)
    poses = np.tile(np.eye(4), (2, 1, 1))
    poses[1, :3, 3] = (1.5, -2.25, 1e-9)
    kitti.write_poses(tmp_path / "poses.txt", poses)
    np.testing.assert_allclose(kitti.read_poses(tmp_path / "poses.txt"), poses, atol=1e-15)
    kitti.write_times(tmp_path / "times.txt", [0.0, 0.1])
    np.testing.assert_allclose(kitti.read_times(tmp_path / "times.txt"), [0.0, 0.1])


def test_generated_sequence(tmp_path):
    cfg = synthetic.SyntheticConfig(azimuth_steps=256)
    synthetic.generate_dataset(tmp_path, 1, 3, seed=5, config=cfg, first_sequence=4)
    seq = kitti.SemanticKittiSequence(tmp_path, "04", require_labels=True)
    assert len(seq) == 3
    scene = synthetic.SyntheticScene(5, 4, 3, cfg)
    np.testing.assert_allclose(seq.poses, scene.lidar_poses, atol=1e-9)
    np.testing.assert_allclose(seq.poses[0], np.eye(4), atol=1e-12)
    np.testing.assert_allclose(seq.poses_cam[0], np.eye(4), atol=1e-12)
    np.testing.assert_allclose(np.diff(seq.times), 0.1, atol=1e-6)
    assert set(seq.calib) >= {"P0", "P1", "P2", "P3", "Tr"}
    np.testing.assert_allclose(seq.tr, scene.tr, atol=1e-11)
    for i in range(3):
        pts, lab = scene.scan(i)
        np.testing.assert_array_equal(seq.scan(i), pts)
        np.testing.assert_array_equal(seq.labels(i), lab)


# ---------------------------------------------------------------------------------------------- errors
def _seq(root, **kw):
    return kitti.SemanticKittiSequence(root, "00", **kw)


def test_error_label_length_mismatch(tiny):
    np.zeros(5, np.uint32).tofile(tiny / "sequences/00/labels/000001.label")
    with pytest.raises(DatasetError, match="has 5 labels but scan 000001.bin has 3 points"):
        _seq(tiny)
    seq = _seq(tiny, validate=False)
    with pytest.raises(DatasetError, match="expected one label per point"):
        seq.labels(1)


def test_error_scan_size(tiny):
    with open(tiny / "sequences/00/velodyne/000002.bin", "ab") as fh:
        fh.write(b"\0" * 6)
    with pytest.raises(DatasetError, match="multiple of 16"):
        _seq(tiny)
    with pytest.raises(DatasetError, match="multiple of 16"):
        kitti.read_scan(tiny / "sequences/00/velodyne/000002.bin")


def test_error_missing_label_file(tiny):
    (tiny / "sequences/00/labels/000002.label").unlink()
    with pytest.raises(DatasetError, match="000002.label is missing"):
        _seq(tiny)


def test_error_pose_count(tiny):
    p = tiny / "sequences/00/poses.txt"
    p.write_text("\n".join(p.read_text().splitlines()[:2]) + "\n")
    with pytest.raises(DatasetError, match="has 2 poses but .* has 3 scans"):
        _seq(tiny)


def test_error_pose_line(tiny):
    p = tiny / "sequences/00/poses.txt"
    lines = p.read_text().splitlines()
    lines[1] = " ".join(lines[1].split()[:11])
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"poses.txt:2: expected 12 values .* found 11"):
        _seq(tiny)
    lines[1] = "a " * 12
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match="non-numeric"):
        _seq(tiny)


def test_error_times_count(tiny):
    (tiny / "sequences/00/times.txt").write_text("0.0\n0.1\n0.2\n0.3\n")
    with pytest.raises(DatasetError, match="4 timestamps but .* 3 scans"):
        _seq(tiny)


def test_error_calib(tiny):
    c = tiny / "sequences/00/calib.txt"
    c.write_text("\n".join(line for line in c.read_text().splitlines()
                           if not line.startswith("Tr")) + "\n")
    with pytest.raises(DatasetError, match="no 'Tr:' line"):
        _seq(tiny)
    c.write_text("Tr: 1 0 0\n")
    with pytest.raises(DatasetError, match="'Tr:' has 3 values; expected 12"):
        _seq(tiny)
    c.write_text("garbage\n")
    with pytest.raises(DatasetError, match="expected 'KEY: v1 v2 ...'"):
        _seq(tiny)
    c.unlink()
    with pytest.raises(DatasetError, match="calib.txt does not exist"):
        _seq(tiny)


def test_error_missing_files_and_folders(tiny, tmp_path):
    (tiny / "sequences/00/times.txt").unlink()
    assert _seq(tiny).times is None          # only a bag needs the stamps: it says so
    from lidar_completion.bags.kitti import bag_from_kitti
    with pytest.raises(DatasetError, match=r"times\.txt does not exist: a bag needs each scan's time"):
        bag_from_kitti(tiny, "00", tmp_path / "bag")
    with pytest.raises(DatasetError, match=r"sequence 05 not found .*\(available: 00\)"):
        kitti.SemanticKittiSequence(tiny, 5)
    with pytest.raises(DatasetError, match="not a SemanticKITTI dataset root"):
        kitti.SemanticKittiSequence(tiny / "sequences" / "00", 0)
    with pytest.raises(DatasetError, match="sequence id must be a number"):
        kitti.SemanticKittiSequence(tiny, "x1")


def test_error_frame_gap(tiny):
    v = tiny / "sequences/00/velodyne"
    (v / "000001.bin").rename(v / "000003.bin")
    with pytest.raises(DatasetError, match="without gaps; missing 000001"):
        _seq(tiny)


def test_error_no_labels(tiny):
    shutil.rmtree(tiny / "sequences/00/labels")
    seq = _seq(tiny)
    assert not seq.has_labels
    with pytest.raises(DatasetError, match="has no labels"):
        seq.labels(0)
    with pytest.raises(DatasetError, match="has no semantic labels"):
        _seq(tiny, require_labels=True)
    with pytest.raises(DatasetError, match="label file .* does not exist"):
        kitti.read_labels(tiny / "nope.label")


def test_error_index(tiny):
    seq = _seq(tiny)
    with pytest.raises(IndexError):
        seq.scan(3)
    np.testing.assert_array_equal(seq.scan(-1), seq.scan(2))
