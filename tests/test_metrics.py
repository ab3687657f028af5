"""Metrics against brute-force references, analytic cases, the published variants (issue 8)."""
import itertools
import math

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist, jensenshannon

from lidar_completion import metrics as M
from lidar_completion.errors import CloudFormatError, ConfigError


def rng(seed):
    return np.random.default_rng(seed)


def random_cloud(seed, n, scale=5.0):
    return rng(seed).uniform(-scale, scale, (n, 3))


def grid_cloud(spacing=1.0, n=6, offset=(0.3, 0.2, 0.1)):
    g = np.arange(n, dtype=np.float64) * spacing
    return np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3) + offset


# ----------------------------------------------------------------------------- brute force refs
def brute_cd(p, g):
    d = np.sqrt(((p[:, None, :] - g[None, :, :]) ** 2).sum(-1))
    return 0.5 * (d.min(0).mean() + d.min(1).mean()), d


def brute_hist(p, bev):
    h = np.histogramdd(p, bins=200, range=[[-50, 50]] * 3)[0]
    if bev:
        h = np.clip(h, 0, 1).sum(-1)
    return (h / h.sum()).ravel()


def brute_voxels(p, vs, limit):
    s = set()
    for x in p:
        i = tuple(int(v) for v in np.round(x / vs))
        if all(abs(c) <= limit for c in i):
            s.add(i)
    return s


def published_sinkhorn_dense(p, q, eps=1e-3, max_iter=3000, tol=1e-4, vs=0.5):
    """The published Distillation-DPO EMD, written out densely (our own transcription)."""
    ka, ca = np.unique(np.floor(p / vs).astype(int), axis=0, return_counts=True)
    kb, cb = np.unique(np.floor(q / vs).astype(int), axis=0, return_counts=True)
    xa, xb, a, b = (ka + 0.5) * vs, (kb + 0.5) * vs, ca / ca.sum(), cb / cb.sum()
    C = cdist(xa, xb)
    K = np.exp(-C / eps) + 1e-9
    u, v = np.ones(len(a)), np.ones(len(b))
    for _ in range(max_iter):
        u_prev = u.copy()
        u = a / (K @ v)
        v = b / (K.T @ u)
        if np.linalg.norm(u - u_prev, 1) < tol:
            break
    return float(np.sum(np.outer(u, v) * K * C))


# ------------------------------------------------------------------------- against brute force
def test_chamfer_matches_brute_force():
    p, g = random_cloud(0, 300), random_cloud(1, 410)
    ref, _ = brute_cd(p, g)
    assert M.chamfer_distance(p, g) == pytest.approx(ref, abs=1e-6)
    assert M.chamfer_distance(p.astype(np.float32), g) == pytest.approx(ref, abs=1e-6)
    # extra columns (intensity) are ignored
    assert M.chamfer_distance(np.c_[p, np.ones(len(p))], g) == pytest.approx(ref, abs=1e-6)


def test_prf_matches_brute_force():
    p, g = random_cloud(2, 300, 2.0), random_cloud(3, 350, 2.0)
    _, d = brute_cd(p, g)
    for thr in (0.05, 0.1, 0.3):
        pr, re, f = M.precision_recall_fscore(p, g, thr)
        ref_p, ref_r = (d.min(1) < thr).mean(), (d.min(0) < thr).mean()
        assert pr == pytest.approx(ref_p, abs=1e-6)
        assert re == pytest.approx(ref_r, abs=1e-6)
        assert f == pytest.approx(2 * ref_p * ref_r / (ref_p + ref_r), abs=1e-6)


