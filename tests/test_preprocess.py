"""Pre/post-processing around the diffusion: filters, farthest-point sampling, x_init, z band."""
import numpy as np
import pytest
import torch

from lidar_completion.errors import CloudFormatError
from lidar_completion.preprocess import (as_cloud, farthest_point_sample, filter_scan, make_x_init,
                                         postprocess, postprocess_mask, sector_split)


def _naive_fps(points, k, start):
    sel = [start]
    d = np.linalg.norm(points - points[start], axis=1)
    for _ in range(k - 1):
        j = int(d.argmax())
        sel.append(j)
        d = np.minimum(d, np.linalg.norm(points - points[j], axis=1))
    return np.array(sel)


def test_filter_scan_limits():
    pts = np.array([[1, 0, 0], [4, 0, 0], [49, 0, 0], [51, 0, 0], [10, 0, -5], [10, 0, -3.9],
                    [3.5, 0, 0], [50, 0, 0]], dtype=np.float32)
    out = filter_scan(pts, 3.5, 50.0, -4.0)
    assert out.tolist() == [[4, 0, 0], [49, 0, 0], [10, 0, pytest.approx(-3.9)]]
    assert len(filter_scan(pts, None, None, None)) == len(pts)
    assert out.dtype == np.float32


def test_farthest_point_sampling_is_exact_and_deterministic():
    rng = np.random.default_rng(3)
    pts = (rng.random((4000, 3)) * [40, 40, 3]).astype(np.float32)
    idx = farthest_point_sample(pts, 300)
    assert idx.dtype == np.int64 and len(np.unique(idx)) == 300
    assert np.array_equal(idx, _naive_fps(pts.astype(np.float64), 300, int(idx[0])))
    assert np.array_equal(idx, farthest_point_sample(pts, 300))
    # fewer points than asked: everything, in order
    assert np.array_equal(farthest_point_sample(pts[:50], 300), np.arange(50))
    with pytest.raises(ValueError):
        farthest_point_sample(pts, 0)


def test_farthest_point_sampling_of_tiny_clouds():
    """Clouds smaller than the k-d tree variant's buckets (2^3 points) still sample."""
    pts = np.array([[0, 0, 0], [1, 0, 0], [5, 0, 0], [0, 2, 0], [0, 0, 9]], dtype=np.float32)
    idx = farthest_point_sample(pts, 3)
    assert len(np.unique(idx)) == 3
    assert np.array_equal(idx, _naive_fps(pts.astype(np.float64), 3, int(idx[0])))


def _ring_scan(rng, n=6000):
    r, a = rng.uniform(4, 40, n), rng.uniform(-np.pi, np.pi, n)
    return np.stack([r * np.cos(a), r * np.sin(a), rng.normal(-1.6, 0.3, n)], 1).astype(np.float32)


def test_sector_split_groups_points_by_azimuth_and_shares_the_samples_out():
    rng = np.random.default_rng(5)
    pts = _ring_scan(rng)
    order, sizes, quotas = sector_split(torch.from_numpy(pts), 500, 8)
    order = order.numpy()
    assert sorted(order.tolist()) == list(range(len(pts)))          # a permutation
    assert sum(sizes) == len(pts) and len(sizes) == len(quotas) == 8
    assert sum(quotas) == 500 and all(0 <= q <= s for q, s in zip(quotas, sizes))
    ang = np.arctan2(pts[:, 1], pts[:, 0])
    start = 0
    for s, size in enumerate(sizes):                                # sector s spans its 45 degrees
        a = ang[order[start:start + size]]
        start += size
        assert a.min() >= -np.pi + s * np.pi / 4 - 1e-5 and a.max() <= -np.pi + (s + 1) * np.pi / 4 + 1e-5
    # a uniform ring: every sector covers the same space, so the shares are about equal
    assert max(quotas) - min(quotas) <= 0.25 * 500 / 8
    # more samples than points: every point, shared out exactly
    assert sector_split(torch.from_numpy(pts[:40]), 100, 4)[2] == sector_split(torch.from_numpy(pts[:40]), 40, 4)[1]


def test_sector_split_shares_by_covered_space_not_by_point_count():
    """10,000 points on a 1 m patch (a wall beside the sensor) against 1,000 spread over a
    20 m x 20 m field: farthest-point sampling would spend nearly every sample on the field, and
    so does the split, where a share by point count would give the patch ten of every eleven."""
    rng = np.random.default_rng(6)
    patch = np.column_stack([rng.uniform(5, 6, 10_000), rng.uniform(0.1, 1.1, 10_000), rng.uniform(-1, 0, 10_000)])
    field = np.column_stack([rng.uniform(-10, 10, 1_000), rng.uniform(-30, -10, 1_000), np.full(1_000, -1.7)])
    pts = np.concatenate([patch, field]).astype(np.float32)
    _, sizes, quotas = sector_split(torch.from_numpy(pts), 200, 2)   # sector 0: y < 0 (the field), 1: y >= 0
    assert sizes[1] == 10_000 and quotas[0] > 3 * quotas[1] and sum(quotas) == 200


