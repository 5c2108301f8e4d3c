#!/usr/bin/env bash
# The one device call: install (building the CUDA extension against the device's jaxlib), run the
# whole test suite on GPU jax, then GPU-only tests and benchmarks. Logs go to $OUT.
# Run through the device tool from the repo root, carrying the nvidia-cutlass wheel:
#   run(command="bash scripts/device_check.sh", carry=[".whl"])
# Stages can be chosen: STAGES="build cpu-suite gpu memcheck ncu bench example" (default: all).
# A short session-closing check (~7 min on an H100): STAGES="build cpu-suite example".
set -uo pipefail
STAGES=${STAGES:-"build cpu-suite gpu memcheck ncu bench example"}
source scripts/device_common.sh

if has cpu-suite; then
  log "whole test suite on GPU jax"
  # SUITE_TESTS narrows it (paths relative to the repo root), e.g. to re-run failures.
  python3 -m pytest -q -p no:cacheprovider -rf $(printf "$REPO/%s " ${SUITE_TESTS:-tests}) \
    --ignore="$REPO/tests/gpu" 2>&1 \
    | tee "$OUT/suite.log" | tail -15
fi
if has gpu; then
  log "GPU tests"
  XLA_FLAGS=--xla_gpu_autotune_level=0 timeout ${GPU_TIMEOUT:-360} python3 -m pytest -q -p no:cacheprovider --tb=short -rf --maxfail=${GPU_MAXFAIL:-5} -m gpu "$REPO/tests/gpu" 2>&1 \
    | tee "$OUT/gpu.log" | grep -vE "^(tests|/)" | tail -40
fi
if has memcheck; then
  log "compute-sanitizer memcheck, dense decode subset (our kernels only)"
  XLA_FLAGS=--xla_gpu_autotune_level=0 XLA_PYTHON_CLIENT_ALLOCATOR=platform \
    timeout ${MEMCHECK_TIMEOUT:-150} compute-sanitizer --tool memcheck \
    --kernel-name kns=jfm --print-limit 20 \
    python3 "$REPO/tests/gpu/memcheck_dense_decode.py" 2>&1 | tee "$OUT/memcheck.log" | tail -12
fi
if has ncu; then
  log "Nsight Compute: dense decode main kernel, h_q 128 and h_q 16 (b 128, s_k 4096 varlen)"
  for hq in 128 16; do
    timeout 150 ncu --kernel-name regex:dense_decode_v --launch-skip 2 --launch-count 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
      --section SchedulerStats --section Occupancy \
      --metrics "dram__bytes_read.sum,lts__t_sector_hit_rate.pct,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_elapsed,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
      python3 "$REPO/benchmarks/profile_decode.py" --h_q $hq > "$OUT/ncu_h$hq.txt" 2>&1
    grep -E "Duration|DRAM Throughput|dram__bytes_read|hit_rate|gmma|Memory Throughput|Compute \(SM\)|Warp Cycles|No Eligible|L2 Hit|stalled_(barrier|long|wait|math|mio|short|lg|membar|sleeping|dispatch|no_inst|not_sel|selected)|==ERR|rror" "$OUT/ncu_h$hq.txt" | head -45
  done
fi
if has bench && [ -f "$REPO/benchmarks/bench_decode.py" ]; then
  log "benchmarks"
  python3 "$REPO/benchmarks/bench_decode.py" ${BENCH_ARGS:-} --out "$OUT/bench.json" 2>&1 \
    | tee "$OUT/bench.log" | tail -40
fi
if has example; then
  log "main job: DeepSeek decode example on the GPU, then its profile trace"
  python3 "$REPO/examples/quickstart.py" --batch 64 --seqlen 4096 --heads 128 2>&1 | tee "$OUT/example.log"
  python3 "$REPO/examples/deepseek_decode.py" 2>&1 | tee -a "$OUT/example.log" | tail -8
  python3 "$REPO/examples/deepseek_decode.py" --max-new-tokens 8 --profile /tmp/jfm-trace \
    > /dev/null 2>&1 && python3 - <<'PY' 2>&1 | tee -a "$OUT/example.log"
import glob, gzip, re
names = {}
for f in glob.glob("/tmp/jfm-trace/**/*.trace.json.gz", recursive=True):
    for m in re.findall(rb'jax_flashmla_[a-z_]+|layer_[0-9]+/attention', gzip.open(f).read()):
        names[m.decode()] = names.get(m.decode(), 0) + 1
print("trace events by name:", dict(sorted(names.items())) or "NONE FOUND")
PY
fi
log "done"
