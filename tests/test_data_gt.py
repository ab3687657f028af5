"""Ground-truth builder: voxel hash, incremental == batch map, target invariants, resumable cache."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree

from lidar_completion.data import geometry, gt, kitti, synthetic, voxels
from lidar_completion.fileutil import stale_tmp
from lidar_completion.errors import DatasetError

N_SCANS = 6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("gt_data")
    synthetic.generate_dataset(root, 1, N_SCANS, seed=11,
                               config=synthetic.SyntheticConfig(azimuth_steps=512))
    return root


@pytest.fixture(scope="module")
def built(dataset, tmp_path_factory):
    """A complete cache built once (read-only for the tests that use it)."""
    out = tmp_path_factory.mktemp("gt_cache")
    seq = kitti.SemanticKittiSequence(dataset, "00", require_labels=True)
    cache = gt.build_sequence(seq, out)
    return seq, cache, out


# ---------------------------------------------------------------------------------------------- hash
def test_voxel_hash_set_matches_python_set():
    rng = np.random.default_rng(0)
    hs = voxels.VoxelHashSet(capacity=16)
    ref = set()
    for _ in range(30):
        keys = rng.integers(0, 5000, rng.integers(0, 400))   # many duplicates, forces growth
        new = hs.insert(keys)
        expect = np.zeros(len(keys), bool)
        seen = set()
        for j, k in enumerate(keys.tolist()):
            if k not in ref and k not in seen:
                expect[j] = True
                seen.add(k)
        ref |= seen
        np.testing.assert_array_equal(new, expect)
        assert len(hs) == len(ref)
    probe = np.arange(0, 6000)
    np.testing.assert_array_equal(hs.contains(probe), [k in ref for k in probe.tolist()])
    assert sorted(hs.keys().tolist()) == sorted(ref)
    assert hs.capacity >= 2 * len(ref)


def test_pack_keys_round_trip_and_range():
    ijk = np.array([[0, 0, 0], [-5, 7, -(1 << 20)], [(1 << 20) - 1, -1, 3]])
    keys = voxels.pack_keys(ijk)
    assert (keys >= 0).all() and len(set(keys.tolist())) == 3
    np.testing.assert_array_equal(voxels.unpack_keys(keys), ijk)
    with pytest.raises(DatasetError, match="out of range"):
        voxels.pack_keys(np.array([[1 << 20, 0, 0]]))


# ---------------------------------------------------------------------------------------------- map
def test_incremental_equals_batch(dataset):
    seq = kitti.SemanticKittiSequence(dataset, "00", require_labels=True)
    cfg = gt.GTConfig()
    incremental = gt.accumulate_map(seq, cfg).points
    per_scan = [gt.sequence_world_points(seq, i, cfg) for i in range(len(seq))]
    batch = voxels.batch_voxel_map(per_scan, cfg.voxel_size)
    # the same voxel set ...
    ki = voxels.pack_keys(voxels.voxel_indices(incremental, 0.1))
    kb = voxels.pack_keys(voxels.voxel_indices(batch, 0.1))
    np.testing.assert_array_equal(np.sort(ki), np.sort(kb))
    # ... and even the same representative points in the same order
    np.testing.assert_array_equal(incremental, batch)
    assert len(incremental) > 50_000


def test_map_invariants(dataset, built):
    seq, cache, _ = built
    m = cache.load_map(verify=True)
    keys = voxels.pack_keys(voxels.voxel_indices(m, 0.1))
    assert len(np.unique(keys)) == len(m), "more than one point in some 0.1 m voxel"
    # no moving-class, unlabeled or outlier point, and nothing closer than 3.5 m to its sensor
    tree = cKDTree(m.astype(np.float64))
    excluded_total = 0
    for i in range(len(seq)):
        scan = seq.scan(i)
        sem = seq.semantic(i)
        world = geometry.transform(scan, seq.pose(i)).astype(np.float32)
        bad = ~gt.static_label_mask(sem) | (geometry.range_of(scan) <= 3.5)
        excluded_total += int(bad.sum())
        d, _ = tree.query(world[bad].astype(np.float64))
        assert (d > 0).all(), f"frame {i}: an excluded point is in the map"
    moving = sum(int((seq.semantic(i) >= 252).sum()) for i in range(len(seq)))
    assert moving > 100 and excluded_total > moving


def test_target_invariants(built):
    seq, cache, _ = built
    cfg = cache.config
    m = cache.load_map()
    tree = cKDTree(m.astype(np.float64))
    for i in range(len(seq)):
        target = cache.load_target(i, verify=True)
        scan = seq.scan(i)
        pose = seq.pose(i)
        assert target.dtype == np.float32 and target.shape[1] == 3 and len(target) > 10_000
        # inside the crop: within 50 m of the pose (the pose is the origin of the scan frame)
        assert np.linalg.norm(target.astype(np.float64), axis=1).max() <= cfg.crop_radius + 1e-3
        assert target[:, 2].min() > cfg.z_min
        # inside the viewpoint mask of the filtered input scan
        inp = scan[gt.input_mask(scan, cfg), :3]
        assert gt.viewpoint_mask(target, inp, cfg.view_voxel).all()
        # frame -> world -> map point (round trip)
        world = geometry.transform(target, pose)
        d, _ = tree.query(world)
        assert d.max() < 1e-3
        back = geometry.inverse_transform(world, pose)
        np.testing.assert_allclose(back, target, atol=1e-6)
        # complete: a brute-force crop of the whole map gives the same number of points
        local = geometry.inverse_transform(m, pose)
        brute = local[(np.linalg.norm(m.astype(np.float64) - pose[:3, 3], axis=1) <= cfg.crop_radius)
                      & (local[:, 2] > cfg.z_min)]
        brute = brute[gt.viewpoint_mask(brute, inp, cfg.view_voxel)]
        assert len(brute) == len(target)


def test_viewpoint_mask_cells():
    scan = np.array([[1.0, 1.0, 0.5], [15.0, -3.0, 0.2]])
    pts = np.array([[9.9, 9.9, 9.9], [10.1, 0.5, 0.5], [12.0, -0.1, 0.0], [-0.1, 0.0, 0.0],
                    [19.9, -9.9, 9.9]])
    np.testing.assert_array_equal(gt.viewpoint_mask(pts, scan, 10.0),
                                  [True, False, True, False, True])


def test_the_published_viewpoint_mask_is_open3ds_grid_from_the_raw_scan():
    """The published evaluation masks the target with Open3D's VoxelGrid.create_from_point_cloud of
    the raw scan within 50 m (cells from its lowest corner minus half a cell) and check_if_included;
    ours anchored the cells at the origin and took the filtered scan: up to 15 % of a frame's CD
    apart. Checked against a set-of-cells reimplementation of that rule."""
    rng = np.random.default_rng(4)
    scan = np.concatenate([rng.uniform(-45, 45, (300, 3)) * [1, 1, 0.05],
                           [[1.0, 0.5, -1.0], [2.0, -30.0, -6.0]]])        # near and low: raw only
    pts = rng.uniform(-50, 50, (20000, 3)) * [1, 1, 0.1]
    raw = scan[np.linalg.norm(scan, axis=1) < 50.0]                        # eval_path: dist < max_range
    origin = raw.min(0) - 5.0
    cells = {tuple(c) for c in np.floor((raw - origin) / 10.0).astype(int)}
    want = np.array([tuple(c) in cells for c in np.floor((pts - origin) / 10.0).astype(int)])
    np.testing.assert_array_equal(gt.published_grid_origin(scan), origin)
    got = gt.viewpoint_mask(pts, raw, 10.0, gt.published_grid_origin(scan))
    np.testing.assert_array_equal(got, want)
    assert (got != gt.viewpoint_mask(pts, raw, 10.0)).any()        # the two grids differ
    # frame_target with view_mask "published" masks with that rule and the raw scan within range
    m = np.concatenate([pts, scan + rng.normal(0, 0.01, scan.shape)]).astype(np.float32)
    cfg = gt.GTConfig(view_mask="published")
    target = gt.frame_target(gt.MapIndex(m, cfg.tile_size), np.eye(4), scan.astype(np.float32), cfg)
    local = m[(np.linalg.norm(m.astype(np.float64), axis=1) <= cfg.crop_radius) & (m[:, 2] > cfg.z_min)]
    expected = local[gt.viewpoint_mask(local, raw, 10.0, origin)]
    order = lambda a: a[np.lexsort(a.T)]   # noqa: E731 - the same points, whatever their order
    np.testing.assert_array_equal(order(target), order(expected))
    # the default is left out of the cache header: caches built before the option are not rebuilt
    assert "view_mask" not in gt.GTConfig().to_dict()
    assert gt.GTConfig.from_dict(cfg.to_dict()).view_mask == "published"
    with pytest.raises(Exception, match="view_mask must be one of origin, published"):
        gt.GTConfig(view_mask="open3d")


# ---------------------------------------------------------------------------------------------- cache
def _manifest(out):
    return json.loads((Path(out) / "00" / "manifest.json").read_text())


def test_resume_after_interrupted_build(dataset, built, tmp_path):
    seq, _, ref_out = built
    out = tmp_path / "cache"

    def boom(phase, i):
        if phase == "target" and i == 2:
            raise KeyboardInterrupt  # what a Ctrl-C / kill leaves behind: frames 0..2 written

    with pytest.raises(KeyboardInterrupt):
        gt.build_sequence(seq, out, on_frame=boom)
    assert not (out / "00" / "manifest.json").exists()
    with pytest.raises(DatasetError, match="not in the cache"):
        gt.GTCache(out, "00").load_target(4)
    # a torn manifest line and a stray temporary file, as a kill during a write leaves them
    with open(out / "00" / "manifest.jsonl", "a") as fh:
        fh.write('{"type": "frame", "frame": 3, "fi')
    (out / "00" / "targets" / "000003.bin.tmp").write_bytes(b"\0" * 10)
    stats = gt.BuildStats("00")
    cache = gt.build_sequence(seq, out, stats=stats)
    assert stats.frames_reused == 3 and stats.frames_built == N_SCANS - 3 and stats.map_reused
    assert cache.complete
    assert not list((out / "00" / "targets").glob("*.tmp"))
    got, ref = _manifest(out), _manifest(ref_out)
    assert [f["sha256"] for f in got["frames"]] == [f["sha256"] for f in ref["frames"]]
    assert got["map"]["sha256"] == ref["map"]["sha256"]


def test_corrupt_and_partial_files_rebuilt(built, tmp_path):
    seq, _, ref_out = built
    out = tmp_path / "cache"
    shutil.copytree(ref_out, out)
    t1 = out / "00" / "targets" / "000001.bin"
    t4 = out / "00" / "targets" / "000004.bin"
    good1, good4 = t1.read_bytes(), t4.read_bytes()
    # same size, flipped bytes: only the checksum can tell
    data = bytearray(good1)
    data[100:108] = bytes(8)
    t1.write_bytes(bytes(data))
    # a partial file
    t4.write_bytes(good4[: len(good4) // 2])
    cache = gt.GTCache(out, "00")
    cache.load_target(1)  # the size is right: loads without verification
    with pytest.raises(DatasetError, match="sha256"):
        cache.load_target(1, verify=True)
    with pytest.raises(DatasetError, match="partial or stale"):
        cache.load_target(4)
    stats = gt.BuildStats("00")
    gt.build_sequence(seq, out, stats=stats)
    assert stats.frames_built == 2 and stats.frames_reused == N_SCANS - 2
    assert t1.read_bytes() == good1 and t4.read_bytes() == good4
    # a complete, valid cache is only verified
    stats = gt.BuildStats("00")
    gt.build_sequence(seq, out, stats=stats)
    assert stats.frames_built == 0 and stats.frames_reused == N_SCANS
    # a corrupt map is rebuilt too
    (out / "00" / "map.bin").write_bytes(b"\0" * 12)
    (out / "00" / "targets" / "000000.bin").unlink()
    stats = gt.BuildStats("00")
    gt.build_sequence(seq, out, stats=stats)
    assert not stats.map_reused and stats.frames_built == 1
    assert _manifest(out)["map"]["sha256"] == _manifest(ref_out)["map"]["sha256"]


@pytest.mark.parametrize("damage", ["deleted", "truncated", "flipped"])
def test_a_damaged_map_is_rebuilt_when_every_target_is_valid(built, tmp_path, damage):
    """The map alone damaged: a build used to report the cache "complete and verified" (every
    target was valid, so nothing was to be built) and leave the map as it was."""
    seq, _, ref_out = built
    out = tmp_path / "cache"
    shutil.copytree(ref_out, out)
    path = out / "00" / "map.bin"
    good = path.read_bytes()
    if damage == "deleted":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    else:
        data = bytearray(good)
        data[40:48] = bytes(8)
        path.write_bytes(bytes(data))
    stats = gt.BuildStats("00")
    gt.build_sequence(seq, out, stats=stats)
    assert stats.frames_built == 0 and not stats.map_reused and stats.map_points == len(good) // 12
    assert path.read_bytes() == good
    assert _manifest(out)["map"]["sha256"] == _manifest(ref_out)["map"]["sha256"]
    stats = gt.BuildStats("00")
    gt.build_sequence(seq, out, stats=stats)
    assert stats.map_reused


def test_labels_without_a_static_point_are_an_error_not_an_empty_map(dataset, tmp_path):
    root = tmp_path / "zeroed"
    shutil.copytree(dataset, root)
    for label in (root / "sequences" / "00" / "labels").glob("*.label"):
        label.write_bytes(bytes(label.stat().st_size))
    seq = kitti.SemanticKittiSequence(root, "00", require_labels=True)
    with pytest.raises(DatasetError, match="ground-truth map is empty"):
        gt.build_sequence(seq, tmp_path / "c")


def test_a_cache_from_before_modification_times_were_recorded_is_kept(built, tmp_path, caplog):
    """A cache whose journal header records no mtimes_sha256 (built by an earlier version) was
    rebuilt whole by build-gt, "changed: the modification times", though nothing had changed, and
    the rebuild's new fingerprint refused every evaluation folder made on it. It is verified and
    kept, header and fingerprint included."""
    import json

    seq, _, ref_out = built
    out = tmp_path / "cache"
    shutil.copytree(ref_out, out)
    journal = out / "00" / "manifest.jsonl"
    lines = journal.read_text().splitlines()
    header = json.loads(lines[0])
    del header["source"]["mtimes_sha256"]
    journal.write_text("\n".join([json.dumps(header)] + lines[1:]) + "\n")
    (out / "00" / "manifest.json").unlink(missing_ok=True)     # as an interrupted old build left it
    before = journal.read_text().splitlines()[0]
    stats = gt.BuildStats("00")
    with caplog.at_level("INFO"):
        gt.build_sequence(seq, out, stats=stats, verify="size")
    assert (stats.frames_built, stats.frames_reused) == (0, N_SCANS) and stats.map_reused
    assert "rebuilding" not in caplog.text and "build-gt --force rebuilds it" in caplog.text
    assert journal.read_text().splitlines()[0] == before
    assert json.loads((out / "00" / "manifest.json").read_text())["header"] == header


def test_temporary_files_of_a_killed_build_are_removed(built, tmp_path):
    """A build killed while writing the map left map.bin.<pid>.tmp in the sequence folder (a map
    of a SemanticKITTI sequence: hundreds of MB) for good: only the targets' were cleaned up."""
    import subprocess

    seq, _, ref_out = built
    out = tmp_path / "cache"
    shutil.copytree(ref_out, out)
    gone = subprocess.Popen(["true"])          # a writer that is gone
    gone.wait()
    litter = [out / "00" / f"map.bin.{gone.pid}.tmp", out / "00" / "targets" / f"000001.bin.{gone.pid}.tmp"]
    for f in litter:
        f.write_bytes(b"partial")
    gt.build_sequence(seq, out, verify="size")
    assert not any(f.exists() for f in litter)