@pytest.mark.parametrize("bev", [True, False])
def test_jsd_matches_dense_histogram(bev):
    p = random_cloud(4, 3000, 60.0)       # some points outside [-50, 50]^3
    g = random_cloud(5, 2000, 45.0)
    p[:5] = [[50.0, 0, 0], [-50.0, 0, 0], [0, 50.0, 49.99], [0, 0, -50.0], [25.0, 25.0, 0.25]]
    ref = jensenshannon(brute_hist(g, bev), brute_hist(p, bev))
    got = M.jsd_bev(p, g) if bev else M.jsd_3d(p, g)
    assert got == pytest.approx(ref, abs=1e-6)
    assert 0 < got <= np.sqrt(np.log(2)) + 1e-12      # a distance, bounded by sqrt(ln 2)


@pytest.mark.parametrize("vs", [0.5, 0.2, 0.1])
@pytest.mark.parametrize("extent", ["full", "legacy"])
def test_iou_matches_brute_force(vs, extent):
    p, g = random_cloud(6, 2000, 55.0), random_cloud(7, 2000, 55.0)
    g[:1000] = p[:1000] + rng(8).normal(0, vs / 3, (1000, 3))     # a real overlap
    near = rng(9).uniform(-4, 4, (400, 3))                          # inside every legacy extent
    p, g = np.r_[p, near], np.r_[g, near + 0.01]
    limit = round(50 / vs) if extent == "full" else 50
    sp, sg = brute_voxels(p, vs, limit), brute_voxels(g, vs, limit)
    tp, fp, fn = M.iou_counts(p, g, vs, extent)
    assert (tp, fp, fn) == (len(sp & sg), len(sp - sg), len(sg - sp))
    assert M.iou(p, g, vs, extent) == pytest.approx(len(sp & sg) / len(sp | sg), abs=1e-12)


def test_iou_legacy_equals_published_histogram_procedure():
    """At 0.5 m the legacy extent equals the published code's histogram of voxel *indices*."""
    p, g = random_cloud(10, 3000, 40.0), random_cloud(11, 3000, 40.0)
    g[:1500] = p[:1500] + 0.1

    def hist(c):
        idx = np.round(c / 0.5).astype(int)
        return np.histogramdd(idx, bins=200, range=[[-50, 50]] * 3)[0].astype(bool)

    hp, hg = hist(p), hist(g)
    ref = (hp & hg).sum(), (hp & ~hg).sum(), (~hp & hg).sum()
    assert M.iou_counts(p, g, 0.5, "legacy") == tuple(int(v) for v in ref)


def test_iou_lidiff2025_equals_that_code_s_histograms():
    """LiDiff's evaluation since June 2025 bins the raw coordinates with np.histogramdd over
    [-50, 50]^3 m (int(100 / v) bins per axis). At 0.5 m its dense histograms are compared whole,
    with points on the bin edges, on +-50 m (50 m itself counts, in the last bin) and outside; at
    0.2 and 0.1 m (10^8 and 10^9 dense cells) on a window of the same edges around the clouds."""
    r = rng(12)
    p, g = random_cloud(13, 3000, 60.0), random_cloud(14, 3000, 60.0)
    g[:1500] = p[:1500] + r.normal(0, 0.1, (1500, 3))
    on_edges = np.array([[50.0, 0.0, 0.0], [-50.0, 1.0, 2.0], [49.5, -49.5, 0.0], [50.0000001, 0, 0],
                         [-50.0000001, 3, 3], [0.5, 0.2, 0.1], [0.0, 0.0, 0.0], [-0.1, -0.2, -0.5]])
    p, g = np.r_[p, on_edges], np.r_[g, on_edges[::2]]

    def counts(hp, hg):
        return int((hp & hg).sum()), int((hp & ~hg).sum()), int((~hp & hg).sum())

    def hist(c, **kw):
        return np.histogramdd(c, **kw)[0].astype(bool)

    ref = counts(hist(p, bins=200, range=[[-50, 50]] * 3), hist(g, bins=200, range=[[-50, 50]] * 3))
    assert M.iou_counts(p, g, 0.5, "lidiff2025") == ref
    for vs in (0.2, 0.1):
        n = int(100 / vs)
        edges = np.linspace(-50, 50, n + 1)
        lo, hi = int(np.searchsorted(edges, -4.0)), int(np.searchsorted(edges, 4.0)) + 1
        window = [edges[lo:hi]] * 3                     # the same edges, a window of them
        a = r.uniform(-3.9, 3.9, (2000, 3))
        b = np.r_[np.clip(a[:1000] + r.normal(0, vs / 2, (1000, 3)), -3.9, 3.9), r.uniform(-3.9, 3.9, (500, 3))]
        a = np.r_[a, edges[lo + 5:lo + 8, None].repeat(3, 1)]   # points exactly on edges
        assert M.iou_counts(a, b, vs, "lidiff2025") == counts(hist(a, bins=window), hist(b, bins=window)), vs
    # a floor grid: 0.29 m and 0.31 m share the 0.2 m bin [0.2, 0.4); round(p / v) splits them
    assert M.iou_counts([[0.29, 0.1, 0.1]], [[0.31, 0.1, 0.1]], 0.2, "lidiff2025") == (1, 0, 0)
    assert M.iou_counts([[0.29, 0.1, 0.1]], [[0.31, 0.1, 0.1]], 0.2, "full") == (0, 1, 1)
    with pytest.raises(M.ConfigError):
        M.iou_counts(p, g, 0.5, "lidiff")


