# Sourced by the device scripts (scripts/device_*.sh), from the repo root, after STAGES is set:
# logging, stage selection, the device banner, and the install (the carried nvidia-cutlass wheel
# from .whl/, then this package built against the device's own jaxlib FFI headers).
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/jfm-out}; mkdir -p "$OUT"
REPO=$(pwd)
has() { [[ " $STAGES " == *" $1 "* ]]; }
log() { echo "=== $(date +%T) $*"; }

log "device"; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"

if has build; then
  log "build${CUDAFLAGS:+ (CUDAFLAGS=$CUDAFLAGS: compile-time candidates on)}"
  python3 -m pip install -q --no-deps --no-index .whl/nvidia_cutlass-*.whl 2>&1 | tail -2
  # -v keeps nvcc's resource report (-Xptxas -warn-spills) in the log. CMAKE_CUDA_FLAGS is passed
  # on every configure (empty without CUDAFLAGS): the build dir (pyproject build-dir) survives on a
  # warm machine, and CMake reads the CUDAFLAGS variable only on a first configure, so a
  # candidate's flags would otherwise stay in, or never get into, the cached build.
  ( time SKBUILD_CMAKE_ARGS="-DCMAKE_CUDA_FLAGS=${CUDAFLAGS:-}" \
      python3 -m pip install --no-build-isolation --no-deps -v . ) > "$OUT/build.log" 2>&1 \
    || { tail -60 "$OUT/build.log"; exit 1; }
  grep -E "spill|error|warning" "$OUT/build.log" | sort | uniq -c | head -20
  tail -3 "$OUT/build.log"
fi
cd /tmp   # import the installed package, not the source tree
python3 -c "import jax_flashmla as j; print('kernels_available:', j.kernels_available(), j._ffi.registered_targets())"
