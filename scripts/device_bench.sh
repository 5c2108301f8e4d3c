#!/usr/bin/env bash
# Side-by-side benchmark against upstream FlashMLA, one device call (benchmarks/side_by_side.py).
#
# Once per checkout (upstream's prebuilt package travels in an ignored folder):
#   mkdir -p .anchor && cp /work/shared/anchor/flashmla_site.tgz .anchor/
#   echo /.anchor/ >> .git/info/exclude
# Then, from the repo root, through the device tool:
#   run(command="SUITES='dense sparse_decode' bash scripts/device_bench.sh", carry=[".whl", ".anchor"])
#
# Knobs (environment):
#   SUITES   dense | sparse_decode | sparse_prefill | all, space-separated (default: dense)
#   QUICK=1  a representative subset of each suite, 10 calls x 5 rounds (~1-2 min with the build)
#   CASES    only cases whose name contains one of these comma-separated substrings
#   OURS_MAX_SECONDS  ours: a case whose first (compiling) call takes longer is not timed (default 30)
#   CASE_TIMEOUT      a worker stuck this long on one case is killed and restarted after it (300)
#   IN_ONE_CALL=K  every case: also time K calls as one unit per side (one jit / one CUDA
#            graph): GPU time per call without a host dispatch per call (small batches);
#            JFM_SBS_K_UNITS=N: N such units per timed round on both sides (default 20)
#   XLA=1    also time plain XLA on 4 dense cases;  LOOP=1  also the 61-layer loop (bench_decode.py;
#            LOOP_CASES="64x4096,2x4096": its batch x length cases, with the GPU's busy time per step)
#   VARIANTS kernel variants of ours to time too, ours only, same inputs (VARIANTS="pair v1":
#            JFM_KERNEL_VARIANT=pair, the FP8 CTA pairs; v1, the kernels before the warp-specialized);
#            benchmarks/sbs_variants.py prints them beside FlashMLA
#   JFM_SBS_HEAT_S=S  both sides run each case S seconds untimed before each timing (back to
#            back and in one unit), so a short case meets the power limiter's steady clock, not
#            the boost clock after an idle gap (docs/BUILDING.md, sixty-first session; try 2)
#   PROFILE=N  after the side by side: our N back-to-back calls of each case under the profiler
#            (kernel time, GPU gaps, span per call: sbs_ours.py --profile), in $OUT/profile.txt
#   STAGES   "build" (default) rebuilds our package; STAGES=" " reuses the one installed on a warm
#            machine
#   SMI_MS=N the GPU's SM clock, power, temperature and clock-event reasons sampled every N ms
#            during the side-by-side run (nvidia-smi, $OUT/smi.csv), and bench.log's lines
#            time-stamped; with IN_ONE_CALL, a table of each side's mean clock, power and
#            power-capped share over its in-one-unit timing window (side_by_side.py --smi).
#            With IN_ONE_CALL the workers also read NVML's energy counter around each window
#            (pynvml, on the device image), and that table's energy per call comes from it
#            (trusted from 2 s windows on: raise JFM_SBS_K_UNITS), even without SMI_MS
# Everything lands flat in $OUT: build.log, bench.log, side_by_side.json, side_by_side.png
# (+ loop.json with LOOP=1). Time: dense ~2-3 min after the build; QUICK=1 all suites ~1-2 min.
set -uo pipefail
STAGES=${STAGES:-"build"}
SUITES=${SUITES:-dense}
WORK=/tmp/sbs_work
ARGS=(--suite $SUITES --work "$WORK" --keep-work)
[ "${QUICK:-0}" = 1 ] && ARGS+=(--quick)
[ -n "${CASES:-}" ] && ARGS+=(--cases "$CASES")
[ -n "${IN_ONE_CALL:-}" ] && ARGS+=(--in-one-call "$IN_ONE_CALL")
OUT=${OUT:-/tmp/jfm-out}; mkdir -p "$OUT"

# The inputs are made on the CPU (numpy + our FP8 quantizer from the source tree) while the
# package builds.
( JAX_PLATFORMS=cpu PYTHONPATH="$(pwd)" python3 benchmarks/side_by_side.py "${ARGS[@]}" \
    --prepare-only --out "$OUT" > /tmp/sbs_prepare.log 2>&1 ) &
PREP=$!

