"""Packaging and layout checks: the core imports without ROS (and without MinkowskiEngine when it is
hidden), package.xml and setup.py agree, the colcon workspace links the package, the console entry
points are installed, and (when colcon is installed) the workspace builds."""
from __future__ import annotations

import ast
import configparser
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG_DIR = ROOT / "lidar_completion_pkg"
BIN = Path(sys.executable).parent
EXPECTED_EXEC_DEPENDS = {"rclpy", "sensor_msgs", "std_msgs", "diagnostic_msgs"}
CONSOLE_SCRIPTS = {"lidar-completion", "lidar-completion-node", "completion_node",
                   "lifecycle_completion_node", "play_when_ready", "lidar-completion-train"}


def _loaded_modules(code: str, env_extra: dict[str, str] | None = None) -> set[str]:
    """Run `code` in a fresh interpreter and return the names in its sys.modules afterwards."""
    env = dict(os.environ)
    env.pop("LIDAR_COMPLETION_HIDE_MINKOWSKI", None)   # the probe says what it needs (make test-minkowski
    env.pop("LIDAR_COMPLETION_BACKEND", None)          # and make test-torch set both for the suite)
    env.update(env_extra or {})
    script = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stderr[-3000:]}"
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def _setup_py_constants() -> dict[str, object]:
    """Module-level string constants and the keyword arguments of setup() in setup.py (by AST)."""
    tree = ast.parse((PKG_DIR / "setup.py").read_text())
    found: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    found[target.id] = node.value.value
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            for kw in node.keywords:
                if isinstance(kw.value, ast.Constant):
                    found["setup." + kw.arg] = kw.value.value
    return found


def _package_xml() -> ET.Element:
    return ET.parse(PKG_DIR / "package.xml").getroot()


def test_import_core_does_not_import_rclpy():
    # The CLI parser imports every command module, so this also covers the sub-commands.
    mods = _loaded_modules("import lidar_completion, lidar_completion.cli as c; c.build_parser()")
    assert "lidar_completion" in mods
    ros = sorted(m for m in mods if m == "rclpy" or m.startswith(("rclpy.", "lidar_completion_pkg")))
    assert not ros, f"importing the core library loaded ROS modules: {ros}"


def test_cli_parser_does_not_import_torch():
    # `lidar-completion --help` (and any command's --help or usage error) builds the whole parser;
    # importing torch for it cost 1.5 of its 2.7 s. Torch loads when a command runs.
    # every sub-command's help text formatted, as `lidar-completion <command> --help` prints it
    code = ("import argparse, lidar_completion.cli as c\np = c.build_parser()\np.format_help()\n"
            "for a in p._actions:\n"
            "    if isinstance(a, argparse._SubParsersAction):\n"
            "        [q.format_help() for q in a.choices.values()]\n")
    mods = _loaded_modules(code)
    assert "lidar_completion.settings" in mods and "lidar_completion.commands.evaluate" in mods
    assert "torch" not in mods, "building the CLI parser or formatting its help imported torch"


def test_training_package_imports_core_not_node():
    mods = _loaded_modules("import training, lidar_completion")
    assert "training" in mods
    ros = sorted(m for m in mods if m == "rclpy" or m.startswith(("rclpy.", "lidar_completion_pkg")))
    assert not ros, f"importing training loaded ROS modules: {ros}"


_BACKEND_PROBE = """
import importlib
for name in {names!r}:
    importlib.import_module(name)
from lidar_completion.sparse import get_backend, resolve_backend
print("backend=" + resolve_backend())
get_backend()
"""


def _sparse_modules() -> list[str]:
    return [n for n in ("lidar_completion", "lidar_completion.sparse", "lidar_completion.models",
                        "lidar_completion.checkpoints", "lidar_completion.completer") if _spec_exists(n)]


def _minkowski_loaded(mods: set[str]) -> list[str]:
    return sorted(m for m in mods if m.split(".")[0] in ("MinkowskiEngine", "MinkowskiEngineBackend"))


def test_hidden_minkowski_is_not_imported():
    # Import every core module that touches the sparse backend, then resolve and load the backend.
    names = _sparse_modules()
    mods = _loaded_modules(_BACKEND_PROBE.format(names=names), {"LIDAR_COMPLETION_HIDE_MINKOWSKI": "1"})
    leaked = _minkowski_loaded(mods)
    assert not leaked, f"with LIDAR_COMPLETION_HIDE_MINKOWSKI=1, {names} + get_backend() loaded {leaked[:5]}"


def test_auto_backend_on_the_cpu_is_torch_even_with_minkowski_installed():
    """On a CPU ``auto`` takes the torch backend (the faster one there) and does not import an
    installed MinkowskiEngine; naming it loads it (so the checks here would see it)."""
    if not _spec_exists("MinkowskiEngine"):  # not imported here: this process may be hiding it
        pytest.skip("MinkowskiEngine is not installed (scripts/setup/install_minkowski.sh builds it)")
    probe = _BACKEND_PROBE.format(names=_sparse_modules())
    env = {"LIDAR_COMPLETION_BACKEND": "auto"}
    mods = _loaded_modules(probe, env)
    assert not _minkowski_loaded(mods), "the auto backend on the CPU imported MinkowskiEngine"
    mods = _loaded_modules(probe, dict(env, LIDAR_COMPLETION_BACKEND="minkowski"))
    assert _minkowski_loaded(mods), "MinkowskiEngine is installed but naming it did not load it"


