"""Findings of the audits of `lidar-completion evaluate` / `evaluate-files`: resuming into a folder
made with other settings, the ground-truth cache's own target files, empty predictions, bad input
folders and files, failed frames, serial metrics, seeds and the help."""
import json
import shutil

import numpy as np
import pytest

from lidar_completion.cli import main
from lidar_completion.errors import ConfigError
from lidar_completion.evaluation import (EvalOptions, evaluate_files, evaluate_sequence, read_records,
                                         run_evaluation, summarize, summary_markdown)
from lidar_completion.settings import CompletionSettings
# the 3-frame synthetic sequence 08 with its cache, the tiny random checkpoint and the small
# Completer of the evaluation tests
from test_evaluate import small_completer, synth, tiny_ckpt  # noqa: F401

OPTS = EvalOptions(emd="none", progress=False, plots=False, limit=1)


def counting(completer):
    """``completer`` with its completions recorded in ``completer.calls``."""
    completer.calls = []
    original = completer.complete_detailed

    def counted(points, seed=None):
        completer.calls.append(seed)
        return original(points, seed=seed)

    completer.complete_detailed = counted
    return completer


def differ(*names):
    """A regex matching the refusal that names each of ``names`` among the differing settings."""
    return "settings differ: " + "".join(rf"(?=[^)]*\b{n}\b)" for n in names)


# ------------------------------------------------------------------------ 1. resume identity
@pytest.mark.parametrize("change", [{"n_fps": 250}, {"tile": 3}, {"fps_parts": 4},
                                    {"min_range": 2.5}, {"max_range": 40.0}, {"min_z": -3.0}])
def test_resume_refuses_other_budgets_and_filters(synth, tiny_ckpt, tmp_path, change):
    out = tmp_path / "ev"
    evaluate_sequence(synth, "08", out, completer=small_completer(tiny_ckpt), options=OPTS)
    other = counting(small_completer(tiny_ckpt, **change))
    with pytest.raises(ConfigError, match=differ(*change)):
        evaluate_sequence(synth, "08", out, completer=other, options=EvalOptions(
            emd="none", progress=False, plots=False))
    assert other.calls == [] and len(read_records(out / "frames.jsonl")) == 1


def test_resume_compares_the_checkpoint_by_content(synth, tmp_path):
    """A file retrained in place is another model (also with no checkpoint setting, as for the
    shipped student or a Completer passed in); a copy of the same weights elsewhere is not."""
    from lidar_completion.checkpoints import make_random_checkpoint
    path = make_random_checkpoint(tmp_path / "model.pt", seed=0)
    out = tmp_path / "ev"
    evaluate_sequence(synth, "08", out, completer=small_completer(path), options=OPTS)
    copy = tmp_path / "elsewhere" / "copy.pt"
    copy.parent.mkdir()
    shutil.copy(path, copy)
    same = counting(small_completer(copy))
    evaluate_sequence(synth, "08", out, settings=CompletionSettings(checkpoint=str(copy)),
                      completer=same, options=OPTS)
    assert same.calls == []                                        # resumed: nothing recomputed
    make_random_checkpoint(path, seed=1)                           # retrained at the same path
    with pytest.raises(ConfigError, match=differ("weights")):
        evaluate_sequence(synth, "08", out, completer=small_completer(path), options=OPTS)
    run = json.loads((out / "run.json").read_text())
    assert len(run["identity"]["weights"]) == 64 and run["run"]["checkpoint"]["sha256"]


def test_resume_refuses_another_ground_truth_cache(synth, tmp_path):
    from lidar_completion.data import GTConfig, build_gt
    out = tmp_path / "ev"
    evaluate_sequence(synth, "08", out, baseline="input", options=OPTS)
    other = tmp_path / "cache"
    build_gt(synth, ["08"], out=other, config=GTConfig(z_max_eval=3.0))
    with pytest.raises(ConfigError, match=differ("gt_cache")):
        evaluate_sequence(synth, "08", out, baseline="input", cache_root=other, options=OPTS)
    shutil.copytree(synth / "gt_cache", tmp_path / "copy")          # the same content elsewhere
    evaluate_sequence(synth, "08", out, baseline="input", cache_root=tmp_path / "copy", options=OPTS)