def test_changed_parameters_rebuild(built, tmp_path):
    seq, _, ref_out = built
    out = tmp_path / "cache"
    shutil.copytree(ref_out, out)
    stats = gt.BuildStats("00")
    cache = gt.build_sequence(seq, out, config=gt.GTConfig(crop_radius=20.0), stats=stats,
                              verify="size")
    assert stats.frames_built == N_SCANS
    assert cache.config.crop_radius == 20.0
    assert np.linalg.norm(cache.load_target(0), axis=1).max() <= 20.0 + 1e-3


def test_relabelled_files_of_the_same_size_rebuild(dataset, built, tmp_path, caplog):
    """A label file rewritten in place keeps its size (one uint32 per point): the cache must
    notice it all the same (by modification time), rebuild, and say what changed."""
    _, _, ref_out = built
    root, out = tmp_path / "data", tmp_path / "cache"
    shutil.copytree(dataset, root)            # copies keep modification times: the cache is reused
    shutil.copytree(ref_out, out)
    seq = kitti.SemanticKittiSequence(root, "00", require_labels=True)
    stats = gt.BuildStats("00")
    gt.build_sequence(seq, out, stats=stats, verify="size")
    assert (stats.frames_built, stats.frames_reused) == (0, N_SCANS)
    label = seq.label_path(2)
    size, before = label.stat().st_size, label.stat().st_mtime_ns
    raw = np.fromfile(label, dtype=np.uint32)
    raw[:] = 0                                # every point of frame 2 unlabelled
    raw.tofile(label)
    os.utime(label, ns=(before + 10**9, before + 10**9))
    assert label.stat().st_size == size
    stats = gt.BuildStats("00")
    with caplog.at_level("INFO", logger="lidar_completion.data.gt"):
        gt.build_sequence(seq, out, stats=stats, verify="size")
    assert stats.frames_built == N_SCANS
    assert "modification times of scan or label files" in caplog.text
    assert "sizes" not in caplog.text.split("changed:")[1]


