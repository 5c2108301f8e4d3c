#!/usr/bin/env bash
# The one device call: install (building the CUDA extension against the device's jaxlib), run the
# test suite on GPU jax, the GPU kernel tests, the sanitizers, an A/B against an earlier build,
# Nsight Compute, benchmarks and the examples. Logs go to $OUT; exits non-zero if any stage failed.
# From the repo root, carrying the nvidia-cutlass wheel (docs/BUILDING.md):
#   run(command="bash scripts/device_check.sh", carry=[".whl"])
# Stages: STAGES="build cpu-suite smoke gpu gpu-alt raceprobe probe gprobe fprobe memcheck racecheck synccheck ab abtime vartime
# abflags ncu trace bench example" (default: build gpu memcheck racecheck bench example). smoke runs a few calls of every
# kernel per SMOKE_VARIANTS (default "ws pair", JFM_KERNEL_VARIANT); gpu-alt runs
# the kernel GPU tests on each variant in ALT_VARIANTS (default "pair": the FP8 CTA pairs
# everywhere at 65-128 heads; "v1": the kernels before the warp-specialized ones; "combine1":
# the split-KV combine before the warp-per-row one; "v4load16" / "v4load8": every / no FP8 V4 producer reading 16 bytes at a time; "direct_out": the bf16 role split's output stored per thread, not by TMA;
# GPU_ALT_TESTS narrows the files, ~4.5 min per variant for all four); SAN_VARIANTS (default
# "ws"; e.g. "ws pair") runs the sanitizers on each. SUITE_TESTS /
# GPU_TESTS narrow the suites (paths relative to the repo root). Stage ab: `git archive -o
# .abase/base.tar <commit>` here first and carry .abase; it builds that tree beside this one and
# times both with BENCH_AB_ARGS (each in its own process).
set -uo pipefail
STAGES=${STAGES:-"build gpu memcheck racecheck bench example"}
source scripts/device_common.sh
rc=0
fail() { echo "!!! stage $1 FAILED"; rc=1; }
SAN="XLA_FLAGS=--xla_gpu_autotune_level=0 XLA_PYTHON_CLIENT_ALLOCATOR=platform"

if has cpu-suite; then
  log "whole CPU test suite on GPU jax"
  python3 -m pytest -q -p no:cacheprovider -rf $(printf "$REPO/%s " ${SUITE_TESTS:-tests}) \
    --ignore="$REPO/tests/gpu" 2>&1 | tee "$OUT/suite.log" | tail -15
  [ "${PIPESTATUS[0]}" -eq 0 ] || fail cpu-suite
fi
if has smoke; then
  # A few calls of every kernel per variant, checked against the reference, each variant in its
  # own process under a short timeout: a hang or a wrong result shows up here in seconds, not in
  # the long test stages.
  for variant in ${SMOKE_VARIANTS:-ws pair}; do
    log "smoke: tests/gpu/sanitize_kernels.py with JFM_KERNEL_VARIANT=$variant"
    JFM_KERNEL_VARIANT=$variant XLA_FLAGS=--xla_gpu_autotune_level=0 timeout -k 10 ${SMOKE_TIMEOUT:-120} \
      python3 "$REPO/tests/gpu/sanitize_kernels.py" 2>&1 | tee "$OUT/smoke_$variant.log" | tail -4
    [ "${PIPESTATUS[0]}" -eq 0 ] || fail "smoke $variant"
  done
fi
if has gpu; then
  log "GPU kernel tests"
  XLA_FLAGS=--xla_gpu_autotune_level=0 timeout -k 10 ${GPU_TIMEOUT:-540} python3 -m pytest -q \
    -p no:cacheprovider --tb=short -rf --maxfail=${GPU_MAXFAIL:-8} -m gpu \
    $(printf "$REPO/%s " ${GPU_TESTS:-tests/gpu}) 2>&1 \
    | tee "$OUT/gpu.log" | grep -vE "^(tests|/)" | tail -45
  [ "${PIPESTATUS[0]}" -eq 0 ] || fail gpu
