#!/usr/bin/env bash
# Build (once) and install tf2_msgs, the message package of /tf and /tf_static, into a venv.
#
# PyPI has the ROS 2 Kilted runtime as `ros-kilted-*` wheels (rclpy, geometry_msgs, ...) but no
# tf2_msgs, and rclpy needs a message package's compiled type support, not only its Python classes,
# to subscribe to a topic. The node needs TFMessage for model_frame / target_frame. This script
# builds the package from its interface definitions (scripts/setup/tf2_msgs/, field for field as in
# ROS 2, so that the type hashes match and it talks to every ROS 2 node) with the Kilted build tools
# from PyPI (ament_cmake, the rosidl generators and type supports), in a throw-away build venv of
# the same Python with the same Kilted versions, packs the installed prefix as a wheel laid out like
# the Kilted wheels (scripts/setup/prefix_wheel.py), caches it under
#   ${XDG_CACHE_HOME:-$HOME/.cache}/lidar-completion/wheels/<key>/
# keyed by Python tag, platform, Kilted geometry_msgs version and a hash of the sources, and
# installs it. Later runs reuse the cached wheel (seconds). It ends with a check: the messages
# import and their C type support loads.
#
# Usage: PYTHON=.venv/bin/python bash scripts/setup/build_tf2_msgs.sh   (make setup runs it)
# Environment:
#   PYTHON             interpreter of the target venv (default: $VIRTUAL_ENV/bin/python)
#   TF2_FORCE_REBUILD  1: ignore the cached wheel and build again
# Needs a C/C++ compiler and the Python headers (build-essential, python3-dev: installed as root).
set -euo pipefail
cd "$(dirname "$0")/../.."

LOG_TAG=tf2_msgs
source scripts/setup/common.sh   # log, die, apt_install, has_python_headers

if [[ -z "${PYTHON:-}" ]]; then
    [[ -n "${VIRTUAL_ENV:-}" ]] || die "no virtual environment: set PYTHON=.venv/bin/python"
    PYTHON="$VIRTUAL_ENV/bin/python"
fi
[[ -x "$PYTHON" ]] || die "PYTHON=$PYTHON is not an executable interpreter"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.prefix != sys.base_prefix else 1)' \
    || die "$PYTHON is not inside a virtual environment; refusing to install into the system Python"

SRC=scripts/setup/tf2_msgs
VERSION=$(sed -n 's:.*<version>\(.*\)</version>.*:\1:p' "$SRC/package.xml")
CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/lidar-completion"

# The Kilted wheels the package is built against: the target venv's own versions.
KILTED=$("$PYTHON" -m pip list --format=freeze 2>/dev/null | grep -i '^ros-kilted-' || true)
GEOMETRY=$(sed -n 's/^ros-kilted-geometry-msgs==//Ip' <<<"$KILTED")
[[ -n "$GEOMETRY" ]] || die "ros-kilted-geometry-msgs is not installed in $PYTHON's venv (make setup installs it)"

