# Sourced by the device scripts (scripts/device_*.sh), from the repo root, after STAGES is set:
# logging, stage selection, the device banner, and the install (the carried nvidia-cutlass wheel
# from .whl/, then this package built against the device's own jaxlib FFI headers).
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/jfm-out}; mkdir -p "$OUT"
REPO=$(pwd)
has() { [[ " $STAGES " == *" $1 "* ]]; }
log() { echo "=== $(date +%T) $*"; }

log "device"; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
# REQUIRE_GPU=H200 (any part of the card's name): stop here, exit 0, nothing built or run, unless
# the card matches. A call that names nvidia-h200 may get an H100 (every call of the 2026-12-06
# sessions did); with this the mismatch costs only the machine's start.
if [ -n "${REQUIRE_GPU:-}" ] && ! nvidia-smi --query-gpu=name --format=csv,noheader | grep -q "$REQUIRE_GPU"; then
  log "the card does not match REQUIRE_GPU=$REQUIRE_GPU: nothing run"
  exit 0
fi
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
  # (C7518: ptxas serialized every wgmma of a kernel, docs/BUILDING.md)
  grep -E "spill|error|warning|C7518" "$OUT/build.log" | sort | uniq -c | head -20
  tail -3 "$OUT/build.log"
fi
# Nsight Compute: the sections and metrics of every profile (device_check.sh's ncu stage,
# scripts/ncu_side_by_side.sh; NCU_EXTRA adds arguments), and the export of one report into
# $OUT: ncu_<name>.txt (the sections), _details.txt (--print-details: the *_Tables sections'
# rows, which the plain print leaves out), _raw.csv.gz (every metric), _sass.csv.gz (warp-stall
# samples per SASS instruction: scripts/ncu_sass_stalls.py). NCU_METRICS: more metrics, comma-
# separated, in the one --metrics list (ncu refuses a second --metrics, e.g. in NCU_EXTRA).
NCU_ARGS=(--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats
  --section SchedulerStats --section Occupancy --section SourceCounters
  --metrics "dram__bytes_read.sum,lts__t_sector_hit_rate.pct,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_elapsed,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio${NCU_METRICS:+,$NCU_METRICS}"
  ${NCU_EXTRA:-})
ncu_export() {  # ncu_export NAME REPORT (.ncu-rep)
  ncu --import "$2" > "$OUT/ncu_$1.txt" 2>&1
  ncu --import "$2" --print-details all > "$OUT/ncu_$1_details.txt" 2>&1
  ncu --import "$2" --page raw --csv 2>/dev/null | gzip > "$OUT/ncu_$1_raw.csv.gz"
  ncu --import "$2" --page source --csv --print-source sass 2>/dev/null | gzip > "$OUT/ncu_$1_sass.csv.gz"
  echo "--- $1"
  grep -E "Duration|DRAM Throughput|dram__bytes_read|hit_rate|gmma|Compute \(SM\)|No Eligible|stalled_(barrier|long|wait|math|mio|short|lg|no_inst|not_sel|selected)|==ERR|rror" "$OUT/ncu_$1.txt" | head -30
  python3 "$REPO/scripts/ncu_sass_stalls.py" "$OUT/ncu_$1_sass.csv.gz" 2>&1 | head -40
}
cd /tmp   # import the installed package, not the source tree
python3 -c "import jax_flashmla as j; print('kernels_available:', j.kernels_available(), j._ffi.registered_targets())"
