"""Training / evaluation datasets over the GT cache (small point budgets)."""
import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from lidar_completion.data import gt, synthetic
from lidar_completion.data.dataset import (CompletionDataset, EvaluationDataset, TrainingDataset,
                                           augmentation_matrix, collate_completion, tile_to)
from lidar_completion.errors import ConfigError, DatasetError

N_FPS, TILE = 2000, 10


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    synthetic.generate_dataset(root, 1, 4, seed=5, config=synthetic.SyntheticConfig(azimuth_steps=512))
    gt.build_gt(root, ["00"])
    return root


@pytest.fixture(scope="module")
def train(root):
    return TrainingDataset(root, ["00"], n_fps=N_FPS, tile=TILE, seed=3)


def test_training_item_shapes(train):
    assert len(train) == 4
    item = train[1]
    assert item["x_init"].shape == (N_FPS * TILE, 3) and item["x_init"].dtype == np.float32
    assert item["target"].shape == (N_FPS * TILE, 3) and item["target"].dtype == np.float32
    assert item["scan"].shape == (N_FPS, 3)
    assert item["raw_scan"].ndim == 2 and len(item["raw_scan"]) > N_FPS
    np.testing.assert_array_equal(item["x_init"][:N_FPS], item["scan"])
    np.testing.assert_array_equal(item["x_init"][N_FPS * 3:N_FPS * 4], item["scan"])
    assert item["meta"]["sequence"] == "00" and item["meta"]["frame"] == 1
    # farthest point sampling picks distinct points
    assert len(np.unique(item["scan"], axis=0)) == N_FPS


def test_training_is_seeded(train, root):
    a, b = train[2], train[2]
    for k in ("x_init", "target", "raw_scan"):
        np.testing.assert_array_equal(a[k], b[k])
    other = TrainingDataset(root, ["00"], n_fps=N_FPS, tile=TILE, seed=3)
    np.testing.assert_array_equal(other[2]["target"], a["target"])
    train.set_epoch(1)
    try:
        c = train[2]
    finally:
        train.set_epoch(0)
    assert not np.allclose(c["meta"]["augmentation"], a["meta"]["augmentation"])
    s = train.sample(2, np.random.default_rng(123))
    s2 = train.sample(2, np.random.default_rng(123))
    np.testing.assert_array_equal(s["x_init"], s2["x_init"])


def test_augmentation_is_joint(train):
    item = train[0]
    m = np.asarray(item["meta"]["augmentation"])
    inv = np.linalg.inv(m)
    cache = train.caches[0]
    seq = train.sequences[0]
    # every augmented target point maps back onto a cached target point ...
    target0 = cache.load_target(0)
    back = item["target"].astype(np.float64) @ inv.T
    d, _ = cKDTree(target0).query(back)
    assert d.max() < 1e-3
    # ... and every scan point back onto a label-filtered scan point, with the same matrix
    scan = seq.scan(0)
    keep = gt.input_mask(scan, train.config, seq.labels(0))
    back = item["raw_scan"].astype(np.float64) @ inv.T
    d, _ = cKDTree(scan[keep, :3]).query(back)
    assert d.max() < 1e-3
    assert len(item["raw_scan"]) == keep.sum()
    back = item["x_init"].astype(np.float64) @ inv.T
    d, _ = cKDTree(scan[keep, :3]).query(back)
    assert d.max() < 1e-3


def test_augmentation_distribution():
    rng = np.random.default_rng(0)
    flips, scales, tilts, yaws = [], [], [], []
    for _ in range(400):
        m = augmentation_matrix(rng)
        s = np.cbrt(abs(np.linalg.det(m)))
        np.testing.assert_allclose(m.T @ m, s * s * np.eye(3), atol=1e-9)   # scaled rotation
        flips.append(np.linalg.det(m) < 0)
        scales.append(s)
        r = m / s
        tilts.append(np.degrees(np.arccos(np.clip(r[2, 2], -1, 1))))
        yaws.append(np.arctan2(r[1, 0], r[0, 0]))
    assert 0.4 < np.mean(flips) < 0.6
    assert 0.95 <= min(scales) and max(scales) <= 1.05 and np.std(scales) > 0.02
    assert max(tilts) < np.degrees(0.18 * np.sqrt(2)) + 0.5 and np.mean(tilts) > 2
    hist, _ = np.histogram(yaws, bins=4, range=(-np.pi, np.pi))
    assert hist.min() > 60   # yaw is spread over the whole circle


def test_moving_points_dropped_in_training(train, root):
    ds = TrainingDataset(root, ["00"], n_fps=N_FPS, tile=TILE, augment=False)
    seq = ds.sequences[0]
    item = ds[0]
    scan = seq.scan(0)
    moving = scan[(seq.semantic(0) >= 252), :3]
    assert len(moving) > 0
    d, _ = cKDTree(item["raw_scan"]).query(moving)
    assert d.min() > 0
    np.testing.assert_array_equal(item["meta"]["augmentation"], np.eye(3))


def test_evaluation_variant(root):
    ds = EvaluationDataset(root, ["00"], n_fps=N_FPS, tile=TILE)
    a, b = ds[3], ds[3]
    np.testing.assert_array_equal(a["x_init"], b["x_init"])
    np.testing.assert_array_equal(a["meta"]["augmentation"], np.eye(3))
    t = a["target"]
    cached = ds.caches[0].load_target(3)
    band = cached[(cached[:, 2] > -4.0) & (cached[:, 2] < 4.4)]
    np.testing.assert_array_equal(t, band)   # whole target, not tiled, z band -4..4.4
    assert t[:, 2].max() < 4.4
    # points above the band (rare in a short sequence: the HDL-64E looks up only 2 deg) are dropped
    tall = np.concatenate([cached, [[5.0, 1.0, 4.5], [6.0, 2.0, 9.0]]]).astype(np.float32)
    ds.caches[0].load_target = lambda i, verify=False: tall
    np.testing.assert_array_equal(ds[3]["target"], band)
    # the input is not label-filtered in evaluation
    seq = ds.sequences[0]
    scan = seq.scan(3)
    assert len(a["raw_scan"]) == gt.input_mask(scan, ds.config).sum()
    fixed = EvaluationDataset(root, ["00"], n_fps=N_FPS, tile=TILE, target_points=5000)
    assert fixed[0]["target"].shape == (5000, 3)


