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
