"""`lidar-completion` in scripts: values and paths it cannot use are refused before any work (not
after every scan was completed), a closed stdout pipe ends it as the shell expects, and errors name
the flags that were typed."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lidar_completion.bags import write_clouds
from lidar_completion.cli import main
from lidar_completion.completer import Completer
from lidar_completion.errors import ConfigError
from lidar_completion.io import write_cloud

FIELDS4 = ("x", "y", "z", "intensity")
START = 1_600_000_000 * 10**9

# a folder no one can create files in, root included (os.access says yes to root there)
UNWRITABLE = Path("/proc")
needs_proc = pytest.mark.skipif(not (UNWRITABLE / "self").exists(), reason="needs Linux's /proc")


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: everything under test is refused before it."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(Completer, "from_settings", load)


@pytest.fixture
def scans(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for name in ("a", "b", "c"):
        paths.append(write_cloud(tmp_path / f"{name}.bin",
                                 (rng.standard_normal((200, 4)) * 10).astype(np.float32)))
    return paths


@pytest.fixture
def bag(tmp_path):
    rng = np.random.default_rng(1)
    clouds = [(START + i * 100_000_000, (rng.standard_normal((300, 4)) * 10).astype(np.float32))
              for i in range(2)]
    return write_clouds(tmp_path / "bag", clouds, field_names=FIELDS4)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------- bag-from-kitti
@pytest.mark.parametrize("start, shown", [("nan", "nan"), ("inf", "inf"), ("1e20", "1e+20"),
                                          ("2147483648", "2147483648"), ("-1", "-1")])
def test_bag_from_kitti_refuses_a_start_time_a_stamp_cannot_hold(tmp_path, capsys, start, shown):
    """--start-time nan / inf / 1e20 ended in a traceback (a float to int, or an int32 overflow in
    the serializer after the bag was begun)."""
    root = tmp_path / "no_dataset"             # refused before the dataset is looked at
    assert main(["bag-from-kitti", str(root), "--sequence", "00", "--out", str(tmp_path / "b"),
                 "--start-time", start, "--no-progress"]) == 1
    err = _one_error_line(capsys)
    assert "--start-time must be a number of seconds in 0..2147483647" in err, err
    assert f"found {shown};" in err
    assert not (tmp_path / "b").exists()


def test_bag_from_kitti_help_names_each_default_once(capsys):
    """The help said the start time's default twice (in words, then as a float) and
    "--limit ... (default: None)"."""
    with pytest.raises(SystemExit):
        main(["bag-from-kitti", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "the default is" not in text
    assert "write only the first N scans (default: all)" in text
    assert text.count("1317600000") == 1 and "2011-10-03 00:00 UTC" in text


# ----------------------------------------------------------------------------- bag-bench
@pytest.mark.parametrize("case", ["file", pytest.param("unwritable", marks=needs_proc)])
def test_bag_bench_refuses_a_report_folder_it_cannot_write_before_the_model_loads(
        bag, tmp_path, capsys, no_model, case):
    """--out on a read-only folder (or an existing file) completed every scan and only then failed
    to write the report, losing the results."""
    out = {"file": tmp_path / "a_file", "unwritable": UNWRITABLE / "rep"}[case]
    if case == "file":
        out.write_text("x")
    assert main(["bag-bench", str(bag), "--limit", "2", "--out", str(out), "--no-progress"]) == 1
    err = _one_error_line(capsys)
    assert f"--out {out}: " in err
    assert ("exists and is not a folder" if case == "file" else f"cannot create files in {UNWRITABLE}") in err


def test_bag_bench_says_when_it_replaces_an_earlier_report(bag, tmp_path, monkeypatch, capsys):
    """A second run into the same --out (the default one included) silently replaced the first
    run's report.json / report.md."""
    def load(*args, **kwargs):
        raise ConfigError("no model in this test")

    monkeypatch.setattr(Completer, "from_settings", load)
    out = tmp_path / "rep"
    assert main(["bag-bench", str(bag), "--out", str(out), "--no-progress"]) == 1
    assert "note:" not in capsys.readouterr().err            # nothing there yet
    out.mkdir()
    (out / "report.json").write_text("{}")
    (out / "report.md").write_text("# earlier")
    assert main(["bag-bench", str(bag), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err.splitlines()
    notes = [line for line in err if "earlier run" in line]
    assert len(notes) == 1 and str(out) in notes[0] and "report.json, report.md" in notes[0], err
    assert (out / "report.md").read_text() == "# earlier"    # replaced by the run's report, not here


# ----------------------------------------------------------------------------- complete
@needs_proc
@pytest.mark.parametrize("case", ["file", "batch", "render", "nested"])
def test_complete_refuses_outputs_it_cannot_write_before_the_model_loads(scans, capsys, no_model,
                                                                         case):
    """-o /read-only/out.ply (or a batch's -o /ro/dir/, or --render /proc/r.png) completed the scans
    and only then failed to write them."""
    a, b, _ = scans
    argv, flag, path = {
        "file": ([a, "-o", UNWRITABLE / "out.ply"], "-o", UNWRITABLE / "out.ply"),
        "batch": ([a, b, "-o", f"{UNWRITABLE / 'dense'}/"], "-o", UNWRITABLE / "dense"),
        "render": ([a, "-o", a.with_name("out.ply"), "--render", UNWRITABLE / "r.png"], "--render",
                   UNWRITABLE / "r.png"),
        "nested": ([a, "-o", UNWRITABLE / "x" / "y" / "out.ply"], "-o", UNWRITABLE / "x" / "y" / "out.ply"),
    }[case]
    assert main(["complete", *map(str, argv), "--backend", "torch"]) == 1
    err = _one_error_line(capsys)
    assert f"{flag} {path}: cannot create files in {UNWRITABLE}" in err, err
    assert not a.with_name("out.ply").exists()


def test_complete_leaves_no_probe_behind(scans, tmp_path, capsys, monkeypatch):
    """The writability check tries a file and a folder: neither stays, nor are the missing output
    folders created before the scan is completed."""
    def load(*args, **kwargs):
        raise ConfigError("no model in this test")

    monkeypatch.setattr(Completer, "from_settings", load)
    before = sorted(tmp_path.iterdir())
    assert main(["complete", str(scans[0]), "-o", str(tmp_path / "new" / "out.ply")]) == 1
    assert main(["complete", str(scans[0]), "-o", str(tmp_path / "out.ply")]) == 1
    assert sorted(tmp_path.iterdir()) == before
    capsys.readouterr()


def test_a_batch_seed_must_hold_for_its_last_scan(scans, tmp_path, capsys, no_model):
    """--seed 2147483647 with two scans failed scan 1 ("seed must be in 0..2147483647, got
    2147483648") after completing scan 0: refused up front, as `evaluate` does."""
    top = 2**31 - 1
    assert main(["complete", *map(str, scans), "-o", f"{tmp_path / 'dense'}/", "--seed", str(top - 1)]) == 1
    err = _one_error_line(capsys)
    assert f"--seed {top - 1}: scan 2 ({scans[2]}) would be completed with seed {top + 1}" in err, err
    assert f"give a seed <= {top - 2}" in err


def test_a_batch_seed_that_fits_is_taken(scans, tmp_path, monkeypatch, capsys):
    def load(*args, **kwargs):
        raise ConfigError("the model would load now")

    monkeypatch.setattr(Completer, "from_settings", load)
    assert main(["complete", *map(str, scans), "-o", f"{tmp_path / 'dense'}/",
                 "--seed", str(2**31 - 3)]) == 1
    assert "the model would load now" in _one_error_line(capsys)


@pytest.mark.parametrize("argv, words", [
    (["--steps", "0"], "error: --steps must be in 1..200, got 0"),
    (["--guidance", "nan"], "error: --guidance must be in 0..20, got nan"),
    (["--seed", "-1"], "error: --seed must be in 0..2147483647, got -1"),
    (["--checkpoint", ""], "error: --checkpoint is an empty string; leave the flag out"),
    (["--min-range", "60", "--max-range", "50"], "error: --min-range (60) must be < --max-range (50)"),
])
def test_setting_errors_name_the_flag(scans, tmp_path, capsys, no_model, argv, words):
    """`complete --steps 0` said "steps must be in 1..200": the field, not the flag typed."""
    assert main(["complete", str(scans[0]), "-o", str(tmp_path / "o.ply"), *argv]) == 1
    assert _one_error_line(capsys).startswith(words)


def test_evaluate_seed_errors_name_the_flag(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path), "--seed", "-1"]) == 1
    assert _one_error_line(capsys) == "error: --seed must be in 0..2147483647, got -1"