def test_cache_errors(dataset, tmp_path):
    with pytest.raises(DatasetError, match="build-gt"):
        gt.GTCache(tmp_path, "00")
    root = tmp_path / "nolabels"
    shutil.copytree(dataset, root)
    shutil.rmtree(root / "sequences" / "00" / "labels")
    seq = kitti.SemanticKittiSequence(root, "00")
    with pytest.raises(DatasetError, match="no labels"):
        gt.build_sequence(seq, tmp_path / "c")
    with pytest.raises(DatasetError, match="no semantic labels"):
        gt.build_gt(root, ["00"], out=tmp_path / "c")


def test_iter_pairs_and_synthetic_pairs(dataset, built, tmp_path):
    _, cache, out = built
    pairs = list(gt.iter_pairs(dataset, "00", out))
    assert len(pairs) == N_SCANS
    scan, target = pairs[2]
    assert scan.shape[1] == 4 and target.shape[1] == 3
    np.testing.assert_array_equal(target, cache.load_target(2))
    cfg = synthetic.SyntheticConfig(azimuth_steps=256)
    got = list(synthetic.synthetic_pairs(tmp_path / "syn", sequence=3, scans=3, seed=2, config=cfg))
    assert len(got) == 3
    assert (tmp_path / "syn" / "gt_cache" / "03" / "manifest.json").is_file()
    assert all(len(t) > 1000 and s.shape[1] == 4 for s, t in got)