fi
if has gpu-alt; then
  for variant in ${ALT_VARIANTS:-pair}; do
    log "GPU dense + sparse kernel tests on JFM_KERNEL_VARIANT=$variant"
    JFM_KERNEL_VARIANT=$variant XLA_FLAGS=--xla_gpu_autotune_level=0 timeout -k 10 ${GPU_TIMEOUT:-540} \
      python3 -m pytest -q -p no:cacheprovider --tb=short -rf --maxfail=${GPU_MAXFAIL:-8} -m gpu \
      $(printf "$REPO/%s " ${GPU_ALT_TESTS:-tests/gpu/test_dense_decode_gpu.py tests/gpu/test_sparse_decode_gpu.py tests/gpu/test_sparse_prefill_gpu.py tests/gpu/test_malformed_gpu.py}) 2>&1 \
      | tee "$OUT/gpu_$variant.log" | grep -vE "^(tests|/)" | tail -45
    [ "${PIPESTATUS[0]}" -eq 0 ] || fail "gpu-alt $variant"
  done
fi
if has raceprobe; then
  # Which synchronization patterns racecheck understands (tests/gpu/racecheck_probe.cu: small,
  # correct exchanges written with the kernels' own primitives, one pattern per process).
  log "racecheck probe: the kernels' synchronization patterns, one at a time"
  CCCL=$(dirname "$(dirname "$(command -v nvcc)")")/include/cccl
  nvcc -I "$REPO/csrc" -I "$CCCL" -gencode arch=compute_90a,code=sm_90a -std=c++17 -O3 -lineinfo \
    -o /tmp/racecheck_probe "$REPO/tests/gpu/racecheck_probe.cu" || fail raceprobe-build
  for pat in ${PROBE_PATTERNS:-0 1 2 3 4 5 6 7 8 9}; do
    timeout -k 5 60 compute-sanitizer --tool racecheck --print-limit 4 /tmp/racecheck_probe $pat \
      > "$OUT/raceprobe_$pat.log" 2>&1
    echo "pattern $pat: exit $? | $(grep -E 'pattern|SUMMARY' "$OUT/raceprobe_$pat.log" | tr '\n' ' ')"
  done
fi
# A standalone probe (benchmarks/NAME.cu, no extension build): compiled here (CUDA 13's CCCL on
# the include path, as the extension's build has it), run under a 120 s timeout with its
# arguments, its output in $OUT/NAME.log; `stage` fails if either step does.
run_probe() {  # stage name, args...
  local stage=$1 name=$2
  shift 2
  local cccl
  cccl=$(dirname "$(dirname "$(command -v nvcc)")")/include/cccl
  nvcc -I "$REPO/csrc" -I "$cccl" -gencode arch=compute_90a,code=sm_90a -std=c++17 -O3 \
    --expt-relaxed-constexpr -o "/tmp/$name" "$REPO/benchmarks/$name.cu" \
    && timeout -k 5 120 "/tmp/$name" "$@" 2>&1 | tee "$OUT/$name.log" \
    || fail "$stage"
}
if has probe; then
  # Tensor-core probe of the 64-row tile math (benchmarks/wgmma_probe.cu): clocks per tile of S
  # and P V alone, in one and in two warpgroups, and in the role split's and a seesaw's pattern.
  log "wgmma probe: clocks per tile of the 64-row tile math's wgmma sequences"
  run_probe probe wgmma_probe ${PROBE_ITERS:-2000}
fi
if has gprobe; then
  # Gather probe (benchmarks/gather_probe.cu): random 656-byte V3.2 tokens from a 1M-token pool
  # by the kernels' register loads or by bulk copies into shared memory (JFM_FP8_BULK_STAGE's
  # question, without the math warps): tokens per second and cycles per warp round.
  log "gather probe: register loads against bulk copies of FP8 tokens"
  run_probe gprobe gather_probe ${GPROBE_ROUNDS:-256}
