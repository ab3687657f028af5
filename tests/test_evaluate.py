"""`lidar-completion evaluate` / `evaluate-files` and the evaluation loop (issue 8)."""
import contextlib
import io
import json
from dataclasses import replace

import numpy as np
import pytest
from scipy.integrate import simpson

from lidar_completion import metrics as M
from lidar_completion.cli import main
from lidar_completion.evaluation import (
    EvalOptions, evaluate_files, evaluate_sequence, frame_metrics, print_summary, read_records, summarize,
    summary_markdown,
)
from lidar_completion.settings import CompletionSettings

PLOTS = ["cd_histogram.png", "metrics_over_sequence.png"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A 3-frame synthetic sequence 08 with its ground-truth cache."""
    from lidar_completion.data import build_gt
    from lidar_completion.data.synthetic import generate_dataset
    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root, sequences=["08"], scans=3, seed=0)
    build_gt(root, ["08"])
    return root


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from lidar_completion.checkpoints import make_random_checkpoint
    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", seed=0)


def small_completer(path, **kw):
    """The Completer with a reduced point budget (300 x 2) so that CPU tests take seconds."""
    from lidar_completion.completer import Completer
    kw = {"steps": 1, "refine": False, "n_fps": 300, "tile": 2, **kw}
    return Completer.from_checkpoint(path, backend="torch", **kw)


def lines(path):
    return path.read_text().splitlines()


# ------------------------------------------------------------------------------------- per frame
def test_frame_metrics_agree_with_metric_functions():
    r = np.random.default_rng(0)
    gt = r.uniform(-10, 10, (2000, 3))
    pred = gt[:1500] + r.normal(0, 0.05, (1500, 3))
    rec = frame_metrics(pred, gt, emd="both")
    assert rec["cd"] == pytest.approx(M.chamfer_distance(pred, gt), abs=1e-12)
    assert rec["jsd_bev"] == M.jsd_bev(pred, gt) and rec["jsd_3d"] == M.jsd_3d(pred, gt)
    assert rec["emd"] == pytest.approx(M.emd(pred, gt), abs=1e-9) and rec["emd_method"] == "exact"
    assert rec["emd_published"] == pytest.approx(M.emd_published(pred, gt), rel=1e-9)
    assert set(rec["iou"]) == {"full", "legacy", "lidiff2025"}
    for ext in ("full", "legacy", "lidiff2025"):
        for vs in (0.5, 0.2, 0.1):
            assert tuple(rec["iou"][ext][f"{vs:g}"]) == M.iou_counts(pred, gt, vs, ext)
    for t in (0.05, 0.1):
        assert rec["prf"][f"{t:g}"] == pytest.approx(M.precision_recall_fscore(pred, gt, t))
    # the published area variant: P/R/F at 100 thresholds in [0.05, 0.1], normalised Simpson area
    thr = np.linspace(0.05, 0.1, 100)
    prf = np.array([M.precision_recall_fscore(pred, gt, t) for t in thr])
    ref = [simpson(prf[:, k], dx=thr[1] - thr[0]) / simpson(np.ones(100), dx=thr[1] - thr[0])
           for k in range(3)]
    assert rec["prf"]["auc"] == pytest.approx(ref, abs=1e-9)
    assert "emd" not in frame_metrics(pred, gt, emd="none")


def test_summary_aggregates_and_labels():
    recs = [{"frame": "a", "cd": 0.2, "jsd_bev": 0.3, "emd": 1.0, "emd_published": None,
             "iou": {e: {k: [1, 1, 0] for k in ("0.5", "0.2", "0.1")} for e in ("full", "legacy")},
             "prf": {k: [0.5, 0.5, 0.5] for k in ("0.05", "0.1", "auc")}},
            {"frame": "b", "cd": 0.4, "jsd_bev": 0.5, "emd": 3.0, "emd_published": 20.0,
             "iou": {e: {k: [3, 0, 1] for k in ("0.5", "0.2", "0.1")} for e in ("full", "legacy")},
             "prf": {k: [1.0, 0.0, 0.0] for k in ("0.05", "0.1", "auc")}}]
    s = summarize(recs, {"label": "m", "steps": 8})
    assert s["cd"]["mean"] == pytest.approx(0.3) and s["emd"]["mean"] == pytest.approx(2.0)
    assert s["emd_published"]["mean"] == 20.0 and s["emd_published"]["dropped_frames"] == 1
    assert s["iou"]["full"]["0.5"]["iou"] == pytest.approx(4 / 6)      # TP/FP/FN summed, not averaged
    assert s["prf"]["auc"]["precision"] == pytest.approx(0.75)
    assert s["best_frames"] == ["a"] and s["worst_frames"] == ["b"]
    many = [dict(recs[0], frame=f"{i}", cd=0.1 * i) for i in range(8)]
    s8 = summarize(many)
    assert s8["best_frames"] == ["0", "1", "2"] and s8["worst_frames"] == ["7", "6", "5"]
    # frames scored before the lidiff2025 variant existed: it is left out, not summed over part
    assert set(s["iou"]) == {"full", "legacy"}
    mixed = summarize([recs[0], dict(recs[1], iou=dict(recs[1]["iou"], lidiff2025=recs[1]["iou"]["full"]))])
    assert set(mixed["iou"]) == {"full", "legacy"}
    both = summarize([dict(r, iou=dict(r["iou"], lidiff2025=r["iou"]["full"])) for r in recs])
    assert both["iou"]["lidiff2025"]["0.5"]["iou"] == pytest.approx(4 / 6)
    assert "LiDiff's code since June 2025" in summary_markdown(both)
    # ... and said so, naming the frames: in summary.md and in the warning after the run
    assert s["iou_not_scored"] == {"lidiff2025": ["a", "b"]} and mixed["iou_not_scored"] == {"lidiff2025": ["a"]}
    assert "iou_not_scored" not in both
    row = next(line for line in summary_markdown(mixed).splitlines() if "LiDiff's code since June 2025" in line)
    assert "not summed: 1 frame (a)" in row and "--restart" in row and "%" not in row
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        print_summary(mixed, "OUT", stream=io.StringIO())
    assert "IoU 'lidiff2025' is not in the summary: 1 frame (a)" in err.getvalue()
    md = summary_markdown(s)
    for label in ("JSD-BEV (Jensen-Shannon distance, as published)", "EMD (published variant)",
                  "legacy: the published tables' variant", "IoU 0.5 [%] (±50 m)", "time per scan", "| m | 8 |"):
        assert label in md


# ------------------------------------------------------------------------ sequence, baseline
def test_evaluate_baseline_cli_resume_and_outputs(synth, tmp_path, capsys):
    out = tmp_path / "ev"
    args = ["evaluate", str(synth), "--sequence", "08", "--baseline", "input", "--emd", "published",
            "--out", str(out), "--no-progress"]
    assert main(args + ["--limit", "2", "--no-plots"]) == 0
    first = lines(out / "frames.jsonl")
    assert [json.loads(x)["frame"] for x in first] == ["000000", "000001"]      # fixed order
    # a kill mid-write leaves a torn line: it is ignored and the next record starts a new line
    with open(out / "frames.jsonl", "a") as fh:
        fh.write('{"frame": "000002", "cd": 0.')
    assert main(args) == 0                                                        # resumes
    now = lines(out / "frames.jsonl")
    assert now[:2] == first                                                      # not recomputed
    recs = read_records(out / "frames.jsonl")
    assert [r["frame"] for r in recs] == ["000000", "000001", "000002"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"] == 3 and summary["run"]["source"] == "input scan (no model)"
    assert summary["cd"]["mean"] == pytest.approx(np.mean([r["cd"] for r in recs]))
    tp = sum(r["iou"]["full"]["0.5"][0] for r in recs)
    union = sum(sum(r["iou"]["full"]["0.5"]) for r in recs)
    assert summary["iou"]["full"]["0.5"]["iou"] == pytest.approx(tp / union)
    assert summary["time_per_scan"] is None and "emd" not in summary
    assert 0 < summary["cd"]["mean"] < 0.5                  # the scan lies on the GT surfaces
    md = (out / "summary.md").read_text()
    assert "| input scan alone | - |" in md and "EMD (published variant)" in md
    for name in PLOTS + summary["renders"]:
        assert (out / name).stat().st_size > 1000
    # 3 frames: the two best and the worst, each once (6 renders from 6 frames on)
    assert sorted(n.split("_")[1] for n in summary["renders"]) == ["best1", "best2", "worst1"]
    assert "CD 0." in capsys.readouterr().out

    # the same frames with other settings are refused, --restart discards them
    assert main(args + ["--seed", "3", "--no-plots"]) == 1
    assert "different run" in capsys.readouterr().err
    assert main(args + ["--every", "2", "--emd", "none", "--restart", "--no-plots"]) == 0
    assert [r["frame"] for r in read_records(out / "frames.jsonl")] == ["000000", "000002"]


def test_evaluate_errors(synth, tmp_path, tiny_ckpt, capsys):
    assert main(["evaluate", str(synth), "--sequence", "08", "--baseline", "input",
                 "--checkpoint", str(tiny_ckpt), "--out", str(tmp_path / "x")]) == 1
    assert "drop" in capsys.readouterr().err
    assert main(["evaluate", str(synth), "--sequence", "05", "--baseline", "input",
                 "--out", str(tmp_path / "y")]) == 1
    assert "error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", str(synth), "--every", "0", "--baseline", "input"])


# ------------------------------------------------------------------------------ sequence, model
def test_evaluate_model_end_to_end_with_resume(synth, tiny_ckpt, tmp_path):
    completer = small_completer(tiny_ckpt)
    calls = []
    original = completer.complete_detailed

    def counted(points, seed=None):
        calls.append(seed)
        return original(points, seed=seed)

    completer.complete_detailed = counted
    kw = dict(sequence="08", settings=CompletionSettings(checkpoint=str(tiny_ckpt)),
              completer=completer)
    opts = EvalOptions(seed=7, emd="none", progress=False, plots=False)
    out = tmp_path / "model"
    s2 = evaluate_sequence(synth, out=out, options=replace(opts, limit=2), **kw)
    assert s2["frames"] == 2 and calls == [7, 8]                   # frame i uses seed + i
    s3 = evaluate_sequence(synth, out=out, options=replace(opts, plots=True), **kw)
    assert calls[2] == 9                                            # only frame 2 completed anew
    assert all(c in (7, 8, 9) for c in calls[3:])                   # renders may recompute, same seeds
    assert s3["frames"] == 3 and s3["run"]["steps"] == 1 and s3["run"]["refine"] is False
    assert s3["time_per_scan"]["frames"] == 3 and s3["time_per_scan"]["mean"] > 0
    assert s3["run"]["checkpoint"]["sha256"]
    assert (out / "bev_best1_" f"{s3['best_frames'][0]}.png").is_file()
    # seeded: a fresh run in another folder gives the same per-frame numbers
    evaluate_sequence(synth, out=tmp_path / "again", options=replace(opts, limit=1),
                      **kw)
    a = read_records(out / "frames.jsonl")[0]
    b = read_records(tmp_path / "again" / "frames.jsonl")[0]
    assert a["frame"] == b["frame"] == "000000" and a["cd"] == b["cd"] and a["iou"] == b["iou"]
    # a different checkpoint setting on the same folder is refused
    from lidar_completion.errors import ConfigError
    with pytest.raises(ConfigError, match="different run"):
        evaluate_sequence(synth, out=out, options=opts, **dict(kw, completer=small_completer(
            tiny_ckpt, steps=2)))


def test_a_refined_run_from_before_the_refined_cut_is_not_resumed(synth, tiny_ckpt, tmp_path):
    """Since 0.2.0 the refined completion is cut at post_max_range as well: a folder of refined
    frames written before (its identity holds no such cut) was resumed, appending frames of the new
    rule to those of the old one in one summary. Unrefined runs, whose numbers did not change, still
    resume."""
    import json

    from lidar_completion.errors import ConfigError

    opts = EvalOptions(seed=0, emd="none", progress=False, plots=False, limit=1)
    for refine, out in ((True, tmp_path / "refined"), (False, tmp_path / "raw")):
        kw = dict(sequence="08", settings=CompletionSettings(checkpoint=str(tiny_ckpt)),
                  completer=small_completer(tiny_ckpt, refine=refine))
        evaluate_sequence(synth, out=out, options=opts, **kw)
        run = json.loads((out / "run.json").read_text())
        assert ("refined_max_range" in run["identity"]) is refine
        for part in (run["identity"], run["run"]):        # as the earlier version wrote it
            part.pop("refined_max_range", None)
        part["identity_keys"] = [k for k in part["identity_keys"] if k != "refined_max_range"]
        (out / "run.json").write_text(json.dumps(run))
        if refine:
            with pytest.raises(ConfigError, match="refined_max_range not recorded there"):
                evaluate_sequence(synth, out=out, options=replace(opts, limit=2), **kw)
        else:
            assert evaluate_sequence(synth, out=out, options=replace(opts, limit=2), **kw)["frames"] == 2


def test_an_evaluation_into_a_folder_another_one_writes_is_refused(synth, tmp_path):
    """Two evaluations started on one --out checked its run.json before either wrote, then both
    appended their frames (two settings in one summary), or a --restart deleted the files of the
    other while it ran. One evaluation writes a folder at a time: the other is refused before it
    reads or deletes anything."""
    import os

    from lidar_completion.errors import ConfigError
    from lidar_completion.fileutil import hold_folder, release_folder

    out = tmp_path / "shared"
    opts = EvalOptions(seed=0, emd="none", progress=False, plots=False, limit=1)
    evaluate_sequence(synth, out=out, sequence="08", baseline="input", options=opts)
    before = (out / "frames.jsonl").read_bytes()
    held = hold_folder(out, "evaluation")
    try:
        with pytest.raises(ConfigError, match=f"another evaluation \\(host:process [^:]+:{os.getpid()}\\)"):
            evaluate_sequence(synth, out=out, sequence="08", baseline="input",
                              options=replace(opts, restart=True))
        assert (out / "frames.jsonl").read_bytes() == before        # not deleted by the --restart
    finally:
        release_folder(held)
    assert evaluate_sequence(synth, out=out, sequence="08", baseline="input",
                             options=replace(opts, limit=2))["frames"] == 2


def test_evaluate_cli_with_checkpoint(synth, tiny_ckpt, tmp_path, monkeypatch):
    """The CLI path loads the checkpoint through Completer.from_checkpoint (point budget reduced)."""
    from lidar_completion.completer import Completer
    real = Completer.from_checkpoint.__func__
    seen = {}

    def reduced(cls, path=None, **kw):
        seen.update(kw, path=path)
        return real(cls, path, n_fps=300, tile=2, **kw)

    monkeypatch.setattr(Completer, "from_checkpoint", classmethod(reduced))
    out = tmp_path / "cli"
    assert main(["evaluate", str(synth), "--sequence", "08", "--checkpoint", str(tiny_ckpt),
                 "--steps", "1", "--guidance", "2", "--no-refine", "--limit", "1", "--emd", "none",
                 "--no-plots", "--no-progress", "--backend", "torch", "--process", "local",
                 "--out", str(out)]) == 0
    assert seen["steps"] == 1 and seen["guidance"] == 2.0 and seen["refine"] is False
    assert seen["process"] == "local"
    s = json.loads((out / "summary.json").read_text())
    assert s["frames"] == 1 and s["run"]["label"] == "tiny" and s["run"]["guidance"] == 2.0
    assert s["run"]["process"] == "local"
    assert "| tiny | 1 |" in (out / "summary.md").read_text()


# ---------------------------------------------------------------------------------- files
def test_evaluate_files_pairs_by_stem(tmp_path, capsys):
    from lidar_completion.io import write_cloud
    r = np.random.default_rng(1)
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    clouds = {}
    for k, (pext, gext) in enumerate([(".npy", ".bin"), (".ply", ".pcd"), (".bin", ".npy")]):
        gt = r.uniform(-8, 8, (1500, 3)).astype(np.float32)
        pred = (gt[: 1000 + 100 * k] + r.normal(0, 0.05, (1000 + 100 * k, 3))).astype(np.float32)
        write_cloud(pred_dir / f"{k:06d}{pext}", pred)
        write_cloud(gt_dir / f"{k:06d}{gext}", gt)
        clouds[f"{k:06d}"] = (pred, gt)
    write_cloud(pred_dir / "unpaired.npy", gt)
    out = tmp_path / "out"
    assert main(["evaluate-files", str(pred_dir), str(gt_dir), "--out", str(out),
                 "--no-progress"]) == 0
    recs = read_records(out / "frames.jsonl")
    assert [x["frame"] for x in recs] == ["000000", "000001", "000002"]
    for rec in recs:
        pred, gt = clouds[rec["frame"]]
        ref = frame_metrics(pred, gt, emd="both")
        for key in ("cd", "jsd_bev", "jsd_3d", "emd", "emd_published"):
            assert rec[key] == pytest.approx(ref[key], rel=1e-9)
        assert rec["iou"] == {e: {k: list(v) for k, v in d.items()} for e, d in ref["iou"].items()}
    s = json.loads((out / "summary.json").read_text())
    assert s["frames"] == 3 and s["emd"]["frames"] == 3 and s["emd_published"]["frames"] == 3
    for name in PLOTS + s["renders"]:
        assert (out / name).is_file()
    # rerun: nothing recomputed
    before = lines(out / "frames.jsonl")
    assert evaluate_files(pred_dir, gt_dir, out,
                          options=EvalOptions(progress=False, plots=False))["frames"] == 3
    assert lines(out / "frames.jsonl") == before
    # nothing pairs -> a clear error
    capsys.readouterr()
    assert main(["evaluate-files", str(pred_dir), str(tmp_path / "missing"), "--out",
                 str(tmp_path / "o2")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["evaluate-files", str(pred_dir), str(tmp_path / "empty"), "--out",
                 str(tmp_path / "o3")]) == 1
    assert "no file stem is common" in capsys.readouterr().err


def test_run_evaluation_records_failed_frames(tmp_path):
    """A frame the predictor cannot complete is recorded with its error, not fatal, not retried."""
    from lidar_completion.errors import CloudFormatError
    from lidar_completion.evaluation import run_evaluation
    r = np.random.default_rng(2)
    gts = {k: r.uniform(-5, 5, (500, 3)) for k in "abcd"}
    calls = []

    def load(key):
        return None, gts[key]

    def predict(key, index, inp):
        calls.append(key)
        if key == "b":
            raise CloudFormatError("too few points to complete: 3 of 3")
        return gts[key] + 0.01 * index, {"total": 0.5}

    run = {"label": "fake", "identity_keys": []}
    s = run_evaluation(list("abcd"), load, predict, tmp_path, run,
                       EvalOptions(emd="none", plots=False, progress=False, metric_workers=2))
    assert s["frames"] == 3 and s["failed_frames"] == ["b"] and s["cd"]["frames"] == 3
    # the failed frame is counted apart (failed_frames), not as a frame where CD is undefined
    assert s["cd"]["undefined"] == 0 and s["time_per_scan"]["mean"] == 0.5
    assert "could not be completed" in (tmp_path / "summary.md").read_text()
    s = run_evaluation(list("abcd"), load, predict, tmp_path, run,
                       EvalOptions(emd="none", plots=False, progress=False))
    assert calls == list("abcd") and s["failed_frames"] == ["b"]