def test_default_budgets(root):
    ds = TrainingDataset(root, ["00"])
    item = ds[0]
    assert item["x_init"].shape == (180_000, 3) and item["target"].shape == (180_000, 3)
    assert item["scan"].shape == (18_000, 3)


def test_dataloader_collate(train):
    loader = torch.utils.data.DataLoader(train, batch_size=2, collate_fn=collate_completion)
    batch = next(iter(loader))
    assert batch["batch_size"] == 2
    assert batch["x_init"].shape == (2 * N_FPS * TILE, 3) and batch["x_init"].dtype == torch.float32
    assert batch["x_init_batch"].tolist() == [0] * (N_FPS * TILE) + [1] * (N_FPS * TILE)
    assert batch["raw_scan_counts"].sum() == len(batch["raw_scan"])
    assert [m["frame"] for m in batch["meta"]] == [0, 1]


def test_works_as_training_source(train):
    tdata = pytest.importorskip("training.data")
    keyed = tdata.KeyedDataset(train, seed=0)
    s = keyed[(1, 0, 5)]
    assert s["x_init"].shape == (N_FPS * TILE, 3) and s["key"] == (0, 5)


def test_tile_to():
    rng = np.random.default_rng(0)
    pts = np.arange(30, dtype=np.float32).reshape(10, 3)
    out = tile_to(pts, 25, rng)
    assert out.shape == (25, 3)
    assert {tuple(r) for r in out.tolist()} == {tuple(r) for r in pts.tolist()}
    assert tile_to(pts, 4, rng).shape == (4, 3)
    with pytest.raises(DatasetError):
        tile_to(pts[:0], 4, rng)


def test_errors(root, tmp_path):
    with pytest.raises(DatasetError, match="build-gt"):
        TrainingDataset(root, ["00"], cache_root=tmp_path / "nothing")
    with pytest.raises(ConfigError, match="split"):
        CompletionDataset(root, ["00"], split="test")
    ds = TrainingDataset(root, ["00"], cache_root=tmp_path / "built", build=True, n_fps=100, tile=2)
    assert ds[0]["x_init"].shape == (200, 3)
    with pytest.raises(IndexError):
        ds[10]


def test_items_left_unsampled_draw_the_same_augmentation(root):
    """fps=False (sampling on the trainer's device): no scan / x_init, the filtered scan shuffled
    (its first point is a random start) and otherwise the same draws: the same target, and the
    same cloud up to order."""
    a = TrainingDataset(root, ["00"], n_fps=N_FPS, tile=TILE, seed=3)[2]
    b = TrainingDataset(root, ["00"], n_fps=N_FPS, tile=TILE, seed=3, fps=False)[2]
    assert "scan" not in b and "x_init" not in b
    np.testing.assert_array_equal(a["target"], b["target"])
    assert len(b["raw_scan"]) == len(a["raw_scan"]) and not np.array_equal(b["raw_scan"], a["raw_scan"])
    np.testing.assert_allclose(np.sort(b["raw_scan"], axis=0), np.sort(a["raw_scan"], axis=0), atol=1e-5)


def test_a_published_mask_cache_is_masked_again_on_its_own_grid(root, tmp_path, monkeypatch):
    """Training masks a target again with the label-filtered scan (no cells of moving objects only).
    On a `--view-mask published` cache that second mask must use the cache's grid - it starts at the
    raw scan's lowest corner, near and low points included - not the filtered scan's, or it cuts
    away cells the cache kept."""
    from lidar_completion.data import kitti

    cfg = gt.GTConfig(view_mask="published")
    gt.build_gt(root, ["00"], out=tmp_path / "cache", config=cfg, progress=False)
    ds = TrainingDataset(root, ["00"], cache_root=tmp_path / "cache", n_fps=N_FPS, tile=TILE,
                         augment=False, target_points=None)
    assert ds.config.view_mask == "published"
    seq = kitti.SemanticKittiSequence(root, "00")
    origins = []
    mask = gt.viewpoint_mask

    def recorded(points, scan_points, cell=10.0, grid_origin=None):
        origins.append(grid_origin)
        return mask(points, scan_points, cell, grid_origin)

    monkeypatch.setattr(gt, "viewpoint_mask", recorded)
    cached = gt.GTCache(tmp_path / "cache", "00").load_target(0)
    assert len(ds[0]["target"]) >= 0.97 * len(cached)        # only cells of moving objects alone go
    expected = gt.published_grid_origin(seq.scan(0), cfg)
    assert len(origins) == 1 and np.array_equal(origins[0], expected)
    scan = seq.scan(0)
    filtered = scan[gt.input_mask(scan, cfg, seq.labels(0)), :3]
    assert expected[2] < filtered[:, 2].min() - 5.0           # low points the filtered scan lacks
    monkeypatch.undo()
    # a consumer that asks for no settings (training, validation, evaluate --build-gt) keeps the
    # cache's rule instead of rebuilding it by the default one
    rebuilt = gt.build_sequence(seq, tmp_path / "cache")
    assert rebuilt.config.view_mask == "published"
    np.testing.assert_array_equal(rebuilt.load_target(0), cached)