fi
if has fprobe; then
  # Fill probe (benchmarks/fill_probe.cu): one SM's TMA refill of a dense page against the page
  # buffers in flight, the math's hold, alone or with every SM loading, one CTA or a multicasting
  # pair: whether the dense fill (~3600-4000 cycles a page) is latency- or bandwidth-bound.
  # FPROBE_HOLDS: the math holds to run (comma-separated cycles; unset: the probe's default).
  log "fill probe: TMA page refills against buffers in flight"
  run_probe fprobe fill_probe ${FPROBE_PAGES:-512} ${FPROBE_HOLDS:-}
fi
# Sanitizers over every kernel, per SAN_VARIANTS (default "ws"; synccheck checks the named
# barriers and mbarriers of the warp-specialized kernels). The reference results are computed once
# here without the sanitizer (also a smoke run of the default kernels) and read back by the
# sanitized runs, which then compile only the kernels' small XLA modules.
if has memcheck || has racecheck || has synccheck; then
  log "reference results for the sanitizer runs (tests/gpu/sanitize_kernels.py --write-refs)"
  rm -rf /tmp/jfm_san_refs
  env $SAN timeout -k 10 ${SMOKE_TIMEOUT:-120} python3 "$REPO/tests/gpu/sanitize_kernels.py" \
    --write-refs /tmp/jfm_san_refs > "$OUT/san_refs.log" 2>&1 \
    && export JFM_SANITIZE_REFS=/tmp/jfm_san_refs \
    || { tail -5 "$OUT/san_refs.log"; fail san-refs; }
fi
for tool in memcheck racecheck synccheck; do
  has $tool || continue
  for variant in ${SAN_VARIANTS:-ws}; do
    log "compute-sanitizer $tool ($variant): every kernel (tests/gpu/sanitize_kernels.py)"
    # No pipe: compute-sanitizer runs the target outside timeout's process group, so a killed
    # sanitizer left the target holding a `| tee` open and the call hung to its limit (twice on
    # 2026-12-01). Its log goes straight to a file, and a leftover target is killed by name.
    env $SAN JFM_KERNEL_VARIANT=$variant timeout -k 10 ${SAN_TIMEOUT:-240} compute-sanitizer \
      --tool $tool --kernel-name kns=jfm --print-limit 20 --error-exitcode 9 \
      python3 "$REPO/tests/gpu/sanitize_kernels.py" > "$OUT/${tool}_$variant.log" 2>&1
    st=$?
    pkill -9 -f "tests/gpu/sanitize_kernels.py" 2>/dev/null
    tail -8 "$OUT/${tool}_$variant.log"
    [ $st -eq 0 ] || { [ $st -ge 124 ] && echo "(timed out after ${SAN_TIMEOUT:-240} s)"; fail "$tool $variant"; }
  done