def test_iou_legacy_vs_full_extent():
    """Legacy counts voxel indices within +-50 only: +-25 / +-10 / +-5 m at 0.5 / 0.2 / 0.1 m."""
    g = np.array([[1.0, 1.0, 0.0], [4.0, 0.0, 0.0], [8.0, 0.0, 0.0], [20.0, 0.0, 0.0],
                  [30.0, 0.0, 0.0], [-49.9, 0.0, 0.0]])
    p = g.copy()
    p[[0, 2, 4]] += [0.0, 0.0, 3.0]        # misses at 1 m, 8 m and 30 m
    # full: every point counts at every voxel size
    for vs in (0.5, 0.2, 0.1):
        assert M.iou_counts(p, g, vs, "full") == (3, 3, 3)
    # legacy 0.5 m (+-25 m): the 30 m and -49.9 m points drop out
    assert M.iou_counts(p, g, 0.5, "legacy") == (2, 2, 2)
    # legacy 0.2 m (+-10 m): also the 20 m point
    assert M.iou_counts(p, g, 0.2, "legacy") == (1, 2, 2)
    # legacy 0.1 m (+-5 m): only the 1 m and 4 m points remain
    assert M.iou_counts(p, g, 0.1, "legacy") == (1, 1, 1)
    assert M.iou(p, g, 0.1, "legacy") == pytest.approx(1 / 3)
    # boundary: index 50 is counted by legacy, index 51 is not (round(25.2 / 0.5) = 50)
    assert M.iou_counts([[25.2, 0, 0]], [[25.2, 0, 0]], 0.5, "legacy") == (1, 0, 0)
    assert M.iou_counts([[25.3, 0, 0]], [[25.3, 0, 0]], 0.5, "legacy") == (0, 0, 0)
    assert M.iou_counts([[50.2, 0, 0]], [[50.2, 0, 0]], 0.5, "full") == (1, 0, 0)
    assert M.iou_counts([[50.3, 0, 0]], [[50.3, 0, 0]], 0.5, "full") == (0, 0, 0)


