#!/usr/bin/env bash
# The GPU checks owed, in one command, for the short slots a GPU is lent in (under 8 minutes on
# an H100/H200):
#   1. the CUDA kernel tests and the CUDA (Philox) seed test on the hardware;
#   2. one full-size random-weights picture, --backend cuda against --backend numpy (mean |Δ| ≤ 1/255);
#   3. benchmarks/bench_cuda.py: U-Net CFG step and VAE decode against diffusers fp32 and fp16.
# It prints one table at the end and writes its logs and JSON under $OUT (or gpu-check-out/).
#
#   scripts/gpu_check.sh --prepare    # here, with PyPI: the wheels the GPU machine lacks -> .whl/
#   scripts/gpu_check.sh              # there: installs .whl/ and tinysd (no index), runs the checks
#   scripts/gpu_check.sh --dry-run    # here, no GPU: step 1 in numba's CUDA simulator, step 2's
#                                     # script on the tiny model with the cpu backend in place of
#                                     # cuda (the simulator takes hours for a picture), no step 3
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
# The GPU machine (Python 3.12) has torch, transformers, numba-cuda, safetensors, tokenizers, but
# no diffusers; diffusers needs importlib_metadata besides what is there.
WHEELS="diffusers==0.42.1 importlib_metadata==8.7.0"

if [ "${1:-}" = "--prepare" ]; then
    grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
    $PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl $WHEELS && ls .whl
    exit $?
fi
DRY=0
if [ "${1:-}" = "--dry-run" ]; then
    DRY=1
    export NUMBA_ENABLE_CUDASIM=1
fi

start=$(date +%s)
if [ "$DRY" = 0 ]; then
    nvidia-smi -L || { echo "gpu_check: no NVIDIA GPU here (use --dry-run)"; exit 1; }
    if [ -d .whl ]; then
        $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    # tinysd itself (tinysd.kernels lives in kernels/): editable, no index, no build isolation
    $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
fi
export PYTHONUNBUFFERED=1

declare -a NAMES RESULTS TIMES
step() {   # step NAME LOG COMMAND...: run it, keep its log, note pass/fail and seconds
    local name=$1 log=$OUT/$2; shift 2
    local t0=$(date +%s)
    echo "== $name: $*"
    "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    NAMES+=("$name"); TIMES+=($(( $(date +%s) - t0 )))
    RESULTS+=("$([ "$rc" = 0 ] && echo ok || echo "FAILED (exit $rc)"): $(grep -E "passed|failed|mean \|Δ\||error" "$log" | tail -1)")
}

if [ "$DRY" = 1 ]; then
    step "CUDA kernels, seeds (simulator)" tests.log $PY -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py tests/test_rng.py
    step "cpu vs numpy picture (tiny; cuda in place)" image.log $PY scripts/gpu_image_check.py --tiny --backend cpu --json "$OUT/image.json"
else
    step "CUDA kernels, Philox seeds (GPU)" tests.log $PY -m pytest -q -p no:cacheprovider -rs tests/test_kernels_cuda.py tests/test_rng.py
    step "cuda vs numpy picture (512², random SD v1.5)" image.log $PY scripts/gpu_image_check.py --json "$OUT/image.json"
    step "bench_cuda (U-Net CFG step, VAE decode)" bench.log $PY benchmarks/bench_cuda.py --only unet,vae --repeat 3 --json "$OUT/bench_cuda.json"
fi

echo
echo "== gpu_check summary ($(( $(date +%s) - start )) s$([ "$DRY" = 1 ] && echo ", dry run in the CUDA simulator"))"
for i in "${!NAMES[@]}"; do
    printf '%-46s %5ss  %s\n' "${NAMES[$i]}" "${TIMES[$i]}" "${RESULTS[$i]}"
done
if [ -f "$OUT/bench.log" ]; then
    echo; sed -n '/^[A-Z].*weights:/,$p' "$OUT/bench.log"
fi
case "${RESULTS[*]}" in *FAILED*) exit 1 ;; esac
