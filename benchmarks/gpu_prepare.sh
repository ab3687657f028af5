#!/usr/bin/env bash
# Before a GPU session, on a CPU machine with PyPI access: what benchmarks/gpu_session.sh needs that
# the GPU host lacks, and a rehearsal of this checkout under the GPU host's torch and Triton.
#
# The GPU host (docs/benchmarks.md, "The Triton engine") has torch 2.11 (CUDA 13) with Triton 3.6.0
# and Python 3.12 preinstalled, and no network; this machine's venv has torch 2.13 and Triton 3.9.
# Code that only the newer versions accept would first fail on the GPU, in minutes that are scarce.
#
#   1. .whl/ (WHEELS): wheels of the packages the host lacks, for its Python (GPU_PY, default 3.12): fpsample.
#      gpu_session.sh installs them from there; pass .whl in the device call's `carry`.
#   2. unless REHEARSE=0: a scratch venv (GPU_VENV, default ${TMPDIR:-/tmp}/gpu-host-venv; Python
#      PYTHON_SYS, default python$GPU_PY where it runs, else python3; about
#      4.7 GB, a minute to install) with torch==$GPU_TORCH (default 2.11.0, the CUDA build from PyPI,
#      which brings its Triton) and numpy < 2.4 (Triton 3.6's interpreter fails on numpy 2.4), this
#      project in editable mode and fpsample of the version in .whl/; in it, on the CPU:
#      tests/test_triton.py (the kernels in the interpreter), tests/test_gpu_session.py (every
#      session step's arguments) and the sm_90 compile check of every kernel variant the
#      published-width networks launch (benchmarks/triton_compile_check.py, about 3 minutes).
#      SUITE=1 also runs the whole fast test suite there (about 13 minutes on 2 cores).
#
# Usage:  bash benchmarks/gpu_prepare.sh            # REHEARSE=0 for the wheels alone
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_PY=${GPU_PY:-3.12}
GPU_TORCH=${GPU_TORCH:-2.11.0}
GPU_VENV=${GPU_VENV:-${TMPDIR:-/tmp}/gpu-host-venv}
log() { echo "[gpu_prepare] $*"; }
# the rehearsal's interpreter: the host's Python version where this machine has one that runs
if [[ -z "${PYTHON_SYS:-}" ]]; then
    PYTHON_SYS=python3
    if "python$GPU_PY" -c '' >/dev/null 2>&1; then PYTHON_SYS=python$GPU_PY; fi
fi

# fpsample as setup.py requires it, as a binary wheel for the host's Python and glibc (its newest
# releases publish only a source distribution, which the host could not build: pip then takes the
# newest release that has such a wheel)
WHEELS=${WHEELS:-.whl}
FPS_SPEC=$(grep -o '"fpsample[^"]*"' lidar_completion_pkg/setup.py | tr -d '"')
log "wheels for Python $GPU_PY into $WHEELS/: $FPS_SPEC"
mkdir -p "$WHEELS"
"$PYTHON_SYS" -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PY" \
    --platform manylinux_2_28_x86_64 -d "$WHEELS" "$FPS_SPEC"
ls -1 "$WHEELS"

[ "${REHEARSE:-1}" = 0 ] && exit 0

PY=$GPU_VENV/bin/python
SYS_PY=$("$PYTHON_SYS" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[[ "$SYS_PY" == "$GPU_PY" ]] || log "note: rehearsing on Python $SYS_PY, the host has $GPU_PY (PYTHON_SYS=python$GPU_PY to match)"
if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$GPU_TORCH' or '%d.%d' % sys.version_info[:2] != '$SYS_PY')" 2>/dev/null; then
    log "venv $GPU_VENV with Python $SYS_PY and torch==$GPU_TORCH (the GPU host's)"
    "$PYTHON_SYS" -m venv --clear "$GPU_VENV"
fi
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$GPU_TORCH" > "$CONSTRAINTS"
"$PY" -m pip install -q -c "$CONSTRAINTS" "torch==$GPU_TORCH" "numpy<2.4" pytest pytest-timeout \
    -e lidar_completion_pkg -e .
# fpsample as the host will have it (the release in $WHEELS, for this machine's Python)
FPS_VERSION=$(ls "$WHEELS"/fpsample-*.whl | head -1 | sed -E 's/.*fpsample-([^-]+)-.*/\1/')
"$PY" -m pip install -q --only-binary=:all: "fpsample==$FPS_VERSION"
"$PY" -c "import torch, triton, numpy, fpsample; print('[gpu_prepare] torch', torch.__version__, 'triton', \
triton.__version__, 'numpy', numpy.__version__, 'fpsample', getattr(fpsample, '__version__', '$FPS_VERSION'))"

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
log "the Triton kernels in the interpreter, and the session's steps"
"$PY" -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_gpu_session.py -W ignore::DeprecationWarning
log "every kernel variant compiled for sm_90"
"$PY" benchmarks/triton_compile_check.py --widths full --arch 90
if [ "${SUITE:-0}" = 1 ]; then
    log "the fast test suite"
    "$PY" -m pytest -q -p no:cacheprovider -m "not slow" -W ignore::DeprecationWarning
fi
log "done: carry .whl in the device call (see benchmarks/gpu_session.sh)"