done
# This working tree's sources (no carried folders, no build dir) copied into $1, to be built there.
copy_tree() {
  tar cf - -C "$REPO" --exclude=./.whl --exclude=./.anchor --exclude=./.abase --exclude=./.git \
    --exclude=./build . | tar xf - -C "$1"
}
# Profiler kernel times (benchmarks/profile_decode.py --timeline: 10 calls in one jit, 5 traced
# runs; mean and median per kernel, and each run's span) of every TIMELINE_CASES entry
# (profile_decode.py argument strings separated by ';') on each build given as name=PYTHONPATH
# (empty: this build; name var:<v>: this build with JFM_KERNEL_VARIANT=<v>), logged to
# $OUT/<$1>_<name>.log. One long-lived process per build runs all the cases
# (benchmarks/profile_cases.py; a process per case and build took ~21 s each, the side by side
# ~1.4 s per case in one process); TL_SERVERS=0: the old loop, one process per case and build.
time_builds() {
  local stage=$1 c side name variant
  shift
  if [ "${TL_SERVERS:-1}" != 0 ]; then
    python3 "$REPO/benchmarks/profile_cases.py" drive --stage "$stage" --out "$OUT" \
      --cases "${TIMELINE_CASES:---h_q 128 --s_k 4096 --b 128}" "$@" || fail "$stage timing"
    return
  fi
  IFS=';' read -ra tl_cases <<< "${TIMELINE_CASES:---h_q 128 --s_k 4096 --b 128}"
  for c in "${tl_cases[@]}"; do
    for side in "$@"; do
      name=${side%%=*}; variant=""
      case "$name" in var:*) variant=${name#var:} ;; esac
      echo "--- $name: $c"
      env ${variant:+JFM_KERNEL_VARIANT=$variant} PYTHONPATH=${side#*=} timeout -k 5 120 \
        python3 "$REPO/benchmarks/profile_decode.py" $c --timeline 10 2>&1 \
        | tee -a "$OUT/${stage}_${name/:/_}.log" | grep -E " x |span" | cut -c1-150
    done
  done
}
# The base of stages ab / abtime, installed beside this build (once per call): the carried tree
# .abase/base.tar, or with ABASE_FROM_TREE=1 this working tree built without $CUDAFLAGS (for
# compile-time candidates switched on by CUDAFLAGS=-D... in the main build: kernels' docs).
build_base() {
  [ -d /tmp/abase/site/jax_flashmla ] && return 0
  rm -rf /tmp/abase && mkdir -p /tmp/abase/src
  if [ "${ABASE_FROM_TREE:-0}" = 1 ]; then
    copy_tree /tmp/abase/src
  else
    tar xf "$REPO/.abase/base.tar" -C /tmp/abase/src
  fi
  (cd /tmp/abase/src && env -u CUDAFLAGS python3 -m pip install -q --no-build-isolation --no-deps \
     --target /tmp/abase/site . > "$OUT/ab_build.log" 2>&1) || { fail ab-build; return 1; }
}
if has ab && { [ -f "$REPO/.abase/base.tar" ] || [ "${ABASE_FROM_TREE:-0}" = 1 ]; }; then
  log "A/B: this build against the carried base build, same cases, each in its own process"
  build_base
  # AB_ROUNDS (default 1): base, this, base, this, ...; host-side differences need several.
  for round in $(seq ${AB_ROUNDS:-1}); do
    for side in base this; do
      if [ $side = base ]; then root=/tmp/abase/src; pp=/tmp/abase/site; else root=$REPO; pp=""; fi
      echo "--- $side (round $round)"
      PYTHONPATH=$pp python3 "$root/benchmarks/bench_decode.py" --no-xla --no-loop \
        ${BENCH_AB_ARGS:-} 2>&1 | tee -a "$OUT/ab_$side.log" | tail -14
    done
  done
fi
if has abtime && { [ -f "$REPO/.abase/base.tar" ] || [ "${ABASE_FROM_TREE:-0}" = 1 ]; }; then
  # Kernel time A/B from the profiler's GPU events (time_builds): no host dispatch in the number,
  # so a few percent between the two builds is visible.
  log "A/B of kernel times (profiler events): this build against the carried base build"
  build_base && time_builds abtime base=/tmp/abase/site this=
fi
if has vartime; then
  # Runtime variants of this build (JFM_KERNEL_VARIANT), profiler kernel times as abtime:
  # TIMELINE_VARIANTS="combine_rows combine_quarters" times every TIMELINE_CASES case on the
  # default and on each, each in its own process. No rebuild.
  sides=(this=)
  for v in ${TIMELINE_VARIANTS:-}; do sides+=("var:$v="); done
  log "kernel times of runtime variants: default ${TIMELINE_VARIANTS:-(none given)}"
  time_builds vartime "${sides[@]}"
fi
if has abflags; then
  # Several compile-time candidates in one call, each against this build: AB_FLAGS is "name=CUDA
  # flags" entries separated by ';' (e.g. "nopdl=-DJFM_PDL=0;nofetch=-DJFM_PIPELINED_FP8_FETCH=0
  # -DJFM_PDL=0"). Each is this tree built with those flags into /tmp/abflags/<name>
  # (pip --target; the builds run side by side, 8 compile jobs each), smoke-checked against the
  # reference (tests/gpu/sanitize_kernels.py; not entries named probe*: timing probes whose
  # results are wrong by design), then every TIMELINE_CASES case is timed on this build and on
  # each candidate (time_builds, as abtime).
  IFS=';' read -ra ab_cfgs <<< "${AB_FLAGS:-}"
  log "A/B of compile-time candidates against this build: ${AB_FLAGS:-none given}"
  ab_names=()
  for cfg in "${ab_cfgs[@]}"; do
    name=${cfg%%=*}; flags=${cfg#*=}; ab_names+=("$name")
    rm -rf "/tmp/abflags/$name" && mkdir -p "/tmp/abflags/$name/src"
    copy_tree "/tmp/abflags/$name/src"
    (cd "/tmp/abflags/$name/src" && env -u CUDAFLAGS CMAKE_BUILD_PARALLEL_LEVEL=8 \
       SKBUILD_CMAKE_ARGS="-DCMAKE_CUDA_FLAGS=$flags" python3 -m pip install -q \
       --no-build-isolation --no-deps --target "/tmp/abflags/$name/site" . \
       > "$OUT/abflags_build_$name.log" 2>&1) &
  done
  wait
  ab_ok=(this=)
  for name in "${ab_names[@]}"; do
    if [ ! -d "/tmp/abflags/$name/site/jax_flashmla" ]; then
      tail -30 "$OUT/abflags_build_$name.log"; fail "abflags build $name"; continue
    fi
    case "$name" in probe*)  # a timing probe, wrong results by design (e.g. JFM_FP8_DEQUANT=2)
      ab_ok+=("$name=/tmp/abflags/$name/site"); continue ;;
    esac
    log "smoke of candidate $name: tests/gpu/sanitize_kernels.py"
    PYTHONPATH="/tmp/abflags/$name/site" XLA_FLAGS=--xla_gpu_autotune_level=0 \
      timeout -k 10 ${SMOKE_TIMEOUT:-120} python3 "$REPO/tests/gpu/sanitize_kernels.py" 2>&1 \
      | tee "$OUT/abflags_smoke_$name.log" | tail -2
    if [ "${PIPESTATUS[0]}" -eq 0 ]; then ab_ok+=("$name=/tmp/abflags/$name/site"); else fail "abflags smoke $name"; fi
  done
  time_builds abflags "${ab_ok[@]}"
fi
if has trace; then
  # The tile-phase probe (csrc/kernels/sm90/decode/tile_trace.cuh): needs this build with
  # CUDAFLAGS=-DJFM_TILE_TRACE=1. Each TRACE_CASES entry (profile_decode.py arguments, ';'
  # separated) runs with XLA's command buffers off (a captured launch is not traced); the third
  # launch of each kernel object is written to tile_trace.txt, then summarized per tile phase.
  case " ${CUDAFLAGS:-} " in *JFM_TILE_TRACE=1*) ;; *) echo "trace: build with CUDAFLAGS=-DJFM_TILE_TRACE=1"; fail trace ;; esac
  IFS=";" read -ra trace_cases <<< "${TRACE_CASES:---prefill 512 --s_q 4096 --h_q 64 --s_k 8192 --topk 512;--h_q 128 --s_k 4096 --b 128;--sparse v32 --h_q 128 --b 64}"
  for c in "${trace_cases[@]}"; do
    log "tile trace: $c"
    echo "# case: $c${JFM_KERNEL_VARIANT:+ (JFM_KERNEL_VARIANT=$JFM_KERNEL_VARIANT)}" >> "$OUT/tile_trace.txt"
    JFM_TILE_TRACE_FILE="$OUT/tile_trace.txt" XLA_FLAGS=--xla_gpu_enable_command_buffer= \
      timeout -k 5 120 python3 "$REPO/benchmarks/profile_decode.py" $c > "$OUT/trace_run.log" 2>&1 \
      || { tail -5 "$OUT/trace_run.log"; fail trace; }
  done
  python3 "$REPO/scripts/tile_trace.py" "$OUT/tile_trace.txt" 2>&1 | tee "$OUT/tile_trace_summary.txt"
