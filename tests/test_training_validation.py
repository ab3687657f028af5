"""Validation during training (training/validation.py): held-out frames completed every N steps with
fixed seeds, val/* in the logs, the best weights exported beside the last ones and kept across a
resume."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lidar_completion.fileutil import read_jsonl
from test_training_utils import scenes_source, tiny_config

FRAMES = 2


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """A two-scan synthetic drive (sequence 07 of seed 2) with its ground truth."""
    from lidar_completion.data import build_gt, generate_dataset
    root = tmp_path_factory.mktemp("heldout")
    generate_dataset(root, sequences=[7], scans=FRAMES, seed=2)
    build_gt(root, ["07"])
    return root


def _val(root, every_steps=2, *extra):
    return [f"validation.every_steps={every_steps}", f"validation.root={root}", "validation.sequence='07'",
            "validation.every=1", f"validation.frames={FRAMES}", "validation.steps=2", "validation.seed=5",
            "data.scan_points=160", "data.tile=10", *extra]


def _val_logs(out):
    return [r for r in read_jsonl(out / "metrics.jsonl") if "val/cd" in r]


def _recompute(ckpt, root, guidance, refine=False):
    """The validation's numbers for an exported checkpoint, computed independently."""
    from lidar_completion.completer import Completer
    from lidar_completion.evaluation import SequenceSource
    from lidar_completion.metrics import chamfer_distance, jsd_bev
    comp = Completer.from_checkpoint(ckpt, steps=2, guidance=guidance, refine=refine, backend="torch",
                                     process="local")
    src = SequenceSource(root, "07", every=1, limit=FRAMES)
    cds, jsds = [], []
    for key, i in zip(src.keys, src.indices):
        scan, gt = src.load(key)
        pred = comp.complete_detailed(scan, seed=5 + i).points
        cds.append(chamfer_distance(pred, gt))
        jsds.append(jsd_bev(pred, gt))
    return float(np.mean(cds)), float(np.mean(jsds))


def test_teacher_validates_keeps_the_best_and_resumes(tmp_path, heldout):
    from training.teacher import TeacherTrainer
    out = tmp_path / "run"
    cfg = tiny_config("teacher", "train.max_steps=4", "train.batch_size=1", "checkpoint.every_steps=2",
                      "checkpoint.keep=5", "train.optimizer={name: adam, lr: 0.003}", *_val(heldout),
                      "validation.guidance=2.0")
    TeacherTrainer(cfg, out, source=scenes_source(2, n_target=1600, n_scan=160)).run()
    logs = _val_logs(out)
    assert [r["step"] for r in logs] == [0, 2, 4]                 # at the start, then every 2 steps
    cds = [r["val/cd"] for r in logs]
    assert all(np.isfinite(cds)) and all(0 < r["val/jsd_bev"] <= 0.833 for r in logs)
    assert [r["val/best"] for r in logs] == pytest.approx(list(np.minimum.accumulate(cds)))
    best = json.loads((out / "best" / "validation.json").read_text())
    assert best["step"] == [r["step"] for r in logs][int(np.argmin(cds))] and best["select"] == "cd"
    assert best["value"] == pytest.approx(min(cds))
    # the exported best weights are the ones validated: recomputing gives the logged numbers
    cd, jsd = _recompute(out / "best" / "teacher.pt", heldout, guidance=2.0)
    assert cd == pytest.approx(best["metrics"]["cd"], rel=1e-5)
    assert jsd == pytest.approx(best["metrics"]["jsd_bev"], rel=1e-5)
    assert (out / "teacher.pt").is_file()                          # the last weights beside the best

    # resume for two more steps: no second start-up validation, the best spans the whole run
    cfg6 = dict(cfg, train=dict(cfg["train"], max_steps=6))
    TeacherTrainer(cfg6, out, resume=True, source=scenes_source(2, n_target=1600, n_scan=160)).run()
    logs = _val_logs(out)
    assert [r["step"] for r in logs] == [0, 2, 4, 6]
    best6 = json.loads((out / "best" / "validation.json").read_text())
    assert best6["value"] == pytest.approx(min(r["val/cd"] for r in logs))


def test_refiner_and_student_validate(tmp_path, heldout):
    """The refiner on x_init; the student at its validation steps (refined by distill.refiner)."""
    from training.distill import DistillTrainer
    from training.refiner import RefinerTrainer
    ref_out = tmp_path / "refiner"
    cfg = tiny_config("refiner", "train.max_steps=1", "train.batch_size=1", "refiner.input_points=800",
                      "refiner.target_points=1600", *_val(heldout, 1))
    RefinerTrainer(cfg, ref_out, source=_refiner_source(cfg)).run()
    logs = _val_logs(ref_out)
    assert [r["step"] for r in logs] == [0, 1] and all(np.isfinite(r["val/cd"]) for r in logs)
    assert (ref_out / "best" / "refiner.pt").is_file()

    out = tmp_path / "student"
    cfg = tiny_config("distill", "train.max_steps=1", "train.batch_size=1", "distill.aux_warmup_steps=0",
                      f"distill.refiner={ref_out / 'refiner.pt'}", *_val(heldout, 1, "validation.at_start=false"),
                      mode="dpo")
    DistillTrainer(cfg, out, source=scenes_source(1, n_target=1600, n_scan=160)).run()
    logs = _val_logs(out)
    assert [r["step"] for r in logs] == [1]
    best = json.loads((out / "best" / "validation.json").read_text())
    cd, _ = _recompute(out / "best" / "distill.pt", heldout, guidance=3.5, refine=True)
    assert cd == pytest.approx(best["metrics"]["cd"], rel=1e-5)


