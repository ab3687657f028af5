"""How evaluation and training use the ground-truth cache, and a SemanticKITTI tree with the defects
real downloads have: a cache older than its dataset, an empty scan, a sequence folder named "8",
a label file of odd size, a sequence without labels, and evaluate-files on the cache's folder."""
import contextlib
import logging
import os
import shutil

import numpy as np
import pytest

from lidar_completion.cli import main
from lidar_completion.data import EvaluationDataset, build_gt, kitti
from lidar_completion.errors import DatasetError
from lidar_completion.evaluation import EvalOptions, SequenceSource, evaluate_files, read_records
# the 3-frame synthetic sequence 08 with its ground-truth cache of the evaluation tests
from test_evaluate import synth  # noqa: F401

OPTS = dict(emd="none", progress=False, plots=False)


@pytest.fixture(scope="module")
def built(synth):
    """A 3-frame synthetic sequence 08 with its ground-truth cache (copied before a test changes it)."""
    return synth


@pytest.fixture
def copy(built, tmp_path):
    dst = tmp_path / "ds"
    shutil.copytree(built, dst)
    return dst


@contextlib.contextmanager
def _captured(name):
    """The messages logged to logger ``name`` at WARNING and above, by a handler on that logger
    itself: once ROS 2's launch is imported (the launch tests), loggers made afterwards do not
    propagate to the root, where caplog listens."""
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger, handler = logging.getLogger(name), Collect(logging.WARNING)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _run_evaluate(root, out, capsys):
    capsys.readouterr()
    code = main(["evaluate", str(root), "--sequence", "08", "--baseline", "input", "--emd", "none",
                 "--no-plots", "--no-progress", "--out", str(out)])
    return code, capsys.readouterr().err


