#!/usr/bin/env bash
# Build (once) and install a ROS 2 interface package that PyPI lacks into a venv: tf2_msgs (the
# node's /tf and /tf_static) and composition_interfaces (imported by launch_ros).
#
# PyPI has the ROS 2 Kilted runtime as `ros-kilted-*` wheels (rclpy, geometry_msgs, ...) but not
# these, and rclpy needs a message package's compiled type support, not only its Python classes, to
# subscribe to a topic. This script builds the package in SRC (its package.xml, CMakeLists.txt and
# interface files; scripts/setup/tf2_msgs/ is written field for field as in ROS 2, so that the type
# hashes match and it talks to every ROS 2 node) with the Kilted build tools from PyPI (ament_cmake,
# the rosidl generators and type supports), in a throw-away build venv of the same Python with the
# same Kilted versions, packs the installed prefix as a wheel laid out like the Kilted wheels
# (scripts/setup/prefix_wheel.py), caches it under
#   ${XDG_CACHE_HOME:-$HOME/.cache}/lidar-completion/wheels/<key>/
# keyed by package, Python tag, platform, the Kilted versions of the interface packages it uses and
# a hash of the sources, and installs it. Later runs reuse the cached wheel (seconds). It ends with
# a check: every interface imports and its C type support loads.
#
# Usage: PYTHON=.venv/bin/python bash scripts/setup/build_interfaces.sh SRC   (make setup runs it)
#   SRC: the package's source folder: scripts/setup/tf2_msgs, or composition_interfaces from the
#        sources scripts/setup/ros2_tools.py fetches
# Environment:
#   PYTHON                    interpreter of the target venv (default: $VIRTUAL_ENV/bin/python)
#   INTERFACES_FORCE_REBUILD  1: ignore the cached wheel and build again
# Needs a C/C++ compiler and the Python headers (build-essential, python3-dev: installed as root).
set -euo pipefail
SRC="${1:-}"
[[ -z "$SRC" ]] || SRC=$(cd "$SRC" 2>/dev/null && pwd) || SRC="$1"
cd "$(dirname "$0")/../.."
ROOT=$(pwd)   # the repository

LOG_TAG=interfaces
source scripts/setup/common.sh   # log, die, apt_install, has_python_headers

[[ -n "$SRC" && -f "$SRC/package.xml" && -f "$SRC/CMakeLists.txt" ]] \
    || die "usage: build_interfaces.sh SRC, a folder with the package's package.xml and CMakeLists.txt (got '${1:-}')"
if [[ -z "${PYTHON:-}" ]]; then
    [[ -n "${VIRTUAL_ENV:-}" ]] || die "no virtual environment: set PYTHON=.venv/bin/python"
    PYTHON="$VIRTUAL_ENV/bin/python"
fi
[[ -x "$PYTHON" ]] || die "PYTHON=$PYTHON is not an executable interpreter"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.prefix != sys.base_prefix else 1)' \
    || die "$PYTHON is not inside a virtual environment; refusing to install into the system Python"

xml_field() { sed -n "s:.*<$1>\(.*\)</$1>.*:\1:p" "$SRC/package.xml"; }
PKG=$(xml_field name | head -n 1)
VERSION=$(xml_field version | head -n 1)
[[ "$PKG" =~ ^[a-z][a-z0-9_]*$ && -n "$VERSION" ]] || die "$SRC/package.xml names no package or no version"
LOG_TAG=$PKG
DIST="ros-${PKG//_/-}"   # the wheel's name, as the Kilted wheels name theirs (ros-kilted-* aside)
mapfile -t DEPS < <(xml_field depend)   # the interface packages it uses, each a Kilted wheel
mapfile -t INTERFACE_FILES < <(cd "$SRC" && find msg srv action -maxdepth 1 -type f \
    \( -name '*.msg' -o -name '*.srv' -o -name '*.action' \) 2>/dev/null | LC_ALL=C sort)
