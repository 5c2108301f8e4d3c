#!/usr/bin/env bash
# The one device call: install (building the CUDA extension against the device's jaxlib), run the
# whole test suite on GPU jax, then GPU-only tests and benchmarks. Logs go to $OUT.
# Run through the device tool from the repo root, carrying the nvidia-cutlass wheel:
#   run(command="bash scripts/device_check.sh", carry=[".whl"])
# Stages can be chosen: STAGES="build cpu-suite gpu memcheck bench" (default: all).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/jfm-out}; mkdir -p "$OUT"
STAGES=${STAGES:-"build cpu-suite gpu memcheck bench"}
has() { [[ " $STAGES " == *" $1 "* ]]; }
log() { echo "=== $(date +%T) $*"; }

log "device"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"

if has build; then
  log "build"
  python3 -m pip install -q --no-deps --no-index .whl/nvidia_cutlass-*.whl 2>&1 | tail -2
  # -v shows nvcc's resource report (-Xptxas -warn-spills); keep it for the record.
  ( time python3 -m pip install --no-build-isolation --no-deps -v . ) > "$OUT/build.log" 2>&1 \
    || { tail -60 "$OUT/build.log"; exit 1; }
  grep -E "spill|error|warning" "$OUT/build.log" | sort | uniq -c | head -20
  tail -3 "$OUT/build.log"
fi
cd /tmp   # import the installed package, not the source tree
python3 -c "import jax_flashmla as j; print('kernels_available:', j.kernels_available(), j._ffi.registered_targets())"

if has cpu-suite; then
  log "whole test suite on GPU jax"
  python3 -m pytest -q -p no:cacheprovider "$OLDPWD/tests" --ignore="$OLDPWD/tests/gpu" 2>&1 \
    | tee "$OUT/suite.log" | tail -15
fi
if has gpu; then
  log "GPU tests"
  XLA_FLAGS=--xla_gpu_autotune_level=0 timeout ${GPU_TIMEOUT:-360} python3 -m pytest -q -p no:cacheprovider --tb=short -rf --maxfail=${GPU_MAXFAIL:-5} -m gpu "$OLDPWD/tests/gpu" 2>&1 \
    | tee "$OUT/gpu.log" | grep -vE "^(tests|/)" | tail -40
fi
if has memcheck; then
  log "compute-sanitizer memcheck, dense decode subset (our kernels only)"
  XLA_FLAGS=--xla_gpu_autotune_level=0 XLA_PYTHON_CLIENT_ALLOCATOR=platform \
    timeout ${MEMCHECK_TIMEOUT:-150} compute-sanitizer --tool memcheck \
    --kernel-name kns=jfm --print-limit 20 \
    python3 "$OLDPWD/tests/gpu/memcheck_dense_decode.py" 2>&1 | tee "$OUT/memcheck.log" | tail -12
fi
if has bench && [ -f "$OLDPWD/benchmarks/bench_decode.py" ]; then
  log "benchmarks"
  python3 "$OLDPWD/benchmarks/bench_decode.py" ${BENCH_ARGS:-} --out "$OUT/bench.json" 2>&1 \
    | tee "$OUT/bench.log" | tail -40
fi
log "done"
