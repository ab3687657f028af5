"""scripts/release/ship_default.py (float16 copies + manifest) and scripts/release/eval_default.py (results table) on a
fake training run made of random tiny checkpoints."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lidar_completion.checkpoints import load_checkpoint, make_random_checkpoint
from lidar_completion.fileutil import sha256_file
from scripts_support import load_script, small_drive

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    return load_script(f"scripts/release/{name}.py")


@pytest.fixture
def fake_run(tmp_path):
    run = tmp_path / "run"
    samp = {"steps": 8, "guidance": 3.5, "n_fps": 300, "tile": 4}
    make_random_checkpoint(run / "distill" / "distill.pt", seed=1, sampling=samp)
    make_random_checkpoint(run / "teacher" / "teacher.pt", seed=2, refine=False,
                           sampling=dict(samp, steps=50, guidance=6.0))
    make_random_checkpoint(run / "refiner" / "refiner.pt", seed=3)
    (run / "teacher" / "metrics.jsonl").write_text(
        "\n".join(json.dumps({"step": s, "time": t}) for s, t in [(1, 2.0), (10, 20.0), (11, 1.0), (20, 9.0)]))
    (run / "teacher.log").write_text('noise\n{"kind": "teacher", "status": "finished", "step": 20}\n')
    return run


def test_ship_writes_half_precision_copies_and_a_manifest(fake_run, tmp_path):
    ship = _script("ship_default")
    dest = tmp_path / "weights"
    assert ship.main([str(fake_run), "--dest", str(dest), "--command", "make it"]) == 0
    m = json.loads((dest / "manifest.json").read_text())
    assert m["default"] == "student.pt" and m["training"]["command"] == "make it"
    assert m["training"]["stages"]["teacher"] == {"steps": 20, "seconds": 29.0}   # two segments: 20 + 9 s
    for name in ("student.pt", "teacher.pt"):
        assert sha256_file(dest / name) == m["files"][name]["sha256"]
        raw = torch.load(dest / name, weights_only=True)
        assert all(t.dtype == torch.float16 for sd in raw["state_dicts"].values()
                   for t in sd.values() if t.is_floating_point())
        ld = load_checkpoint(dest / name, backend="torch")
        assert ld.content_hash == m["files"][name]["content_hash"] and ld.refiner is not None
    # the teacher got the refiner of the refiner run, rounded to float16
    ref = load_checkpoint(fake_run / "refiner" / "refiner.pt", backend="torch").refiner.state_dict()
    got = load_checkpoint(dest / "teacher.pt", backend="torch").refiner.state_dict()
    k = next(k for k, v in ref.items() if v.is_floating_point() and v.numel() > 10)
    torch.testing.assert_close(got[k], ref[k].half().float())


def test_ship_adds_the_calibrated_teacher_when_the_student_was_not_distilled_from_it(fake_run, tmp_path):
    ship = _script("ship_default")
    make_random_checkpoint(fake_run / "calibrate" / "teacher.pt", seed=4, refine=False,
                           sampling={"steps": 50, "guidance": 6.0, "process": "local"})
    (fake_run / "calibrate" / "metrics.jsonl").write_text(json.dumps({"step": 5, "time": 7.5}))
    dest = tmp_path / "weights"
    assert ship.main([str(fake_run), "--dest", str(dest)]) == 0
    m = json.loads((dest / "manifest.json").read_text())
    assert m["default"] == "student.pt"
    assert set(m["files"]) == {"student.pt", "teacher.pt", "teacher_calibrated.pt"}
    assert m["training"]["stages"]["calibrate"] == {"steps": 5, "seconds": 7.5}
    assert m["files"]["teacher_calibrated.pt"]["sampling"]["process"] == "local"
    for name, src in (("teacher_calibrated.pt", fake_run / "calibrate" / "teacher.pt"),
                      ("teacher.pt", fake_run / "teacher" / "teacher.pt")):
        want = load_checkpoint(src, backend="torch").denoiser.state_dict()
        got = load_checkpoint(dest / name, backend="torch").denoiser.state_dict()
        k = next(k for k, v in want.items() if v.is_floating_point() and v.numel() > 10)
        torch.testing.assert_close(got[k], want[k].half().float())
    # exports that name no process (made before the option) are shipped with the local solver
    assert m["files"]["student.pt"]["sampling"]["process"] == "local"


def test_ship_another_student_with_its_own_guidance_and_drop_stale_files(fake_run, tmp_path):
    """--student ships a distillation from another folder of the run (its teacher: the one its config
    names, here the calibrated one, so no separate teacher_calibrated.pt), --student-guidance
    replaces the guidance it samples with, and files of the previous shipping that are not
    shipped again are removed."""
    ship = _script("ship_default")
    make_random_checkpoint(fake_run / "calibrate" / "teacher.pt", seed=4, refine=False,
                           sampling={"steps": 50, "guidance": 6.0, "process": "local"})
    dest = tmp_path / "weights"
    assert ship.main([str(fake_run), "--dest", str(dest)]) == 0
    assert (dest / "teacher_calibrated.pt").exists()
    other = fake_run / "distill_cal"
    make_random_checkpoint(other / "distill.pt", seed=5, sampling={"steps": 8, "guidance": 3.5, "n_fps": 300,
                                                                     "tile": 4})
    raw = torch.load(other / "distill.pt", weights_only=False)
    raw.setdefault("meta", {})["training_config"] = f"distill:\n  teacher: {fake_run / 'calibrate' / 'teacher.pt'}\n"
    torch.save(raw, other / "distill.pt")
    (other / "metrics.jsonl").write_text(json.dumps({"step": 7, "time": 70.0}))
    (fake_run / "distill_cal.log").write_text('{"kind": "distill", "status": "finished", "step": 7}\n')
    assert ship.main([str(fake_run), "--dest", str(dest), "--student", str(other / "distill.pt"),
                      "--student-guidance", "2"]) == 0
    m = json.loads((dest / "manifest.json").read_text())
    assert set(m["files"]) == {"student.pt", "teacher.pt"}
    assert sorted(p.name for p in dest.glob("*.pt")) == ["student.pt", "teacher.pt"]
    assert m["files"]["student.pt"]["sampling"]["guidance"] == 2.0
    assert m["files"]["student.pt"]["sampling_override"] == {"guidance": {"export": 3.5, "shipped": 2.0}}
    assert m["training"]["stages"]["distill"]["steps"] == 7
    assert m["training"]["stages"]["distill"]["export"] == str(other / "distill.pt")
    from lidar_completion.completer import Completer
    assert Completer.from_checkpoint(dest / "student.pt", backend="torch").guidance == 2.0
    want = load_checkpoint(fake_run / "calibrate" / "teacher.pt", backend="torch").denoiser.state_dict()
    got = load_checkpoint(dest / "teacher.pt", backend="torch").denoiser.state_dict()
    k = next(k for k, v in want.items() if v.is_floating_point() and v.numel() > 10)
    torch.testing.assert_close(got[k], want[k].half().float())
    assert ship.main([str(fake_run), "--dest", str(tmp_path / "w3"), "--student-guidance", "-1"]) == 2


def test_ship_teacher_only_and_missing_inputs(fake_run, tmp_path, capsys):
    ship = _script("ship_default")
    dest = tmp_path / "weights"
    assert ship.main([str(fake_run), "--dest", str(dest), "--teacher-only"]) == 0
    m = json.loads((dest / "manifest.json").read_text())
    assert m["default"] is None and set(m["files"]) == {"teacher.pt"}
    (fake_run / "distill" / "distill.pt").unlink()
    assert ship.main([str(fake_run), "--dest", str(tmp_path / "w2")]) == 2
    assert "distill.pt is missing" in capsys.readouterr().err


def test_ship_refuses_over_budget(fake_run, tmp_path, monkeypatch):
    ship = _script("ship_default")
    monkeypatch.setattr(ship, "BUDGET_BYTES", 1000)
    dest = tmp_path / "weights"
    assert ship.main([str(fake_run), "--dest", str(dest)]) == 2
    assert not list(dest.glob("*.pt"))


def test_ship_student_only_replaces_the_student_of_the_same_teacher(fake_run, tmp_path, capsys):
    """--student-only ships a new distillation of the teacher already shipped: student.pt and the
    manifest's student entry and distill stage change, the teacher's file and entries do not; a student
    of another teacher (by the sha256 its export records, else the file its config names) is refused
    and the shipped student stays."""
    ship = _script("ship_default")
    dest = tmp_path / "weights"
    assert ship.main([str(fake_run), "--dest", str(dest), "--command", "whole run"]) == 0
    before = json.loads((dest / "manifest.json").read_text())
    teacher_bytes = (dest / "teacher.pt").read_bytes()
    new = tmp_path / "d2" / "distill.pt"
    make_random_checkpoint(new, seed=7, sampling={"steps": 8, "guidance": 3.5, "n_fps": 300, "tile": 4})
    raw = torch.load(new, weights_only=False)
    raw.setdefault("meta", {})["teacher_sha256"] = sha256_file(dest / "teacher.pt")
    torch.save(raw, new)
    (tmp_path / "d2" / "metrics.jsonl").write_text(json.dumps({"step": 9, "time": 90.0}))
    assert ship.main(["--student-only", str(new), "--dest", str(dest), "--student-guidance", "2",
                      "--command", "distil again"]) == 0
    m = json.loads((dest / "manifest.json").read_text())
    assert (dest / "teacher.pt").read_bytes() == teacher_bytes
    assert m["files"]["teacher.pt"] == before["files"]["teacher.pt"]
    assert m["training"]["command"] == "whole run"
    assert m["training"]["stages"]["teacher"] == before["training"]["stages"]["teacher"]
    assert m["training"]["stages"]["distill"] == {"steps": 9, "seconds": 90.0, "export": str(new),
                                                  "command": "distil again"}
    assert m["files"]["student.pt"]["sha256"] == sha256_file(dest / "student.pt")
    assert m["files"]["student.pt"]["sampling"]["guidance"] == 2.0
    want = load_checkpoint(new, backend="torch").denoiser.state_dict()
    got = load_checkpoint(dest / "student.pt", backend="torch").denoiser.state_dict()
    k = next(k for k, v in want.items() if v.is_floating_point() and v.numel() > 10)
    torch.testing.assert_close(got[k], want[k].half().float())
    shipped = (dest / "student.pt").read_bytes()
    # a student of another teacher: refused, nothing changes
    other = tmp_path / "d3" / "distill.pt"
    make_random_checkpoint(other, seed=8)
    raw = torch.load(other, weights_only=False)
    raw.setdefault("meta", {})["training_config"] = f"distill:\n  teacher: {fake_run / 'teacher' / 'teacher.pt'}\n"
    torch.save(raw, other)
    capsys.readouterr()
    assert ship.main(["--student-only", str(other), "--dest", str(dest)]) == 2
    assert "was not distilled from the shipped teacher" in capsys.readouterr().err
    assert (dest / "student.pt").read_bytes() == shipped
    assert json.loads((dest / "manifest.json").read_text()) == m
    # and the usage errors
    assert ship.main(["--student-only", str(tmp_path / "nope.pt"), "--dest", str(dest)]) == 2
    assert ship.main(["--student-only", str(new), "--dest", str(tmp_path / "empty")]) == 2
    assert ship.main([str(fake_run), "--student-only", str(new), "--dest", str(dest)]) == 2
    assert ship.main(["--dest", str(dest)]) == 2


def test_eval_default_rows_and_table(fake_run, tmp_path):
    ev = _script("eval_default")
    data = tmp_path / "data"
    small_drive(data, (8,), scans=3, seed=1)
    out = tmp_path / "table"
    ev.main(["--data", str(data), "--every", "2", "--limit", "2", "--student", str(fake_run / "distill" / "distill.pt"),
             "--rows", "input,xinit,student1,student1w1local", "--out", str(out), "--emd", "none", "--no-progress",
             "--threads", "1"])
    md = [line for line in (out / "table.md").read_text().splitlines() if line.startswith("|")]
    names = [line.split("|")[1].strip() for line in md[2:]]
    assert names == ["input scan alone", "x_init, no denoiser", "x_init, no denoiser",
                     "student", "student", "student", "student"]
    t = json.loads((out / "table.json").read_text())
    by = {(r["run"]["label"]): r for r in t["rows"]}
    raw, ref = by["student 1 steps, w=3.5, vp solver"], by["student 1 steps, w=3.5, vp solver + refine"]
    # the unrefined row is the same completion before the refiner: the refined one takes longer
    assert ref["stats"]["time"]["mean"] > raw["stats"]["time"]["mean"]
    assert np.isfinite(ref["stats"]["cd"]["mean"]) and ref["stats"]["cd"]["mean"] != raw["stats"]["cd"]["mean"]
    assert ref["stats"]["cd"]["spread"] is None                   # one seed: no spread
    # a refined row records the refined cut (a row of refined frames from before it is not
    # resumed with frames of the new rule); the unrefined row has none
    assert ref["run"]["refined_max_range"] == 50.0 and "refined_max_range" not in raw["run"]
    # the suffix picks the solver; the checkpoint names none, so the plain row is the published vp
    assert by["student 1 steps, w=1, local solver + refine"]["run"]["process"] == "local"
    assert raw["run"]["process"] == "vp"
    assert [line.split("|")[3].strip() for line in md[2:]] == ["-", "-", "-", "local", "local", "vp", "vp"]
    with pytest.raises(SystemExit):
        ev.main(["--data", str(data), "--rows", "bogus", "--out", str(out)])
    # a missing checkpoint is named before any row runs (here the input row would come first)
    fresh = tmp_path / "fresh"
    with pytest.raises(SystemExit, match="--teacher checkpoint not found: .*nowhere.pt"):
        ev.main(["--data", str(data), "--rows", "input,teacher8", "--teacher", str(tmp_path / "nowhere.pt"),
                 "--out", str(fresh), "--emd", "none", "--no-progress"])
    assert not (fresh / "input").exists()
    # the rows resume only into results made the same way: another input filter, or a student
    # retrained in place, is refused naming what differs, not mixed in
    from lidar_completion.errors import ConfigError
    again = ["--data", str(data), "--every", "2", "--limit", "2", "--rows", "student1", "--out", str(out),
             "--emd", "none", "--no-progress", "--threads", "1"]
    with pytest.raises(ConfigError, match="settings differ: min_z"):
        ev.main(again + ["--student", str(fake_run / "distill" / "distill.pt"), "--min-z", "-2.5"])
    copy = tmp_path / "student.pt"
    copy.write_bytes((fake_run / "distill" / "distill.pt").read_bytes())
    ev.main(again + ["--student", str(copy)])              # the same weights elsewhere: resumed
    copy.write_bytes((fake_run / "teacher" / "teacher.pt").read_bytes())   # other weights, same path
    with pytest.raises(ConfigError, match="settings differ: .*weights"):
        ev.main(again + ["--student", str(copy)])


def test_eval_default_seeds_sequences_and_the_results_doc(fake_run, tmp_path):
    """Two drives x two seeds: per seed the frame-weighted mean over the drives, then the mean and
    standard deviation over the seeds, written into the results block of a Markdown file."""
    ev = _script("eval_default")
    data = tmp_path / "data"
    small_drive(data, (8, 9), scans=3, seed=1)
    doc = tmp_path / "results.md"
    doc.write_text(f"intro\n{ev.DOC_BEGIN}\nold table\n{ev.DOC_END}\nafter\n")
    out = tmp_path / "table"
    args = ["--data", str(data), "--sequence", "08,09", "--seeds", "0,7", "--every", "1", "--limit", "2",
            "--student", str(fake_run / "distill" / "distill.pt"), "--rows", "input,student1w1local",
            "--out", str(out), "--emd", "none", "--no-progress", "--threads", "1", "--doc", str(doc)]
    ev.main(args)
    t = json.loads((out / "table.json").read_text())
    assert t["seeds"] == ["0", "7"]
    row = next(r for r in t["rows"] if r["run"]["label"] == "student 1 steps, w=1, local solver + refine")
    per_seed = []
    for seed in (0, 7):
        parts = [json.loads((out / f"seed{seed}" / q / "student1w1local_refine" / "summary.json").read_text())
                 for q in ("08", "09")]
        per_seed.append(sum(p["cd"]["mean"] * p["frames"] for p in parts) / sum(p["frames"] for p in parts))
    assert [p["frames"] for p in row["per_seed"]] == [4, 4]
    assert row["stats"]["cd"]["mean"] == pytest.approx(np.mean(per_seed))
    assert row["stats"]["cd"]["spread"] == pytest.approx(np.std(per_seed, ddof=1))
    assert per_seed[0] != per_seed[1]                              # the seed changes the completion
    inp = next(r for r in t["rows"] if r["run"]["label"] == "input scan alone")
    assert inp["stats"]["cd"]["spread"] == pytest.approx(0.0, abs=1e-12)    # no sampling: no spread
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("after\n") and "old table" not in text
    assert f"{row['stats']['cd']['mean']:.3f} ± {row['stats']['cd']['spread']:.3f}" in text
    assert "--seeds 0,7" in text and "4 frames of sequences 08, 09 per seed" in text


@pytest.mark.slow
def test_train_default_runs_every_stage_with_calibration(tmp_path):
    """scripts/release/train_default.sh end to end at toy sizes: data, teacher, refiner, the calibration
    stage (teacher without the std regulariser) and a distillation from the calibrated teacher, every
    stage validated on a held-out drive and the next one started from its best export."""
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    env = dict(os.environ, PYTHON=sys.executable, DEVICE="cpu", SEQUENCES="1", SCANS="3", BATCH="1",
               SCAN_POINTS="200", MAX_STEPS_TEACHER="2", MAX_STEPS_REFINER="2", MAX_STEPS_CALIBRATE="2",
               MAX_STEPS_DISTILL="1", T_TEACHER="900", T_REFINER="900", T_CALIBRATE="900",
               T_DISTILL="900", OMP_NUM_THREADS="1", VAL_SCANS="3", VAL_FRAMES="1", DISTILL_MODE="dpo",
               DISTILL_TEACHER_GUIDANCE="7.5",
               DISTILL_SET="distill.pair_noise=independent distill.noise_scale=1.0 distill.pair_regions=2 "
                           "distill.aux_shared_draws=true distill.aux_optimizer.lr=1e-3")
    res = subprocess.run(["bash", str(ROOT / "scripts" / "release" / "train_default.sh"), str(run)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for stage in ("teacher", "refiner", "calibrate", "distill"):
        assert (run / stage / ".stage_done").exists(), stage
    calib = load_checkpoint(run / "calibrate" / "teacher.pt", backend="torch")
    assert calib.sampling["process"] == "local" and calib.meta["step"] == 2
    cfg = (run / "calibrate" / "config.yaml").read_text()
    assert "reg_weight: 0" in cfg and "init: " + str(run / "teacher" / "best" / "teacher.pt") in cfg
    distill_cfg = (run / "distill" / "config.yaml").read_text()
    assert str(run / "calibrate" / "best" / "teacher.pt") in distill_cfg and "reg_weight: 0" in distill_cfg
    assert str(run / "refiner" / "best" / "refiner.pt") in distill_cfg
    # the shipped student's recipe: Distillation-DPO with region pairs and shared auxiliary draws
    d = yaml.safe_load(distill_cfg)["distill"]
    assert d["mode"] == "dpo" and d["teacher_guidance"] == 7.5 and d["pair_noise"] == "independent"
    assert d["pair_regions"] == 2 and d["aux_shared_draws"] is True and d["aux_optimizer"]["lr"] == 1e-3
    assert load_checkpoint(run / "distill" / "distill.pt", backend="torch").meta["trained_by"] == "training.distill (dpo)"
    for stage, kind in (("teacher", "teacher"), ("refiner", "refiner"), ("calibrate", "teacher"),
                        ("distill", "distill")):
        assert (run / stage / "best" / f"{kind}.pt").is_file(), stage
        steps = [json.loads(line)["step"] for line in (run / stage / "metrics.jsonl").read_text().splitlines()
                 if "val/cd" in line]
        assert steps[0] == 0 and steps[-1] >= 1, (stage, steps)    # at the start and at the end
    # a second call finds every stage done and trains nothing
    again = subprocess.run(["bash", str(ROOT / "scripts" / "release" / "train_default.sh"), str(run)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("already done") == 4, again.stdout


@pytest.mark.slow
def test_train_default_gpu_run_profile_writes_parts_in_bf16(tmp_path):
    """PROFILE=gpu-run (here on the CPU, torch backend, toy sizes): every stage trains in bf16 and
    keeps one training state in parts of at most 16 MiB; a bad profile name is refused."""
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    env = dict(os.environ, PYTHON=sys.executable, PROFILE="gpu-run", DEVICE="cpu", LIDAR_COMPLETION_BACKEND="torch",
               SEQUENCES="1", SCANS="3", BATCH="1", SCAN_POINTS="200", MAX_STEPS_TEACHER="2",
               MAX_STEPS_REFINER="2", MAX_STEPS_DISTILL="1", OMP_NUM_THREADS="1", VAL_EVERY="0")
    script = str(ROOT / "scripts" / "release" / "train_default.sh")
    res = subprocess.run(["bash", script, str(run)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for stage in ("teacher", "refiner", "distill"):
        cfg = (run / stage / "config.yaml").read_text()
        assert "precision: bf16" in cfg and "part_mib: 16" in cfg, stage
        files = [p for p in (run / stage / "checkpoints").iterdir() if p.name != "latest.json"]
        assert files and all(p.stat().st_size <= 16 * 2 ** 20 for p in files)
    bad = subprocess.run(["bash", script, str(run)], cwd=ROOT, env=dict(env, PROFILE="fast"),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "PROFILE must be" in bad.stderr


def test_train_default_refuses_a_malformed_distill_set_before_any_stage(tmp_path):
    """DISTILL_SET is checked before anything is trained or generated: an entry without '=' stops
    the script with exit code 2 and names the entry, and the run folder is not created."""
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    env = dict(os.environ, PYTHON=sys.executable, DEVICE="cpu",
               DISTILL_SET="distill.pair_regions=2 distill.aux_shared_draws")
    res = subprocess.run(["bash", str(ROOT / "scripts" / "release" / "train_default.sh"), str(run)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "'distill.aux_shared_draws'" in res.stderr, res.stderr
    assert not run.exists()


@pytest.mark.parametrize("env_extra, message", [
    ({"DISTILL_SEEDS": "0 x"}, "DISTILL_SEEDS takes integers"),
    ({"DISTILL_SEEDS": "0 1", "VAL_EVERY_DISTILL": "0"}, "VAL_EVERY and VAL_EVERY_DISTILL must be > 0"),
    ({"DISTILL_SEEDS": "0 1", "VAL_EVERY": "0"}, "VAL_EVERY and VAL_EVERY_DISTILL must be > 0"),
])
def test_train_default_refuses_distill_seeds_it_cannot_choose_among(tmp_path, env_extra, message):
    """DISTILL_SEEDS chooses by validation: without it, or with a seed that is not an integer, the
    script stops before anything is generated or trained."""
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    res = subprocess.run(["bash", str(ROOT / "scripts" / "release" / "train_default.sh"), str(run)], cwd=ROOT,
                         env=dict(os.environ, PYTHON=sys.executable, DEVICE="cpu", **env_extra),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert not run.exists()


@pytest.mark.slow
def test_train_default_distill_seeds_links_the_best_by_validation(tmp_path):
    """DISTILL_SEEDS="1 0" at toy sizes: two distillations, RUN/distill links the one whose best
    validation value is lower (ties: the first listed), distill_choice.json lists both; a second
    call trains nothing and chooses again from the records; ship_default.py ships the chosen seed's
    best export and records the choice."""
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    env = dict(os.environ, PYTHON=sys.executable, DEVICE="cpu", SEQUENCES="1", SCANS="3", BATCH="1",
               SCAN_POINTS="200", MAX_STEPS_TEACHER="1", MAX_STEPS_REFINER="1", MAX_STEPS_DISTILL="2",
               T_TEACHER="900", T_REFINER="900", T_DISTILL="900", OMP_NUM_THREADS="1", VAL_SCANS="3",
               VAL_FRAMES="1", VAL_EVERY_DISTILL="1", DISTILL_MODE="vsd", DISTILL_SEEDS="1 0")
    script = str(ROOT / "scripts" / "release" / "train_default.sh")
    res = subprocess.run(["bash", script, str(run)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    choice = json.loads((run / "distill_choice.json").read_text())
    values = {r["seed"]: r["value"] for r in choice["seeds"]}
    assert set(values) == {0, 1} and choice["by"] == "cd"
    for r in choice["seeds"]:    # each record is that seed's own best validation
        own = json.loads((run / f"distill_s{r['seed']}" / "best" / "validation.json").read_text())
        assert own["value"] == r["value"] and own["step"] == r["step"]
        assert f"seed: {r['seed']}" in (run / f"distill_s{r['seed']}" / "config.yaml").read_text()
    # the lowest value; ties (both seeds best at step 0, where each student is the same teacher copy)
    # go to the first seed listed
    chosen = 0 if values[0] < values[1] else 1
    assert choice["chosen"] == chosen
    assert (run / "distill").is_symlink() and os.readlink(run / "distill") == f"distill_s{chosen}"
    assert os.readlink(run / "distill.log") == f"distill_s{chosen}.log"
    # the other seed validated better (its record edited here): a second call trains nothing and
    # links that one instead
    other = 1 - chosen
    rec_path = run / f"distill_s{other}" / "best" / "validation.json"
    rec = json.loads(rec_path.read_text())
    rec["value"] = min(values.values()) - 0.5
    rec_path.write_text(json.dumps(rec))
    again = subprocess.run(["bash", script, str(run)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("already done") == 4, again.stdout
    assert os.readlink(run / "distill") == f"distill_s{other}"
    assert json.loads((run / "distill_choice.json").read_text())["chosen"] == other
    dest = tmp_path / "weights"
    ship = subprocess.run([sys.executable, str(ROOT / "scripts" / "release" / "ship_default.py"), str(run),
                           "--dest", str(dest)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ship.returncode == 0, ship.stderr
    m = json.loads((dest / "manifest.json").read_text())
    d = m["training"]["stages"]["distill"]
    assert d["chosen_from"]["chosen"] == other and d["export"].endswith("distill/best/distill.pt")
    assert m["files"]["student.pt"]["validation"]["value"] == rec["value"]


def test_ship_takes_each_stage_best_by_validation(fake_run, tmp_path):
    """train_default.sh validates every stage: ship_default ships RUN/<stage>/best/<kind>.pt and
    records what it was chosen by."""
    ship = _script("ship_default")
    samp = {"steps": 8, "guidance": 3.5, "n_fps": 300, "tile": 4}
    make_random_checkpoint(fake_run / "distill" / "best" / "distill.pt", seed=5, sampling=samp)
    make_random_checkpoint(fake_run / "refiner" / "best" / "refiner.pt", seed=6)
    val = {"step": 40, "select": "cd", "value": 0.3, "metrics": {"cd": 0.3, "jsd_bev": 0.4}}
    (fake_run / "distill" / "best" / "validation.json").write_text(json.dumps(val))
    (fake_run / "distill" / "metrics.jsonl").write_text(json.dumps({"step": 60, "time": 12.0}))
    dest = tmp_path / "weights"
    assert ship.main([str(fake_run), "--dest", str(dest)]) == 0
    m = json.loads((dest / "manifest.json").read_text())
    assert m["files"]["student.pt"]["validation"] == val
    assert m["training"]["stages"]["distill"]["steps"] == 60          # the stage folder's figures
    for name, src, net in (("student.pt", fake_run / "distill" / "best" / "distill.pt", "denoiser"),
                           ("teacher.pt", fake_run / "refiner" / "best" / "refiner.pt", "refiner")):
        want = getattr(load_checkpoint(src, backend="torch"), net).state_dict()
        got = getattr(load_checkpoint(dest / name, backend="torch"), net).state_dict()
        k = next(k for k, v in want.items() if v.is_floating_point() and v.numel() > 10)
        torch.testing.assert_close(got[k], want[k].half().float())