((${#INTERFACE_FILES[@]} > 0)) || die "$SRC has no interface files in msg/, srv/ or action/"
CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/lidar-completion"

# The Kilted wheels the package is built against: the target venv's own versions (ros-kilted-X is
# a meta-package of ros-X, the distribution that holds X).
KILTED=$("$PYTHON" -m pip list --format=freeze 2>/dev/null | grep -i '^ros-' || true)
DEP_WHEELS=()
DEP_PINS=""
for dep in "${DEPS[@]}"; do
    wheel="ros-${dep//_/-}"
    pin=$(grep -i "^$wheel==" <<<"$KILTED" || true)
    [[ -n "$pin" ]] || die "$wheel is not installed in $PYTHON's venv ($PKG uses $dep; make setup installs it)"
    DEP_WHEELS+=("$wheel")
    DEP_PINS+="$pin "
done

read -r PY_TAG PLAT < <("$PYTHON" -c 'import sys, sysconfig
print("cp%d%d" % sys.version_info[:2], sysconfig.get_platform().replace("-", "_").replace(".", "_"))')
SRC_HASH=$( (cd "$SRC" && find . -type f ! -name COLCON_IGNORE | LC_ALL=C sort | xargs sha256sum;
             cat "$ROOT/scripts/setup/build_interfaces.sh" "$ROOT/scripts/setup/prefix_wheel.py") | sha256sum | cut -c1-12)
PINS_HASH=$(printf '%s' "$DEP_PINS" | sha256sum | cut -c1-8)
KEY="${PKG}${VERSION}-kilted${PINS_HASH}-${PY_TAG}-${PLAT}-${SRC_HASH}"
WHEEL_DIR="$CACHE_ROOT/wheels/$KEY"
WHEEL_VERSION="$VERSION+lc$SRC_HASH"   # a local label: this build, not another wheel of the package

installed_version() {
    "$PYTHON" - "$DIST" <<'EOF' 2>/dev/null || true
import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass
EOF
}

type_support_loads() {  # every interface's C type support, not only the Python classes
    "$PYTHON" - "$PKG" "${INTERFACE_FILES[@]}" <<'EOF' 2>/dev/null
import importlib, pathlib, sys
pkg = sys.argv[1]
for rel in sys.argv[2:]:
    path = pathlib.PurePosixPath(rel)
    cls = getattr(importlib.import_module(f"{pkg}.{path.parent.name}"), path.stem)
    cls.__class__.__import_type_support__()
    assert cls.__class__._TYPE_SUPPORT is not None, rel
EOF
}

build_wheel() {
    # compiler and Python headers (the generated Python bindings include Python.h and numpy's headers)
    local missing=()
    command -v c++ >/dev/null 2>&1 && command -v cc >/dev/null 2>&1 || missing+=(build-essential)
    has_python_headers "$PYTHON" || missing+=("python$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-dev")
    ((${#missing[@]} == 0)) || apt_install "to build $PKG" "${missing[@]}"

    local base start requires=()
    # nothing of a sourced ROS 2 (another distribution's generators, libraries, prefixes) may leak in
    unset PYTHONPATH LD_LIBRARY_PATH AMENT_PREFIX_PATH CMAKE_PREFIX_PATH COLCON_PREFIX_PATH \
          ROS_DISTRO ROS_VERSION ROS_PYTHON_VERSION
    work=$(mktemp -d "${TMPDIR:-/tmp}/$PKG-build.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    base=$("$PYTHON" -c 'import sys; print(getattr(sys, "_base_executable", sys.executable))')
    start=$SECONDS
    log "building $PKG $VERSION for $PY_TAG (Kilted build tools from PyPI; about a minute); log: $work/build.log"
    "$base" -m venv "$work/venv" || die "cannot create a build venv with $base"
    printf '%s\n' "$KILTED" > "$work/constraints.txt"
    # cmake from PyPI: ament_cmake wants a recent one, whatever the system has
    "$work/venv/bin/python" -m pip install -q -c "$work/constraints.txt" \
        ros-kilted-rosidl-default-generators ros-kilted-ament-cmake ros-kilted-ament-cmake-ros-core \
        ros-kilted-ament-cmake-include-directories ros-kilted-ament-package \
        ros-kilted-rosidl-core-generators ros-kilted-action-msgs ros-kilted-builtin-interfaces \
        "${DEP_WHEELS[@]}" catkin_pkg empy lark numpy "cmake>=3.22" \
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
        mkdir -p "$CACHE_ROOT" && cp "$work/build.log" "$CACHE_ROOT/last-$PKG-build.log" 2>/dev/null || true
        die "$PKG build failed (full log kept in $CACHE_ROOT/last-$PKG-build.log)"
    }
    mkdir -p "$WHEEL_DIR"
    for w in "${DEP_WHEELS[@]}"; do requires+=(--requires "$w"); done
    "$work/venv/bin/python" scripts/setup/prefix_wheel.py "$work/prefix" --name "$DIST" \
        --version "$WHEEL_VERSION" --top-level "$PKG" --out "$WHEEL_DIR" \
        --summary "$PKG interfaces (C/C++/Python type support), built with the ROS 2 Kilted tools" \
        "${requires[@]}" >/dev/null || die "cannot pack the $PKG wheel"
    log "built in $((SECONDS - start)) s"
}

if [[ "${INTERFACES_FORCE_REBUILD:-0}" != 1 && "$(installed_version)" == "$WHEEL_VERSION" ]] && type_support_loads; then
    log "$PKG $WHEEL_VERSION already installed"
    exit 0
fi
WHEEL=$(compgen -G "$WHEEL_DIR/${DIST//-/_}-*.whl" | head -n 1 || true)
if [[ -z "$WHEEL" || "${INTERFACES_FORCE_REBUILD:-0}" == 1 ]]; then
    rm -rf "$WHEEL_DIR"
    build_wheel
    WHEEL=$(compgen -G "$WHEEL_DIR/${DIST//-/_}-*.whl" | head -n 1) || die "no wheel in $WHEEL_DIR after the build"
else
    log "using the cached wheel $WHEEL"
fi
"$PYTHON" -m pip install -q --no-deps --force-reinstall "$WHEEL" \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
type_support_loads || die "$PKG is installed but the type support of its interfaces does not load in $PYTHON's venv"
log "installed $(basename "$WHEEL")"
