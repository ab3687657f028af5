#!/usr/bin/env bash
# Create or update the project's virtual environment (called by `make setup`; safe to re-run).
#
#   1. .venv/ with Python 3.10, 3.11 or 3.12 (the interpreter in $PYTHON_SYS, default python3;
#      3.11 is the one CI and the GPU rehearsal use); python3.X-venv from apt where Debian lacks it
#   2. torch 2.13.0, CPU build (TORCH_SPEC, from TORCH_INDEX: PyPI has only the CUDA build), pinned
#      for every later step so no CUDA build sneaks in
#   3. the project editable with test extras, the training package, the ROS 2 Kilted PyPI wheels,
#      rosbags/mcap, colcon (setuptools < 80, which colcon's --symlink-install needs)
#   4. the ROS 2 launch / CLI tools (not on PyPI): from the wheels in ROS2_CLI_WHEELS, else built from
#      their sources at pinned commits by scripts/setup/ros2_tools.py (cached; SKIP_ROS2_TOOLS=1 leaves
#      them out); tf2_msgs (the message package of /tf; not on PyPI either) built with the Kilted build
#      tools through scripts/setup/build_interfaces.sh, once per Python (cached; SKIP_TF2_MSGS=1)
#   5. MinkowskiEngine 0.5.4 through scripts/setup/install_minkowski.sh (skip with SKIP_MINKOWSKI=1; the
#      pure-PyTorch sparse backend then serves)
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON_SYS="${PYTHON_SYS:-python3}"
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0+cpu}"
# the CPU builds of torch (a local copy that pip already finds, e.g. --find-links, serves as well)
TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"

LOG_TAG=setup
source scripts/setup/common.sh   # log, die, apt_install

py_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'; }
is_supported() { "$1" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else 1)' 2>/dev/null; }

if [[ ! -x "$VENV/bin/python" ]]; then
    command -v "$PYTHON_SYS" >/dev/null 2>&1 || die "$PYTHON_SYS not found; install Python 3.11 (3.10 and 3.12 work too)"
    is_supported "$PYTHON_SYS" || die "$PYTHON_SYS is Python $("$PYTHON_SYS" -c 'import sys; print(sys.version.split()[0])'), \
this project needs 3.10, 3.11 or 3.12 (the ROS 2 Kilted wheels' builds): run 'make setup PYTHON_SYS=python3.11'"
    log "creating $VENV with $("$PYTHON_SYS" --version)"
    if ! "$PYTHON_SYS" -m venv "$VENV" >/dev/null 2>&1; then
        # Debian and Ubuntu ship venv's pip bootstrap (ensurepip) apart, in python3.X-venv
        rm -rf "$VENV"
        apt_install "to create a virtual environment" "python$(py_version "$PYTHON_SYS")-venv"
        "$PYTHON_SYS" -m venv "$VENV" || die "cannot create $VENV with $PYTHON_SYS"
    fi
fi
PY="$VENV/bin/python"
is_supported "$PY" || die "$VENV holds Python $("$PY" -c 'import sys; print(sys.version.split()[0])'), not 3.10-3.12: \
remove it (rm -rf $VENV) and run make setup again"
PY_VERSION=$(py_version "$PY")

# Keep torch pinned to the CPU build in every pip call below.
CONSTRAINTS="$VENV/.setup-constraints.txt"
printf '%s\n' "$TORCH_SPEC" "setuptools<80" > "$CONSTRAINTS"
# (pip's notes about this machine's local index mirrors lacking a project are dropped.)
pip_install() {
    "$PY" -m pip install -q -c "$CONSTRAINTS" "$@" \
        2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}