def _spec_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def test_package_xml_is_format3_with_ros_exec_depends():
    root = _package_xml()
    assert root.tag == "package" and root.get("format") == "3", (root.tag, root.attrib)
    exec_depends = {e.text.strip() for e in root.findall("exec_depend")}
    missing = EXPECTED_EXEC_DEPENDS - exec_depends
    assert not missing, f"package.xml lacks exec_depend {sorted(missing)}; has {sorted(exec_depends)}"
    assert root.findtext("export/build_type") == "ament_python"
    for tag in ("name", "version", "description", "maintainer", "license"):
        assert (root.findtext(tag) or "").strip(), f"package.xml has no <{tag}>"


def test_package_name_matches_setup_resource_and_scripts_dir():
    name = _package_xml().findtext("name").strip()
    consts = _setup_py_constants()
    assert consts.get("PACKAGE") == name, f"setup.py PACKAGE={consts.get('PACKAGE')!r}, package.xml {name!r}"
    marker = PKG_DIR / "resource" / name
    assert marker.is_file(), f"ament resource marker {marker} missing"
    assert (PKG_DIR / name / "__init__.py").is_file(), f"python package {name}/ missing"
    cfg = configparser.ConfigParser()
    cfg.read(PKG_DIR / "setup.cfg")
    # ros2 run looks for executables in lib/<package name>.
    assert cfg.get("develop", "script_dir") == f"$base/lib/{name}"
    assert cfg.get("install", "install_scripts") == f"$base/lib/{name}"


def test_a_wheel_without_the_launch_folder_is_refused_naming_how_to_build_it(tmp_path):
    """The launch files live beside the package (../launch): a wheel built from an sdist (which
    cannot hold them) came out without them, and `ros2 launch` could not start the installed package.
    setup.py now stops there with the reason; an sdist leaves the folder out instead of copying it
    into the tree (it wrote lidar_completion_pkg/launch/ there)."""
    pkg = tmp_path / "repo" / "lidar_completion_pkg"
    pkg.mkdir(parents=True)
    for name in ("setup.py", "setup.cfg", "package.xml"):
        shutil.copy(PKG_DIR / name, pkg / name)
    shutil.copytree(PKG_DIR / "resource", pkg / "resource")

    def setup(*args):
        return subprocess.run([sys.executable, "setup.py", *args], cwd=pkg, capture_output=True,
                              text=True, timeout=120)

    proc = setup("--version")
    assert proc.returncode != 0 and "../launch/completion.launch.py is missing" in proc.stderr, proc
    assert "pip wheel ./lidar_completion_pkg" in proc.stderr
    assert setup("sdist", "--help").returncode == 0        # an sdist does not need (nor copy) it
    (tmp_path / "repo" / "launch").mkdir()
    (tmp_path / "repo" / "launch" / "completion.launch.py").write_text("")
    proc = setup("--version")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("0.2.0"), proc


def test_versions_agree():
    import lidar_completion

    xml_version = _package_xml().findtext("version").strip()
    setup_version = _setup_py_constants().get("setup.version")
    # the training distribution (top-level pyproject.toml) is released with the core
    # (read by a pattern: tomllib is 3.11+, and 3.10 is supported)
    import re
    training_version = re.search(r'(?m)^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text())[1]
    assert xml_version == setup_version == lidar_completion.__version__ == training_version, \
        (xml_version, setup_version, lidar_completion.__version__, training_version)


def test_workspace_symlink_is_relative_and_resolves():
    link = ROOT / "ros2_ws" / "src" / "lidar_completion_pkg"
    assert link.is_symlink(), f"{link} is not a symlink"
    target = os.readlink(link)
    assert not os.path.isabs(target), f"{link} points to the absolute path {target}"
    assert link.resolve() == PKG_DIR.resolve()


def test_console_entry_points_installed():
    declared = {ep.name for ep in metadata.entry_points(group="console_scripts")}
    missing = CONSOLE_SCRIPTS - declared
    assert not missing, f"console scripts not declared by the installed packages: {sorted(missing)}"
    for script in CONSOLE_SCRIPTS:
        assert (BIN / script).is_file(), f"{BIN / script} missing; run make setup"
    proc = subprocess.run([str(BIN / "lidar-completion"), "--help"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage: lidar-completion" in proc.stdout


def test_python_dash_m_matches_entry_point():
    proc = subprocess.run([sys.executable, "-m", "lidar_completion", "--version"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import lidar_completion

    assert lidar_completion.__version__ in proc.stdout


@pytest.mark.ros
def test_colcon_builds_the_workspace(tmp_path):
    """`colcon build --symlink-install` of ros2_ws (about 10 s), as a ROS 2 user would run it."""
    colcon = BIN / "colcon"
    if not colcon.is_file():
        pytest.skip("colcon is not installed in this venv (make setup installs colcon-common-extensions)")
    ws = tmp_path / "ws"
    env = dict(os.environ, AMENT_PREFIX_PATH=sys.prefix, COLCON_HOME=str(tmp_path / "colcon_home"),
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = [str(colcon), "--log-base", str(ws / "log"), "build", "--symlink-install",
           "--base-paths", str(ROOT / "ros2_ws" / "src"),
           "--build-base", str(ws / "build"), "--install-base", str(ws / "install"),
           "--event-handlers", "console_direct-"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    name = _package_xml().findtext("name").strip()
    prefix = ws / "install" / name
    assert (prefix / "share" / "ament_index" / "resource_index" / "packages" / name).exists()
    assert (prefix / "share" / name / "package.xml").exists()
    # With setuptools >= 80 colcon's --symlink-install silently falls back to copying: make setup pins <80.
    assert (prefix / "share" / name / "package.xml").is_symlink(), \
        "colcon --symlink-install copied instead of linking; setuptools must be < 80 in this venv"
    for exe in ("completion_node", "lifecycle_completion_node", "play_when_ready", "lidar-completion"):
        assert (prefix / "lib" / name / exe).is_file(), f"colcon did not install lib/{name}/{exe}"
