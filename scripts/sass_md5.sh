#!/usr/bin/env bash
# Per-object SASS md5 of every kernel object (csrc/kernels/**/*.cu) of a source tree, built with
# extra nvcc flags: two trees / flag sets with equal hashes run the same machine code, which is how
# a refactor or a candidate's default is shown unchanged without a GPU (docs/BUILDING.md).
#   scripts/sass_md5.sh [ROOT] [OUTDIR] ["-DJFM_X=1 ..."]    (ROOT default: this repo)
# PER_FUNCTION=1 also hashes each kernel function of each object (lines "object:function md5"),
# which shows, where a candidate applies to some kernels of an object, that the others kept
# their (tested) machine code. OBJECTS="regex" compiles only the objects whose path matches
# (e.g. OBJECTS=sparse/instantiate_ws_fp8: the two FP8 warp-specialized objects).
# Compare two runs with `diff`. Needs nvcc and cuobjdump: the toolkit here has no cuobjdump, PyPI
# does (`pip download --no-deps nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm -d /tmp/nvd`, unzip both
# into /tmp/nvd/x; CUOBJDUMP=path otherwise). The
# anonymous-namespace symbol names carry a hash of the source path, so they are masked; line info
# is not in `cuobjdump -sass`, so comment edits do not move a hash.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
ROOT=$(cd "${1:-$here}" && pwd)
OUTD=${2:-/tmp/sass_md5}
FLAGS=${3:-}
CUOBJDUMP=${CUOBJDUMP:-$(command -v cuobjdump || echo /tmp/nvd/x/nvidia/cu13/bin/cuobjdump)}
CUTLASS=${CUTLASS_INCLUDE:-$(python3 -c "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))")}
CCCL=${CCCL_INCLUDE:-${CUDA_HOME:-/usr/local/cuda}/include/cccl}
[ -x "$CUOBJDUMP" ] || { echo "no cuobjdump at $CUOBJDUMP (see the header)"; exit 1; }
# cuobjdump -sass runs nvdisasm (PyPI's nvidia-cuda-nvdisasm, unzipped beside it: same bin/).
export PATH="$(dirname "$CUOBJDUMP"):$PATH"
mkdir -p "$OUTD"
rm -f "$OUTD"/*.sass "$OUTD"/*.cubin  # (the hashes below take every .sass here: none stale)
# The flags of CMakeLists.txt's target that change code (-lineinfo only adds line tables).
compile() {
  set -o pipefail  # (bash -c: not inherited) a failed cuobjdump must not hash as empty SASS
  local f=$1 n; n=$(echo "$f" | tr / _)
  nvcc -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr --expt-extended-lambda \
    --use_fast_math -std=c++17 -I"$ROOT/csrc" -I"$CUTLASS" -I"$CCCL" $FLAGS \
    -cubin -o "$OUTD/$n.cubin" "$ROOT/$f"
  # Runs of blanks squeezed: cuobjdump pads every line to a width that depends on the whole
  # object, so without it a function whose code did not change gets a new hash when another
  # function of its object changed (seen 2026-12-03).
  "$CUOBJDUMP" -sass "$OUTD/$n.cubin" | grep -v '^\s*$' | sed -E 's/[[:space:]]+/ /g' \
    | sed -E 's/[0-9]*_GLOBAL__N__[0-9a-f]+_[0-9]+_[A-Za-z0-9_]+_cu_[0-9a-f]+(_[0-9]+)?/_ANON_/g' > "$OUTD/$n.sass" \
    || { echo "sass_md5: no SASS for $f" >&2; rm -f "$OUTD/$n.sass"; exit 1; }
}
export -f compile
export ROOT OUTD FLAGS CUOBJDUMP CUTLASS CCCL
(cd "$ROOT" && find csrc/kernels -name "*.cu" | sort | grep -E "${OBJECTS:-.}") \
  | xargs -P "${JOBS:-2}" -I{} bash -c 'compile "$@"' _ {}
(cd "$OUTD" && md5sum ./*.sass | sed 's| \./| |')
if [ "${PER_FUNCTION:-0}" = 1 ]; then
  for f in "$OUTD"/*.sass; do
    awk -v obj="$(basename "$f" .sass)" '
      /Function :/ { if (fn != "") { close(cmd); } fn = $3; cmd = "md5sum | sed \"s|-$|" obj ":" fn "|\"" }
      fn != "" { print | cmd }
      END { if (fn != "") close(cmd) }' "$f"
  done
fi