def test_resume_after_sigkill(tmp_path):
    """Kill a real `build-gt` process while it writes targets, then resume."""
    import os
    import signal
    import subprocess
    import sys
    import time

    n = 24
    root = tmp_path / "data"
    synthetic.generate_dataset(root, 1, n, seed=4, config=synthetic.SyntheticConfig(azimuth_steps=256))
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "lidar_completion", "build-gt", str(root), "--sequences", "00",
           "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    jsonl = out / "00" / "manifest.jsonl"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if jsonl.is_file() and '"type": "frame"' in jsonl.read_text():
                break
            time.sleep(0.002)
        assert proc.poll() is None, "build-gt finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "00" / "manifest.json").exists()
    seq = kitti.SemanticKittiSequence(root, "00", require_labels=True)
    stats = gt.BuildStats("00")
    cache = gt.build_sequence(seq, out, stats=stats)
    assert stats.map_reused and 1 <= stats.frames_reused < n
    assert stats.frames_reused + stats.frames_built == n
    clean = gt.build_sequence(seq, tmp_path / "clean")
    for i in range(n):
        np.testing.assert_array_equal(cache.load_target(i, verify=True), clean.load_target(i))


def test_concurrent_verifications_of_one_cache(built, tmp_path):
    """Several processes (a teacher and a refiner started together) verify the same complete cache at
    once: each rewrites manifest.json through its own temporary file, so none fails."""
    import subprocess
    import sys

    seq, _, src = built
    out = tmp_path / "cache"
    shutil.copytree(src, out)
    code = ("import sys; from lidar_completion.data import gt\n"
            "for _ in range(20): gt.build_gt(sys.argv[1], ['00'], out=sys.argv[2], verify='size')\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(seq.root), str(out)],
                              stderr=subprocess.PIPE) for _ in range(3)]
    errs = [p.communicate(timeout=300)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errs
    assert not list((out / "00").glob("*.tmp"))
    json.loads((out / "00" / "manifest.json").read_text())


def test_stale_temporary_files():
    assert stale_tmp(Path("targets/000001.bin.tmp"))            # old naming: no writer id
    assert stale_tmp(Path(f"000001.bin.{2 ** 22 + 12345}.tmp"))  # no such process
    import os
    assert not stale_tmp(Path(f"000001.bin.{os.getppid()}.tmp"))  # a live writer


def test_two_builds_of_one_sequence_at_once_build_it_once(built, tmp_path):
    """Two build-gt processes started on the same new cache (two training stages launched together):
    they took turns before, each rebuilding every target and doubling the journal; now the second
    waits and finds the first's cache complete."""
    import subprocess
    import sys

    seq, _, _ = built
    out = tmp_path / "cache"
    code = ("import sys, logging; logging.basicConfig(level=logging.INFO)\n"
            "from lidar_completion.data import gt\n"
            "st = gt.build_gt(sys.argv[1], ['00'], out=sys.argv[2], verify='size')[0]\n"
            "print('BUILT', st.frames_built, 'REUSED', st.frames_reused)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(seq.root), str(out)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    built_counts = sorted(int(o.split("BUILT ")[1].split()[0]) for o, _ in outs)
    assert built_counts == [0, len(seq)], outs                    # one built them all, the other none
    records = [json.loads(line) for line in (out / "00" / "manifest.jsonl").read_text().splitlines()]
    assert sum(r.get("type") == "header" for r in records) == 1
    assert sum(r.get("type") == "frame" for r in records) == len(seq)
