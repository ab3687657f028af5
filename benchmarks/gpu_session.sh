#!/usr/bin/env bash
# One prepared GPU session (the figures of README "Benchmarks"): CUDA correctness tests, a profile of
# one scan, and the end-to-end timings. Runs on a machine with torch preinstalled and no network:
# wheels of the missing packages (fpsample) may sit in .whl/. Results go to ${OUT:-gpu_out}/.
#   bash benchmarks/gpu_session.sh            # everything (about 5 minutes on an H200)
#   QUICK=1 bash benchmarks/gpu_session.sh    # tests and the shipped student's profile only
#   FAST=1 bash benchmarks/gpu_session.sh     # tests, profile and the headline end-to-end figures
# CUDA graphs are on by default on the GPU; the student is also timed with LIDAR_COMPLETION_CUDA_GRAPHS=0.
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then   # wheels for a machine without network, into a scratch folder
  SITE=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    && export PYTHONPATH=$SITE:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/lidar_completion_pkg:$PWD:${PYTHONPATH:-} LIDAR_COMPLETION_BACKEND=torch PYTHONUNBUFFERED=1
nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
step() { echo; echo "=== $*"; local t0=$SECONDS; "$@"; echo "=== rc=$? in $((SECONDS - t0)) s"; }
step timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
step timeout 120 python3 benchmarks/profile_completion.py --device cuda --top 40 --trace "$OUT/trace_tiny_fp32.json.gz"
[ -n "${QUICK:-}" ] && exit 0
if [ -n "${FAST:-}" ]; then   # the headline figures only (about 3 minutes)
  step timeout 90 python3 benchmarks/backends.py --device cuda --no-forward --repeats 3 \
    --checkpoint lidar_completion_pkg/lidar_completion/weights/student.pt --json "$OUT/student.json"
  step env LIDAR_COMPLETION_CUDA_GRAPHS=0 timeout 90 python3 benchmarks/backends.py --device cuda --no-forward \
    --repeats 3 --steps 8 --checkpoint lidar_completion_pkg/lidar_completion/weights/student.pt \
    --json "$OUT/student_nographs.json"
  step timeout 150 python3 benchmarks/backends.py --device cuda --config tiny --no-forward --repeats 3 --json "$OUT/tiny_auto.json"
  step timeout 120 python3 benchmarks/backends.py --device cuda --config full --no-forward --repeats 2 --steps 8 --json "$OUT/full_auto.json"
  exit 0
fi
step timeout 150 python3 benchmarks/backends.py --device cuda --config tiny --no-forward --repeats 3 --json "$OUT/tiny_auto.json"
for algo in gather grouped scatter; do
  export LIDAR_COMPLETION_CONV_ALGO=$algo
  step timeout 60 python3 benchmarks/backends.py --device cuda --config tiny \
    --no-forward --repeats 3 --steps 8 --json "$OUT/tiny_$algo.json"
done
unset LIDAR_COMPLETION_CONV_ALGO
step timeout 90 python3 benchmarks/backends.py --device cuda --no-forward --repeats 3 \
  --checkpoint lidar_completion_pkg/lidar_completion/weights/student.pt --json "$OUT/student.json"
step timeout 120 python3 benchmarks/backends.py --device cuda --config full --no-forward --repeats 2 --steps 8 --json "$OUT/full_auto.json"
step timeout 90 python3 benchmarks/profile_completion.py --device cuda --config full --top 20