def test_prf_thresholds():
    g = grid_cloud(1.0, 5)                        # 125 points 1 m apart
    p = g.copy()
    p[:50, 0] += 0.03                              # 50 points 3 cm away
    p[50:100, 0] += 0.07                           # 50 points 7 cm away
    p[100:, 0] += 0.2                              # 25 points 20 cm away
    assert M.precision_recall_fscore(p, g, 0.05) == pytest.approx((0.4, 0.4, 0.4))
    assert M.precision_recall_fscore(p, g, 0.10) == pytest.approx((0.8, 0.8, 0.8))
    assert M.precision_recall_fscore(p, g, 0.25) == pytest.approx((1.0, 1.0, 1.0))
    assert M.precision_recall_fscore(p, g, 0.02) == (0.0, 0.0, 0.0)
    # strictly closer than the threshold counts (as the published code): 0.5 m at 0.5 m does not
    q = np.array([[0.0, 0.0, 0.0]])
    assert M.precision_recall_fscore(q, q + [0.5, 0, 0], 0.5)[0] == 0.0
    # precision and recall differ when the prediction covers only part of the ground truth
    pr, re, f = M.precision_recall_fscore(g[:25], g, 0.05)
    assert (pr, re) == (1.0, 0.2) and f == pytest.approx(2 * 0.2 / 1.2)
    with pytest.raises(ConfigError):
        M.precision_recall_fscore(p, g, 0.0)


def test_emd_matches_assignment_for_uniform_clouds():
    """One point per voxel, at the voxel centres: W1 = optimal assignment cost / n."""
    for seed in (0, 1):
        keys = rng(seed).permutation(np.array(list(itertools.product(range(-8, 8), repeat=3))))
        a = (keys[:150] + 0.5) * 0.5
        b = (keys[150:300] + 0.5) * 0.5 + 1.0     # shifted by 2 voxels in x, y, z
        c = cdist(a, b)
        r, k = linear_sum_assignment(c)
        value, info = M.emd(a, b, return_info=True)
        assert info["method"] == "exact"
        assert value == pytest.approx(c[r, k].mean(), abs=1e-6)


def test_emd_matches_ot_on_raw_point_masses():
    """Several points per voxel (duplicates at the centres): W1 of the raw uniform point masses."""
    import ot
    keys_a = rng(3).integers(-6, 6, (400, 3))
    keys_b = rng(4).integers(-5, 7, (300, 3))
    a, b = (keys_a + 0.5) * 0.5, (keys_b + 0.5) * 0.5
    ref = ot.emd2(np.full(len(a), 1 / len(a)), np.full(len(b), 1 / len(b)), cdist(a, b))
    assert M.emd(a, b) == pytest.approx(ref, abs=1e-6)
    # jitter inside the voxels does not change the voxel masses
    jit = rng(5).uniform(-0.2, 0.2, a.shape)
    assert M.emd(a + jit, b) == pytest.approx(ref, abs=1e-6)


def test_emd_sinkhorn_path():
    a, b = random_cloud(12, 300, 2.0), random_cloud(13, 300, 2.0) + [0.7, 0.0, 0.0]
    exact = M.emd(a, b)
    sk, info = M.emd(a, b, method="sinkhorn", sinkhorn_eps=0.05, return_info=True)
    assert info["method"] == "sinkhorn" and info["eps"] == 0.05
    assert exact - 1e-4 <= sk <= exact + 0.1           # the entropic plan costs a little more


def test_emd_coarse_path_within_its_bound():
    a, b = random_cloud(12, 2000, 6.0), random_cloud(13, 2000, 6.0) + [0.7, 0.0, 0.0]
    exact, info = M.emd(a, b, return_info=True)
    assert info["method"] == "exact" and info["error_bound"] == 0.0
    coarse, info = M.emd(a, b, max_exact_entries=100_000, return_info=True)
    assert info["method"] == "coarse" and info["cell"] > 0.5
    assert info["n_src"] * info["n_tgt"] > 100_000
    assert abs(coarse - exact) <= info["error_bound"] + 1e-9   # the proven bound holds
    assert abs(coarse - exact) < 0.1                             # and is loose in practice


def test_emd_published_matches_dense_transcription():
    p = random_cloud(14, 300, 4.0)
    q = np.r_[p[:150] + rng(15).normal(0, 0.1, (150, 3)), random_cloud(16, 150, 4.0)]
    ref = published_sinkhorn_dense(p, q)
    assert M.emd_published(p, q) == pytest.approx(ref, rel=1e-6, abs=1e-6)
    # a larger eps keeps more of the exponential (pairs 0.5 m apart): still the same arithmetic
    ref = published_sinkhorn_dense(p, q, eps=0.05)
    assert M.emd_published(p, q, epsilon=0.05) == pytest.approx(ref, rel=1e-6, abs=1e-6)