fi
if has ncu; then
  # NCU_CASES: "name|kernel regex|profile_decode.py args[|VAR=value ...]" entries separated by
  # ';' (the optional fourth field: environment of that case, e.g. JFM_KERNEL_VARIANT=pair).
  # Besides the text sections, each case leaves ncu_<name>_sass.csv.gz: warp-stall samples per
  # SASS instruction, which tell the producer warps' stalls from the math warps' in the
  # warp-specialized kernels (WarpStateStats averages over both); read with
  # scripts/ncu_sass_stalls.py (per opcode) and scripts/ncu_stalls_by_line.py (per source line and
  # warp role, from a local -lineinfo build). More than 8 files come back only packed:
  # end the command with scripts/device_pack.sh. NCU_EXTRA: more ncu arguments for every case
  # (e.g. "--section MemoryWorkloadAnalysis_Tables": shared-memory wavefronts and bank conflicts).
  NCU_CASES=${NCU_CASES:-"sparse_v32_h128|sparse_attention_ws_kernel|--sparse v32 --h_q 128 --b 64;sparse_v32_h16|sparse_attention_ws_kernel|--sparse v32 --h_q 16 --b 64;dense_h128|dense_decode_ws_kernel|--h_q 128"}
  log "Nsight Compute: $NCU_CASES"
  IFS=';' read -ra ncu_cases <<< "$NCU_CASES"
  for entry in "${ncu_cases[@]}"; do
    IFS='|' read -r name regex pargs cenv <<< "$entry"
    env ${cenv:-} timeout 240 ncu --kernel-name regex:$regex --launch-skip 2 --launch-count 1 \
      "${NCU_ARGS[@]}" -o "/tmp/ncu_$name" -f python3 "$REPO/benchmarks/profile_decode.py" $pargs \
      > "$OUT/ncu_$name.log" 2>&1
    ncu_export "$name" "/tmp/ncu_$name.ncu-rep"
  done