def test_the_python_api_keeps_the_field_names():
    from lidar_completion.settings import CompletionSettings

    with pytest.raises(ConfigError, match=r"^steps must be in 1\.\.200, got 0$"):
        CompletionSettings(steps=0)


# ----------------------------------------------------------------------------- closed stdout
@pytest.mark.parametrize("argv", [["models", "--config", "tiny"], ["models", "--config", "tiny", "--json"]])
def test_a_closed_stdout_pipe_ends_quietly_with_the_sigpipe_status(argv):
    """`lidar-completion evaluate ... | head -1`: "error: [Errno 32] Broken pipe" and exit status 1
    (or Python's "Exception ignored ... BrokenPipeError" and 120). Now: nothing on stderr and 141,
    the status of a process SIGPIPE ended, which `set -o pipefail` scripts expect."""
    read, write = os.pipe()
    os.close(read)                      # the reader is gone before anything is written: EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "lidar_completion", *argv], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        os.close(write)
    assert proc.returncode == 141 and proc.stderr == "", (proc.returncode, proc.stderr[-2000:])


def test_bag_bench_live_without_rclpy_says_what_to_install(monkeypatch):
    """The live-bench entry point is registered with or without the ROS 2 libraries: without rclpy
    `bag-bench --live` died in a traceback of the replay's `import rclpy`; one line now."""
    import importlib.util

    from lidar_completion.commands import bags
    from lidar_completion.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "rclpy" else real(name, *a, **k))
    with pytest.raises(ConfigError, match=r"rclpy\) are not importable here: install them"):
        bags.live_runner()