def test_emd_published_drops_large_frames(caplog):
    keys = np.array(list(itertools.product(range(60), range(60), range(20))))   # 72,000 voxels
    p = (keys + 0.5) * 0.5
    with caplog.at_level("WARNING"):
        assert np.isnan(M.emd_published(p, p + [0.5, 0, 0]))       # 144,000 voxels > 130,000
    assert "drops this frame" in caplog.text


# ------------------------------------------------------------------------------- analytic cases
def test_identical_clouds():
    p = random_cloud(17, 2000, 10.0)
    assert M.chamfer_distance(p, p) == 0.0
    assert M.jsd_bev(p, p) == pytest.approx(0.0, abs=1e-7)
    assert M.jsd_3d(p, p) == pytest.approx(0.0, abs=1e-7)
    assert M.emd(p, p) == pytest.approx(0.0, abs=1e-9)
    for vs in (0.5, 0.2, 0.1):
        assert M.iou(p, p, vs) == 1.0
        assert M.iou(p, p, vs, "legacy") == 1.0
    assert M.precision_recall_fscore(p, p, 0.05) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("d", [0.01, 0.05, 0.1])
def test_small_shift_gives_chamfer_equal_to_shift(d):
    g = grid_cloud(1.0, 6)
    shift = np.array([1.0, 2.0, 2.0]) / 3.0 * d       # |shift| = d, small against the 1 m spacing
    assert M.chamfer_distance(g + shift, g) == pytest.approx(d, abs=1e-9)


@pytest.mark.parametrize("shift", [(0.5, 0.0, 0.0), (1.5, 0.0, 0.0), (0.5, 1.0, 0.0),
                                   (1.0, -0.5, 1.0)])
def test_whole_voxel_shift_gives_emd_equal_to_shift_length(shift):
    p = random_cloud(18, 1000, 5.0)
    # keep points away from the voxel faces so that floating point cannot move them across
    frac = np.mod(p, 0.5)
    p = p - frac + np.clip(frac, 0.05, 0.45)
    value, info = M.emd(p, p + shift, return_info=True)
    assert info["method"] == "exact"
    assert value == pytest.approx(np.linalg.norm(shift), abs=1e-6)


def _disk(seed, n=6400, radius=8.0, shift=(0.0, 0.0, 0.0)):
    """A flat street-like patch: n points uniform on a disk, 5 cm height noise."""
    r = rng(seed)
    rad, th = radius * np.sqrt(r.random(n)), 2 * np.pi * r.random(n)
    return np.c_[rad * np.cos(th), rad * np.sin(th), r.normal(0, 0.05, n) - 1.7] + shift


def test_emd_vs_published_on_independent_samples():
    """Two independent samples (seeds 0 / 1) of the same 8 m street patch (~800 occupied 0.5 m
    voxels, 8 points each), the second shifted along x.

    Numbers seen when this test was written:
        shift [m]             0       1       4       (same patch at twice the size, no shift)
        emd (W1, ours) [m]    0.156   1.007   4.005   0.19
        emd_published         1.475   2.209   5.055   2.86
    Ours is near 0 for the same distribution and equals the shift; the published variant reports
    1.5 m for identically distributed clouds, overstates every shift by about that much, and that
    offset doubles with the scene's size (it is the unmatched mass times the mean pairwise distance
    of the scene, not a transport cost).
    """
    a = _disk(0)
    ours, published = {}, {}
    for d in (0.0, 1.0, 4.0):
        b = _disk(1, shift=(d, 0.0, 0.0))
        ours[d] = M.emd(a, b)
        published[d] = M.emd_published(a, b)
    assert ours[0.0] < 0.25
    assert ours[1.0] == pytest.approx(1.0, abs=0.1)
    assert ours[4.0] == pytest.approx(4.0, abs=0.1)
    assert published[0.0] > 5 * ours[0.0] and published[0.0] > 1.0
    for d in (0.0, 1.0, 4.0):
        assert published[d] - d > 0.9          # an offset that is not transport
    big_a, big_b = _disk(0, 4 * 6400, 16.0), _disk(1, 4 * 6400, 16.0)
    assert M.emd_published(big_a, big_b) > 1.6 * published[0.0]      # grows with the scene
    assert M.emd(big_a, big_b, max_exact_entries=4_000_000) < 0.35   # ours does not


