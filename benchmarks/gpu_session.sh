#!/usr/bin/env bash
# One prepared GPU session for the sparse engines (docs/benchmarks.md keeps what each session measured).
# Steps, in order of importance; each gets its own time limit, cut to what is left of BUDGET seconds
# (default 540) so that the whole session ends inside one device call:
#   1. the headline: benchmarks/backends.py, triton vs torch, published widths and the shipped
#      student, bf16, default tiles (no tuning: every tuning candidate is one more compilation),
#      farthest-point sampling where the Completer puts it by default (the device on CUDA),
#   2. the Triton rows of step 1 with the exact sampling kernel that takes several samples per
#      exchange (--fps-candidates 2: each program offers its two farthest points),
#   3. the Triton rows of step 1 with approximate farthest-point sampling in 16 azimuth sectors
#      (--fps-parts 16; its effect on CD: docs/benchmarks.md),
#   4. the published Triton row of step 1 with the kernel maps and lattice search built by torch
#      operations (LIDAR_COMPLETION_TRITON_MAPS=0), for comparison with the map kernels,
#   5. correctness on the GPU: tests/test_triton.py and the Triton and sampling tests of
#      tests/test_cuda.py (fp32 within 1e-4 of the torch backend, bf16 no further from fp32 than
#      torch's own bf16), with the default tiles (with tuning on, every new layer shape compiles
#      every candidate),
#   6. farthest-point sampling alone: the device kernel against fpsample on the CPU, with 1-8
#      candidates per program and exchange, with fewer programs per cloud, and the approximate
#      sector variant (8, 16 and 32 sectors),
#   7. launches of one guided published-width pass (benchmarks/launch_count.py): torch operators and
#      Triton kernels with the map kernels and without,
#   8. training steps per second on the GPU (python -m training.bench): the published-width teacher,
#      triton vs torch, bf16 and fp32 (the target: triton bf16 >= 4x torch fp32), each row with a
#      profile of one more step (named regions, top kernels, launches, host synchronisations),
#   9. the tiny teacher at batch 8 on Triton, bf16 (the target: >= 20 steps per second), profiled
#      the same way, with the Chrome trace of the profiled step,
#  10. a profile of one published-width bf16 scan on the Triton backend (which kernels take the time;
#      the local process, as step 1 runs it),
#  11. benchmarks/gemm_tiles.py: every convolution of one published-width scan with the default
#      tiles, then a wider list of tile configurations for the heaviest layers (the useful TFLOP/s),
#  12. the fp32 rows of step 1 (fp32 products are tf32x3 on CUDA),
#  13. the layer and network tests again with the flat K loop,
#  14. the rest of tests/test_cuda.py (torch backend, CUDA graphs),
#  15. the published-width teacher of step 8 (triton, bf16) with the weight gradient looping over
#      every row of every offset (LIDAR_COMPLETION_TRITON_WGRAD=dense) instead of each offset's
#      listed pairs: what the listed pairs save (benchmarks/training_work.py counts 1.4x fewer
#      multiply-adds visited per step),
#  16. benchmarks/wgrad_tiles.py: every weight-gradient call of one published-width teacher step
#      with the default blocks and the dense loop, then a wider list of blocks per layer.
# Runs on a machine with torch and Triton preinstalled and no network: wheels of the missing packages
# (fpsample) may sit in .whl/. Results go to ${OUT:-gpu_out}/. Run it as
#   set -o pipefail; BUDGET=400 bash benchmarks/gpu_session.sh 2>&1 | tee $OUT/log
# so that a call cut off at its limit still returns the earlier steps' output (ONLY="1 5" runs steps
# 1 and 5 alone; TESTS_K narrows step 5's pytest -k). Triton compiles its kernels on first use and caches them on disk for later steps.
# tests/test_gpu_session.py rehearses this script on the CPU with stand-ins for python3 and nvidia-smi:
# every step's arguments must pass its script's parser and every pytest call must select tests.
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
BUDGET=${BUDGET:-540}
if ls .whl/*.whl >/dev/null 2>&1; then   # wheels for a machine without network, into a scratch folder
  SITE=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    && export PYTHONPATH=$SITE:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/lidar_completion_pkg:$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
export LIDAR_COMPLETION_TRITON_CACHE="$OUT/triton-tune.json"   # the tuned tiles come back with the logs
unset LIDAR_COMPLETION_BACKEND TRITON_INTERPRET
nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
# step LIMIT CMD...: run CMD under min(LIMIT, what is left of BUDGET - 5 s); skipped under 15 s left,
# or when ONLY (e.g. ONLY="3 4 8") lists step numbers and not this one
N=0
step() {
  local limit=$1; shift
  N=$((N + 1))
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $N "* ]]; then return 0; fi
  local left=$((BUDGET - SECONDS - 5))
  [ "$left" -lt "$limit" ] && limit=$left
  echo; echo "=== [$SECONDS s] step $N: $* (limit ${limit} s)"
  if [ "$limit" -lt 15 ]; then echo "=== skipped: out of budget"; return 0; fi
  local t0=$SECONDS; timeout "$limit" "$@"; echo "=== rc=$? in $((SECONDS - t0)) s"
}
PYTEST="python3 -m pytest -q -p no:cacheprovider -rf --timeout 100"
step 110 env LIDAR_COMPLETION_TRITON_TUNE=0 python3 benchmarks/backends.py --device cuda \
  --cases published student --precisions bf16 --repeats 3 --json "$OUT/backends_bf16.json"
step 60 env LIDAR_COMPLETION_TRITON_TUNE=0 python3 benchmarks/backends.py --device cuda \
  --cases published student --backends triton --precisions bf16 --repeats 3 --fps-candidates 2 \
  --json "$OUT/backends_fps_candidates2.json"
step 60 env LIDAR_COMPLETION_TRITON_TUNE=0 python3 benchmarks/backends.py --device cuda \
  --cases published student --backends triton --precisions bf16 --repeats 3 --fps-parts 16 \
  --json "$OUT/backends_fps16.json"
step 50 env LIDAR_COMPLETION_TRITON_TUNE=0 LIDAR_COMPLETION_TRITON_MAPS=0 python3 benchmarks/backends.py --device cuda \
  --cases published --backends triton --precisions bf16 --repeats 3 --json "$OUT/backends_maps_torch.json"
step 150 env LIDAR_COMPLETION_TRITON_TUNE=0 $PYTEST tests/test_triton.py tests/test_cuda.py -k "${TESTS_K:-triton or fps or samples}"
step 60 python3 benchmarks/backends.py --device cuda --fps-only --fps-candidates 0 1 2 4 8 --fps-parts 1 8 16 32 \
  --json "$OUT/fps.json"
step 40 env LIDAR_COMPLETION_TRITON_TUNE=0 python3 benchmarks/launch_count.py --device cuda --widths full --points 120000
step 180 python3 -m training.bench --device cuda --sizes full --kinds teacher --backends triton torch \
  --precisions bf16 fp32 --steps 3 --profile
step 60 python3 -m training.bench --device cuda --sizes tiny --kinds teacher --backends triton --precisions bf16 \
  --batch 8 --steps 5 --profile --trace "$OUT/traces"
step 60 env LIDAR_COMPLETION_TRITON_TUNE=0 python3 benchmarks/profile_completion.py --device cuda --config full \
  --backend triton --precision bf16 --top 30 --trace "$OUT/trace_triton_full_bf16.json.gz"
step 90 python3 benchmarks/gemm_tiles.py --device cuda --budget 30 --json "$OUT/gemm_tiles.json"
step 70 env LIDAR_COMPLETION_TRITON_TUNE=0 python3 benchmarks/backends.py --device cuda \
  --cases published student --precisions fp32 --repeats 3 --json "$OUT/backends_fp32.json"
step 45 env LIDAR_COMPLETION_TRITON_TUNE=0 LIDAR_COMPLETION_TRITON_LOOP=flat $PYTEST tests/test_triton.py \
  -k "convolution or residual or networks or static or completes"
step 90 $PYTEST tests/test_cuda.py -k "not triton and not fps and not samples"
step 60 env LIDAR_COMPLETION_TRITON_WGRAD=dense python3 -m training.bench --device cuda --sizes full --kinds teacher \
  --backends triton --precisions bf16 --steps 3
step 90 python3 benchmarks/wgrad_tiles.py --device cuda --budget 40 --json "$OUT/wgrad_tiles.json"
echo "=== session done in $SECONDS s"