read -r PY_TAG PLAT < <("$PYTHON" -c 'import sys, sysconfig
print("cp%d%d" % sys.version_info[:2], sysconfig.get_platform().replace("-", "_").replace(".", "_"))')
SRC_HASH=$(cd "$SRC" && find . -type f ! -name COLCON_IGNORE | LC_ALL=C sort | xargs sha256sum \
           | cat - ../build_tf2_msgs.sh ../prefix_wheel.py | sha256sum | cut -c1-12)
KEY="tf2_msgs${VERSION}-kilted-geometry${GEOMETRY}-${PY_TAG}-${PLAT}-${SRC_HASH}"
WHEEL_DIR="$CACHE_ROOT/wheels/$KEY"
WHEEL_VERSION="$VERSION+lc$SRC_HASH"   # a local label: this build, not another tf2_msgs wheel

installed_version() {
    "$PYTHON" -c 'import importlib.metadata as m
try:
    print(m.version("ros-tf2-msgs"))
except m.PackageNotFoundError:
    pass' 2>/dev/null || true
}

type_support_loads() {  # the C type support, not only the Python classes
    "$PYTHON" - <<'EOF' 2>/dev/null
from tf2_msgs.action import LookupTransform
from tf2_msgs.msg import TF2Error, TFMessage
from tf2_msgs.srv import FrameGraph
for cls in (TFMessage, TF2Error, FrameGraph, LookupTransform):
    cls.__class__.__import_type_support__()
    assert cls.__class__._TYPE_SUPPORT is not None, cls
EOF
}

build_wheel() {
    # compiler and Python headers (the generated Python bindings include Python.h and numpy's headers)
    local missing=()
    command -v c++ >/dev/null 2>&1 && command -v cc >/dev/null 2>&1 || missing+=(build-essential)
    has_python_headers "$PYTHON" || missing+=("python$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-dev")
    ((${#missing[@]} == 0)) || apt_install "to build tf2_msgs" "${missing[@]}"

    local base start
    # nothing of a sourced ROS 2 (another distribution's generators, libraries, prefixes) may leak in
    unset PYTHONPATH LD_LIBRARY_PATH AMENT_PREFIX_PATH CMAKE_PREFIX_PATH COLCON_PREFIX_PATH \
          ROS_DISTRO ROS_VERSION ROS_PYTHON_VERSION
    work=$(mktemp -d "${TMPDIR:-/tmp}/tf2_msgs-build.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    base=$("$PYTHON" -c 'import sys; print(getattr(sys, "_base_executable", sys.executable))')
    start=$SECONDS
    log "building tf2_msgs $VERSION for $PY_TAG (Kilted build tools from PyPI; about a minute); log: $work/build.log"
    "$base" -m venv "$work/venv" || die "cannot create a build venv with $base"
    printf '%s\n' "$KILTED" > "$work/constraints.txt"
    # cmake from PyPI: ament_cmake wants a recent one, whatever the system has
    "$work/venv/bin/python" -m pip install -q -c "$work/constraints.txt" \
        ros-kilted-rosidl-default-generators ros-kilted-ament-cmake ros-kilted-ament-cmake-ros-core \
        ros-kilted-ament-cmake-include-directories ros-kilted-ament-package \
        ros-kilted-rosidl-core-generators ros-kilted-geometry-msgs ros-kilted-action-msgs \
        ros-kilted-builtin-interfaces catkin_pkg empy lark numpy "cmake>=3.22" \
        >"$work/build.log" 2>&1 || { tail -n 30 "$work/build.log" >&2; die "cannot install the Kilted build tools"; }
    # The Kilted message wheels record the include folders of the machine that built them (its Python
    # and numpy headers) in their CMake exports; point them at this venv's.
    "$work/venv/bin/python" - "$work/venv" <<'EOF' || die "cannot adapt the Kilted CMake exports"
import pathlib, re, sys, sysconfig
import numpy
venv = pathlib.Path(sys.argv[1])
py_inc, np_inc = sysconfig.get_paths()["include"], numpy.get_include()
for path in venv.glob("share/*/cmake/export_*__rosidl_generator_pyExport.cmake"):
    text = path.read_text()
    def fix(m):
        dirs = [py_inc if re.search(r"/include/python3\.\d+$", d) else
                np_inc if re.search(r"/numpy/(_core|core)/include$", d) else d
                for d in m.group(2).split(";")]
        return m.group(1) + ";".join(dirs) + m.group(3)
    new = re.sub(r'(INTERFACE_INCLUDE_DIRECTORIES ")([^"]*)(")', fix, text)
    if new != text:
        path.write_text(new)
EOF
    (
        export PATH="$work/venv/bin:$PATH" AMENT_PREFIX_PATH="$work/venv" CMAKE_PREFIX_PATH="$work/venv"
        cmake -S "$SRC" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF \
            -DCMAKE_INSTALL_PREFIX="$work/prefix" -DPython3_EXECUTABLE="$work/venv/bin/python" &&
        cmake --build "$work/build" -j "${MAX_JOBS:-2}" &&
        cmake --install "$work/build"
    ) >>"$work/build.log" 2>&1 || {
        grep -E -m 30 -B2 -A6 'error|Error' "$work/build.log" >&2 || tail -n 40 "$work/build.log" >&2
        mkdir -p "$CACHE_ROOT" && cp "$work/build.log" "$CACHE_ROOT/last-tf2_msgs-build.log" 2>/dev/null || true
        die "tf2_msgs build failed (full log kept in $CACHE_ROOT/last-tf2_msgs-build.log)"
    }
    mkdir -p "$WHEEL_DIR"
    "$work/venv/bin/python" scripts/setup/prefix_wheel.py "$work/prefix" --name ros-tf2-msgs \
        --version "$WHEEL_VERSION" --top-level tf2_msgs --out "$WHEEL_DIR" \
        --summary "tf2_msgs interfaces (C/C++/Python type support), built with the ROS 2 Kilted tools" \
        --requires ros-kilted-geometry-msgs --requires ros-kilted-builtin-interfaces \
        --requires ros-kilted-action-msgs >/dev/null || die "cannot pack the tf2_msgs wheel"
    log "built in $((SECONDS - start)) s"
}

if [[ "${TF2_FORCE_REBUILD:-0}" != 1 && "$(installed_version)" == "$WHEEL_VERSION" ]] && type_support_loads; then
    log "tf2_msgs $WHEEL_VERSION already installed"
    exit 0
fi
WHEEL=$(compgen -G "$WHEEL_DIR/ros_tf2_msgs-*.whl" | head -n 1 || true)
if [[ -z "$WHEEL" || "${TF2_FORCE_REBUILD:-0}" == 1 ]]; then
    rm -rf "$WHEEL_DIR"
    build_wheel
    WHEEL=$(compgen -G "$WHEEL_DIR/ros_tf2_msgs-*.whl" | head -n 1) || die "no wheel in $WHEEL_DIR after the build"
else
    log "using the cached wheel $WHEEL"
fi
"$PYTHON" -m pip install -q --no-deps --force-reinstall "$WHEEL" \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
type_support_loads || die "tf2_msgs is installed but its type support does not load in $PYTHON's venv"
log "installed $(basename "$WHEEL")"
