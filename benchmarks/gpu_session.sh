#!/usr/bin/env bash
# One prepared GPU session for the sparse engines (docs/benchmarks.md keeps what each session measured):
#   1. the Triton backend against the torch backend on the GPU (tests/test_triton.py on CUDA),
#   2. benchmarks/backends.py: triton vs torch, published widths and the shipped student, fp32/bf16,
#      with the default tiles (no tuning: every tuning candidate is one more compilation),
#   3. the headline row again with tile tuning (published widths, bf16, triton),
#   4. a profile of one published-width bf16 scan on the Triton backend (which kernels take the time),
#   5. the rest of the CUDA tests (torch backend, CUDA graphs, Triton completions),
#   6. exact farthest-point sampling on the device against the CPU's.
# Runs on a machine with torch and Triton preinstalled and no network: wheels of the missing packages
# (fpsample) may sit in .whl/. Results go to ${OUT:-gpu_out}/. Not yet run on a GPU. The steps come in
# order of importance, each with its own timeout: run it as `set -o pipefail; bash
# benchmarks/gpu_session.sh 2>&1 | tee $OUT/log`, so that a call cut off at its time limit still
# returns the earlier steps' output. Triton compiles its kernels on first use and caches them on disk
# for the later steps.
#   bash benchmarks/gpu_session.sh            # everything
#   QUICK=1 bash benchmarks/gpu_session.sh    # steps 1 and 2 only
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then   # wheels for a machine without network, into a scratch folder
  SITE=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    && export PYTHONPATH=$SITE:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/lidar_completion_pkg:$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
export LIDAR_COMPLETION_TRITON_CACHE="$OUT/triton-tune.json"   # the tuned tiles come back with the logs
unset LIDAR_COMPLETION_BACKEND TRITON_INTERPRET
nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
step() { echo; echo "=== $*"; local t0=$SECONDS; "$@"; echo "=== rc=$? in $((SECONDS - t0)) s"; }
step timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_triton.py
step env LIDAR_COMPLETION_TRITON_TUNE=0 timeout 420 python3 benchmarks/backends.py --device cuda \
  --cases published student --repeats 3 --json "$OUT/backends.json"
[ -n "${QUICK:-}" ] && exit 0
step timeout 240 python3 benchmarks/backends.py --device cuda --cases published --backends triton \
  --precisions bf16 --repeats 3 --json "$OUT/backends_tuned.json"
step timeout 120 python3 benchmarks/profile_completion.py --device cuda --config full --backend triton --precision bf16 \
  --top 30 --trace "$OUT/trace_triton_full_bf16.json.gz"
step timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
step timeout 120 python3 benchmarks/backends.py --device cuda --fps-only --json "$OUT/fps.json"
