#!/usr/bin/env bash
# Build (once) and install MinkowskiEngine 0.5.4 into the active virtual environment.
#
# MinkowskiEngine's last release (2021) does not build or import as published with Python 3.10-3.12
# and torch 2.x. This script downloads its source distribution from PyPI (hash-checked), patches a copy in
# a temporary directory (nothing patched is kept or committed), builds a wheel for the installed torch
# (CPU; CUDA with ME_VARIANT=cuda, given nvcc and a CUDA build of torch), caches that wheel under
#   ${XDG_CACHE_HOME:-$HOME/.cache}/lidar-completion/wheels/<key>/
# keyed by MinkowskiEngine version, torch version, cpu/cuXY, Python tag and patch revision, and
# installs it. Later runs reuse the cached wheel and take seconds. It ends with a smoke test: import
# and one small sparse convolution forward and backward.
#
# Usage: scripts/setup/install_minkowski.sh            (inside an activated venv, or with PYTHON=...)
# Environment:
#   PYTHON            interpreter of the target venv (default: $VIRTUAL_ENV/bin/python)
#   MAX_JOBS          parallel compile jobs (default 2; the build needs ~1.5 GB RAM per job)
#   ME_FORCE_REBUILD  1: ignore the cached wheel and build again
#   ME_SDIST          path to MinkowskiEngine-0.5.4.tar.gz (offline machines; else downloaded)
#   ME_INDEX_URL      simple index to download from (default https://pypi.org/simple)
#   ME_VARIANT        cpu | cuda  (default: cpu, the verified build; cuda needs nvcc and a CUDA torch)
set -euo pipefail

ME_VERSION=0.5.4
ME_SDIST_SHA256=b1879c00d0b0b1d30ba622cce239886a7e3c78ee9da1064cdfe2f64c2ab15f94
# Bump when the patches below change, so that cached wheels built with older patches are not reused.
PATCH_REV=1

LOG_TAG=install_minkowski
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"   # log, die, apt_install, has_python_headers

# --- target interpreter -----------------------------------------------------------------------
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -n "${VIRTUAL_ENV:-}" ]]; then
        PYTHON="$VIRTUAL_ENV/bin/python"
    else
        die "no virtual environment: activate one (source .venv/bin/activate) or set PYTHON=.venv/bin/python"
    fi
fi
[[ -x "$PYTHON" ]] || die "PYTHON=$PYTHON is not an executable interpreter"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.prefix != sys.base_prefix else 1)' \
    || die "$PYTHON is not inside a virtual environment; refusing to install into the system Python"
"$PYTHON" -c 'import torch' 2>/dev/null \
    || die "torch is not installed in $PYTHON's environment; install it first (make setup does)"

CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/lidar-completion"
MAX_JOBS="${MAX_JOBS:-2}"
export MAX_JOBS

# --- what to build --------------------------------------------------------------------------------
read -r TORCH_VERSION TORCH_CUDA PY_TAG PLAT < <("$PYTHON" - <<'EOF'
import sys, sysconfig, torch
version = torch.__version__.split("+")[0]
cuda = torch.version.cuda or "none"
tag = "cp%d%d" % sys.version_info[:2]
plat = sysconfig.get_platform().replace("-", "_").replace(".", "_")
print(version, cuda, tag, plat)
EOF
)
if [[ -z "${ME_VARIANT:-}" ]]; then
    # The CPU build is the verified one (and imports beside a CUDA torch). The CUDA build is tried
    # only when asked for: with a CUDA torch and nvcc but no GPU to read the architecture from (a
    # build machine), torch's extension builder fails before compiling anything.
    ME_VARIANT=cpu
    if [[ "$TORCH_CUDA" != none ]] && command -v nvcc >/dev/null 2>&1; then
        log "building the CPU variant beside torch's CUDA $TORCH_CUDA (ME_VARIANT=cuda tries the CUDA build, not verified here)"
    fi
