"""Synthetic generator: HDL-64E-like scans, valid labels, moving objects, determinism."""
import hashlib
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree

from lidar_completion.data import geometry, gt, kitti, synthetic
from lidar_completion.data.synthetic import SyntheticConfig, SyntheticScene


@pytest.fixture(scope="module")
def scene():
    return SyntheticScene(seed=3, sequence=0, n_scans=30)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Eight low-resolution scans written to disk, with their GT cache."""
    root = tmp_path_factory.mktemp("syn")
    synthetic.generate_dataset(root, 1, 8, seed=21, config=SyntheticConfig(azimuth_steps=512))
    seq = kitti.SemanticKittiSequence(root, "00", require_labels=True)
    cache = gt.build_sequence(seq, root / "gt_cache", verify="size")
    return seq, cache


def test_point_counts_and_sensor_pattern(scene):
    for k in (0, 29):
        pts, lab = scene.scan(k)
        assert 90_000 <= len(pts) <= 130_000, len(pts)
        assert pts.dtype == np.float32 and pts.shape[1] == 4 and lab.dtype == np.uint32
        r = np.linalg.norm(pts[:, :3].astype(np.float64), axis=1)
        assert r.max() <= 120.0 + 0.1 and r.min() > 0.5
        elev = np.degrees(np.arcsin(pts[:, 2] / r))
        assert elev.max() <= 2.0 + 0.01 and elev.min() >= -24.9 - 0.01
        # the 64 beams are all there and distinct
        beam_of = np.abs(elev[:, None] - synthetic.hdl64_elevations_deg()[None, :]).argmin(1)
        assert len(np.unique(beam_of)) >= 60
        assert 0.0 <= pts[:, 3].min() and pts[:, 3].max() < 1.0


def test_label_ids_valid_and_classes_present(scene):
    pts, lab = scene.scan(10)
    sem = lab & 0xFFFF
    assert set(np.unique(sem).tolist()) <= synthetic.VALID_LABELS
    present = set(np.unique(sem).tolist())
    for needed in (synthetic.ROAD, synthetic.SIDEWALK, synthetic.BUILDING, synthetic.TERRAIN,
                   synthetic.POLE, synthetic.OUTLIER, synthetic.UNLABELED):
        assert needed in present, synthetic.LABEL_NAMES[needed]
    # instance ids only on things
    inst = lab >> 16
    stuff = np.isin(sem, [40, 44, 48, 50, 51, 70, 71, 72, 80, 81, 99, 0, 1])
    assert (inst[stuff] == 0).all()
    assert (inst[np.isin(sem, [10, 252])] > 0).all()


def test_scene_has_all_the_street_furniture(scene):
    labels = set(np.unique(scene.town.static.label).tolist())
    assert {48, 50, 51, 70, 71, 80, 10} <= labels
    assert len(scene.town.streets) >= 2
    moving = [a for a in scene.town.agents]
    assert any(a.mode == "route" for a in moving) and any(a.mode == "street" for a in moving)


def test_moving_objects_move_and_are_labelled(scene):
    # agents are placed at different positions in consecutive sweeps
    _, w0 = scene.town.dynamic_prims(0)
    _, w5 = scene.town.dynamic_prims(5)
    pos0, pos5 = dict(w0), dict(w5)
    shifts = np.array([np.linalg.norm(pos5[k] - pos0[k]) for k in pos0])
    assert (shifts > 0.3).all()
    # and their points carry the moving ids; a moving instance seen in two sweeps moved in the world
    moved = []
    sweeps = {k: scene.scan(k) for k in (0, 4, 17, 29)}
    for k, (pts, lab) in sweeps.items():
        assert ((lab & 0xFFFF) >= 252).sum() > 0, f"no moving points in sweep {k}"
    a_pts, a_lab = sweeps[0]
    b_pts, b_lab = sweeps[4]
    wa = geometry.transform(a_pts, scene.world_poses[0])
    wb = geometry.transform(b_pts, scene.world_poses[4])
    for inst in np.intersect1d(a_lab[(a_lab & 0xFFFF) == 252] >> 16, b_lab[(b_lab & 0xFFFF) == 252] >> 16):
        ca = wa[(a_lab >> 16) == inst].mean(0)
        cb = wb[(b_lab >> 16) == inst].mean(0)
        moved.append(np.linalg.norm(ca - cb))
    assert moved and max(moved) > 1.0


def test_moving_objects_excluded_from_gt(small):
    seq, cache = small
    m = cache.load_map()
    tree = cKDTree(m.astype(np.float64))
    n_moving = 0
    for i in range(len(seq)):
        scan, sem = seq.scan(i), seq.semantic(i)
        mov = sem >= 252
        n_moving += int(mov.sum())
        world = geometry.transform(scan[mov], seq.pose(i)).astype(np.float32).astype(np.float64)
        if len(world):
            d, _ = tree.query(world)
            assert d.min() > 0, "a moving point is in the map"
        # the static points of the same scan are in the map (sanity of the check above)
        stat = gt.map_point_mask(scan, sem)
        world = geometry.transform(scan[stat][:200], seq.pose(i)).astype(np.float32).astype(np.float64)
        d, _ = tree.query(world)
        assert (d < 0.2).all()
    assert n_moving > 100


def test_trajectory_is_smooth(scene):
    poses = scene.lidar_poses
    np.testing.assert_allclose(poses[0], np.eye(4), atol=1e-12)
    step = np.linalg.norm(np.diff(poses[:, :3, 3], axis=0), axis=1)
    assert 0.3 < step.min() and step.max() < 1.2          # 3-12 m/s at 10 Hz
    assert np.abs(np.diff(step)).max() < 0.05            # no jumps in speed
    # rotation change between sweeps stays small
    rel = np.einsum("kji,kjl->kil", poses[:-1, :3, :3], poses[1:, :3, :3])
    angle = np.arccos(np.clip((np.trace(rel, axis1=1, axis2=2) - 1) / 2, -1, 1))
    assert angle.max() < np.radians(6)


def test_determinism(tmp_path):
    cfg = SyntheticConfig(azimuth_steps=256)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    synthetic.generate_dataset(a, 1, 2, seed=7, config=cfg)
    synthetic.generate_dataset(b, 1, 2, seed=7, config=cfg)
    synthetic.generate_dataset(c, 1, 2, seed=8, config=cfg)

    def digest(root):
        h = hashlib.sha256()
        for p in sorted(Path(root).rglob("*")):
            if p.is_file():
                h.update(p.relative_to(root).as_posix().encode())
                h.update(p.read_bytes())
        return h.hexdigest()

    assert digest(a) == digest(b)
    assert digest(a) != digest(c)
    # different sequences of one seed are different towns
    s0, _ = SyntheticScene(7, 0, 1, cfg).scan(0)
    s1, _ = SyntheticScene(7, 1, 1, cfg).scan(0)
    assert len(s0) != len(s1) or not np.array_equal(s0, s1)


def test_bad_arguments():
    from lidar_completion.errors import ConfigError
    with pytest.raises(ConfigError, match="azimuth_steps"):
        SyntheticScene(0, 0, 2, SyntheticConfig(azimuth_steps=10))
    with pytest.raises(ConfigError, match="at least one scan"):
        SyntheticScene(0, 0, 0)
    with pytest.raises(IndexError):
        SyntheticScene(0, 0, 2, SyntheticConfig(azimuth_steps=128)).scan(2)