fi
if has bench; then
  log "benchmarks (${BENCH_CMD:-python3 benchmarks/bench_decode.py})"
  # The stages run from /tmp (device_common.sh): BENCH_CMD's paths are relative to the repo
  # root, as GPU_TESTS' are, so each word naming a file of the repo is resolved against it
  # (2026-12-05: "python3 benchmarks/x.py" was not found).
  bench_cmd=()
  for w in ${BENCH_CMD:-}; do
    if [[ $w != /* && -f "$REPO/$w" ]]; then bench_cmd+=("$REPO/$w"); else bench_cmd+=("$w"); fi
  done
  [ ${#bench_cmd[@]} -gt 0 ] || bench_cmd=(python3 "$REPO/benchmarks/bench_decode.py" --out "$OUT/bench.json")
  "${bench_cmd[@]}" 2>&1 \
    | tee "$OUT/bench.log" | tail -40
  [ "${PIPESTATUS[0]}" -eq 0 ] || fail bench
fi
if has example; then
  log "main job: quickstart and the DeepSeek decode example (V3, V3.2 sparse) on the GPU"
  python3 "$REPO/examples/quickstart.py" --batch 64 --seqlen 4096 --heads 128 2>&1 | tee "$OUT/example.log" \
    || fail example
  for flags in "" "--fp8" "--sparse --fp8"; do
    python3 "$REPO/examples/deepseek_decode.py" $flags 2>&1 | tee -a "$OUT/example.log" | tail -6
    [ "${PIPESTATUS[0]}" -eq 0 ] || fail "example $flags"
  done
fi
log "done (rc $rc)"
exit $rc
