"""`lidar-completion complete` and Completer.from_checkpoint on a tiny random checkpoint."""
import subprocess
import sys

import numpy as np
import pytest

from lidar_completion.checkpoints import make_random_checkpoint
from lidar_completion.cli import main
from lidar_completion.completer import Completer
from lidar_completion.errors import CheckpointError
from lidar_completion.io import read_cloud, write_cloud

FAST = ["--steps", "1", "--seed", "0", "--backend", "torch", "--n-fps", "150", "--tile", "4"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def scan_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    n = 600
    r, a = rng.uniform(5, 25, n), rng.uniform(0, 2 * np.pi, n)
    pts = np.stack([r * np.cos(a), r * np.sin(a), rng.normal(-1.5, 0.3, n), rng.random(n)], 1)
    return write_cloud(tmp_path_factory.mktemp("scan") / "scan.bin", pts)


def test_from_checkpoint_uses_checkpoint_sampling_defaults(ckpt, monkeypatch):
    c = Completer.from_checkpoint(ckpt, backend="torch", seed=1, n_fps=100, tile=3)
    assert c.steps == 8 and c.guidance == 3.5 and c.refine and c.seed == 1
    c2 = Completer.from_checkpoint(ckpt, steps=3, guidance=1.0, refine=False, backend="torch")
    assert c2.steps == 3 and c2.guidance == 1.0 and not c2.refine
    with pytest.raises(CheckpointError):
        Completer.from_checkpoint(ckpt.parent / "missing.pt")
    from lidar_completion import checkpoints
    monkeypatch.setattr(checkpoints, "WEIGHTS_DIR", ckpt.parent / "no_weights_here")
    with pytest.raises(CheckpointError, match="no default checkpoint"):
        Completer.from_checkpoint(None)


def test_no_refiner_warning_says_where_a_refiner_can_come_from(ckpt, tmp_path, caplog):
    """A Lightning file whose model_refine.* is not loaded is not said to have no refiner: the
    warning names the option that loads it; a file without one points at --refiner-checkpoint."""
    import torch

    sds = torch.load(ckpt, weights_only=True)["state_dicts"]
    parts = {"partial_enc.": sds["encoder"], "generator.": sds["denoiser"]}
    both = tmp_path / "student_with_refine.ckpt"
    torch.save({"state_dict": {p + k: v for p, sd in {**parts, "model_refine.": sds["refiner"]}.items()
                               for k, v in sd.items()}}, both)
    plain = tmp_path / "student.ckpt"
    torch.save({"state_dict": {p + k: v for p, sd in parts.items() for k, v in sd.items()}}, plain)
    with caplog.at_level("WARNING", logger="lidar_completion.completer"):
        assert not Completer.from_checkpoint(both, backend="torch").refine
    assert "has no refiner" not in caplog.text
    assert "carries refiner weights (model_refine.*)" in caplog.text
    assert f"--refiner-checkpoint {both}" in caplog.text
    assert Completer.from_checkpoint(both, backend="torch", refiner_checkpoint=both).refine
    caplog.clear()
    with caplog.at_level("WARNING", logger="lidar_completion.completer"):
        assert not Completer.from_checkpoint(plain, backend="torch").refine
    assert f"checkpoint {plain} has no refiner" in caplog.text and "--refiner-checkpoint" in caplog.text


def test_solver_process_comes_from_the_checkpoint_and_can_be_overridden(ckpt, scan_file, tmp_path, capsys):
    from lidar_completion.errors import ConfigError
    assert Completer.from_checkpoint(ckpt, backend="torch").process == "vp"      # names none: published
    local = make_random_checkpoint(tmp_path / "local.pt", sampling={"steps": 2, "guidance": 1.0,
                                                                    "process": "local"})
    c = Completer.from_checkpoint(local, backend="torch", n_fps=100, tile=3, seed=0)
    assert c.process == "local" and c.solver.process == "local"
    res = c.complete_detailed(read_cloud(scan_file))
    assert res.process == "local" and np.isfinite(res.points).all()
    c.process = "vp"
    assert c.solver.process == "vp" and c.steps == 2
    assert Completer.from_checkpoint(local, backend="torch", process="vp").process == "vp"
    with pytest.raises(ConfigError, match="process"):
        Completer.from_checkpoint(local, backend="torch", process="ve")
    out = tmp_path / "o.npy"
    assert main(["complete", str(scan_file), "-o", str(out), "--checkpoint", str(local),
                 "--process", "vp", *FAST]) == 0
    assert "1 vp steps" in capsys.readouterr().out
    assert main(["complete", str(scan_file), "-o", str(out), "--checkpoint", str(local), *FAST]) == 0
    assert "1 local steps" in capsys.readouterr().out


def test_complete_cli_writes_output_and_render(ckpt, scan_file, tmp_path, capsys):
    out, png = tmp_path / "out" / "dense.ply", tmp_path / "cmp.png"
    rc = main(["complete", str(scan_file), "-o", str(out), "--checkpoint", str(ckpt), "--render",
               str(png), *FAST])
    assert rc == 0, capsys.readouterr().err
    dense = read_cloud(out)
    assert dense.ndim == 2 and dense.shape[1] == 3 and len(dense) % 6 == 0   # refined: x6
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "-> " in capsys.readouterr().out
    # --no-refine gives the raw completion (same seed: the same raw points, 6 times fewer)
    raw = tmp_path / "raw.npy"
    assert main(["complete", str(scan_file), "-o", str(raw), "--checkpoint", str(ckpt),
                 "--no-refine", *FAST]) == 0
    assert len(read_cloud(raw)) * 6 == len(dense)


@pytest.mark.parametrize("case", ["missing", "wrong_shape", "empty", "nan_only", "bad_ext"])
def test_complete_cli_bad_input_exits_with_one_line(ckpt, tmp_path, capsys, case):
    inp = tmp_path / "in.npy"
    out = tmp_path / "out.npy"
    if case == "wrong_shape":
        np.save(inp, np.zeros((100, 2), np.float32))
    elif case == "empty":
        inp = tmp_path / "in.bin"
        inp.write_bytes(b"")
    elif case == "nan_only":
        np.save(inp, np.full((100, 3), np.nan, np.float32))
    elif case == "bad_ext":
        np.save(inp, np.zeros((100, 3), np.float32))
        out = tmp_path / "out.xyz"
    rc = main(["complete", str(inp), "-o", str(out), "--checkpoint", str(ckpt), *FAST])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert not out.exists()


def test_complete_says_what_it_left_out_and_warns_of_a_scan_not_z_up(ckpt, scan_file, tmp_path, capsys,
                                                                     caplog):
    """An organised scan's no-return rows and the points outside the limits were dropped without a
    word; a scan in a z-forward (camera) frame lost everything behind the sensor to min_z silently."""
    pts = read_cloud(scan_file)
    holes = np.concatenate([pts, np.full((40, 3), np.nan, np.float32), pts[:25] * 10])   # 25 beyond 50 m
    write_cloud(tmp_path / "holes.npy", holes)
    assert main(["complete", str(tmp_path / "holes.npy"), "-o", str(tmp_path / "a.npy"),
                 "--checkpoint", str(ckpt)] + FAST) == 0
    line = capsys.readouterr().out
    assert f"holes.npy: {len(holes)} points (left out: 40 non-finite, 25 outside the range / z limits) ->" \
        in line, line
    forward = np.stack([-pts[:, 1], -pts[:, 2], pts[:, 0]], axis=1)          # x right, y down, z forward
    write_cloud(tmp_path / "forward.npy", forward)
    with caplog.at_level("WARNING"):
        main(["complete", str(tmp_path / "forward.npy"), "-o", str(tmp_path / "b.npy"),
              "--checkpoint", str(ckpt)] + FAST)
    assert any("is the scan's z axis up" in r.getMessage() for r in caplog.records), caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        main(["complete", str(scan_file), "-o", str(tmp_path / "c.npy"), "--checkpoint", str(ckpt)] + FAST)
    assert not any("z axis" in r.getMessage() for r in caplog.records)


def test_complete_entry_point_subprocess(ckpt, scan_file, tmp_path):
    out = tmp_path / "o.pcd"
    proc = subprocess.run([sys.executable, "-m", "lidar_completion", "complete", str(scan_file),
                           "-o", str(out), "--checkpoint", str(ckpt), "--ascii", *FAST],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().splitlines()[10] == "DATA ascii" and len(read_cloud(out)) > 0
    bad = subprocess.run([sys.executable, "-m", "lidar_completion", "complete", str(tmp_path / "nope.bin"),
                          "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "no such file" in bad.stderr


def test_complete_cli_batch_one_model_many_scans(ckpt, scan_file, tmp_path, capsys):
    """Several inputs (files and folders) -> one completion per scan in the output folder, scan i
    with seed + i (the same as completing it alone with that seed); a bad scan is reported and
    skipped, the others are written, and the exit status says that one failed."""
    scans = tmp_path / "scans"
    scans.mkdir()
    pts = read_cloud(scan_file, xyz_only=False)
    write_cloud(scans / "a.bin", pts)
    write_cloud(scans / "b.pcd", pts[::-1])
    (scans / "notes.txt").write_text("not a scan")                 # not a scan file: not picked up
    extra = tmp_path / "c.npy"
    np.save(extra, np.zeros((100, 2), np.float32))                 # unreadable: wrong shape
    out, png = tmp_path / "dense", tmp_path / "renders"
    rc = main(["complete", str(scans), str(extra), "-o", str(out), "--render", str(png), *FAST])
    res = capsys.readouterr()
    assert rc == 1
    assert sorted(p.name for p in out.iterdir()) == ["a.bin", "b.pcd"]
    assert sorted(p.name for p in png.iterdir()) == ["a.png", "b.png"]
    assert "error: " in res.err and "c.npy" in res.err
    assert "completed 2 of 3 scans" in res.out and "1 failed: c.npy" in res.out
    assert "seed 0)" in res.out and "seed 1)" in res.out
    # scan 1 (b.pcd) was completed with seed 0 + 1: the same as completing it alone with seed 1
    alone = tmp_path / "b_alone.pcd"
    fast1 = [a if a != "0" else "1" for a in FAST]
    assert main(["complete", str(scans / "b.pcd"), "-o", str(alone), *fast1]) == 0
    assert np.array_equal(read_cloud(alone), read_cloud(out / "b.pcd"))
    # --skip-existing leaves what is there; --format chooses the output's format
    (out / "a.bin").write_bytes(b"kept")
    capsys.readouterr()
    assert main(["complete", str(scans), "-o", str(out), "--skip-existing", *FAST]) == 0
    assert (out / "a.bin").read_bytes() == b"kept" and "2 left as they were" in capsys.readouterr().out
    assert main(["complete", str(scans / "a.bin"), str(scans / "b.pcd"), "-o", str(out), "--format", "ply",
                 *FAST]) == 0
    assert len(read_cloud(out / "a.ply")) > 0 and len(read_cloud(out / "b.ply")) > 0


@pytest.mark.parametrize("case", ["file_output", "same_name", "render_png", "format_single", "empty_dir"])
def test_complete_cli_batch_refuses_bad_arguments_before_loading(ckpt, scan_file, tmp_path, capsys, case):
    scans = tmp_path / "scans"
    scans.mkdir()
    write_cloud(scans / "a.bin", read_cloud(scan_file))
    write_cloud(tmp_path / "a.bin", read_cloud(scan_file))
    args, words = {
        "file_output": ([str(scans), "-o", str(tmp_path / "out.ply")], "is a folder"),
        "same_name": ([str(scans), str(tmp_path / "a.bin"), "-o", str(tmp_path / "o")], "would both be written"),
        "render_png": ([str(scans), "-o", str(tmp_path / "o"), "--render", str(tmp_path / "x.png")], "a folder"),
        "format_single": ([str(scan_file), "-o", str(tmp_path / "o.ply"), "--format", "ply"], "several inputs"),
        "empty_dir": ([str(tmp_path / "scans_empty"), "-o", str(tmp_path / "o")], "without scan files"),
    }[case]
    (tmp_path / "scans_empty").mkdir()
    assert main(["complete", *args, "--checkpoint", str(ckpt), *FAST]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err and "\n" not in err, err
    assert not (tmp_path / "o").exists()


def test_skip_existing_with_one_scan_into_a_folder(ckpt, scan_file, tmp_path, capsys):
    """README lists --skip-existing for an -o that ends with '/'; with one scan it was refused ("is
    for several inputs"), which broke a loop of single-scan calls into one folder."""
    out = tmp_path / "dense"
    assert main(["complete", str(scan_file), "-o", f"{out}/", "--skip-existing", *FAST]) == 0
    done = out / "scan.bin"
    assert len(read_cloud(done)) > 0
    done.write_bytes(b"kept")
    capsys.readouterr()
    assert main(["complete", str(scan_file), "-o", f"{out}/", "--skip-existing", *FAST]) == 0
    assert done.read_bytes() == b"kept" and "1 left as it was" in capsys.readouterr().out
    assert main(["complete", str(scan_file), "-o", str(tmp_path / "one.bin"), "--skip-existing", *FAST]) == 1
    assert "--skip-existing is for several inputs or an output folder" in capsys.readouterr().err
