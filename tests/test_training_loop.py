"""The training loop: kill-and-resume is bit-identical, corrupt checkpoints are refused, NaN stops the
run keeping the last good checkpoint, configs and the CLI."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lidar_completion.errors import CheckpointError, ConfigError
from test_training_utils import CONFIGS, lidiff_teacher_file, scenes_source, tiny_config, write_npz
from training.__main__ import main
from training.checkpoint import CheckpointManager, load_state, save_state
from training.config import KINDS, load_config
from training.engine import TrainingDivergedError
from training.teacher import TeacherTrainer

ROOT = Path(__file__).resolve().parents[1]


def _args(npz: Path, out: Path, *extra) -> list:
    return ["teacher", "--config", "tiny_teacher.yaml", "--out", str(out),
            "--set", "device=cpu", "--set", "backend=torch", "--set", "threads=1",
            "--set", "data.kind=npz", "--set", f"data.root={npz}", "--set", "data.scan_points=120",
            "--set", "data.target_points=1200", "--set", "data.num_workers=0",
            "--set", "train.batch_size=1", "--set", "log.progress=false", "--set", "log.tensorboard=false",
            "--set", "log.render_every_steps=0", "--set", "checkpoint.export=false",
            "--set", "teacher.cond_dropout=0.3", *extra]


def _weights(out: Path) -> dict:
    st = load_state(CheckpointManager(out / "checkpoints").latest_path())
    return {"models": st["models"], "optim": st["optimizers"], "step": st["step"]}


def _assert_identical(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for name, sd in a["models"].items():
        for k, v in sd.items():
            assert torch.equal(v, b["models"][name][k]), f"{name}.{k} differs"
    for k, v in a["optim"]["main"]["state"].items():
        for kk, vv in v.items():
            assert torch.equal(torch.as_tensor(vv), torch.as_tensor(b["optim"]["main"]["state"][k][kk])), kk


def _start(args: list) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, "-m", "training", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(proc: subprocess.Popen, mgr: CheckpointManager, step: int, timeout: float = 240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        p = mgr.latest_path() if (mgr.folder / "latest.json").exists() else None
        if p is not None and p.name == mgr.path_for(step).name:
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"training exited ({proc.returncode}) before step {step}:\n{err[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no checkpoint of step {step} within {timeout} s")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """20 steps without interruption (2 scans, 10 epochs: permutations, lr schedule and dropout
    draws all change across epochs)."""
    tmp = tmp_path_factory.mktemp("straight")
    npz = write_npz(tmp / "two.npz", n=2, n_target=1200, n_scan=120)
    out = tmp / "run"
    assert main(_args(npz, out, "--max-steps", "20", "--set", "train.lr_schedule={gamma: 0.9, every_epochs: 2}")) == 0
    return npz, _weights(out)


def test_resume_after_kill_is_identical(straight_run, tmp_path):
    npz, straight = straight_run
    out = tmp_path / "killed"
    args = _args(npz, out, "--max-steps", "20", "--set", "checkpoint.every_steps=10",
                 "--set", "train.lr_schedule={gamma: 0.9, every_epochs: 2}")
    proc = _start(args)
    _wait_for_checkpoint(proc, CheckpointManager(out / "checkpoints"), 10)
    proc.kill()   # SIGKILL: no handler runs, whatever step it was in is lost
    proc.wait()
    assert not (out / "summary.json").exists() or json.loads((out / "summary.json").read_text())["step"] < 20
    assert main(args + ["--resume"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step_000000010.ckpt") and summary["steps_this_run"] == 10
    _assert_identical(straight, _weights(out))


def test_sigterm_writes_checkpoint_and_resume_is_identical(straight_run, tmp_path):
    npz, straight = straight_run
    out = tmp_path / "terminated"
    args = _args(npz, out, "--max-steps", "20", "--set", "checkpoint.every_steps=7",
                 "--set", "train.lr_schedule={gamma: 0.9, every_epochs: 2}")
    proc = _start(args)
    _wait_for_checkpoint(proc, CheckpointManager(out / "checkpoints"), 7)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "interrupted" in err and "--resume" in err
    stopped_at = load_state(CheckpointManager(out / "checkpoints").latest_path())["step"]
    assert 7 <= stopped_at < 20
    assert main(args + ["--resume"]) == 0
    _assert_identical(straight, _weights(out))


def test_checkpoint_in_parts_resumes_bit_exactly(straight_run, tmp_path):
    """checkpoint.part_mib: every training state is written as files of at most that size (an index
    and its parts), older ones rotate away with their parts, and the resume equals the straight run."""
    npz, straight = straight_run
    out = tmp_path / "parts"
    args = _args(npz, out, "--set", "train.lr_schedule={gamma: 0.9, every_epochs: 2}",
                 "--set", "checkpoint.part_mib=1", "--set", "checkpoint.keep=1")
    assert main(args + ["--max-steps", "10"]) == 0
    folder = out / "checkpoints"
    files = sorted(p.name for p in folder.iterdir() if p.name != "latest.json")
    assert files[0] == "step_000000010.ckpt" and len(files) >= 2
    assert all(name.startswith("step_000000010.ckpt.part") for name in files[1:])
    assert all((folder / n).stat().st_size <= 2 ** 20 for n in files)
    assert main(args + ["--max-steps", "20", "--resume"]) == 0
    assert not any(p.name.startswith("step_000000010") for p in folder.iterdir())   # rotated, parts too
    _assert_identical(straight, _weights(out))


def test_a_checkpoint_a_killed_run_was_writing_is_removed_at_the_next_save(tmp_path):
    """A run killed while writing a checkpoint left step_N.ckpt.<pid>.tmp (a checkpoint's size)
    in checkpoints/ for good; the next save removes it (not a live writer's)."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    mgr = CheckpointManager(tmp_path / "checkpoints")
    mgr.folder.mkdir(parents=True)
    dead = mgr.folder / f"step_000000001.ckpt.{gone.pid}.tmp"
    live = mgr.folder / f"step_000000001.ckpt.{os.getppid()}.tmp"     # a process that is running
    for f in (dead, live):
        f.write_bytes(b"partial")
    mgr.save({"step": 2, "models": {"w": torch.zeros(3)}})
    assert not dead.exists() and live.exists()


def test_checkpoint_parts_are_checked(tmp_path):
    from training.checkpoint import state_files
    path = tmp_path / "state.ckpt"
    big = {"step": 3, "models": {"w": torch.arange(300_000.0)}, "rng": [torch.get_rng_state()]}
    save_state(path, big, part_bytes=400_000)
    parts = state_files(path)[1:]
    assert len(parts) == 4 and all(p.stat().st_size <= 400_000 for p in parts)
    st = load_state(path)
    assert torch.equal(st["models"]["w"], big["models"]["w"]) and torch.equal(st["rng"][0], big["rng"][0])
    save_state(path, {"step": 4, "models": {"w": torch.arange(10.0)}}, part_bytes=400_000)
    assert state_files(path) == [path] and load_state(path)["step"] == 4   # one file: stale parts gone
    save_state(path, big, part_bytes=400_000)
    data = bytearray(parts[2].read_bytes())
    data[100] ^= 0xFF
    parts[2].write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="part002 is corrupt"):
        load_state(path)
    parts[2].unlink()
    with pytest.raises(CheckpointError, match="part002, which is missing"):
        load_state(path)


def test_corrupt_checkpoint_is_refused(tmp_path):
    path = tmp_path / "state.ckpt"
    save_state(path, {"step": 3, "models": {"w": torch.arange(1000.0)}})
    assert load_state(path)["step"] == 3
    data = bytearray(path.read_bytes())
    flipped = tmp_path / "flipped.ckpt"
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_state(flipped)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(path.read_bytes()[: len(data) // 3])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_state(truncated)
    other = tmp_path / "other.pt"
    torch.save({"step": 1}, other)
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        load_state(other)


def test_resume_from_corrupt_checkpoint_fails_with_clear_error(tmp_path, capsys):
    npz = write_npz(tmp_path / "two.npz", n=2, n_target=1200, n_scan=120)
    out = tmp_path / "run"
    assert main(_args(npz, out, "--max-steps", "2")) == 0
    latest = CheckpointManager(out / "checkpoints").latest_path()
    latest.write_bytes(latest.read_bytes()[:-100])
    capsys.readouterr()
    assert main(_args(npz, out, "--max-steps", "4", "--resume")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "corrupt" in err and str(latest) in err


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config("teacher", "checkpoint.every_steps=1", "checkpoint.keep=5", "checkpoint.export=false",
                      "train.max_steps=6")
    tr = TeacherTrainer(cfg, tmp_path, source=scenes_source(2, n_target=1200, n_scan=120))
    import training.teacher as T
    real = T.denoising_loss_terms

    def poisoned(eps_hat, eps, reg):
        terms = real(eps_hat, eps, reg)
        if tr.step == 3:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(T, "denoising_loss_terms", poisoned)
    with pytest.raises(TrainingDivergedError, match=r"became nan in step 4 .*after 3 completed steps.*"
                                                     r"step_000000003\.ckpt: resume from it"):
        tr.run()
    mgr = CheckpointManager(tmp_path / "checkpoints")
    good = load_state(mgr.latest_path())
    assert good["step"] == 3
    for k, v in good["models"]["teacher"].items():
        assert torch.isfinite(v.float()).all()
    for k, p in tr.net.named_parameters():   # no optimiser step was taken with the NaN loss
        assert torch.equal(p.detach(), good["models"]["teacher"][k]), k
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged" and "became nan in step 4" in summary["error"]


def test_a_run_that_fails_says_so_in_its_summary(tmp_path, monkeypatch):
    cfg = tiny_config("teacher", "checkpoint.export=false", "train.max_steps=3")
    tr = TeacherTrainer(cfg, tmp_path, source=scenes_source(2, n_target=1200, n_scan=120))

    def broken(batch):
        raise RuntimeError("a step that breaks")

    monkeypatch.setattr(tr, "train_step", broken)
    with pytest.raises(RuntimeError, match="a step that breaks"):
        tr.run()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "RuntimeError: a step that breaks"


def _ckpt_steps(out: Path) -> list:
    return sorted(int(p.name[5:14]) for p in (out / "checkpoints").glob("step_*.ckpt"))


def test_a_fresh_run_into_a_folder_with_checkpoints_is_refused(tmp_path, capsys):
    """Without --resume, a run into a folder that holds another run's checkpoints would mix its
    checkpoints, logs and export with that run's: it stops before building anything."""
    npz = write_npz(tmp_path / "two.npz", n=2, n_target=1200, n_scan=120)
    out = tmp_path / "run"
    assert main(_args(npz, out, "--max-steps", "2")) == 0
    before = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    capsys.readouterr()
    assert main(_args(npz, out, "--max-steps", "1")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--resume" in err and "step_000000002.ckpt" in err
    assert {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()} == before


def test_a_run_into_a_folder_another_run_is_writing_is_refused(tmp_path, capsys):
    """Two runs started on one folder before the first checkpoint (or a --resume of a run still
    going) both passed the checks, then the second moved the first one's logs aside and the two
    mixed checkpoints, config and export. One run writes a folder at a time: the other is refused,
    naming the process that holds it, before it writes anything."""
    from lidar_completion.fileutil import LOCK_NAME, hold_folder, release_folder

    npz = write_npz(tmp_path / "two.npz", n=2, n_target=1200, n_scan=120)
    out = tmp_path / "run"
    held = hold_folder(out, "training run")          # as the first run holds it while it trains
    try:
        assert main(_args(npz, out, "--max-steps", "1")) == 1
        err = capsys.readouterr().err
        holder = f"{socket.gethostname()}:{os.getpid()}"
        assert f"being written by another training run (host:process {holder})" in err, err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]      # nothing written
    finally:
        release_folder(held)
    assert main(_args(npz, out, "--max-steps", "1")) == 0                 # free again


def test_resuming_an_older_checkpoint_never_deletes_what_it_writes_nor_later_ones(tmp_path):
    """Rotation removes only this run's past: resumed from step 2 of a folder holding steps 2 and 4,
    with keep=1, the run's step 3 stays (latest.json names it), step 4 of the abandoned run stays,
    step 2 goes; the next --resume continues from step 3."""
    npz = write_npz(tmp_path / "two.npz", n=2, n_target=1200, n_scan=120)
    out = tmp_path / "run"
    keep = ("--set", "checkpoint.every_steps=2", "--set", "checkpoint.keep=2")
    assert main(_args(npz, out, "--max-steps", "4", *keep)) == 0
    assert _ckpt_steps(out) == [2, 4]
    older = CheckpointManager(out / "checkpoints").path_for(2)
    assert main(_args(npz, out, "--max-steps", "3", "--resume", str(older),
                      "--set", "checkpoint.keep=1", "--set", "checkpoint.every_steps=0")) == 0
    mgr = CheckpointManager(out / "checkpoints")
    assert _ckpt_steps(out) == [3, 4] and mgr.latest_path() == mgr.path_for(3)
    assert load_state(mgr.latest_path())["step"] == 3
    assert main(_args(npz, out, "--max-steps", "5", "--resume")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == str(mgr.path_for(3)) and summary["step"] == 5


def test_resume_without_latest_json_takes_the_checkpoint_of_the_highest_step(tmp_path, caplog):
    """Step files copied back from another machine without their pointer: --resume goes on from
    the highest step (and says so) instead of silently starting again from step 0."""
    npz = write_npz(tmp_path / "two.npz", n=2, n_target=1200, n_scan=120)
    out = tmp_path / "run"
    assert main(_args(npz, out, "--max-steps", "3", "--set", "checkpoint.every_steps=1")) == 0
    (out / "checkpoints" / "latest.json").unlink()
    with caplog.at_level("WARNING", logger="training.engine"):
        assert main(_args(npz, out, "--max-steps", "4", "--set", "checkpoint.every_steps=1", "--resume")) == 0
    assert "no latest.json" in caplog.text and "step_000000003.ckpt" in caplog.text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step_000000003.ckpt") and summary["steps_this_run"] == 1


def test_the_cli_refuses_a_negative_step_budget_and_an_out_that_is_a_file(tmp_path, capsys):
    npz = write_npz(tmp_path / "two.npz", n=2, n_target=1200, n_scan=120)
    assert main(_args(npz, tmp_path / "run", "--max-steps", "-5")) == 1
    assert "--max-steps must be >= 0" in capsys.readouterr().err
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(_args(npz, afile, "--max-steps", "1")) == 1
    assert "is a file" in capsys.readouterr().err and afile.read_text() == "x"
    assert not (tmp_path / "run").exists()
    assert main(["teacher", "--config", "tiny_techer", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "config tiny_techer not found" in err and "tiny_teacher" in err


_DIVERGING_RANK = r"""
import contextlib, io, json, sys, types
import torch
from training import distributed as D
from training.__main__ import report_error
from training.engine import Trainer, TrainingDivergedError

info = D.init("cpu")
last = sys.argv[1]
ckpt = types.SimpleNamespace(latest_path=lambda: None)
fake = types.SimpleNamespace(kind="teacher", step=7, steps_per_epoch=5, device=info.device, ckpt=ckpt)
fake._stopped_without_saving = types.MethodType(Trainer._stopped_without_saving, fake)
value = torch.tensor([0.5, float("nan") if info.rank == 1 else 0.25])
err = io.StringIO()
try:
    Trainer.guard(fake, "main", value)
    message = None
except TrainingDivergedError as exc:
    message = str(exc)
    with contextlib.redirect_stderr(err):
        report_error(exc)
D.shutdown()
print(json.dumps({"rank": info.rank, "message": message, "stderr": err.getvalue()}))
"""


def test_weights_made_non_finite_by_a_step_stop_the_run_before_they_are_drawn_or_saved(tmp_path, monkeypatch):
    """A step whose loss was finite can still leave NaN weights (a learning rate far too high): the run
    crashed in the bird's-eye plot of step 1 (matplotlib: "Axis limits cannot be NaN or Inf") with a
    traceback, or would have saved them. Now it stops with the divergence error, writes no checkpoint
    of them, and the summary says diverged."""
    cfg = tiny_config("teacher", "checkpoint.every_steps=1", "checkpoint.export=false", "train.max_steps=4",
                      "log.render_every_steps=2")
    tr = TeacherTrainer(cfg, tmp_path, source=scenes_source(2, n_target=1200, n_scan=120))
    real = tr.clip_and_step

    def exploding(name, clip):
        out = real(name, clip)
        if tr.step == 1:            # the second step's update (step 1 is done and saved)
            with torch.no_grad():
                next(tr.net.parameters()).fill_(float("inf"))
        return out

    monkeypatch.setattr(tr, "clip_and_step", exploding)
    with pytest.raises(TrainingDivergedError, match=r"the weights of teacher became non-finite in step 2 "
                                                     r".*step_000000001\.ckpt: resume from it"):
        tr.run()
    mgr = CheckpointManager(tmp_path / "checkpoints")
    assert load_state(mgr.latest_path())["step"] == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged" and "weights of teacher" in summary["error"]


def test_divergence_on_one_rank_stops_every_rank_with_one_message_naming_it(tmp_path):
    """A NaN on rank 1 only: both ranks stop at the same step with the same message, which names
    rank 1 and its value (not rank 0's finite one), and only rank 0 prints it."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        procs.append(subprocess.Popen([sys.executable, "-c", _DIVERGING_RANK, str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=Path(__file__).resolve().parents[1]))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-3000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    by_rank = {o["rank"]: o for o in out}
    assert by_rank[0]["message"] == by_rank[1]["message"]
    assert "became nan in step 8 (epoch 1) on rank 1 of 2" in by_rank[0]["message"]
    assert "no checkpoint was written yet: start it again" in by_rank[0]["message"]
    assert by_rank[0]["stderr"] == f"error: {by_rank[0]['message']}\n"
    assert by_rank[1]["stderr"] == ""


def test_configs_load_and_reject_mistakes(tmp_path):
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = load_config(path, overrides=["distill.metric=lidar_completion.metrics.chamfer_distance"]
                          if "distill" in path.name else [])
        assert cfg["kind"] in KINDS
    full = load_config(CONFIGS / "distill_dpo.yaml", overrides=["distill.metric=lidar_completion.metrics.chamfer_distance"])
    assert full["train"]["optimizer"]["name"] == "sgd" and full["train"]["optimizer"]["lr"] == 1e-5
    assert full["train"]["grad_clip"] == 0.05 and full["distill"]["noise_scale"] == 1.1
    teacher = load_config(CONFIGS / "teacher.yaml")
    assert teacher["teacher"]["cond_dropout"] == 0.1 and teacher["train"]["optimizer"]["lr"] == 1e-4
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: teacher\ntrain: {batch_sise: 2}\n")
    with pytest.raises(ConfigError, match="batch_sise"):
        load_config(bad)
    with pytest.raises(ConfigError, match="distill.mode"):
        load_config(CONFIGS / "distill_dpo.yaml", overrides=["distill.mode=sdpo"])
    with pytest.raises(ConfigError, match="no callable|cannot import"):
        load_config(CONFIGS / "distill_dpo.yaml", overrides=["distill.metric=training.losses.nope"])
    with pytest.raises(ConfigError, match="is for 'teacher'"):
        load_config(CONFIGS / "teacher.yaml", kind="distill")
    with pytest.raises(ConfigError, match="teacher_dpo.composite"):
        load_config(CONFIGS / "teacher_dpo.yaml", overrides=["teacher_dpo.metric=composite",
                                                             "teacher_dpo.composite={cd: 1, emd: 1}"])
    with pytest.raises(ConfigError, match="validation.select"):
        load_config(CONFIGS / "teacher.yaml", overrides=["validation.select=emd"])
    # a distillation / DPO stage without its teacher is refused (it used to train from random
    # networks with a warning); "random" asks for that explicitly
    with pytest.raises(ConfigError, match=r"distill.teacher is not set.*distill.teacher=PATH"):
        load_config(CONFIGS / "tiny_distill_vsd.yaml", overrides=["distill.teacher=null"])
    with pytest.raises(ConfigError, match=r"teacher_dpo.reference is not set"):
        load_config(CONFIGS / "tiny_teacher_dpo.yaml", overrides=["teacher_dpo.reference=null"])
    assert load_config(CONFIGS / "tiny_distill_vsd.yaml", overrides=["distill.teacher=random"])["distill"]["teacher"] == "random"
    assert load_config(CONFIGS / "tiny_distill_vsd.yaml",
                       overrides=["distill.teacher=null", "init=runs/t.pt"])["init"] == "runs/t.pt"


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=abc", "train.batch_size must be a number, got 'abc'"),
    ("train.batch_size=1.5", "train.batch_size must be a whole number"),
    ("seed=abc", "seed must be a number"),
    ("train.optimizer.lr=[1]", "train.optimizer.lr must be a number"),
    ("train=5", "train must be a mapping"),
    ("log.progress=maybe", "log.progress must be true or false"),
    ("data.kind=[npz]", "data.kind must be a string"),
    ("train.grad_clip=-1", "train.grad_clip must be null or a number > 0"),
    ("train.grad_clip=0", "train.grad_clip must be null or a number > 0"),
    ("data.limit=0", "data.limit must be null or a whole number >= 1"),
    ("checkpoint.part_mib=abc", "checkpoint.part_mib must be null or a number >= 1"),
    ("train.optimizer.betas=[2, 3]", "train.optimizer.betas must be two numbers in [0, 1)"),
    ("train.optimizer={name: sgd, lr: 0}", "train.optimizer.lr must be a positive number"),
    ("train.lr_schedule.every_epochs=0", "train.lr_schedule.every_epochs must be >= 1"),
    ("distill.aux_warmup_steps=-1", "distill.aux_warmup_steps must be >= 0"),
    ("distill.aux_optimizer={name: adam, lr: -1}", "distill.aux_optimizer.lr must be a positive number"),
    ("distill.aux_grad_clip=-2", "distill.aux_grad_clip"),
    ("device=tpu", "device must be auto, cpu, cuda or cuda:N"),
    ("validation.sequence=[1]", "validation.sequence: expected a sequence name"),
    ("distill.metric=nosuch", "distill.metric must be one of cd, "),
    ("data.target_points=0", "data.target_points must be >= 1"),
    ("data.num_workers=-1", "data.num_workers must be >= 0"),
    # values that flip a sign (gradient ascent, a rewarded regulariser) or mean something else
    ("train.lr_schedule.gamma=-1", "train.lr_schedule.gamma must be positive, got -1"),
    ("diffusion.reg_weight=-1", "diffusion.reg_weight must be >= 0, got -1"),
    ("distill.vsd_weight=-0.5", "distill.vsd_weight must be >= 0, got -0.5"),
    ("distill.dpo_beta=0", "distill.dpo_beta must be positive, got 0"),
    ("distill.teacher_guidance=0", "distill.teacher_guidance must be positive, got 0"),
    ("threads=-2", "threads must be >= 0 (0: torch's default), got -2"),
    ("log.render_every_steps=-1", "log.render_every_steps must be >= 0 (0: off), got -1"),
    ("train.optimizer={name: adam, lr: 0.001, momentum: 0.9}",
     "train.optimizer.momentum is 0.9, but train.optimizer.name 'adam' has no momentum"),
    ("kind=refiner", "override kind='refiner': this is a 'distill' run"),
])
def test_config_values_of_the_wrong_type_or_range_are_refused_naming_the_key(override, message):
    """A value a trainer would misread (a truncated batch size, a negative clip that flips the
    gradient) or crash on (a string where a number goes) is refused before anything is built."""
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "tiny_distill_dpo.yaml", overrides=[override])
    assert message in str(e.value)


@pytest.mark.parametrize("name, override, message", [
    ("tiny_refiner", "refiner.jitter_sigma=-0.1", "refiner.jitter_sigma must be >= 0, got -0.1"),
    ("tiny_refiner", "refiner.input_points=0", "refiner.input_points must be >= 1, got 0"),
    ("tiny_teacher_dpo", "teacher_dpo.sample_guidance=0",
     "teacher_dpo.sample_guidance must be positive, got 0"),
    ("tiny_teacher", "kind=refiner", "override kind='refiner': this is a 'teacher' run"),
])
def test_refiner_and_teacher_dpo_values_out_of_range_are_refused_naming_the_key(name, override, message):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / f"{name}.yaml", overrides=[override, "teacher_dpo.reference=random"]
                    if name == "tiny_teacher_dpo" else [override])
    assert message in str(e.value)


def test_the_documented_edge_values_stay_allowed():
    """vsd_weight 0 is the published objective; guidance below 1 is a weaker condition, not an error."""
    cfg = load_config(CONFIGS / "tiny_distill_dpo.yaml", overrides=[
        "distill.teacher=random", "distill.vsd_weight=0", "distill.teacher_guidance=0.5", "threads=0",
        "log.render_every_steps=0", "diffusion.reg_weight=0"])
    assert cfg["distill"]["vsd_weight"] == 0 and cfg["distill"]["teacher_guidance"] == 0.5


def test_a_mapping_override_is_merged_over_the_section_like_a_config_file(tmp_path):
    """`--set train.optimizer={lr: ...}` replaced the section: a configured SGD trained with Adam (the
    default name) unannounced, and `--set train={batch_size: 1}` crashed on the missing max_steps."""
    sgd = tmp_path / "sgd.yaml"
    sgd.write_text("kind: teacher\nmodel: tiny\ntrain:\n  max_steps: 3\n"
                   "  optimizer: {name: sgd, lr: 1.0e-3, momentum: 0.9}\n")
    cfg = load_config(sgd, "teacher", ["train.optimizer={lr: 1.0e-2}"])
    assert cfg["train"]["optimizer"]["name"] == "sgd" and cfg["train"]["optimizer"]["momentum"] == 0.9
    assert cfg["train"]["optimizer"]["lr"] == 0.01
    cfg = load_config(sgd, "teacher", ["train={batch_size: 2}", "checkpoint={keep: 1}"])
    assert cfg["train"]["max_steps"] == 3 and cfg["train"]["batch_size"] == 2
    assert cfg["checkpoint"]["keep"] == 1 and cfg["checkpoint"]["every_steps"] == 500
    cfg = load_config(sgd, "teacher", ["train={optimizer: {lr: 0.5}}"])   # merged at every depth
    assert cfg["train"]["optimizer"] == {"name": "sgd", "lr": 0.5, "betas": [0.9, 0.999],
                                         "weight_decay": 0.0, "momentum": 0.9}
    with pytest.raises(ConfigError, match="unknown config key 'train.optimizer.momentun'"):
        load_config(sgd, "teacher", ["train={optimizer: {momentun: 0.5}}"])


def test_config_values_are_normalised_to_their_defaults_types():
    """Sequence numbers as YAML reads them (07 -> 7, 00 -> 0, or one number alone) become KITTI
    sequence names; an integral float stands for an integer, an integer for a float."""
    cfg = load_config(CONFIGS / "tiny_teacher.yaml", overrides=[
        "data.sequences=00", "validation.sequence=07", "train.batch_size=2.0", "train.optimizer.lr=1",
        "data.loader_timeout_s=0.5", "train.grad_clip=5e-2"])
    assert cfg["data"]["sequences"] == ["00"] and cfg["validation"]["sequence"] == "07"
    assert cfg["train"]["batch_size"] == 2 and isinstance(cfg["train"]["batch_size"], int)
    assert cfg["train"]["optimizer"]["lr"] == 1.0 and isinstance(cfg["train"]["optimizer"]["lr"], float)
    assert cfg["data"]["loader_timeout_s"] == 0.5
    assert cfg["train"]["grad_clip"] == 0.05     # PyYAML reads 5e-2 as a string: parsed as the number
    assert load_config(CONFIGS / "tiny_teacher.yaml",
                       overrides=["data.sequences=[7, '08', 10]"])["data"]["sequences"] == ["07", "08", "10"]


def test_cli_help_lists_the_three_trainings(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("teacher", "refiner", "distill", "torchrun"):
        assert word in out


def test_tensorboard_scalars_and_birds_eye_render(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = tiny_config("distill", "train.max_steps=2", "log.tensorboard=true", "log.render_every_steps=1",
                      "log.every_steps=1", "checkpoint.export=false", "distill.aux_warmup_steps=0", mode="dpo")
    from training.distill import DistillTrainer
    DistillTrainer(cfg, tmp_path, source=scenes_source(1, n_target=800, n_scan=80)).run()
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("loss/student", "loss/aux_w", "loss/aux_l", "lr", "metric/winner", "metric/loser",
                "metric/margin"):
        assert tag in tags["scalars"], (tag, tags["scalars"])
        assert len(acc.Scalars(tag)) == 2
    assert "distill/bev" in tags["images"] and len(acc.Images("distill/bev")) == 2


def test_distillation_starts_from_a_published_lightning_checkpoint(tmp_path):
    """A Distillation-DPO teacher file (``DiffModel.`` / ``DM_encoder.`` prefixes) initialises the
    encoder, the teacher and the student/auxiliary copies."""
    from lidar_completion.models import ConditionEncoder, Denoiser, ModelConfig
    from training.distill import DistillTrainer
    torch.manual_seed(3)
    enc, den = ConditionEncoder(ModelConfig.tiny(), "torch"), Denoiser(ModelConfig.tiny(), "torch")
    sd = {f"DM_encoder.{k}": v for k, v in enc.state_dict().items()}
    sd.update({f"DiffModel.{k}": v for k, v in den.state_dict().items()})
    path = tmp_path / "published.ckpt"
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 100}, path)
    cfg = tiny_config("distill", f"distill.teacher={path}", "checkpoint.export=false", mode="dpo")
    tr = DistillTrainer(cfg, tmp_path / "run", source=scenes_source(1, n_target=800, n_scan=80))
    for name in ("teacher", "student", "aux_w", "aux_l"):
        for k, v in den.state_dict().items():
            assert torch.equal(tr.modules[name].state_dict()[k], v), (name, k)
    for k, v in enc.state_dict().items():
        assert torch.equal(tr.encoder.state_dict()[k], v), k
    assert not any(p.requires_grad for p in tr.teacher.parameters())
    assert not any(p.requires_grad for p in tr.encoder.parameters())
    # the export records the exact teacher file it was distilled from (ship_default --student-only)
    from lidar_completion.checkpoints import load_checkpoint
    from lidar_completion.fileutil import sha256_file
    tr.export(tmp_path / "distill.pt")
    assert load_checkpoint(tmp_path / "distill.pt", backend="torch").meta["teacher_sha256"] == sha256_file(path)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training(precision, tmp_path, monkeypatch):
    """train.precision: the forward passes run under autocast (the denoiser's output is in the
    reduced dtype), the loss and the master weights stay fp32, the weights move, fp16 keeps a
    loss scaler in the checkpoint, and a resume is bit-exact."""
    npz = write_npz(tmp_path / "two.npz", n=2, n_target=1200, n_scan=120)
    seen = []
    real = TeacherTrainer.train_step

    def spy(self, batch):
        hook = self.net.denoiser.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        try:
            return real(self, batch)
        finally:
            hook.remove()
    monkeypatch.setattr(TeacherTrainer, "train_step", spy)
    straight, parted = tmp_path / "straight", tmp_path / "parted"
    extra = ["--set", f"train.precision={precision}", "--set", "train.optimizer.lr=1e-3"]
    assert main(_args(npz, straight, "--max-steps", "6", *extra)) == 0
    assert set(seen) == {torch.bfloat16 if precision == "bf16" else torch.float16}
    st = load_state(CheckpointManager(straight / "checkpoints").latest_path())
    w = st["models"]["teacher"]["denoiser.stem.0.kernel"]
    assert w.dtype == torch.float32 and torch.isfinite(w).all()
    assert ("main" in st["scalers"]) == (precision == "fp16")
    first = tmp_path / "first"
    assert main(_args(npz, first, "--max-steps", "1", *extra)) == 0
    w0 = load_state(CheckpointManager(first / "checkpoints").latest_path())["models"]["teacher"]["denoiser.stem.0.kernel"]
    assert not torch.equal(w0, w)
    assert main(_args(npz, parted, "--max-steps", "3", *extra)) == 0
    assert main(_args(npz, parted, "--max-steps", "6", "--resume", *extra)) == 0
    _assert_identical(_weights(straight), _weights(parted))


class _SlowDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, item):
        time.sleep(30)
        return item


def test_loader_workers_give_the_same_run(straight_run, tmp_path):
    """Samples made by two forkserver-started workers: the run is the one made in the trainer."""
    npz, straight = straight_run
    out = tmp_path / "workers"
    args = _args(npz, out, "--max-steps", "20", "--set", "train.lr_schedule={gamma: 0.9, every_epochs: 2}",
                 "--set", "data.num_workers=2", "--set", "data.loader_start=forkserver")
    assert main(args) == 0
    _assert_identical(straight, _weights(out))


def test_a_stuck_loader_worker_is_an_error_that_says_what_to_do():
    from lidar_completion.errors import DatasetError
    from training.data import make_loader
    from training.engine import _batches

    loader = make_loader(_SlowDataset(), [[0, 1], [2, 3]], num_workers=1, start="fork", timeout_s=1)
    with pytest.raises(DatasetError, match="data.num_workers=0"):
        next(_batches(loader, 1, 1))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_per_step_decay_of_the_learning_rate(tmp_path, kind):
    """train.lr_schedule.decay_steps N: the rate goes from lr0 at step 0 to lr0 * decay_to at step N
    and stays there, inside one epoch (where gamma never acts); the logged rate of step s+1 is the
    one that step used (the schedule evaluated at s)."""
    import math
    npz = write_npz(tmp_path / "four.npz", n=4, n_target=1200, n_scan=120)
    out = tmp_path / "run"
    lr0, n, low = 1e-3, 4, 0.1
    assert main(_args(npz, out, "--max-steps", "6", "--set", "log.every_steps=1",
                      "--set", f"train.optimizer={{name: adam, lr: {lr0}}}",
                      "--set", f"train.lr_schedule={{decay_steps: {n}, decay_to: {low}, decay: {kind}}}")) == 0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in logged if "lr" in r}

    def want(s):
        p = min(s, n) / n
        return lr0 * ((low + (1 - low) * 0.5 * (1 + math.cos(math.pi * p))) if kind == "cosine" else 1 - (1 - low) * p)
    for step in range(1, 7):
        assert lrs[step] == pytest.approx(want(step - 1), rel=1e-9), step
    assert lrs[6] == pytest.approx(lr0 * low) and lrs[1] == pytest.approx(lr0)
    for bad, match in (("decay_steps: -1", "decay_steps"), ("decay_to: 1.5", "decay_to"), ("decay: step", "decay")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, "teacher", [f"train.lr_schedule={{{bad}}}"])


def test_a_training_state_given_as_a_model_checkpoint_is_named_as_such(tmp_path):
    """``init`` (or a teacher, reference, refiner) pointing at a --resume checkpoint: the error says
    it is a training state and what to do, under the config key that named it."""
    state = tmp_path / "step_000000002.ckpt"
    save_state(state, {"step": 2, "models": {"w": torch.zeros(3)}})
    cfg = tiny_config("teacher", f"init={state}")
    with pytest.raises(CheckpointError, match=r"^init: .*is a training state .*--resume"):
        TeacherTrainer(cfg, tmp_path / "run", source=scenes_source(1, n_target=800, n_scan=80))
    from training.distill import DistillTrainer
    cfg = tiny_config("distill", f"distill.teacher={state}")
    with pytest.raises(CheckpointError, match=r"^distill\.teacher: .*is a training state"):
        DistillTrainer(cfg, tmp_path / "d", source=scenes_source(1, n_target=800, n_scan=80))


def test_the_distillations_refiner_is_read_before_training_not_after(tmp_path):
    """A mistyped distill.refiner used to surface only at the export, after every step had run."""
    from training.distill import DistillTrainer
    cfg = tiny_config("distill", f"distill.refiner={tmp_path / 'refiner_typo.pt'}", "train.max_steps=1")
    with pytest.raises(CheckpointError, match=r"^distill\.refiner: .*refiner_typo\.pt"):
        DistillTrainer(cfg, tmp_path / "d", source=scenes_source(1, n_target=800, n_scan=80))
    assert not (tmp_path / "d" / "checkpoints").exists()
    shipped = ROOT / "lidar_completion_pkg" / "lidar_completion" / "weights" / "student.pt"
    cfg = tiny_config("distill", f"distill.refiner={shipped}", "train.max_steps=1")
    tr = DistillTrainer(cfg, tmp_path / "ok", source=scenes_source(1, n_target=800, n_scan=80))
    assert tr._refiner is not None


def test_resuming_with_another_optimiser_is_refused_before_it_fails_midway(tmp_path, capsys):
    npz = write_npz(tmp_path / "two.npz", n=2, n_target=1200, n_scan=120)
    out = tmp_path / "run"
    assert main(_args(npz, out, "--max-steps", "2")) == 0
    capsys.readouterr()
    assert main(_args(npz, out, "--max-steps", "3", "--resume", "--set", "train.optimizer={name: sgd, lr: 0.01}")) == 1
    err = capsys.readouterr().err
    assert "optimiser was Adam, this run's is SGD" in err and "init=" in err
    assert main(_args(npz, out, "--max-steps", "3", "--resume")) == 0


def test_a_missing_validation_sequence_stops_the_run_at_start_naming_the_keys(tmp_path):
    from lidar_completion.data.synthetic import generate_dataset
    from lidar_completion.errors import DatasetError

    root = tmp_path / "data"
    generate_dataset(root, sequences=["00"], scans=2, seed=0)
    cfg = tiny_config("teacher", f"data.root={root}", "data.kind=semantickitti", "data.sequences=['00']",
                      "validation.every_steps=50", "validation.at_start=false", "train.max_steps=100")
    tr = TeacherTrainer(cfg, tmp_path / "run", source=scenes_source(2, n_target=1200, n_scan=120))
    with pytest.raises(DatasetError, match=r"validation \(validation.root .*validation.sequence '08'\)"):
        tr.run()
    assert tr.step == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"


def test_an_npz_data_root_that_is_no_archive_is_named(tmp_path):
    from lidar_completion.errors import DatasetError
    from training.sources import NpzSource

    text = tmp_path / "data.npz"
    text.write_text("not an archive\n")
    with pytest.raises(DatasetError, match=r"data.root .*data.npz is not a readable .npz archive"):
        NpzSource(text, 100, 1000)
    one = tmp_path / "one.npz"
    with open(one, "wb") as fh:
        np.save(fh, np.zeros((3, 3), np.float32))
    with pytest.raises(DatasetError, match="holds one array, not an .npz archive"):
        NpzSource(one, 100, 1000)


def test_the_last_step_is_saved_once_and_a_resume_takes_the_configured_optimiser(tmp_path, monkeypatch,
                                                                                 caplog):
    """A last step that is a multiple of checkpoint.every_steps was written twice (the loop's save,
    then the final one), which rewrote a split checkpoint's parts in place under the index naming
    them. And a resume restored every optimiser setting of the checkpoint but the learning rate:
    changed betas / weight decay were silently dropped while config.yaml recorded them."""
    npz = write_npz(tmp_path / "two.npz", n=2, n_target=1200, n_scan=120)
    out = tmp_path / "run"
    saved = []
    real_save = CheckpointManager.save

    def spy(self, state, *a, **k):
        saved.append(state["step"])
        return real_save(self, state, *a, **k)

    monkeypatch.setattr(CheckpointManager, "save", spy)
    args = _args(npz, out, "--set", "checkpoint.every_steps=4")
    assert main(args + ["--max-steps", "8"]) == 0
    assert saved == [4, 8]
    saved.clear()
    with caplog.at_level("INFO", logger="training.engine"):
        assert main(args + ["--max-steps", "9", "--resume", "--set", "train.optimizer.betas=[0.5, 0.9]",
                            "--set", "train.optimizer.weight_decay=0.1"]) == 0
    assert saved == [9]
    groups = load_state(CheckpointManager(out / "checkpoints").latest_path())["optimizers"]["main"]["param_groups"]
    assert all(tuple(g["betas"]) == (0.5, 0.9) and g["weight_decay"] == 0.1 for g in groups)
    assert "betas (0.9, 0.999) -> (0.5, 0.9)" in caplog.text, caplog.text
    assert "train.optimizer.weight_decay: 0.0 -> 0.1" in caplog.text, caplog.text


def test_a_resumed_distillation_keeps_and_names_the_teacher_it_was_trained_from(tmp_path, caplog):
    """Resumed with distill.teacher naming another file, the run went on (rightly) with the teacher
    weights of its checkpoint, but its export named the new file's SHA-256: a teacher never used."""
    from lidar_completion.checkpoints import load_checkpoint
    from lidar_completion.fileutil import sha256_file
    from lidar_completion.models import ConditionEncoder, Denoiser, ModelConfig
    from training.distill import DistillTrainer

    files = []
    for seed in (3, 4):
        torch.manual_seed(seed)
        enc, den = ConditionEncoder(ModelConfig.tiny(), "torch"), Denoiser(ModelConfig.tiny(), "torch")
        sd = {f"DM_encoder.{k}": v for k, v in enc.state_dict().items()}
        sd.update({f"DiffModel.{k}": v for k, v in den.state_dict().items()})
        files.append(tmp_path / f"teacher{seed}.ckpt")
        torch.save({"state_dict": sd}, files[-1])
    source = scenes_source(1, n_target=800, n_scan=80)
    first = DistillTrainer(tiny_config("distill", f"distill.teacher={files[0]}", "checkpoint.export=false",
                                       mode="dpo"), tmp_path / "run", max_steps=1, source=source)
    first.run()
    cfg = tiny_config("distill", f"distill.teacher={files[1]}", "checkpoint.export=false", mode="dpo")
    with caplog.at_level("WARNING", logger="training.engine"):
        again = DistillTrainer(cfg, tmp_path / "run", resume=True, max_steps=1, source=source)
    assert "distill.teacher now names a file" in caplog.text
    for k, v in first.teacher.state_dict().items():
        assert torch.equal(again.teacher.state_dict()[k], v), k
    again.export(tmp_path / "distill.pt")
    meta = load_checkpoint(tmp_path / "distill.pt", backend="torch").meta
    assert meta["teacher_sha256"] == sha256_file(files[0]) != sha256_file(files[1])


def test_mapping_overrides_and_synthetic_sections_refuse_unknown_keys(tmp_path):
    """A mapping given to --set replaced its section unchecked (`train.optimizer={..., momentun: 0.9}`
    meant momentum 0, silently), and the synthetic sections took any key (and ignored it)."""
    with pytest.raises(ConfigError, match="unknown key 'momentun' in train.optimizer"):
        load_config(CONFIGS / "tiny_teacher.yaml", "teacher",
                    ["train.optimizer={name: sgd, lr: 0.01, momentun: 0.9}"])
    cfg = load_config(CONFIGS / "tiny_teacher.yaml", "teacher", ["train.optimizer={name: sgd, lr: 0.01, momentum: 0.9}"])
    assert {k: cfg["train"]["optimizer"][k] for k in ("name", "lr", "momentum")} == \
        {"name": "sgd", "lr": 0.01, "momentum": 0.9}
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: teacher\ndata: {kind: synthetic, synthetic: {scan: 4}}\n")
    with pytest.raises(ConfigError, match="unknown config key 'data.synthetic.scan'"):
        load_config(bad, "teacher")


def test_logs_of_a_run_without_checkpoint_move_aside_and_a_resume_drops_what_followed_its_checkpoint(
        tmp_path):
    """A fresh run into a folder whose earlier run left logs but no checkpoint appended to them
    (metrics.jsonl read steps 1..6, then 1..8); a run killed between checkpoints had logged steps
    that the resumed run logged again."""
    npz = write_npz(tmp_path / "two.npz", n=2, n_target=1200, n_scan=120)
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 123.0}\n{"step": 2, "loss": 123.0}\n')
    args = _args(npz, out, "--set", "checkpoint.every_steps=2", "--set", "log.every_steps=1")
    assert main(args + ["--max-steps", "4"]) == 0
    aside = list((out / "earlier").glob("*/metrics.jsonl"))
    assert len(aside) == 1 and "123.0" in aside[0].read_text()

    def steps():
        return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    assert steps() == [1, 2, 3, 4]
    with open(out / "metrics.jsonl", "a") as fh:      # what a run killed at step 6 had logged
        fh.write('{"step": 5, "loss": 123.0}\n{"step": 6, "loss": 123.0}\n{"st')
    assert main(args + ["--max-steps", "6", "--resume"]) == 0
    assert steps() == [1, 2, 3, 4, 5, 6] and "123.0" not in (out / "metrics.jsonl").read_text()


def test_resuming_with_another_model_size_is_a_short_error(tmp_path, capsys):
    """torch lists every mismatched tensor of a state dict (hundreds of lines for another model
    size): the resume is refused in one line naming the setting, before anything is built; a state
    without the run's settings (written before they were saved with it) gets the module and the
    first few mismatched tensors from load_state_dict."""
    npz = write_npz(tmp_path / "two.npz", n=2, n_target=1200, n_scan=120)
    out = tmp_path / "run"
    assert main(_args(npz, out, "--max-steps", "1")) == 0
    wider = "model={channels: [8, 8, 16, 32, 64, 64, 32, 24, 16], name: other}"
    assert main(_args(npz, out, "--max-steps", "2", "--resume", "--set", wider)) == 1
    err = capsys.readouterr().err
    assert "was written by a run with other data or networks (model: 'tiny' there, {" in err
    assert len(err.strip().splitlines()) == 1, err[:2000]
    latest = CheckpointManager(out / "checkpoints").latest_path()
    st = load_state(latest)
    del st["config_yaml"]
    save_state(latest, st)
    assert main(_args(npz, out, "--max-steps", "2", "--resume", "--set", wider)) == 1
    err = capsys.readouterr().err
    assert "does not match this configuration (another model size?)" in err
    assert len(err.strip().splitlines()) == 1 and "more)" in err, err[:2000]


def test_a_resume_that_cannot_work_fails_before_data_is_made_or_a_folder_written(tmp_path, monkeypatch):
    """--resume of a missing file, of a file that is no checkpoint, or of another kind's state was
    refused only after the networks were built and the data made, and left a run folder behind."""
    built = []
    monkeypatch.setattr(TeacherTrainer, "build_source", lambda self: built.append(1))
    cfg = tiny_config("teacher", "train.max_steps=2")
    text = tmp_path / "text.ckpt"
    text.write_text("not a checkpoint\n")
    refiner_state = tmp_path / "refiner.ckpt"
    save_state(refiner_state, {"kind": "refiner", "step": 1})
    for resume, words in ((tmp_path / "nope.ckpt", "does not exist"), (text, "not"),
                          (refiner_state, "is a 'refiner' training state, expected 'teacher'")):
        out = tmp_path / f"run_{resume.stem}"
        with pytest.raises(CheckpointError, match=words):
            TeacherTrainer(cfg, out, resume=str(resume), source=None)
        assert not out.exists() and not built, resume


def test_a_resume_keeps_to_its_own_folder_and_its_data(tmp_path, monkeypatch, caplog):
    """--resume of one run into an --out holding another run's checkpoints deleted those (the
    rotation) and replaced its export; a resume without the run's --set flags made a whole
    synthetic dataset before the data order refused it, or went on with other data. Both are
    refused before anything is built; the same data in another folder is taken, with a warning."""
    import logging

    from training.config import dump
    built = []
    monkeypatch.setattr(TeacherTrainer, "build_source", lambda self: built.append(1))
    cfg = tiny_config("teacher", "train.max_steps=2", "data.kind=synthetic", "data.scan_points=500")
    other_run = tmp_path / "other" / "checkpoints"
    save_state(other_run / "step_000000003.ckpt", {"kind": "teacher", "step": 3, "config_yaml": dump(cfg)})
    mine = tmp_path / "mine" / "checkpoints"
    save_state(mine / "step_000000001.ckpt", {"kind": "teacher", "step": 1, "config_yaml": dump(cfg)})
    with pytest.raises(ConfigError, match=r"continues the run of .*other, but .*mine already holds the "
                                          r"checkpoints of another run"):
        TeacherTrainer(cfg, tmp_path / "mine", resume=str(other_run / "step_000000003.ckpt"), source=None)
    assert sorted(p.name for p in mine.iterdir()) == ["step_000000001.ckpt"] and not built

    (tmp_path / "other" / "config.yaml").write_text(dump(cfg))
    plain = tiny_config("teacher", "train.max_steps=2")            # the --set flags left out
    with pytest.raises(ConfigError, match=r"other data or networks \(data\.scan_points: 500 there, \d+ now\).*"
                                          r"`--config .*other/config\.yaml --out .*fresh --resume "
                                          r".*step_000000003\.ckpt` resumes with all of them"):
        TeacherTrainer(plain, tmp_path / "fresh", resume=str(other_run), source=None)
    assert not (tmp_path / "fresh").exists() and not built

    # the check alone (a resume also loads the state, which these stand-ins do not hold)
    src = scenes_source(2, n_target=1200, n_scan=120)
    moved = TeacherTrainer(tiny_config("teacher", "train.max_steps=2", "data.kind=synthetic", "data.scan_points=500",
                                       "data.root=/elsewhere/data"), tmp_path / "fresh2", source=src)
    with caplog.at_level(logging.WARNING):
        moved._check_resume_settings(other_run / "step_000000004.ckpt",
                                     dump(dict(cfg, data=dict(cfg["data"], root="/data"))))    # no error
    assert "data.root is /elsewhere/data now, /data in the run that wrote" in caplog.text
    # a state of a version without a key (its config lacks it) is not refused for that key
    older = dict(cfg, data={k: v for k, v in cfg["data"].items() if k != "scan_window"})
    same = TeacherTrainer(tiny_config("teacher", "train.max_steps=2", "data.kind=synthetic", "data.scan_points=500",
                                      "data.scan_window=7"), tmp_path / "fresh3", source=src)
    same._check_resume_settings(other_run / "step_000000005.ckpt", dump(older))                # no error
    with pytest.raises(ConfigError, match=r"data\.scan_window: \d+ there, 7 now"):
        same._check_resume_settings(other_run / "step_000000005.ckpt", dump(cfg))


@pytest.mark.parametrize("kind", ["teacher", "teacher-dpo"])
def test_the_validation_refiner_is_read_at_start(tmp_path, monkeypatch, kind):
    """validation.refiner was read at the first validation: a missing file ended the run there,
    before that step's checkpoint (up to every_steps steps lost); a file without a refiner validated
    unrefined without a word."""
    from lidar_completion.checkpoints import make_random_checkpoint
    from training.teacher_dpo import TeacherDPOTrainer
    cls = {"teacher": TeacherTrainer, "teacher-dpo": TeacherDPOTrainer}[kind]
    monkeypatch.setattr(cls, "make_validator", lambda self: None)   # no held-out drive made here
    src = scenes_source(2, n_target=1200, n_scan=120)
    no_refiner = make_random_checkpoint(tmp_path / "teacher.pt", refine=False)
    with_refiner = make_random_checkpoint(tmp_path / "refiner.pt")
    val = ("validation.every_steps=2", "validation.at_start=false")
    with pytest.raises(CheckpointError, match="validation.refiner.*not found"):
        cls(tiny_config(kind, *val, f"validation.refiner={tmp_path / 'nothere.pt'}"), tmp_path / "a", source=src)
    with pytest.raises(CheckpointError, match=r"validation.refiner: .*teacher\.pt has no refiner network"):
        cls(tiny_config(kind, *val, f"validation.refiner={no_refiner}"), tmp_path / "b", source=src)
    t = cls(tiny_config(kind, *val, f"validation.refiner={with_refiner}"), tmp_path / "c", source=src)
    assert t._val_refiner is not None
    # validation off, or unrefined: the file is not needed
    assert cls(tiny_config(kind, f"validation.refiner={tmp_path / 'nothere.pt'}"), tmp_path / "d", source=src)._val_refiner is None


def test_the_first_ctrl_c_is_answered_at_once_and_a_second_stops_without_a_traceback(tmp_path, capsys):
    """The first Ctrl-C printed nothing (a CPU step can take minutes: users pressed it again); the
    second ended in a raw KeyboardInterrupt traceback and a summary saying 'failed'."""
    from training.engine import TrainingAborted
    cfg = tiny_config("teacher", "train.max_steps=2")
    tr = TeacherTrainer(cfg, tmp_path / "run", source=scenes_source(2, n_target=1200, n_scan=120))
    tr._stop_signal = None
    tr._on_signal(signal.SIGINT, None)
    err = capsys.readouterr().err
    assert "SIGINT received: the run stops after step 1 and writes its checkpoint there (Ctrl-C again" in err
    with pytest.raises(TrainingAborted, match="second Ctrl-C in step 1, without a checkpoint; none was "
                                              "written before, so the run starts again"):
        tr._on_signal(signal.SIGINT, None)
    tr._stop_signal = None                      # SIGTERM: the same stop, and no Ctrl-C hint
    tr._on_signal(signal.SIGTERM, None)
    assert "SIGTERM received" in capsys.readouterr().err and tr._stop_signal == signal.SIGTERM


def test_an_out_below_a_file_is_one_line_before_anything_is_built(tmp_path, capsys, monkeypatch):
    """--out a/file/sub ended in a NotADirectoryError traceback, after the networks and the data were
    built."""
    built = []
    monkeypatch.setattr(TeacherTrainer, "build", lambda self: built.append(1))
    (tmp_path / "afile").write_text("x")
    npz = write_npz(tmp_path / "two.npz", n=2, n_target=1200, n_scan=120)
    assert main(_args(npz, tmp_path / "afile" / "sub" / "run", "--max-steps", "1")) == 1
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'afile' / 'sub' / 'run'}: {tmp_path / 'afile'} is a file" in err
    assert "Traceback" not in err and not built


def test_resuming_with_a_runs_own_config_continues_that_run(tmp_path, capsys, monkeypatch):
    """The resume error's hint `--config <run>/config.yaml` started a fresh run in runs/config/ (the
    default --out is runs/<config stem>): the hint names --out, and --resume with a run's own
    config.yaml and no --out continues that run."""
    monkeypatch.chdir(tmp_path)
    npz = write_npz(tmp_path / "two.npz", n=2, n_target=1200, n_scan=120)
    out = tmp_path / "run"
    assert main(_args(npz, out, "--max-steps", "1")) == 0
    assert main(_args(npz, out, "--max-steps", "2", "--resume", "--set", "data.scan_points=100")) == 1
    err = capsys.readouterr().err
    assert f"`--config {out / 'config.yaml'} --out {out} --resume` resumes with all of them" in err
    assert main(["teacher", "--config", str(out / "config.yaml"), "--resume", "--max-steps", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 2 and summary["resumed_from"].endswith("step_000000001.ckpt")
    assert not (tmp_path / "runs").exists()


def test_a_latest_json_naming_a_deleted_file_names_it_and_what_is_there(tmp_path, capsys):
    """`error: --resume True: .../step_000000002.ckpt does not exist` leaked Python's True and said
    nothing of latest.json or of the checkpoints that were still there."""
    npz = write_npz(tmp_path / "two.npz", n=2, n_target=1200, n_scan=120)
    out = tmp_path / "run"
    assert main(_args(npz, out, "--max-steps", "2", "--set", "checkpoint.every_steps=1")) == 0
    folder = out / "checkpoints"
    (folder / "step_000000002.ckpt").unlink()
    assert main(_args(npz, out, "--max-steps", "3", "--resume")) == 1
    err = capsys.readouterr().err.strip()
    assert "True" not in err, err
    assert err == (f"error: --resume: {folder / 'latest.json'} names step_000000002.ckpt, which does not "
                   f"exist; the checkpoints there are step_000000001.ckpt: give one with --resume "
                   f"{folder / 'step_000000001.ckpt'}")


def test_a_signal_while_the_finished_run_is_saved_says_what_happens(tmp_path, capsys, monkeypatch):
    """A signal during the final save / export printed 'the run stops after step 3 and writes its
    checkpoint there' for a 2-step run."""
    real = TeacherTrainer.export

    def export(self, path):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(self, path)
    monkeypatch.setattr(TeacherTrainer, "export", export)
    cfg = tiny_config("teacher", "train.max_steps=2", "checkpoint.export=true")
    summary = TeacherTrainer(cfg, tmp_path / "run", source=scenes_source(2, n_target=1200, n_scan=120)).run()
    err = capsys.readouterr().err
    assert "SIGTERM received: the run has done its 2 steps and stops once its final checkpoint and " \
           "export are written" in err, err
    assert "step 3" not in err and summary["status"] == "finished" and summary["export"]


def test_ctrl_c_before_the_first_step_is_one_line_and_status_130(tmp_path, capsys, monkeypatch):
    """Ctrl-C while the data was generated or its caches built ended in a KeyboardInterrupt traceback."""
    def interrupted(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(TeacherTrainer, "build_source", interrupted)
    npz = write_npz(tmp_path / "two.npz", n=2, n_target=1200, n_scan=120)
    try:
        code = main(_args(npz, tmp_path / "run", "--max-steps", "1"))
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt escaped main(): a traceback")
    assert code == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted: Ctrl-C outside the training steps")
    assert len(err.strip().splitlines()) == 1


def test_a_resumed_distillation_needs_no_teacher_file(tmp_path, caplog):
    """The training state holds the frozen teacher, but a resume read distill.teacher's file all the
    same (and failed without it); a fresh run still needs the file."""
    from training.distill import DistillTrainer
    teacher = lidiff_teacher_file(tmp_path / "teacher.ckpt", seed=3)
    source = scenes_source(1, n_target=800, n_scan=80)
    cfg = tiny_config("distill", f"distill.teacher={teacher}", "checkpoint.export=false", mode="dpo")
    first = DistillTrainer(cfg, tmp_path / "run", max_steps=1, source=source)
    first.run()
    digest = first.sources["distill.teacher"]
    teacher.unlink()
    with caplog.at_level("WARNING", logger="training.distill"):
        again = DistillTrainer(cfg, tmp_path / "run", resume=True, max_steps=2, source=source)
    assert f"distill.teacher {teacher} does not exist; the teacher's weights are taken from the training " \
           "state" in caplog.text
    for k, v in first.teacher.state_dict().items():
        assert torch.equal(again.teacher.state_dict()[k], v), k
    assert again.sources["distill.teacher"] == digest
    assert again.run()["status"] == "finished"
    with pytest.raises(CheckpointError):
        DistillTrainer(cfg, tmp_path / "fresh", max_steps=1, source=source)