# pip >= 25.1: editable installs go through PEP 660, so the console scripts land in $VENV/bin (older
# pips run `setup.py develop`, which honours setup.cfg's ament script_dir and hides them in lib/).
log "pip, torch ($TORCH_SPEC) and build tools"
pip_install --upgrade "pip>=25.1"
# TORCH_INDEX only where pip cannot find TORCH_SPEC without it (a dry run; PyPI has no +cpu build,
# so on a new machine it fails at once, and a local copy of the wheel is found without a download)
TORCH_FROM=()
if [[ -n "$TORCH_INDEX" ]] && ! "$PY" -m pip install -q --dry-run --no-deps "$TORCH_SPEC" >/dev/null 2>&1; then
    log "torch from $TORCH_INDEX"
    TORCH_FROM=(--extra-index-url "$TORCH_INDEX")
fi
pip_install "${TORCH_FROM[@]}" "$TORCH_SPEC" "setuptools>=64,<80" wheel ninja numpy
# Triton: the GPU path of the sparse engine. On this CPU build its kernels run only in the
# interpreter (TRITON_INTERPRET=1), which the tests use; 3.9 is the first whose interpreter works
# with numpy 2.4 (CUDA builds of torch bring their own Triton); 3.9 has no Python 3.10 build, and
# 3.7.1 serves there (numpy stops at 2.2 on 3.10). The demo's setup skips it (SKIP_TRITON=1).
if [[ "${SKIP_TRITON:-0}" != 1 ]]; then
    if "$PY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)'; then
        log "Triton: the version torch's CUDA build requires (installed with it)"
    elif [[ "$PY_VERSION" == 3.10 ]]; then pip_install "triton==3.7.1"; else pip_install "triton==3.9.0"; fi
fi
"$PY" - "$TORCH_SPEC" <<'EOF' || die "torch in $VENV is not the requested build"
import sys, torch
want = sys.argv[1].split("==", 1)[-1]
have = torch.__version__ if "+" in want else torch.__version__.split("+")[0]   # 2.13.0 takes any build
if have != want:
    sys.exit(f"torch {torch.__version__} installed, {want} wanted")
EOF

log "project (editable, with test extras), training package, ROS 2 wheels, colcon"
# (setuptools' 10-line "Editable installation" notice, about folders named like a package in the
# working directory: lidar_completion_pkg/lidar_completion_pkg and training/ are those packages)
PYTHONWARNINGS="ignore:Editable installation" pip_install \
    -e "lidar_completion_pkg[test]" -e . \
    "ros-kilted-rclpy[fastrtps]" ros-kilted-sensor-msgs ros-kilted-std-msgs \
    ros-kilted-diagnostic-msgs ros-kilted-visualization-msgs \
    rosbags mcap mcap-ros2-support colcon-common-extensions

# ---- ROS 2 tools, frames and the ament index ----------------------------------------------------
# tf2_msgs (the node's /tf, with its compiled type support) is not on PyPI: build_interfaces.sh builds
# it with the Kilted build tools from PyPI (cached per Python). `ros2 launch` / `ros2 topic` /
# `ros2 param` / `ros2 lifecycle`, launch_ros and sensor_msgs_py are not on PyPI either, and are pure
# Python: they are installed offline from ROS2_CLI_WHEELS when it names a folder of their wheels
# (default ../shared/ros2-cli-wheels next to the checkout, as in CI), else ros2_tools.py builds them
# from their sources at pinned commits (GitHub, or ROS2_TOOLS_SOURCES; content-hashed; cached), and
# build_interfaces.sh builds composition_interfaces, which launch_ros imports. --no-deps: PyPI's
# `launch` is an unrelated package. Then the package is laid out as an ament package in the venv
# (lib/lidar_completion_pkg/, share/lidar_completion_pkg/, and AMENT_PREFIX_PATH set by a .pth), so
# `.venv/bin/ros2 launch lidar_completion_pkg ...` just works.
ROS2_CLI_WHEELS="${ROS2_CLI_WHEELS:-../shared/ros2-cli-wheels}"
log "ROS 2 message packages and the small dependencies of the ROS 2 tools"
pip_install ros-kilted-geometry-msgs ros-kilted-lifecycle-msgs ros-kilted-rcl-interfaces \
    ros-kilted-ament-index-python osrf-pycommon argcomplete packaging psutil pyyaml transforms3d