def test_approximate_sampling_is_exact_within_each_sector():
    rng = np.random.default_rng(7)
    pts = _ring_scan(rng, 3000)
    idx = farthest_point_sample(pts, 240, parts=6)
    assert idx.dtype == np.int64 and len(np.unique(idx)) == 240
    assert np.array_equal(idx, farthest_point_sample(pts, 240, parts=6))      # deterministic
    order, sizes, quotas = sector_split(torch.from_numpy(pts), 240, 6)
    order, start, got = order.numpy(), 0, 0
    for size, quota in zip(sizes, quotas):
        members = order[start:start + size]
        start += size
        chosen = idx[got:got + quota]
        got += quota
        assert set(chosen.tolist()) <= set(members.tolist())
        local = np.searchsorted(np.sort(members), chosen)
        sub = pts[np.sort(members)].astype(np.float64)
        assert np.array_equal(local, _naive_fps(sub, quota, int(local[0])))
    assert np.array_equal(farthest_point_sample(pts, 240, parts=1), farthest_point_sample(pts, 240))
    with pytest.raises(ValueError, match="parts"):
        farthest_point_sample(pts, 240, parts=0)
    scan_fps, x_init = make_x_init(pts, n_fps=240, tile=2, fps_parts=6)
    assert np.array_equal(scan_fps, pts[idx]) and x_init.shape == (480, 3)


def test_make_x_init_tiles_whole_blocks():
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(500, 3)).astype(np.float32)
    scan_fps, x_init = make_x_init(pts, n_fps=100, tile=10)
    assert scan_fps.shape == (100, 3) and x_init.shape == (1000, 3)
    for k in range(10):
        assert np.array_equal(x_init[k * 100:(k + 1) * 100], scan_fps)
    small_fps, small = make_x_init(pts[:40], n_fps=100, tile=3)
    assert small_fps.shape == (40, 3) and small.shape == (120, 3)


def test_postprocess_band_numpy_and_torch_agree():
    rng = np.random.default_rng(1)
    x_init = np.concatenate([rng.normal(size=(900, 3)) * [10, 10, 0.5],
                             [[0, 0, 3.0]]]).astype(np.float32)
    z = x_init[:, 2].astype(np.float64)
    lo, hi = z.mean() - 2 * z.std(ddof=1), z.max()
    pts = np.array([[1, 1, 0], [1, 1, lo - 0.01], [1, 1, lo + 0.01], [1, 1, hi + 0.01],
                    [1, 1, hi - 0.01], [49, 0, 0], [51, 0, 0]], dtype=np.float32)
    expect = [True, False, True, False, True, True, False]
    assert postprocess_mask(pts, x_init, 50.0).tolist() == expect
    assert postprocess_mask(torch.from_numpy(pts), torch.from_numpy(x_init), 50.0).tolist() == expect
    assert postprocess(pts, x_init).shape == (4, 3)
    assert postprocess_mask(pts, x_init, None).tolist()[-1] is True


def test_as_cloud_validates_and_drops_non_finite_rows():
    pts = np.array([[1, 2, 3, 9], [np.nan, 0, 0, 1], [4, 5, 6, 0], [np.inf, 1, 1, 1],
                    [1, 1, 1, np.nan]], dtype=np.float64)
    out = as_cloud(pts)
    assert out.dtype == np.float32 and out.tolist() == [[1, 2, 3], [4, 5, 6], [1, 1, 1]]
    assert as_cloud(torch.ones(4, 3)).shape == (4, 3)
    assert as_cloud(np.ones((4, 3), dtype=np.int32)).dtype == np.float32
    for bad, msg in ((np.ones((4, 2)), r"\(N, 3\+\)"), (np.ones(12), r"\(N, 3\+\)"),
                     (np.array([["a", "b", "c"]]), "real-valued"), ([[1, 2, 3], [1, 2]], "numpy cannot convert")):
        with pytest.raises(CloudFormatError, match=msg):
            as_cloud(bad)


def test_filters_equal_the_plain_numpy_forms():
    """as_cloud and filter_scan keep exactly the rows of np.isfinite(...).all(1) and of
    np.linalg.norm(..., axis=1) limits, points on the limits included."""
    g = np.random.default_rng(4)
    x = (g.standard_normal((200_000, 4)) * 30).astype(np.float64)
    x[::7, 1] = np.nan
    x[::11, 2] = np.inf
    x[::13, 0] = -np.inf
    x[:6, :3] = [[3.5, 0, 0], [0, -50, 0], [0, 0, -4], [2.1, 2.8, 0], [30, 40, 0], [0, 3.5, -4]]
    xyz = as_cloud(x)
    ref = x[:, :3].astype(np.float32)
    ref = ref[np.isfinite(ref).all(axis=1)]
    assert xyz.dtype == np.float32 and np.array_equal(xyz, ref)
    r = np.linalg.norm(ref, axis=1)
    want = ref[(r > 3.5) & (r < 50.0) & (ref[:, 2] > -4.0)]
    assert np.array_equal(filter_scan(xyz, 3.5, 50.0, -4.0), want)
    assert np.array_equal(filter_scan(xyz, None, 20.0, None), ref[r < 20.0])