def test_folders_of_earlier_versions_are_refused(synth, tmp_path, capsys):
    """Their run.json lacks settings that are compared now: they cannot be matched, so they are
    refused (not resumed as if the missing settings had been today's defaults)."""
    out = tmp_path / "old"
    args = ["evaluate", str(synth), "--sequence", "08", "--baseline", "input", "--emd", "none",
            "--limit", "1", "--no-plots", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    run = json.loads((out / "run.json").read_text())
    run["identity"].pop("gt_cache")                          # what the earlier version recorded
    (out / "run.json").write_text(json.dumps(run))
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert "settings differ: gt_cache" in err and "not recorded there" in err
    assert "--restart" in err and len(err.splitlines()) == 1
    assert main(args + ["--restart"]) == 0


# --------------------------------------------------------------- 2. the GT cache's own targets
def test_evaluate_files_reads_the_ground_truth_cache_targets(synth, tmp_path, capsys):
    targets = synth / "gt_cache" / "08" / "targets"
    # the targets as predictions, kept in the evaluation z band: a perfect score (the cache's
    # targets are scored in that band, as `evaluate` scores them)
    banded = tmp_path / "banded"
    banded.mkdir()
    for f in sorted(targets.glob("*.bin")):
        t = np.fromfile(f, dtype=np.float32).reshape(-1, 3)
        np.save(banded / f"{f.stem}.npy", t[(t[:, 2] > -4.0) & (t[:, 2] < 4.4)])
    for gt_dir in (targets, targets.parent):                 # CACHE/SS/targets or CACHE/SS
        s = evaluate_files(banded, gt_dir, tmp_path / gt_dir.name, options=EvalOptions(
            emd="none", progress=False, plots=False))
        assert s["frames"] == 3 and s["cd"]["mean"] == 0.0 and not s["failed_frames"]
        assert s["run"]["bin_format"] == {"pred": "kitti", "gt": "xyz"} and s["run"]["gt_z_band"] == [-4.0, 4.4]
    # a link to the cache's targets is the cache's targets
    (tmp_path / "linked").symlink_to(targets, target_is_directory=True)
    s = evaluate_files(targets, tmp_path / "linked", tmp_path / "via_link", options=EvalOptions(
        emd="none", progress=False, plots=False))
    assert s["run"]["bin_format"] == {"pred": "xyz", "gt": "xyz"} and s["run"]["gt_z_band"] == [-4.0, 4.4]
    # copied out of the cache (no manifest): --bin-format xyz says how to read them
    copied = tmp_path / "copied"
    shutil.copytree(targets, copied)
    out = tmp_path / "o"
    assert main(["evaluate-files", str(copied), str(copied), "--bin-format", "xyz", "--emd", "none",
                 "--no-plots", "--no-progress", "--out", str(out)]) == 0
    recs = read_records(out / "frames.jsonl")
    n = [len(np.fromfile(targets / f"{r['frame']}.bin", dtype=np.float32)) // 3 for r in recs]
    assert [r["cd"] for r in recs] == [0.0] * 3 and [r["n_gt"] for r in recs] == n
    # a point count that is not a multiple of 4 is not a KITTI file: the error says what to pass
    odd = tmp_path / "odd"
    odd.mkdir()
    np.zeros((5, 3), np.float32).tofile(odd / "000000.bin")
    capsys.readouterr()
    assert main(["evaluate-files", str(odd), str(odd), "--emd", "none", "--no-plots",
                 "--no-progress", "--out", str(tmp_path / "o2")]) == 1
    assert "pass --gt-bin-format xyz" in capsys.readouterr().err     # the option of that folder
    assert main(["evaluate-files", str(odd), str(odd), "--bin-format", "xyz", "--emd", "none",
                 "--no-plots", "--no-progress", "--out", str(tmp_path / "o3")]) == 0


def test_evaluate_files_help_documents_bin_format(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate-files", "--help"])
    assert "--bin-format" in capsys.readouterr().out


# ---------------------------------------------------------------------- 3. empty predictions
def test_an_empty_prediction_is_a_miss_and_is_reported(tmp_path, capsys):
    r = np.random.default_rng(0)
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir(), gt_dir.mkdir()
    gt = r.uniform(-8, 8, (800, 3)).astype(np.float32)
    for stem in ("a", "b"):
        np.save(gt_dir / f"{stem}.npy", gt)
    np.save(pred_dir / "a.npy", gt[:600] + np.float32(0.01))        # good: every point matched
    np.save(pred_dir / "b.npy", np.zeros((0, 3), np.float32))       # empty
    out = tmp_path / "o"
    assert main(["evaluate-files", str(pred_dir), str(gt_dir), "--emd", "none", "--no-plots",
                 "--no-progress", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "1 of 2 frames had an empty prediction" in captured.err
    assert "(over 1 frame; 1 with an empty prediction left out)" in captured.out   # beside CD
    s = json.loads((out / "summary.json").read_text())
    assert s["empty_predictions"] == {"count": 1, "frames": ["b"]}
    assert s["cd"]["frames"] == 1 and s["cd"]["empty_predictions"] == 1
    recs = {r["frame"]: r for r in read_records(out / "frames.jsonl")}
    good = recs["a"]["prf"]
    for k in ("0.05", "0.1", "auc"):
        assert s["prf"][k]["precision"] == pytest.approx(good[k][0])    # undefined: left out
        assert s["prf"][k]["recall"] == pytest.approx(good[k][1] / 2)   # the miss counts as 0
        assert s["prf"][k]["fscore"] == pytest.approx(good[k][2] / 2)
        assert s["prf"][k]["frames"] == {"precision": 1, "recall": 2, "fscore": 2}
    assert s["prf"]["auc"]["recall"] < 0.75
    empty = recs["b"]
    assert empty["empty_prediction"] is True and empty["prf"]["auc"] == [None, 0.0, 0.0]
    assert "empty prediction" in (out / "summary.md").read_text()


def test_a_model_that_outputs_nothing_is_counted(tmp_path):
    """`evaluate` takes the same path: a completion of 0 points (here from the predictor), and
    records of earlier runs that hold NaN P/R/F for such a frame."""
    gt = np.random.default_rng(1).uniform(-5, 5, (500, 3))

    def predict(key, index, inp):
        return (gt if key == "a" else np.zeros((0, 3))), {"total": 0.1}

    s = run_evaluation(["a", "b"], lambda key: (None, gt), predict, tmp_path, {"identity_keys": []},
                       EvalOptions(emd="none", plots=False, progress=False))
    assert s["empty_predictions"]["count"] == 1 and s["prf"]["auc"]["fscore"] == pytest.approx(0.5)
    old = sorted(read_records(tmp_path / "frames.jsonl"), key=lambda r: r["frame"])
    old[1].pop("empty_prediction")
    old[1]["prf"] = {k: [None, None, None] for k in old[1]["prf"]}
    assert summarize(old)["prf"]["auc"]["recall"] == pytest.approx(0.5)


# ----------------------------------------------------------------- 4. bad folders and files
def test_missing_input_dir_is_a_one_line_error(tmp_path, capsys):
    d = tmp_path / "c"
    d.mkdir()
    np.save(d / "a.npy", np.random.default_rng(0).uniform(-5, 5, (200, 3)).astype(np.float32))
    assert main(["evaluate-files", str(d), str(d), "--input-dir", str(tmp_path / "nonexistent"),
                 "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: input-scan folder") and "nonexistent" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_nan_prediction_is_a_failed_frame_named_by_its_file(tmp_path, capsys):
    r = np.random.default_rng(0)
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir(), gt_dir.mkdir()
    for stem in ("a", "b", "c"):
        gt = r.uniform(-5, 5, (300, 3)).astype(np.float32)
        np.save(gt_dir / f"{stem}.npy", gt)
        pred = gt + np.float32(0.01)
        if stem == "b":
            pred[7, 1] = np.nan
        np.save(pred_dir / f"{stem}.npy", pred)
    out = tmp_path / "o"
    assert main(["evaluate-files", str(pred_dir), str(gt_dir), "--emd", "none", "--no-plots",
                 "--no-progress", "--out", str(out)]) == 1           # a failed frame: exit 1
    s = json.loads((out / "summary.json").read_text())
    assert s["failed_frames"] == ["b"] and s["cd"]["frames"] == 2
    failed = {r["frame"]: r for r in read_records(out / "frames.jsonl")}["b"]
    assert "b.npy" in failed["error"] and "NaN" in failed["error"]
    # a ground-truth file with NaN ends the run, naming the file
    np.save(gt_dir / "a.npy", np.full((10, 3), np.nan, np.float32))
    capsys.readouterr()
    assert main(["evaluate-files", str(pred_dir), str(gt_dir), "--emd", "none", "--no-plots",
                 "--no-progress", "--restart", "--out", str(out)]) == 1
    assert "a.npy" in capsys.readouterr().err


# ------------------------------------------------------------------ 5. failed frames are apart
def test_failed_frames_are_counted_apart_and_the_run_exits_1(tmp_path, capsys):
    """A prediction that cannot be read is a failed frame: not among the frames evaluated (console
    line, summary.md headline, IoU rows), named, and the command exits 1."""
    r = np.random.default_rng(3)
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir(), gt_dir.mkdir()
    for stem in ("f0", "f1", "f2", "f3"):
        gt = r.uniform(-5, 5, (300, 3)).astype(np.float32)
        np.save(gt_dir / f"{stem}.npy", gt)
        np.save(pred_dir / f"{stem}.npy", gt + np.float32(0.01))
    (pred_dir / "f3.npy").write_bytes(b"not an array")                   # unreadable
    out = tmp_path / "o"
    args = ["evaluate-files", str(pred_dir), str(gt_dir), "--emd", "none", "--no-plots",
            "--no-progress", "--out", str(out)]
    assert main(args) == 1
    res = capsys.readouterr()
    assert "frames 3 evaluated, 1 failed" in res.out
    assert "error: 1 of 4 frames failed" in res.err and "f3" in res.err
    s = json.loads((out / "summary.json").read_text())
    assert s["frames"] == 3 and s["failed_frames"] == ["f3"] and s["iou_frames"] == 3
    md = (out / "summary.md").read_text()
    assert "3 frames evaluated, 1 failed" in md
    iou_rows = [line for line in md.splitlines() if line.startswith("| IoU (")]
    assert len(iou_rows) == 3 and all(row.split(" | ")[-2] == "3" for row in iou_rows), iou_rows
    assert main(args) == 1                      # a rerun keeps the failed frame, and says so again
    # with every frame evaluated, exit 0
    np.save(pred_dir / "f3.npy", np.load(gt_dir / "f3.npy"))
    assert main(args + ["--restart"]) == 0


def test_summary_md_tables_have_no_stray_cell_separators():
    """Every row of summary.md's tables has as many cells as its header: a "|" inside a cell
    (|x| <= 50 m) must be escaped, or Markdown splits the row there."""
    import re
    rec = {"frame": "a", "cd": 0.2, "jsd_bev": 0.3, "emd": 1.0, "emd_published": 2.0,
           "iou": {e: {k: [1, 1, 0] for k in ("0.5", "0.2", "0.1")} for e in ("full", "legacy")},
           "prf": {k: [0.5, 0.5, 0.5] for k in ("0.05", "0.1", "auc")}, "timings": {"total": 1.0}}
    md = summary_markdown(summarize([rec, dict(rec, frame="b"), {"frame": "c", "error": "x"}]))
    cells = None
    for line in md.splitlines():
        if not line.startswith("|"):
            cells = None
            continue
        n = len(re.split(r"(?<!\\)\|", line))
        cells = n if cells is None else cells
        assert n == cells, line
    assert r"\|x\|" in md


def test_metric_workers_0_computes_metrics_between_the_timed_completions(tmp_path, monkeypatch):
    """With 0 metric workers no metric runs while a frame is being completed: each frame's metrics
    come after its completion and before the next one starts (the time per scan is the
    completion's alone)."""
    from lidar_completion.evaluation import runner
    gt = np.random.default_rng(4).uniform(-5, 5, (300, 3))
    events = []
    real = runner.frame_metrics

    def metrics(pred, target, emd):
        events.append("metrics")
        return real(pred, target, emd)

    def predict(key, index, inp):
        events.append(f"predict {key}")
        return gt + 0.01, {"total": 0.1}

    monkeypatch.setattr(runner, "frame_metrics", metrics)
    s = run_evaluation(list("abc"), lambda key: (None, gt), predict, tmp_path, {"identity_keys": []},
                       EvalOptions(emd="none", plots=False, progress=False, metric_workers=0))
    assert events == ["predict a", "metrics", "predict b", "metrics", "predict c", "metrics"]
    assert s["frames"] == 3 and s["run"]["metric_workers"] == 0
    with pytest.raises(ConfigError, match="metric_workers"):
        EvalOptions(metric_workers=-1)


def test_metric_workers_0_from_the_command_line(tmp_path, capsys):
    d = tmp_path / "c"
    d.mkdir()
    np.save(d / "a.npy", np.random.default_rng(0).uniform(-5, 5, (200, 3)).astype(np.float32))
    assert main(["evaluate-files", str(d), str(d), "--metric-workers", "0", "--emd", "none",
                 "--no-plots", "--no-progress", "--out", str(tmp_path / "o")]) == 0
    with pytest.raises(SystemExit):
        main(["evaluate-files", str(d), str(d), "--metric-workers", "-1"])
    assert "expected an integer >= 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 12. seeds
@pytest.mark.parametrize("seed", ["-3", "2147483648"])
def test_evaluate_refuses_a_seed_complete_refuses(tmp_path, capsys, seed):
    assert main(["evaluate", str(tmp_path / "no_dataset"), "--seed", seed, "--baseline", "input",
                 "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "seed" in err and "0..2147483647" in err, err
    assert not (tmp_path / "o").exists()


def test_the_last_frame_seed_must_be_a_valid_seed(tmp_path):
    """Frame i is completed with seed + i: that seed must be one `complete --seed` takes."""
    gt = np.random.default_rng(5).uniform(-5, 5, (200, 3))

    def predict(key, index, inp):
        return gt, {}

    top = 2**31 - 1
    with pytest.raises(ConfigError, match=f"frame 20 would be completed with seed {top + 18}"):
        run_evaluation(["000000", "000010", "000020"], lambda k: (None, gt), predict, tmp_path / "o",
                       {"identity_keys": []}, EvalOptions(emd="none", plots=False, progress=False,
                                                          seed=top - 2), indices=[0, 10, 20])
    assert not (tmp_path / "o").exists()            # refused before anything is written
    s = run_evaluation(["a", "b"], lambda k: (None, gt), predict, tmp_path / "p", {"identity_keys": []},
                       EvalOptions(emd="none", plots=False, progress=False, seed=top - 1))
    assert s["frames"] == 2


# ----------------------------------------------------------------------------- 17. help
@pytest.mark.parametrize("command", ["evaluate", "evaluate-files"])
def test_help_shows_the_defaults_of_emd_metric_workers_and_out(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default both)" in text and "(default 1)" in text
    assert "(default evaluation_<" in text
    assert "exit status" in text


# ------------------------------------------- 4. evaluate-files: files that change, folders apart
def _pairs(tmp_path, n=3, seed=0):
    """``n`` (prediction, ground truth) .npy pairs in tmp_path/pred, tmp_path/gt."""
    from lidar_completion.io import write_cloud
    r = np.random.default_rng(seed)
    for k in range(n):
        gt = r.uniform(-8, 8, (800, 3)).astype(np.float32)
        write_cloud(tmp_path / "pred" / f"{k:06d}.npy", gt[:600] + r.normal(0, 0.05, (600, 3)).astype(np.float32))
        write_cloud(tmp_path / "gt" / f"{k:06d}.npy", gt)
    return tmp_path / "pred", tmp_path / "gt"


def test_a_resumed_evaluate_files_scores_again_the_frames_whose_files_changed(tmp_path, caplog):
    """Resuming into the same --out used to report the numbers of files that had changed since (the
    run was named by its folders' paths only): a frame whose prediction or ground truth is another
    file now (size or modification time) is scored again; the others are kept."""
    import logging
    import os

    from lidar_completion.io import read_cloud, write_cloud
    pred, gt = _pairs(tmp_path)
    opts = EvalOptions(emd="none", progress=False, plots=False)
    first = evaluate_files(pred, gt, tmp_path / "o", options=opts)
    fresh_cd = {r["frame"]: r["cd"] for r in read_records(tmp_path / "o" / "frames.jsonl")}
    moved = read_cloud(gt / "000001.npy") + np.float32(20.0)
    write_cloud(gt / "000001.npy", moved)
    st = (gt / "000001.npy").stat()
    os.utime(gt / "000001.npy", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # a later time, surely
    with caplog.at_level(logging.INFO):
        again = evaluate_files(pred, gt, tmp_path / "o", options=opts)
    assert "1 frame(s) scored before have other files now" in caplog.text and "000001" in caplog.text
    recs = read_records(tmp_path / "o" / "frames.jsonl")
    assert len(recs) == 4 and recs[-1]["frame"] == "000001" and recs[-1]["cd"] > fresh_cd["000001"] + 10
    reference = evaluate_files(pred, gt, tmp_path / "fresh", options=opts)
    assert again["cd"]["mean"] == pytest.approx(reference["cd"]["mean"], rel=1e-12)
    assert again["cd"]["mean"] != pytest.approx(first["cd"]["mean"])
    # and nothing else changed: a third run computes nothing
    before = (tmp_path / "o" / "frames.jsonl").read_text()
    evaluate_files(pred, gt, tmp_path / "o", options=opts)
    assert (tmp_path / "o" / "frames.jsonl").read_text() == before


def test_an_empty_ground_truth_file_ends_the_run_naming_it(tmp_path, capsys):
    """An empty ground truth used to be scored silently (CD left out, every predicted voxel a false
    positive of IoU), exit status 0."""
    pred, gt = _pairs(tmp_path)
    np.save(gt / "000002.npy", np.zeros((0, 3), np.float32))
    assert main(["evaluate-files", str(pred), str(gt), "--emd", "none", "--no-plots", "--no-progress",
                 "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "000002.npy: the ground truth holds no points" in err


def test_predictions_and_ground_truth_bin_formats_apart(synth, tmp_path, tiny_ckpt):
    """`complete` writes KITTI .bin completions; targets copied out of the cache are x, y, z: one
    --bin-format for both folders read one of them wrongly (a silently wrong CD). --pred-bin-format
    / --gt-bin-format set each folder's layout; the result equals the cache read in place."""
    targets = synth / "gt_cache" / "08" / "targets"
    preds = tmp_path / "preds"
    assert main(["complete", str(synth / "sequences" / "08" / "velodyne"), "-o", str(preds) + "/",
                 "--checkpoint", str(tiny_ckpt), "--steps", "1", "--n-fps", "300", "--tile", "2",
                 "--no-refine", "--seed", "0", "--backend", "torch"]) == 0
    copied = tmp_path / "copied"
    shutil.copytree(targets, copied)
    common = ["--emd", "none", "--no-plots", "--no-progress"]
    assert main(["evaluate-files", str(preds), str(targets), "--out", str(tmp_path / "in_place")] + common) == 0
    assert main(["evaluate-files", str(preds), str(copied), "--gt-bin-format", "xyz",
                 "--out", str(tmp_path / "apart")] + common) == 0
    in_place = json.loads((tmp_path / "in_place" / "summary.json").read_text())
    apart = json.loads((tmp_path / "apart" / "summary.json").read_text())
    assert apart["run"]["bin_format"] == {"pred": "kitti", "gt": "xyz"} == in_place["run"]["bin_format"]
    assert apart["cd"]["mean"] == in_place["cd"]["mean"]
    # `complete --bin-format xyz` writes x, y, z .bin completions: read with --pred-bin-format xyz
    xyz_preds = tmp_path / "xyz_preds"
    for scan in sorted((synth / "sequences" / "08" / "velodyne").glob("*.bin")):
        raw = np.fromfile(scan, np.float32).reshape(-1, 4)[:, :3]
        raw.tofile(tmp_path / scan.name)
    assert main(["complete", *sorted(str(p) for p in tmp_path.glob("00000*.bin")), "-o", str(xyz_preds),
                 "--bin-format", "xyz", "--checkpoint", str(tiny_ckpt), "--steps", "1", "--n-fps", "300",
                 "--tile", "2", "--no-refine", "--seed", "0", "--backend", "torch"]) == 0
    for p in sorted(xyz_preds.glob("*.bin")):
        assert np.array_equal(np.fromfile(p, np.float32).reshape(-1, 3),
                              np.fromfile(preds / p.name, np.float32).reshape(-1, 4)[:, :3])
    assert main(["evaluate-files", str(xyz_preds), str(copied), "--bin-format", "xyz",
                 "--out", str(tmp_path / "both_xyz")] + common) == 0
    both = json.loads((tmp_path / "both_xyz" / "summary.json").read_text())
    assert both["cd"]["mean"] == in_place["cd"]["mean"]


def test_restart_and_reruns_leave_no_renders_of_other_frames(tmp_path):
    """Renders are named after their frame: a run whose best / worst frames were others left the
    earlier run's PNGs beside its own, and --restart kept them too."""
    pred, gt = _pairs(tmp_path, n=4)
    opts = EvalOptions(emd="none", progress=False)
    s = evaluate_files(pred, gt, tmp_path / "o", options=opts)
    (tmp_path / "o" / "bev_best1_999999.png").write_bytes(b"an old render")
    (tmp_path / "o" / "notes.txt").write_text("the user's own file")
    evaluate_files(pred, gt, tmp_path / "o", options=opts)
    renders = sorted(p.name for p in (tmp_path / "o").glob("bev_*.png"))
    assert renders == sorted(s["renders"])
    (tmp_path / "o" / "bev_worst1_999999.png").write_bytes(b"an old render")
    evaluate_files(pred, gt, tmp_path / "o", options=EvalOptions(emd="none", progress=False, plots=False,
                                                                  restart=True))
    assert not list((tmp_path / "o").glob("bev_*.png")) and not (tmp_path / "o" / "cd_histogram.png").exists()
    assert (tmp_path / "o" / "notes.txt").is_file() and (tmp_path / "o" / "summary.json").is_file()


def test_evaluate_files_crops_predictions_to_the_published_range(tmp_path, capsys):
    """The published evaluation keeps a completion read from a file within 50 m of the sensor
    (LiDiff's eval_path: range < max_range) before any metric; without it, points a model put
    beyond 50 m entered CD, P/R/F and EMD here, and numbers of other code were not comparable."""
    from lidar_completion import metrics as M
    from lidar_completion.io import write_cloud
    r = np.random.default_rng(3)
    gt = r.uniform(-30, 30, (2000, 3)).astype(np.float32)
    gt[:, 2] = r.uniform(-2, 2, 2000)
    far = r.uniform(-80, 80, (300, 3)).astype(np.float32)
    far = far[np.linalg.norm(far, axis=1) >= 50.5]
    pred = np.vstack([gt[:1500] + 0.02, far])
    write_cloud(tmp_path / "pred" / "000000.npy", pred)
    write_cloud(tmp_path / "gt" / "000000.npy", gt)
    common = ["--emd", "none", "--no-plots", "--no-progress"]
    assert main(["evaluate-files", str(tmp_path / "pred"), str(tmp_path / "gt"), "--out",
                 str(tmp_path / "o")] + common) == 0
    rec = read_records(tmp_path / "o" / "frames.jsonl")[0]
    assert rec["n_pred"] == 1500 and rec["cd"] == pytest.approx(M.chamfer_distance(gt[:1500] + 0.02, gt))
    assert main(["evaluate-files", str(tmp_path / "pred"), str(tmp_path / "gt"), "--out",
                 str(tmp_path / "all"), "--max-range", "0"] + common) == 0
    assert read_records(tmp_path / "all" / "frames.jsonl")[0]["n_pred"] == len(pred)
    capsys.readouterr()                     # another range is another run: not resumed into
    assert main(["evaluate-files", str(tmp_path / "pred"), str(tmp_path / "gt"), "--out",
                 str(tmp_path / "o"), "--max-range", "0"] + common) == 1
    assert "settings differ: pred_max_range" in capsys.readouterr().err


def test_frames_where_a_metric_is_undefined_are_named(tmp_path, capsys):
    """JSD is undefined on a frame with no point inside its +-50 m cube (a prediction and target
    far out): left out of the JSD means, the summary names the frame and why (it was only counted)."""
    from lidar_completion.io import write_cloud
    r = np.random.default_rng(4)
    near = r.uniform(-20, 20, (1500, 3)).astype(np.float32)
    far = near + np.float32([80.0, 0.0, 0.0])                  # x in 60..100 m: outside the cube
    for stem, cloud in (("000000", near), ("000001", far)):
        write_cloud(tmp_path / "pred" / f"{stem}.npy", cloud + np.float32(0.02))
        write_cloud(tmp_path / "gt" / f"{stem}.npy", cloud)
    out = tmp_path / "o"
    assert main(["evaluate-files", str(tmp_path / "pred"), str(tmp_path / "gt"), "--out", str(out),
                 "--max-range", "0", "--emd", "none", "--no-plots", "--no-progress"]) == 0
    err = capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    assert s["cd"]["frames"] == 2 and s["cd"]["undefined_frames"] == []
    for key in ("jsd_bev", "jsd_3d"):
        assert s[key]["frames"] == 1 and s[key]["undefined"] == 1 and s[key]["undefined_frames"] == ["000001"]
    assert "JSD-BEV is undefined on 1 frame (000001): no point" in err
    md = (out / "summary.md").read_text()
    assert "(frames 000001: no point of the prediction or of the target inside the +-50 m cube)" in md


def test_the_input_baseline_refuses_completion_settings(synth, tmp_path, capsys):
    """--baseline input with --min-range / --steps scored the cached scan as it is, saying nothing."""
    assert main(["evaluate", str(synth), "--baseline", "input", "--min-range", "10", "--steps", "3",
                 "--out", str(tmp_path / "o")]) == 1
    assert "--steps, --min-range would change nothing" in capsys.readouterr().err


def test_bin_format_auto_is_accepted_as_its_help_says(capsys):
    from lidar_completion.cli import build_parser

    args = build_parser().parse_args(["evaluate-files", "p", "g", "--bin-format", "auto"])
    assert args.bin_format == "auto"


def test_a_resume_without_plots_leaves_no_plots_of_the_earlier_run(tmp_path):
    """A run of 1 frame with plots, resumed for 3 frames with --no-plots, kept the 1-frame run's
    histogram and renders beside the 3-frame summary."""
    rng = np.random.default_rng(0)
    for d in ("p", "g"):
        (tmp_path / d).mkdir()
    for i in range(3):
        gt = rng.uniform(-10, 10, (300, 3)).astype(np.float32)
        np.save(tmp_path / "g" / f"{i:06d}.npy", gt)
        np.save(tmp_path / "p" / f"{i:06d}.npy", gt + rng.normal(0, 0.1, gt.shape).astype(np.float32))
    out = tmp_path / "out"
    evaluate_files(tmp_path / "p", tmp_path / "g", out, options=EvalOptions(emd="none", progress=False,
                                                                           plots=True, limit=1))
    assert (out / "cd_histogram.png").exists() and list(out.glob("bev_best*_*.png"))
    evaluate_files(tmp_path / "p", tmp_path / "g", out, options=EvalOptions(emd="none", progress=False,
                                                                           plots=False))
    assert json.loads((out / "summary.json").read_text())["frames"] == 3
    assert not (out / "cd_histogram.png").exists() and not list(out.glob("bev_*.png"))


def test_targets_copied_out_of_the_cache_are_said_to_be_scored_whole(synth, tmp_path, caplog):
    """Copied out of the cache, its targets lose the z band evaluate scores them in: the numbers
    changed (CD 0.08 -> 0.22 m with points above 4.4 m) without a word."""
    copied = tmp_path / "copied"
    shutil.copytree(synth / "gt_cache" / "08" / "targets", copied)
    with caplog.at_level("WARNING", logger="lidar_completion.evaluation.sources"):
        evaluate_files(copied, copied, tmp_path / "o", options=OPTS, bin_format="xyz")
    assert "is not a folder of the ground-truth cache: its targets are scored whole" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="lidar_completion.evaluation.sources"):
        evaluate_files(copied, synth / "gt_cache" / "08", tmp_path / "o2", options=OPTS, bin_format="xyz")
    assert "scored whole" not in caplog.text


def test_an_interrupted_evaluation_frees_its_folder_for_the_next(tmp_path):
    """The folder lock an evaluation holds ends with it however it ends (Ctrl-C here): the next
    evaluation into the folder, in the same process, resumes instead of being refused."""
    gt = np.random.default_rng(5).uniform(-5, 5, (200, 3))

    def interrupted(key, index, inp):
        if key == "b":
            raise KeyboardInterrupt
        return gt, {}

    opts = EvalOptions(emd="none", plots=False, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(["a", "b"], lambda k: (None, gt), interrupted, tmp_path / "o",
                       {"identity_keys": []}, opts)
    s = run_evaluation(["a", "b"], lambda k: (None, gt), lambda k, i, x: (gt, {}), tmp_path / "o",
                       {"identity_keys": []}, opts)
    assert s["frames"] == 2