def _refiner_source(cfg):
    from training.sources import RefinerView
    r = cfg["refiner"]
    return RefinerView(scenes_source(1, n_target=1600, n_scan=160), r["input_points"], r["target_points"],
                       r["jitter_sigma"], r["jitter_clip"])


def test_validation_needs_frames():
    from lidar_completion.errors import ConfigError
    from training.validation import validation_root
    cfg = tiny_config("teacher", "validation.every_steps=5", "data.kind=npz", "data.root=x.npz")
    with pytest.raises(ConfigError, match="validation.root"):
        validation_root(cfg, "out")


def _best(out, step, select="cd", value=1.0, weights=b"weights"):
    (out / "best").mkdir(parents=True, exist_ok=True)
    (out / "best" / "teacher.pt").write_bytes(weights)
    (out / "best" / "validation.json").write_text(json.dumps(
        {"step": step, "select": select, "value": value, "metrics": {"cd": value, "jsd_bev": value}}))


def test_a_resume_discards_a_best_recorded_after_its_checkpoint(tmp_path, caplog):
    """A run killed between checkpoints could have recorded a best after its last checkpoint; the
    resumed run went on beside those weights of a continuation it abandoned (its logs of those
    steps dropped), and could ship them."""
    from training.teacher import TeacherTrainer
    out = tmp_path / "run"
    cfg = tiny_config("teacher", "train.max_steps=2", "checkpoint.every_steps=2", "checkpoint.export=false")
    source = scenes_source(2, n_target=1200, n_scan=120)
    TeacherTrainer(cfg, out, source=source).run()
    _best(out, 3, weights=b"abandoned")                  # what the killed continuation recorded
    cfg3 = dict(cfg, train=dict(cfg["train"], max_steps=3))
    with caplog.at_level("WARNING", logger="training.validation"):
        TeacherTrainer(cfg3, out, resume=True, source=source).run()
    assert not (out / "best").exists()
    moved = list((out / "earlier").glob("*/best/teacher.pt"))
    assert len(moved) == 1 and moved[0].read_bytes() == b"abandoned"
    assert "best weights of step 3, after the resumed checkpoint's step 2" in caplog.text
    # a best of the checkpoint's step or before is the run's own history: kept
    from training.validation import discard_later_best
    _best(out, 3, weights=b"own")
    assert discard_later_best(out, 3) is None and (out / "best" / "teacher.pt").read_bytes() == b"own"


def test_a_best_chosen_by_another_metric_does_not_count(tmp_path, caplog):
    """Resumed with validation.select changed (jsd_bev -> cd), the cd values were compared with the
    best jsd_bev, so no validation ever counted as an improvement."""
    from training.validation import Validator
    _best(tmp_path, 2, select="jsd_bev", value=0.05)
    cfg = tiny_config("teacher", "validation.every_steps=2", "validation.select=cd")
    with caplog.at_level("WARNING", logger="training.validation"):
        v = Validator(cfg, "teacher", tmp_path)
    assert v.best is None and v.improved({"cd": 0.3, "jsd_bev": 0.05})
    assert "best by jsd_bev, but validation.select is cd now" in caplog.text
    # its weights moved aside: best/ never holds a best by a metric the run no longer selects by
    assert not (tmp_path / "best").exists() and list((tmp_path / "earlier").glob("*/best/validation.json"))
    _best(tmp_path, 2, select="cd", value=0.05)              # the same metric: kept
    assert Validator(cfg, "teacher", tmp_path).best["value"] == 0.05


def test_a_validation_whose_samples_explode_is_recorded_and_training_goes_on(tmp_path, heldout, monkeypatch,
                                                                             caplog):
    """Non-finite network output on a held-out frame ended the run as 'failed', without a
    checkpoint, in a message naming neither the validation nor the step."""
    from lidar_completion.errors import ModelOutputError
    from training.teacher import TeacherTrainer
    from training.validation import Validator
    real = Validator.evaluate

    def evaluate(self, predict):
        if not getattr(self, "_exploded", False):
            self._exploded = True
            raise ModelOutputError("the networks produced non-finite values from a valid scan")
        return real(self, predict)
    monkeypatch.setattr(Validator, "evaluate", evaluate)
    out = tmp_path / "run"
    cfg = tiny_config("teacher", "train.max_steps=2", "checkpoint.every_steps=0", "checkpoint.export=false",
                      *_val(heldout, 1, "validation.at_start=false"))
    with caplog.at_level("WARNING", logger="training.engine"):
        summary = TeacherTrainer(cfg, out, source=scenes_source(2, n_target=1600, n_scan=160)).run()
    assert summary["status"] == "finished" and summary["step"] == 2 and summary["checkpoint"]
    assert "validation at step 1 failed: the networks produced non-finite values" in caplog.text
    logs = _val_logs(out)
    assert [r["step"] for r in logs] == [1, 2] and logs[0]["val/cd"] == "inf"
    assert np.isfinite(logs[1]["val/cd"])
    assert json.loads((out / "best" / "validation.json").read_text())["step"] == 2
