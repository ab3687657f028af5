"""The Makefile's setup logic, dry-run (`make -n`): `make demo` sets up without building
MinkowskiEngine, `make setup` / `make test` build it, and a full setup serves the demo."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def dry_run(target, venv, *extra):
    r = subprocess.run(["make", "-n", "--no-print-directory", target, f"VENV={venv}", *extra],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def stamp(target, venv, *extra):
    """The stamp file the target's setup would create (its last `touch`)."""
    return next(line.split()[-1] for line in reversed(dry_run(target, venv, *extra).splitlines())
                if line.startswith("touch "))


def test_demo_sets_up_without_minkowski_and_setup_with_it(tmp_path):
    venv = tmp_path / "venv"
    demo = dry_run("demo", venv)
    assert "SKIP_MINKOWSKI=1 SKIP_TRITON=1 SKIP_TF2_MSGS= " in demo
    assert "bash scripts/demo/demo.sh" in demo
    for target in ("setup", "test"):
        out = dry_run(target, venv)
        assert "SKIP_MINKOWSKI= SKIP_TF2_MSGS= " in out and "scripts/setup/setup_venv.sh" in out, target


def test_skipping_tf2_msgs_reaches_the_setup_and_is_its_own_environment(tmp_path):
    """SKIP_TF2_MSGS=1 reaches setup_venv.sh, and a venv set up without tf2_msgs does not pass for
    one set up with it (nor the other way round)."""
    venv = tmp_path / "venv"
    for target in ("setup", "demo"):
        assert "SKIP_TF2_MSGS=1 " in dry_run(target, venv, "SKIP_TF2_MSGS=1"), target
        assert stamp(target, venv, "SKIP_TF2_MSGS=1") != stamp(target, venv), target


def test_an_existing_setup_is_reused(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    # after `make demo`, the demo does not set up again; `make setup` still builds the rest
    Path(stamp("demo", venv)).touch()
    assert "setup_venv.sh" not in dry_run("demo", venv)
    assert "setup_venv.sh" in dry_run("setup", venv)
    # after a full `make setup`, neither target sets up again
    Path(stamp("setup", venv)).touch()
    assert "setup_venv.sh" not in dry_run("demo", venv)
    assert "setup_venv.sh" not in dry_run("setup", venv)


def test_demo_script_runs_on_the_torch_backend_unless_told_otherwise(tmp_path):
    """demo.sh exports LIDAR_COMPLETION_BACKEND=torch for everything it starts (an existing value
    wins); checked on the script's first lines, up to where it starts work."""
    text = (ROOT / "scripts" / "demo" / "demo.sh").read_text()
    head = text[:text.index("OUT=")]
    probe = tmp_path / "probe.sh"
    probe.write_text(head + 'echo "backend=$LIDAR_COMPLETION_BACKEND"\n')
    run = subprocess.run(["bash", str(probe)], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"})
    assert run.stdout.strip() == "backend=torch"
    run = subprocess.run(["bash", str(probe)], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "LIDAR_COMPLETION_BACKEND": "minkowski"})
    assert run.stdout.strip() == "backend=minkowski"


def test_ci_runs_the_suite_on_the_default_backend_then_on_minkowski(tmp_path):
    """`make test` leaves the backend to `auto` (torch on a CPU); `make test-minkowski` makes
    MinkowskiEngine what `auto` means, after checking that it imports; .ci/run runs both."""
    venv = tmp_path / "venv"
    test = [line for line in dry_run("test", venv).splitlines() if "pytest" in line]
    assert test and not any("LIDAR_COMPLETION_BACKEND" in line for line in test), test
    mink = dry_run("test-minkowski", venv)
    assert "import MinkowskiEngine" in mink
    assert any(line.startswith("LIDAR_COMPLETION_BACKEND=minkowski ") and "pytest" in line
               for line in mink.splitlines()), mink
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.index("make test ") < ci.index("make test-minkowski ")


DDS_USE = re.compile(r"rclpy\.init\(|create_node\(|\"--live\"|ROS_DOMAIN_ID|Participant\(|participant\(|"
                     r"random_domain\(|ros2 launch|demo\.sh")


def test_make_test_runs_in_two_workers_and_every_dds_test_file_in_one_of_them(tmp_path):
    """`make test` passes pytest-xdist's loadfile to pytest (TEST_WORKERS=0: one process), and the
    scheduler of tests/conftest.py puts every test file that opens DDS participants (rclpy, the
    node, live replays, ros2 launch) into the one "ros" unit: random DDS domains drawn by two
    workers at once could meet. Other files are their own unit."""
    from conftest import xdist_scope
    assert "-n 2 --dist loadfile" in dry_run("test", tmp_path / "v")
    assert "--dist" not in dry_run("test", tmp_path / "v", "TEST_WORKERS=0")
    dds = [p for p in sorted((ROOT / "tests").glob("test_*.py"))
           if p.name != "test_make.py" and DDS_USE.search(p.read_text())]
    assert len(dds) >= 6, [p.name for p in dds]
    for p in dds:
        assert xdist_scope(ROOT, f"tests/{p.name}::t") == "ros", p.name
    assert xdist_scope(ROOT, "tests/test_io.py::test_x[a::b]") == "tests/test_io.py"