def test_a_cache_older_than_its_dataset_is_refused_naming_what_changed(copy, tmp_path, capsys):
    before, _ = _run_evaluate(copy, tmp_path / "before", capsys)
    assert before == 0
    poses = copy / "sequences" / "08" / "poses.txt"
    rows = [line.split() for line in poses.read_text().splitlines()]
    rows[1][11] = f"{float(rows[1][11]) + 2.0:.6e}"              # frame 1 moved 2 m along z
    poses.write_text("\n".join(" ".join(r) for r in rows) + "\n")
    with pytest.raises(DatasetError, match=r"changed: poses\.txt.*lidar-completion build-gt .* --sequences 08"):
        EvaluationDataset(copy, ["08"])
    code, err = _run_evaluate(copy, tmp_path / "stale", capsys)
    assert code == 1 and "built from other files" in err and "poses.txt" in err
    assert not (tmp_path / "stale" / "frames.jsonl").exists()
    # the training data refuses it too (the same dataset class), and a rebuild clears it
    from lidar_completion.data import TrainingDataset
    with pytest.raises(DatasetError, match="poses.txt"):
        TrainingDataset(copy, ["08"], n_fps=100, tile=2)
    build_gt(copy, ["08"])
    assert len(EvaluationDataset(copy, ["08"])) == 3
    # other modification times alone (a copy that did not keep them): used, with a warning
    scan = copy / "sequences" / "08" / "velodyne" / "000002.bin"
    st = scan.stat()
    os.utime(scan, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with _captured("lidar_completion.data.gt") as records:
        assert len(EvaluationDataset(copy, ["08"])) == 3
    assert any("other modification times" in r and "build-gt" in r for r in records), records
    # a scan of another size is refused again
    np.concatenate([np.fromfile(scan, np.float32), np.zeros(4, np.float32)]).tofile(scan)
    lab = copy / "sequences" / "08" / "labels" / "000002.label"
    np.concatenate([np.fromfile(lab, np.uint32), np.zeros(1, np.uint32)]).tofile(lab)
    with pytest.raises(DatasetError, match="the sizes of scan or label files"):
        EvaluationDataset(copy, ["08"])


def test_a_damaged_cache_ends_the_run_a_frame_with_nothing_fails_alone(copy, tmp_path, capsys):
    """A target file cut short is the cache's fault (rebuild it), not one frame's: evaluate stops
    naming it; evaluate-files on a cache target with no point in the evaluation band fails that
    frame, as evaluate fails a frame with an empty target."""
    target = copy / "gt_cache" / "08" / "targets" / "000001.bin"
    whole = target.read_bytes()
    target.write_bytes(whole[:120])
    code, err = _run_evaluate(copy, tmp_path / "ev", capsys)
    assert code == 1 and "000001.bin has 120 bytes but the manifest records" in err
    assert not (tmp_path / "ev" / "summary.md").exists()
    # the same size, every point lifted above the band (the manifest's sizes still match)
    pts = np.frombuffer(whole, np.float32).reshape(-1, 3).copy()
    pts[:, 2] = 10.0
    target.write_bytes(pts.tobytes())
    preds = tmp_path / "preds"
    preds.mkdir()
    for f in sorted(target.parent.glob("*.bin")):
        np.save(preds / f"{f.stem}.npy", np.fromfile(f, np.float32).reshape(-1, 3))
    s = evaluate_files(preds, target.parent, tmp_path / "files", options=EvalOptions(**OPTS))
    assert s["failed_frames"] == ["000001"] and s["frames"] == 2


def test_evaluate_files_on_the_cache_scores_what_evaluate_scores(copy, tmp_path):
    # a roof above the evaluation band (z >= 4.4 m; the synthetic towns have none) in every scan
    seq = copy / "sequences" / "08"
    roof = np.zeros((400, 4), np.float32)
    roof[:, 0], roof[:, 1] = np.repeat(np.linspace(8, 16, 20), 20), np.tile(np.linspace(-4, 4, 20), 20)
    roof[:, 2] = 6.0
    for scan in sorted((seq / "velodyne").glob("*.bin")):
        np.concatenate([np.fromfile(scan, np.float32), roof.ravel()]).tofile(scan)
        lab = seq / "labels" / f"{scan.stem}.label"
        np.concatenate([np.fromfile(lab, np.uint32), np.full(400, 50, np.uint32)]).tofile(lab)   # building
    build_gt(copy, ["08"])
    built = copy
    src = SequenceSource(built, "08")
    preds = tmp_path / "preds"
    preds.mkdir()
    for key in src.keys:                         # the filtered input scans as the "completions"
        np.save(preds / f"{int(key):06d}.npy", src.load(key)[0])
    ev = tmp_path / "ev"
    assert main(["evaluate", str(built), "--sequence", "08", "--baseline", "input", "--emd", "none",
                 "--no-plots", "--no-progress", "--out", str(ev)]) == 0
    s = evaluate_files(preds, built / "gt_cache" / "08", tmp_path / "files", options=EvalOptions(**OPTS))
    by_eval = {int(r["frame"]): r for r in read_records(ev / "frames.jsonl")}
    by_files = {int(r["frame"]): r for r in read_records(tmp_path / "files" / "frames.jsonl")}
    assert sorted(by_eval) == sorted(by_files) == [0, 1, 2]
    for f in by_eval:
        assert by_files[f]["n_gt"] == by_eval[f]["n_gt"]
        assert by_files[f]["cd"] == pytest.approx(by_eval[f]["cd"], rel=1e-6)
    # the band removed points: the cache's whole targets are larger than what is scored
    whole = [len(np.fromfile(built / "gt_cache" / "08" / "targets" / f"{f:06d}.bin", np.float32)) // 3
             for f in range(3)]
    assert sum(whole) > sum(by_files[f]["n_gt"] for f in range(3))
    assert s["run"]["gt_z_band"] == [-4.0, 4.4] and "as `evaluate` scores them" in s["run"]["description"]


def test_an_empty_scan_is_a_failed_frame_not_the_end_of_the_run(copy, tmp_path, capsys):
    seq = copy / "sequences" / "08"
    for p in (seq / "velodyne" / "000001.bin", seq / "labels" / "000001.label"):
        p.write_bytes(b"")
    with _captured("lidar_completion.data.gt") as records:
        build_gt(copy, ["08"])
    text = "\n".join(records)
    assert "frame 1" in text and "000001.bin, 0 points" in text and "no point passes the input filter" in text
    code, err = _run_evaluate(copy, tmp_path / "ev", capsys)
    assert code == 1                                      # a failed frame: the run says so
    recs = {int(r["frame"]): r for r in read_records(tmp_path / "ev" / "frames.jsonl")}
    assert sorted(recs) == [0, 1, 2] and "cd" in recs[0] and "cd" in recs[2]
    assert "000001.bin" in recs[1]["error"] and "no scan point passes the input filter" in recs[1]["error"]
    summary = (tmp_path / "ev" / "summary.md").read_text()
    assert "1 frames could not be completed" in summary


def test_training_and_validation_step_over_an_empty_scan(copy, tmp_path):
    from training.config import load_config
    from training.kitti_adapter import KittiSource
    seq = copy / "sequences" / "08"
    for p in (seq / "velodyne" / "000001.bin", seq / "labels" / "000001.label"):
        p.write_bytes(b"")
    cfg = load_config(None, kind="teacher", overrides=[
        "data.kind=semantickitti", f"data.root={copy}", 'data.sequences=["08"]', "data.scan_points=100",
        "data.tile=2", "data.target_points=500", "data.build_gt=true"])
    src = KittiSource(cfg, copy)
    with _captured("training.kitti_adapter") as records:
        a = src.sample(1, np.random.default_rng(5))
        again = src.sample(1, np.random.default_rng(5))
    assert sum("frame 1 left out" in r for r in records) == 1     # said once, not at every epoch
    b = src.sample(2, np.random.default_rng(5))
    for k in a:                                                  # frame 2 took its place, the same draws
        np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(a[k], again[k])
    # with data.limit 2, the replacement comes from the first two frames: frame 0
    from training.sources import _Limited
    limited = _Limited(KittiSource(cfg, copy), 2)
    first = limited.sample(0, np.random.default_rng(5))
    for k, v in limited.sample(1, np.random.default_rng(5)).items():
        np.testing.assert_array_equal(v, first[k])
    # validation on that sequence leaves the frame out and validates on the others
    from training.validation import Validator
    vcfg = load_config(None, kind="teacher", overrides=[
        "data.kind=semantickitti", f"data.root={copy}", 'data.sequences=["08"]',
        f"validation.root={copy}", "validation.sequence='08'", "validation.every=1", "validation.frames=3",
        "validation.every_steps=1"])
    with _captured("training.validation") as records:
        frames = Validator(vcfg, "teacher", tmp_path / "run").frames()
    assert [f[0] for f in frames] == [0, 2] and any("validation: frame 000001 left out" in r for r in records)


def test_a_sequence_folder_named_8_is_named_in_the_error(copy, tmp_path, capsys):
    (copy / "sequences" / "08").rename(copy / "sequences" / "8")
    with pytest.raises(DatasetError, match=r"found the folder .*sequences/8, but sequence folders are "
                                           r"named with two digits; rename it to .*sequences/08"):
        kitti.SemanticKittiSequence(copy, 8)
    # another sequence beside it: build-gt without --sequences builds that one, warning about "8"
    from lidar_completion.data.synthetic import generate_dataset
    generate_dataset(copy, sequences=["00"], scans=2, seed=1)
    with _captured("lidar_completion.data.kitti") as records:
        assert kitti.list_sequences(copy) == ["00"]
    assert any("sequences/8 left out" in r and "rename it to 08" in r for r in records)
    capsys.readouterr()
    assert main(["build-gt", str(copy), "--no-progress"]) == 0
    assert "sequence 00: 2 frames" in capsys.readouterr().out


def test_a_label_file_of_odd_size_says_so(copy):
    lab = copy / "sequences" / "08" / "labels" / "000002.label"
    lab.write_bytes(lab.read_bytes() + b"\0\0")
    with pytest.raises(DatasetError, match=r"000002\.label has \d+ bytes; expected a multiple of 4"):
        kitti.SemanticKittiSequence(copy, "08")


def test_a_sequence_without_labels_says_it_has_no_ground_truth(copy, tmp_path, capsys):
    shutil.rmtree(copy / "sequences" / "08" / "labels")
    shutil.rmtree(copy / "gt_cache")
    with pytest.raises(DatasetError, match="sequence 08 has no ground truth: it has no semantic labels"):
        EvaluationDataset(copy, ["08"])
    code, err = _run_evaluate(copy, tmp_path / "ev", capsys)
    assert code == 1 and "no semantic labels" in err and "build-gt" not in err


def test_ground_truth_without_a_prediction_is_reported(built, tmp_path, capsys):
    targets = built / "gt_cache" / "08" / "targets"
    preds = tmp_path / "preds"
    preds.mkdir()
    for f in sorted(targets.glob("*.bin"))[:2]:              # frame 000002 not completed
        np.save(preds / f"{f.stem}.npy", np.fromfile(f, np.float32).reshape(-1, 3))
    capsys.readouterr()
    assert main(["evaluate-files", str(preds), str(targets), "--emd", "none", "--no-plots", "--no-progress",
                 "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "1 ground-truth file had no prediction and is not in the means (000002)" in err
    md = (tmp_path / "o" / "summary.md").read_text()
    assert "1 ground-truth file had no prediction and is not scored: 000002." in md