fi
case "$ME_VARIANT" in
    cpu) VARIANT_TAG=cpu ;;
    cuda)
        [[ "$TORCH_CUDA" != none ]] || die "ME_VARIANT=cuda but the installed torch is a CPU build"
        command -v nvcc >/dev/null 2>&1 || die "ME_VARIANT=cuda but nvcc is not on PATH"
        VARIANT_TAG="cu${TORCH_CUDA//./}"
        log "note: the CUDA build has not been verified by this project yet (CPU builds have)" ;;
    *) die "ME_VARIANT must be cpu or cuda, got '$ME_VARIANT'" ;;
esac
KEY="me${ME_VERSION}-torch${TORCH_VERSION}-${VARIANT_TAG}-${PY_TAG}-${PLAT}-p${PATCH_REV}"
WHEEL_DIR="$CACHE_ROOT/wheels/$KEY"
log "target: MinkowskiEngine $ME_VERSION for torch $TORCH_VERSION ($VARIANT_TAG), $PY_TAG, $PLAT"

find_cached_wheel() {
    compgen -G "$WHEEL_DIR/[Mm]inkowski[Ee]ngine-${ME_VERSION}-*.whl" | head -n 1 || true
}

# --- system prerequisites ----------------------------------------------------------------------
check_build_prereqs() {
    local missing=()
    if command -v c++ >/dev/null 2>&1; then
        # libopenblas-dev provides the unversioned libopenblas.so the extension links against.
        echo 'int main(){return 0;}' | c++ -x c++ - -lopenblas -o /dev/null >/dev/null 2>&1 \
            || missing+=(libopenblas-dev)
    else
        missing+=(build-essential libopenblas-dev)
    fi
    has_python_headers "$PYTHON" || missing+=(python3-dev)
    ((${#missing[@]} == 0)) || apt_install "to build MinkowskiEngine" "${missing[@]}"
}

check_runtime_prereqs() {  # a cached wheel still needs the OpenBLAS shared library at run time
    ldconfig -p 2>/dev/null | grep -q 'libopenblas\.so\.0' || apt_install "to run MinkowskiEngine" libopenblas0
}

# --- source distribution ----------------------------------------------------------------------------
fetch_sdist() {  # prints the path of the verified sdist
    local dest="$CACHE_ROOT/sdists/MinkowskiEngine-${ME_VERSION}.tar.gz"
    local src="${ME_SDIST:-}"
    if [[ -z "$src" && -f "$dest" ]]; then src="$dest"; fi
    if [[ -z "$src" ]]; then
        mkdir -p "$(dirname "$dest")"
        log "downloading the MinkowskiEngine $ME_VERSION source distribution"
        "$PYTHON" - "${ME_INDEX_URL:-https://pypi.org/simple}" "$ME_VERSION" "$dest.part" <<'EOF'
import json, sys, urllib.request
index, version, out = sys.argv[1].rstrip("/"), sys.argv[2], sys.argv[3]
want = f"MinkowskiEngine-{version}.tar.gz"
req = urllib.request.Request(f"{index}/minkowskiengine/",
                             headers={"Accept": "application/vnd.pypi.simple.v1+json"})
with urllib.request.urlopen(req, timeout=120) as r:
    files = json.load(r)["files"]
urls = [f["url"] for f in files if f["filename"] == want]
if not urls:
    sys.exit(f"{want} not listed by {index}")
with urllib.request.urlopen(urls[0], timeout=300) as r, open(out, "wb") as f:
    f.write(r.read())
EOF
        mv "$dest.part" "$dest"
        src="$dest"
    fi
    [[ -f "$src" ]] || die "source distribution not found: $src"
    local got
    got=$(sha256sum "$src" | cut -d' ' -f1)
    if [[ "$got" != "$ME_SDIST_SHA256" ]]; then
        [[ "$src" == "$dest" ]] && rm -f "$dest"
        die "sha256 of $src is $got, expected $ME_SDIST_SHA256"
    fi
    printf '%s\n' "$src"
}

# --- source fixes, applied to a temporary copy ------------------------------------------------------
patch_source() {  # $1: unpacked source tree
    "$PYTHON" - "$1" "$ME_VARIANT" <<'EOF'
import pathlib, re, sys

root, variant = pathlib.Path(sys.argv[1]), sys.argv[2]


def edit(rel, old, new, count=1):
    """Replace `old` by `new` in one file; fail loudly when the source is not the expected one."""
    path = root / rel
    text = path.read_text()
    found = text.count(old)
    if found != count:
        sys.exit(f"patch: expected {count} occurrence(s) of {old!r} in {rel}, found {found}")
    path.write_text(text.replace(old, new))


# setup.py deletes ./build and runs `pip uninstall MinkowskiEngine -y` at import time: a build must
# not modify the environment it builds for (and pip calls setup.py more than once).
edit("setup.py", 'run_command("rm", "-rf", "build")\n', "")
edit("setup.py", 'run_command("pip", "uninstall", "MinkowskiEngine", "-y")\n', "")

# Python 3.10 removed the ABC aliases from `collections`.
for rel in ["MinkowskiEngine/MinkowskiCoordinateManager.py", "MinkowskiEngine/MinkowskiTensorField.py",
            "MinkowskiEngine/MinkowskiCommon.py", "MinkowskiEngine/utils/quantization.py"]:
    edit(rel, "from collections import Sequence\n", "from collections.abc import Sequence\n")
edit("MinkowskiEngine/MinkowskiKernelGenerator.py", "from collections import Sequence, namedtuple\n",
     "from collections import namedtuple\nfrom collections.abc import Sequence\n")

# torch._six was removed in torch 2.0. Only utils.gradcheck used it; that module is not imported by
# the package and still needs torch.autograd internals that torch 2.x no longer has.
edit("MinkowskiEngine/utils/gradcheck.py", "from torch._six import container_abcs, istuple\n",
     "import collections.abc as container_abcs\n\n\ndef istuple(obj):\n    return isinstance(obj, tuple)\n\n\n")

# CUDA only: since CUDA 12, thrust no longer pulls these headers in transitively (the upstream
# reports: NVIDIA/MinkowskiEngine issues 543 and 601). Not built in this project so far.
if variant == "cuda":
    edit("src/convolution_kernel.cuh", '#include "gpu.cuh"\n',
         '#include "gpu.cuh"\n#include <thrust/execution_policy.h>\n')
    edit("src/coordinate_map_gpu.cu", "#include <thrust/sort.h>\n",
         "#include <thrust/sort.h>\n#include <thrust/remove.h>\n#include <thrust/unique.h>\n")
    edit("src/spmm.cu", "#include <cusparse.h>\n",
         "#include <cusparse.h>\n#include <thrust/execution_policy.h>\n#include <thrust/reduce.h>\n"
         "#include <thrust/sort.h>\n")
    edit("src/3rdparty/concurrent_unordered_map.cuh", "#include <thrust/count.h>\n",
         "#include <thrust/count.h>\n#include <thrust/execution_policy.h>\n")

leftover = [str(p.relative_to(root)) for p in root.rglob("*.py")
            if re.search(r"^from collections import .*\b(Sequence|Iterable|Mapping|Callable)\b",
                         p.read_text(), re.M) or "torch._six" in p.read_text()]
if leftover:
    sys.exit(f"patch: unpatched collections ABC / torch._six imports remain in {leftover}")
print(f"patched {root.name} for Python 3.10+ / torch 2.x ({variant})")
EOF
}

# --- build --------------------------------------------------------------------------------------------
build_wheel() {
    check_build_prereqs
    local sdist work
    sdist=$(fetch_sdist)
    work=$(mktemp -d "${TMPDIR:-/tmp}/minkowski-build.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" EXIT
    tar -xzf "$sdist" -C "$work"
    local src="$work/MinkowskiEngine-$ME_VERSION"
    patch_source "$src" >&2
    # Build tools, installed only when missing (offline machines may already have them).
    local tools
    tools=$("$PYTHON" - <<'EOF'
import importlib.util
print(" ".join(m for m in ("setuptools", "wheel", "ninja", "numpy") if importlib.util.find_spec(m) is None))
EOF
)
    if [[ -n "$tools" ]]; then
        # shellcheck disable=SC2086
        "$PYTHON" -m pip install -q $tools >&2
    fi
    local flag=--cpu_only
    [[ "$ME_VARIANT" == cuda ]] && flag=--force_cuda
    # its setup.py imports distutils: the standard library's up to 3.11, setuptools' copy from 3.12
    # (the standard library has none there)
    local distutils=stdlib
    [[ "$PY_TAG" =~ ^cp3([0-9]+)$ ]] && ((BASH_REMATCH[1] >= 12)) && distutils=local
    log "building the wheel (MAX_JOBS=$MAX_JOBS; about 4-10 minutes on 2 cores); log: $work/build.log"
    local start=$SECONDS
    if ! CFLAGS="-DNDEBUG -fwrapv -O3 -g0" SETUPTOOLS_USE_DISTUTILS=$distutils \
        "$PYTHON" -m pip wheel -v --no-deps --no-build-isolation -w "$work/dist" \
            --config-settings="--global-option=--blas=openblas" \
            --config-settings="--global-option=$flag" \
            "$src" >"$work/build.log" 2>&1; then
        grep -E -m 40 -B2 -A6 'error|Error' "$work/build.log" >&2 || tail -n 60 "$work/build.log" >&2
        cp "$work/build.log" "$CACHE_ROOT/last-build.log" 2>/dev/null || true
        die "MinkowskiEngine build failed (full log kept in $CACHE_ROOT/last-build.log)"
    fi
    log "built in $((SECONDS - start)) s"
    local built
    built=$(compgen -G "$work/dist/[Mm]inkowski[Ee]ngine-*.whl" | head -n 1) || die "no wheel produced"
    mkdir -p "$WHEEL_DIR"
    cp "$built" "$WHEEL_DIR/.tmp.whl"
    mv "$WHEEL_DIR/.tmp.whl" "$WHEEL_DIR/$(basename "$built")"
    rm -rf "$work"
    trap - EXIT
}

WHEEL=""
[[ "${ME_FORCE_REBUILD:-0}" == 1 ]] || WHEEL=$(find_cached_wheel)
if [[ -n "$WHEEL" ]]; then
    log "using cached wheel $WHEEL"
else
    build_wheel
    WHEEL=$(find_cached_wheel)
    [[ -n "$WHEEL" ]] || die "wheel missing from $WHEEL_DIR after the build"
fi

# --- install (skipped when this very wheel is already installed) ----------------------------------
check_runtime_prereqs
installed_from=$("$PYTHON" - <<'EOF'
import json
from importlib import metadata
try:
    text = metadata.distribution("MinkowskiEngine").read_text("direct_url.json") or "{}"
    print(json.loads(text).get("url", ""))
except metadata.PackageNotFoundError:
    print("")
EOF
)
if [[ "$installed_from" == "file://$WHEEL" && "${ME_FORCE_REBUILD:-0}" != 1 ]]; then
    log "already installed from the cached wheel"
else
    log "installing $(basename "$WHEEL")"
    "$PYTHON" -m pip install -q --no-deps --force-reinstall "$WHEEL"
fi

# --- smoke test: import, then one small sparse convolution forward and backward ------------------
"$PYTHON" - <<'EOF'
import warnings

import torch

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*compiled with CPU_ONLY.*")
    import MinkowskiEngine as ME
print(ME.__version__)

g = torch.Generator().manual_seed(0)
coords = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1], [0, 1, 0, 0], [1, 2, 2, 2], [1, 2, 3, 2]],
                      dtype=torch.int32)
feats = torch.randn(5, 3, generator=g, requires_grad=True)
x = ME.SparseTensor(feats, coordinates=coords)
conv = ME.MinkowskiConvolution(3, 4, kernel_size=3, stride=1, dimension=3)
y = conv(x)
assert y.F.shape == (5, 4), y.F.shape
assert torch.isfinite(y.F).all()
y.F.sum().backward()
assert feats.grad is not None and torch.isfinite(feats.grad).all()
print(f"sparse conv smoke test ok: {tuple(x.F.shape)} -> {tuple(y.F.shape)}, backward ok")
EOF