if compgen -G "$ROS2_CLI_WHEELS/*.whl" >/dev/null; then
    log "ROS 2 launch / CLI wheels from $ROS2_CLI_WHEELS (offline)"
    # only the wheels built for this interpreter; a tf2_msgs wheel there is left for our own build
    mapfile -t CLI_WHEELS < <("$PY" - "$ROS2_CLI_WHEELS" <<'PYEOF'
import pathlib, sys
from packaging.tags import sys_tags
from packaging.utils import parse_wheel_filename
here = set(sys_tags())
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    print(("+" if here & set(parse_wheel_filename(path.name)[3]) else "-") + str(path))
PYEOF
)
    WANT=()
    for w in "${CLI_WHEELS[@]}"; do
        if [[ "$(basename "$w")" == ros_tf2_msgs-* ]]; then continue; fi
        if [[ "$w" == +* ]]; then WANT+=("${w#+}"); else
            log "WARNING: $(basename "${w#-}") is built for another Python than $PY_VERSION: not installed"
        fi
    done
    # composition_interfaces: the folder's Python-only wheel and our build (ros2_tools.py) share
    # their files; ours goes first, and the folder's with it, to be installed afresh
    if "$PY" -m pip show -q ros-composition-interfaces >/dev/null 2>&1; then
        "$PY" -m pip uninstall -q -y ros-composition-interfaces composition_interfaces 2>/dev/null
    fi
    ((${#WANT[@]} == 0)) || "$PY" -m pip install -q --no-index --no-deps "${WANT[@]}"
elif [[ "${SKIP_ROS2_TOOLS:-0}" == 1 ]]; then
    log "SKIP_ROS2_TOOLS=1: not installing ros2 launch / topic / param (a system ROS 2 has them)"
elif ! "$PY" scripts/setup/ros2_tools.py install; then
    [[ "${CI:-}" != true ]] || die "the ROS 2 launch / CLI tools could not be installed (above)"
    if [[ -x "$VENV/bin/ros2" ]]; then
        log "WARNING: the ROS 2 launch / CLI tools could not be installed (above): the ones installed before stay"
    else
        log "WARNING: the ROS 2 launch / CLI tools could not be installed (above): ros2 launch / topic / param"
        log "  are unavailable (a system ROS 2 has them; or set ROS2_CLI_WHEELS to a folder of their wheels,"
        log "  or ROS2_TOOLS_SOURCES to a mirror of their source archives); the tests that need them skip."
    fi
fi
if [[ "${SKIP_TF2_MSGS:-0}" == 1 ]]; then
    log "SKIP_TF2_MSGS=1: not building tf2_msgs (the node then cannot use model_frame / target_frame)"
elif ! PYTHON="$PY" bash scripts/setup/build_interfaces.sh scripts/setup/tf2_msgs; then
    [[ "${CI:-}" != true ]] || die "tf2_msgs could not be built (see above)"
    log "WARNING: tf2_msgs could not be built (see above): the node cannot use model_frame / target_frame"
fi
"$PY" -m lidar_completion_pkg.ament_install "$VENV" || die "cannot lay out the ament package in $VENV"
# ---- end of the ROS 2 block ------------------------------------------------------------------------

if [[ "${SKIP_MINKOWSKI:-0}" == 1 ]]; then
    log "SKIP_MINKOWSKI=1: not installing MinkowskiEngine (the pure-PyTorch backend will be used)"
else
    PYTHON="$PY" bash scripts/setup/install_minkowski.sh
fi

"$VENV/bin/lidar-completion" --help >/dev/null || die "the lidar-completion entry point does not run"
log "done: $("$PY" -c 'import torch, lidar_completion; print("torch", torch.__version__, "| lidar_completion", lidar_completion.__version__)')"