# -------------------------------------------------------------------------- inputs and errors
def test_empty_and_malformed_inputs():
    p = random_cloud(19, 100)
    empty = np.zeros((0, 3))
    assert np.isnan(M.chamfer_distance(p, empty))
    assert np.isnan(M.emd(empty, p))
    assert np.isnan(M.emd_published(p, empty))
    assert np.isnan(M.jsd_bev(p, empty))
    assert all(np.isnan(M.precision_recall_fscore(empty, p, 0.1)))
    assert M.iou_counts(empty, p, 0.5) == (0, 0, len(np.unique(np.round(p / 0.5), axis=0)))
    assert np.isnan(M.iou(empty, empty, 0.5))
    with pytest.raises(CloudFormatError, match="expected an"):
        M.chamfer_distance(np.zeros((5, 2)), p)
    with pytest.raises(CloudFormatError, match="NaN"):
        M.jsd_bev(np.array([[np.nan, 0.0, 0.0]]), p)
    with pytest.raises(ConfigError):
        M.iou(p, p, 0.5, extent="wide")
    with pytest.raises(ConfigError):
        M.emd(p, p, method="fast")


def test_a_point_beyond_the_integer_grid_is_outside_iou_and_named_by_emd():
    """One finite float32 point at 1e25 m (a diverged completion) wrapped to int64's smallest value,
    whose absolute value is negative: it counted as a false positive inside the IoU extent and
    moved the EMD to about 4.6e15 m, all without an error."""
    rng = np.random.default_rng(0)
    gt = rng.uniform(-20, 20, (1000, 3))
    far = np.vstack([gt, [[1e25, 0.0, 0.0]]]).astype(np.float32)
    for extent in ("full", "legacy"):
        for v in (0.5, 0.2, 0.1):
            assert M.iou_counts(far, gt.astype(np.float32), v, extent) == \
                M.iou_counts(gt.astype(np.float32), gt.astype(np.float32), v, extent)
    for fn in (M.emd, M.emd_published):
        with pytest.raises(CloudFormatError, match="cannot be placed on a 0.5 m voxel grid"):
            fn(far, gt)
    rec = M.frame_metrics(gt[:500] + 0.01, gt, emd="none")      # the other metrics are unchanged
    assert math.isfinite(rec["cd"])


def test_summary_counts_failed_frames_apart_and_drops_only_large_frames():
    """A failed frame was counted as 'undefined' in every mean and as a dropped frame of the
    published EMD; an empty prediction counted as 'dropped' (> 130k voxels) too."""
    from lidar_completion.evaluation import summarize
    ok = {"cd": 0.2, "emd_published": 5.0, "n_pred": 10, "n_gt": 10}
    recs = [dict(ok, frame="a"), dict(ok, frame="b", emd_published=None),      # dropped by size
            dict(ok, frame="c", n_pred=0, cd=None, emd_published=None),        # empty prediction
            {"frame": "d", "error": "unreadable"}]
    s = summarize(recs)
    assert s["frames"] == 3 and s["failed_frames"] == ["d"]
    assert s["cd"]["frames"] == 2 and s["cd"]["undefined"] == 1      # c only: d is failed, not undefined
    assert s["emd_published"]["undefined"] == 2 and s["emd_published"]["dropped_frames"] == 1