source scripts/device_common.sh   # banner, build, then cd /tmp (import the installed package)

log "upstream FlashMLA from .anchor/flashmla_site.tgz"
if [ ! -f "$REPO/.anchor/flashmla_site.tgz" ]; then
  echo "missing $REPO/.anchor/flashmla_site.tgz: copy it from /work/shared/anchor/ and carry .anchor"
  UPSTREAM=off
else
  mkdir -p /tmp/site && tar xzf "$REPO/.anchor/flashmla_site.tgz" -C /tmp/site
  if PYTHONPATH=/tmp/site python3 -c "import torch, flash_mla; print('torch', torch.__version__, 'flash_mla', flash_mla.__file__)"; then
    UPSTREAM=on
  else
    echo "flash_mla does not import (torch changed? rebuild from flashmla_src.tgz, anchor/README.md)"
    UPSTREAM=off
  fi
fi

wait $PREP; tail -3 /tmp/sbs_prepare.log

log "side by side: $SUITES${QUICK:+ (QUICK=$QUICK)}"
stamp() { if [ -n "${SMI_MS:-}" ]; then while IFS= read -r l; do echo "$(date +%T.%3N) $l"; done; else cat; fi; }
if [ -n "${SMI_MS:-}" ]; then
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active \
    --format=csv -lms "$SMI_MS" > "$OUT/smi.csv" 2>&1 &
  SMI=$!
fi
# /tmp/site only: the source tree must not shadow the installed package (its kernels).
PYTHONPATH=/tmp/site python3 "$REPO/benchmarks/side_by_side.py" "${ARGS[@]}" --out "$OUT" \
  --upstream $UPSTREAM --ours-max-seconds "${OURS_MAX_SECONDS:-30}" \
  --case-timeout "${CASE_TIMEOUT:-300}" $([ "${XLA:-0}" = 1 ] && echo --xla) \
  ${SMI_MS:+--smi "$OUT/smi.csv"} 2>&1 | stamp | tee "$OUT/bench.log" | grep -vE "^([0-9:.]+ )?\[(ours|flashmla)\] " | tail -120
rc=${PIPESTATUS[0]}
[ -n "${SMI:-}" ] && kill "$SMI" 2>/dev/null

# VARIANTS: kernel variants of ours timed again on the same inputs, ours only, each switched on
# through JFM_KERNEL_VARIANT (pair: the FP8 CTA pairs; v1: the kernels before the warp-specialized ones).
VARIANT_JSONS=()
for v in ${VARIANTS:-}; do
  log "variant $v: ours again with JFM_KERNEL_VARIANT=$v"
  JFM_KERNEL_VARIANT=$v PYTHONPATH=/tmp/site python3 "$REPO/benchmarks/side_by_side.py" \
    "${ARGS[@]}" --out "$OUT/$v" --upstream off --ours-max-seconds "${OURS_MAX_SECONDS:-30}" \
    --case-timeout "${CASE_TIMEOUT:-300}" > "$OUT/bench_$v.log" 2>&1 || rc=1
  VARIANT_JSONS+=("$v=$OUT/$v/side_by_side.json")
done
if [ ${#VARIANT_JSONS[@]} -gt 0 ]; then
  python3 "$REPO/benchmarks/sbs_variants.py" "$OUT/side_by_side.json" "${VARIANT_JSONS[@]}" 2>&1 \
    | tee "$OUT/variants.txt"
fi

if [ "${LOOP:-0}" = 1 ]; then
  log "61-layer loop (${LOOP_CASES:-64x4096})"
  python3 "$REPO/benchmarks/bench_decode.py" --loop-only --loop-cases "${LOOP_CASES:-64x4096}" \
    --out "$OUT/loop.json" 2>&1 | grep -E "layer step|Error"
fi
if [ -n "${PROFILE:-}" ]; then
  # PROFILE=N: our side's N back-to-back calls of each case under the profiler (sbs_ours.py
  # --profile: kernel time, GPU gaps, span per call), on the inputs just timed.
  log "ours, $PROFILE back-to-back calls per case under the profiler"
  python3 "$REPO/benchmarks/sbs_ours.py" --work "$WORK" --profile "$PROFILE" 2>&1 \
    | grep -v "kernels_available" | tee "$OUT/profile.txt"
fi
rm -rf "$WORK"
log "done (rc $rc)"
exit $rc
