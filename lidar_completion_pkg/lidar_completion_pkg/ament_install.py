"""Make a virtual environment an ament prefix for this package (what `make setup` runs).

    python -m lidar_completion_pkg.ament_install [PREFIX]        # default: sys.prefix

``ros2 launch`` / ``ros2 run`` / ``ros2 pkg`` find a package through the ament index of the prefixes on
``AMENT_PREFIX_PATH``: its marker in ``share/ament_index/resource_index/packages/``, its files under
``share/<package>/`` and its executables under ``lib/<package>/``. A colcon build lays a package out that
way; a pip install (editable or not) does not put executables under ``lib/<package>/``. This installs,
into PREFIX:

* the index marker and ``share/lidar_completion_pkg/package.xml``;
* ``share/lidar_completion_pkg/launch`` (launch files, params, rviz config, Fast DDS profile);
* ``lib/lidar_completion_pkg/<executable>`` for each node executable: a relative link to the console
  script pip wrote into ``bin/`` (which starts this venv's interpreter);
* ``lidar_completion_ament.pth`` in site-packages: every interpreter of the venv (``.venv/bin/ros2``,
  the nodes it starts) puts PREFIX first on ``AMENT_PREFIX_PATH``, so ``.venv/bin/ros2 launch
  lidar_completion_pkg completion.launch.py`` works with no ``source`` step.

From a source checkout (editable install) the share entries are links to the checkout's files (in real
directories: ros2launch does not search linked directories), so edits of the launch file or the params
take effect at once, as with colcon's --symlink-install; a new file needs a re-run. Re-running is safe.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import sysconfig
from pathlib import Path

PACKAGE = "lidar_completion_pkg"
#: executables `ros2 run` / launch_ros start (console scripts of the same names); play_when_ready
#: starts the launch file's bag player once the node listens.
EXECUTABLES = ("completion_node", "lifecycle_completion_node", "play_when_ready")
PTH_NAME = "lidar_completion_ament.pth"
# One line, executed by site.py at every start of an interpreter of this prefix (.pth "import" lines).
# sys.prefix goes last: a sourced workspace (a colcon overlay of this package, a system ROS 2) keeps
# precedence for share/ resources as its PYTHONPATH has it for modules, not half of each install.
PTH_LINE = ("import os, sys; _p = [x for x in os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep) "
            "if x]; sys.prefix in _p or os.environ.__setitem__('AMENT_PREFIX_PATH', "
            "os.pathsep.join(_p + [sys.prefix]))\n")


def source_tree() -> Path | None:
    """The checkout's package folder (package.xml, resource/, ../launch) when running from source."""
    pkg_dir = Path(__file__).resolve().parent.parent
    if (pkg_dir / "package.xml").is_file() and (pkg_dir.parent / "launch").is_dir():
        return pkg_dir
    return None


def _replace(link: Path, target: Path, relative_to: Path | None = None) -> None:
    """``link`` -> ``target`` (a relative link when ``relative_to`` is given), replacing what was there."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    dest = os.path.relpath(target, relative_to) if relative_to is not None else target
    link.symlink_to(dest, target_is_directory=target.is_dir())


def _mirror(src: Path, dest: Path) -> None:
    """``dest`` as a tree of real directories holding links to the files of ``src``."""
    if dest.is_symlink() or dest.is_file():
        dest.unlink()
    elif dest.is_dir():
        shutil.rmtree(dest)
    for path in sorted(src.rglob("*")):
        target = dest / path.relative_to(src)
        if path.is_dir() and not path.is_symlink():
            target.mkdir(parents=True, exist_ok=True)
        else:
            _replace(target, path.resolve())


def install(prefix: Path, bin_dir: Path | None = None, site_packages: Path | None = None) -> list[str]:
    """Lay the package out in ``prefix`` as an ament package; returns what is missing (empty = ok)."""
    prefix = Path(prefix).resolve()
    bin_dir = Path(bin_dir) if bin_dir else prefix / "bin"
    problems = []
    share = prefix / "share" / PACKAGE
    marker = prefix / "share" / "ament_index" / "resource_index" / "packages" / PACKAGE
    marker.parent.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        marker.write_text("")
    src = source_tree()
    if src is not None:
        _replace(share / "package.xml", src / "package.xml")
        _mirror(src.parent / "launch", share / "launch")
    for name in ("package.xml", "launch/completion.launch.py"):
        if not (share / name).is_file():
            problems.append(f"{share / name} is missing (install the package from a checkout, or "
                            "with pip so that its data files land in the prefix)")
    for exe in EXECUTABLES:
        script = bin_dir / exe
        if not script.is_file():
            problems.append(f"console script {script} is missing (pip install the package first)")
            continue
        link = prefix / "lib" / PACKAGE / exe
        _replace(link, script, relative_to=link.parent)
    site = Path(site_packages) if site_packages else Path(
        sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)}))
    site.mkdir(parents=True, exist_ok=True)
    (site / PTH_NAME).write_text(PTH_LINE)
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lidar_completion_pkg.ament_install",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prefix", nargs="?", default=sys.prefix, help="install prefix (default: this venv)")
    args = p.parse_args(argv)
    problems = install(Path(args.prefix))
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not problems:
        print(f"{PACKAGE}: ament index, share/{PACKAGE}/ and lib/{PACKAGE}/ in {Path(args.prefix).resolve()}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
